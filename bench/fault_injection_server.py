"""bench_fault_injection.py's server: `python fault_injection_server.py WRITER FOLDER` imports splice
once, holds versions A and B of the adapter and, on command, forks a child that overwrites FOLDER
with them alternately until it is killed (bench_fault_injection.py's docstring has the protocol)."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_fault_injection import CONFIG, VERSIONS, WEIGHTS, adapter_model, head3_save

# -- the server: one import of splice, one fork per kill ----------------------------------------


def serve(writer: str, folder: Path) -> None:
    """Commands on stdin, one JSON reply per line on stdout:
    `kill V` forks a child saving V, then the other version, alternately, replies {"pid"} once
    the child's first save began and {"saves", "first_s", "signal", "exit"} once the child is dead
    (first_s: how long its first save took, 0 if it did not finish);
    `save V` saves V once, here; EOF ends."""
    torch.set_num_threads(1)  # no thread pool to inherit across fork
    from safetensors.torch import load_file

    import splice

    models = {v: adapter_model(v) for v in VERSIONS}
    for v, model in models.items():
        splice.save(model, folder.parent / f"reference-{v}", overwrite=True)
    if writer == "after":
        def save(version: str) -> None:
            splice.save(models[version], folder, overwrite=True)
    else:
        files = {v: (json.loads((folder.parent / f"reference-{v}" / CONFIG).read_text()),
                     load_file(str(folder.parent / f"reference-{v}" / WEIGHTS))) for v in VERSIONS}

        def save(version: str) -> None:
            head3_save(*files[version], folder)

    durations = []
    for i in range(8):
        started = time.perf_counter()
        save("AB"[i % 2])
        durations.append(time.perf_counter() - started)
    shutil.rmtree(folder)
    reply({"save_s": statistics.median(durations)})
    shared = mmap.mmap(-1, 24)  # [began, saves finished, first save's ns], shared with the forked child
    for line in sys.stdin:
        command, version = line.split()
        if command == "save":
            save(version)
            reply({"saved": version})
            continue
        shared[:] = bytes(24)
        pid = os.fork()
        if pid == 0:
            _child(save, version, shared)
        deadline = time.monotonic() + 10
        while not struct.unpack_from("q", shared, 0)[0] and time.monotonic() < deadline:
            time.sleep(0.0002)
        reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        reply({"saves": struct.unpack_from("q", shared, 8)[0], "first_s": struct.unpack_from("q", shared, 16)[0] / 1e9,
               "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
               "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None})


def _child(save: Any, first: str, shared: mmap.mmap) -> None:
    """Overwrite the folder with `first`, the other version, `first`, ... until killed (20 s at most)."""
    code = 0
    try:
        order = [first, "B" if first == "A" else "A"]
        struct.pack_into("q", shared, 0, 1)
        started = time.perf_counter_ns()
        deadline, done = time.monotonic() + 20, 0
        while time.monotonic() < deadline:
            save(order[done % 2])
            done += 1
            if done == 1:
                struct.pack_into("q", shared, 16, time.perf_counter_ns() - started)
            struct.pack_into("q", shared, 8, done)
    except BaseException:
        code = 3
    finally:
        os._exit(code)


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    serve(sys.argv[1], Path(sys.argv[2]))
