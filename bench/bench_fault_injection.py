"""Fault injection: SIGKILL a process while it overwrites an adapter folder, then load the folder.

Issue 13: `splice.save(..., overwrite=True)` used to rewrite adapter_config.json in place and then
the weights, so a kill in between left the new config next to the old weights: a folder that loads
without an error and gives wrong outputs. Now every folder is written into a temporary sibling and
swapped in whole (`splice.io.files.atomic_directory`). This counts what a kill leaves, both ways.

How. A server process (fault_injection_server.py) imports splice once and holds two versions of one
LoRA on a tiny MLP (64-256-256-16; LoRA r=16 on its three Linears, 70 KB of weights): A with alpha
16, B with alpha 32 and other random factors, so that one's config with the other's weights gives
outputs unlike both. It also writes each version once, cleanly, as the reference. For each kill it
forks a child that overwrites one folder with A, B, A, B, ... (`overwrite=True`) as fast as it can;
once the child's first save has begun, this process waits a random 0 to `delay` save durations, SIGKILLs
the child, and loads the folder (`splice.load`) onto a fresh copy of the base model. Every
`fresh_every`-th kill starts with no folder (a fresh save). The outcome is judged against the save
in flight when the kill landed (the child counts its finished saves in shared memory):

  old       outputs bit-identical to the folder before that save (no folder, for a fresh save)
  new       outputs bit-identical to the version that save was writing
  refused   `splice.load` raised a SpliceError (e.g. a config with no weights file next to it)
  mixed     it loaded, and the outputs are neither: a config/weights mixture
  other     anything else was raised (what a user sees as a raw traceback)

After a refused, mixed or other outcome the writer itself rewrites the folder once (no kill), so
the next kill again starts from a known version. Leftovers are counted after each kill (the
`.adapter.splice-tmp-*` / `-old-*` siblings; files other than the two in the folder, such as
safetensors' `.tmp*`), and once more after one clean save by the same writer at the end.

Writers:
  before    the code at HEAD~3 (copied here): `prepare_output_dir`, then adapter_config.json
            rewritten in place, then the weights with safetensors' `save_file`
  after     `splice.save(model, folder, overwrite=True)` as it is now

    .venv/bin/python bench/bench_fault_injection.py              # 500 kills per writer, ~1-2 min on 2 cores
    .venv/bin/python bench/bench_fault_injection.py --quick      # 50 kills per writer (smoke run)
    .venv/bin/python bench/bench_fault_injection.py --render bench/results/fault_injection.json

Results: bench/results/fault_injection.{json,md} (`fault_injection_quick` for --quick). The harness
(`FaultInjection`) is also what tests/reliability/test_atomic_writes.py runs (60 kills, slow suite).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

OUTCOMES = ("old", "new", "refused", "mixed", "other")
WRITERS = ("before", "after")
VERSIONS = {"A": (16.0, 1), "B": (32.0, 2)}  # alpha, seed of the random factors
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
CARD = "README.md"  # the model card splice.save writes beside them
MANIFEST = "splice_manifest.json"  # and its provenance manifest
SERVER = Path(__file__).resolve().with_name("fault_injection_server.py")


# -- the adapter and the two writers ------------------------------------------------------------


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 16)).eval()


def adapter_model(version: str) -> nn.Module:
    """The base with LoRA version A or B attached, factors random (B = 0 would hide mixtures)."""
    import splice

    alpha, seed = VERSIONS[version]
    model = splice.attach(base_model(), splice.LoRA(r=16, alpha=alpha, targets=["0", "2", "4"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(splice.trainable_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def inputs() -> torch.Tensor:
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(3))


def head3_save(config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> None:
    """`splice.save(model, path, overwrite=True)` of a LoRA as HEAD~3 wrote it (its
    prepare_output_dir, write_config and write_weights, from `git show HEAD~3:src/splice/io/files.py`)."""
    from safetensors.torch import save_file

    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})


def leftovers(folder: Path) -> list[str]:
    """Temporaries next to the folder and files in it other than the adapter's two, its card and
    its manifest."""
    found = [p.name for p in folder.parent.glob(f".{folder.name}.*")]
    if folder.is_dir():
        found += [f"{folder.name}/{p.name}" for p in folder.iterdir()
                  if p.name not in (CONFIG, WEIGHTS, CARD, MANIFEST)]
    return sorted(found)


# -- the killing side ---------------------------------------------------------------------------


@dataclass
class Round:
    fresh: bool
    saves: int  # saves the child finished before the kill
    outcome: str
    detail: str
    leftovers: int


def outputs(folder: Path, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import splice

    model = splice.load(copy.deepcopy(base), folder)
    with torch.no_grad():
        return model(x)


def judge(folder: Path, base: nn.Module, x: torch.Tensor, expected: dict[str, torch.Tensor], before: str | None,
          writing: str) -> tuple[str, str]:
    """The outcome of loading `folder` and its detail: `before` is the version the folder held
    before the save in flight (None: no folder), `writing` the version that save was writing."""
    from splice.core.errors import SpliceError

    try:
        found = outputs(folder, base, x)
    except SpliceError as err:
        if before is None and not folder.exists():
            return "old", "no folder, as before the fresh save"
        return "refused", f"{type(err).__name__}: {err}"
    except Exception as err:
        return "other", f"{type(err).__name__}: {err}"
    if before is not None and torch.equal(found, expected[before]):
        return "old", ""
    if torch.equal(found, expected[writing]):
        return "new", ""
    return "mixed", "loaded, with outputs of neither version"


class FaultInjection:
    """Kills of a `writer` ("before" or "after") overwriting `root`/adapter, judged by loading it."""

    def __init__(self, root: Path, writer: str, *, seed: int = 0, delay: float = 2.5) -> None:
        self.writer, self.delay = writer, delay
        self.folder = Path(root) / "adapter"
        self.server = subprocess.Popen([sys.executable, str(SERVER), writer, str(self.folder)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.save_s = self._read()["save_s"]
        self.base, self.x = base_model(), inputs()
        self.expected = {v: outputs(self.folder.parent / f"reference-{v}", self.base, self.x) for v in VERSIONS}
        if torch.equal(*self.expected.values()):
            raise RuntimeError("versions A and B give the same outputs: mixtures could not be seen")
        self.rng = random.Random(seed)
        self.first_saves: list[float] = []  # durations of children's first saves (slower than warm ones)
        self.state: str | None = None  # the version the folder holds (None: no folder)
        self.rounds: list[Round] = []

    def kill(self, fresh: bool = False) -> Round:
        if fresh:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.state = None
        elif self.state is None:
            self._save("A")
        order = ["B", "A"] if self.state == "A" else ["A", "B"]
        pid = self._send(f"kill {order[0]}")["pid"]
        typical = statistics.median(self.first_saves[-50:]) if self.first_saves else self.save_s
        time.sleep(self.rng.uniform(0.0, self.delay * typical))
        os.kill(pid, signal.SIGKILL)
        ended = self._read()
        if ended["signal"] != signal.SIGKILL:
            raise RuntimeError(f"the writing child was not killed but ended with {ended}: its saves fail")
        saves = ended["saves"]
        if ended["first_s"]:
            self.first_saves.append(ended["first_s"])
        before = self.state if saves == 0 else order[(saves - 1) % 2]
        outcome, detail = self.judge(before, order[saves % 2])
        self.rounds.append(Round(fresh, saves, outcome, detail, len(leftovers(self.folder))))
        self.state = {"old": before, "new": order[saves % 2]}.get(outcome)
        if outcome not in ("old", "new"):
            self._save("A")  # a known version again (in before's case, over the damaged folder)
        return self.rounds[-1]

    def judge(self, before: str | None, writing: str) -> tuple[str, str]:
        return judge(self.folder, self.base, self.x, self.expected, before, writing)

    def finish(self) -> list[str]:
        """One clean save by the writer, then what is left next to and in the folder."""
        self._save("A")
        return leftovers(self.folder)

    def close(self) -> None:
        if self.server.poll() is None:
            self.server.stdin.close()
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()

    def __enter__(self) -> FaultInjection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def counts(self) -> dict[str, int]:
        found = Counter(r.outcome for r in self.rounds)
        return {"kills": len(self.rounds), **{o: found[o] for o in OUTCOMES}}

    def _save(self, version: str) -> None:
        self._send(f"save {version}")
        self.state = version

    def _send(self, command: str) -> dict[str, Any]:
        self.server.stdin.write(command + "\n")
        self.server.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.writer} server died (exit {self.server.wait()}); its stderr is above")
        return json.loads(line)


def inject(root: Path, writer: str, kills: int, *, fresh_every: int = 10, seed: int = 0,
           delay: float = 2.5) -> dict[str, Any]:
    """`kills` kills of `writer`, every `fresh_every`-th one during a fresh save; counts and details."""
    started = time.perf_counter()
    with FaultInjection(root, writer, seed=seed, delay=delay) as run:
        for i in range(kills):
            run.kill(fresh=fresh_every > 0 and i % fresh_every == fresh_every - 1)
        final = run.finish()
    details: dict[str, list[str]] = {}
    for r in run.rounds:
        detail = r.detail.replace(str(run.folder), "<adapter>")
        if detail and r.outcome != "old" and len(details.setdefault(r.outcome, [])) < 5 \
                and detail not in details[r.outcome]:
            details[r.outcome].append(detail)
    fresh = [r for r in run.rounds if r.fresh and r.saves == 0]  # the kill landed in the fresh save itself
    return {**run.counts(), "fresh_rounds": sum(r.fresh for r in run.rounds), "fresh_save_kills": len(fresh),
            "fresh": dict(Counter(r.outcome for r in fresh)),
            "rounds_with_leftovers": sum(r.leftovers > 0 for r in run.rounds),
            "save_ms": run.save_s * 1e3,
            "first_save_ms": statistics.median(run.first_saves) * 1e3 if run.first_saves else None,
            "saves_before_kill": dict(sorted(Counter(r.saves for r in run.rounds).items())),
            "leftovers_after_kill_max": max((r.leftovers for r in run.rounds), default=0),
            "leftovers_after_kill_mean": statistics.fmean(r.leftovers for r in run.rounds) if run.rounds else 0.0,
            "leftovers_after_final_save": final, "details": details, "seconds": time.perf_counter() - started}


# -- the benchmark ------------------------------------------------------------------------------


@dataclass
class Settings:
    kills: int = 500
    writers: list[str] = field(default_factory=lambda: list(WRITERS))
    fresh_every: int = 10
    delay: float = 2.5
    seed: int = 0
    threads: int = 1
    quick: bool = False

    @classmethod
    def quick_run(cls, **overrides: Any) -> Settings:
        return cls(kills=50, quick=True, **overrides)


def run(s: Settings) -> dict[str, Any]:
    import tempfile

    from common import Phases, environment, finish

    from splice.io import files

    torch.set_num_threads(s.threads)
    phase = Phases()
    result: dict[str, Any] = {"settings": asdict(s), "environment": environment(s.threads), "writers": {}}
    result["environment"]["rename_exchange"] = bool(files._load_renameat2())
    for writer in s.writers:
        phase(f"{s.kills} kills of the {writer} writer")
        with tempfile.TemporaryDirectory(prefix="fault-injection-", dir=Path(__file__).parent) as root:
            result["writers"][writer] = inject(Path(root), writer, s.kills, fresh_every=s.fresh_every, seed=s.seed,
                                               delay=s.delay)
        print("  " + ", ".join(f"{k} {result['writers'][writer][k]}" for k in ("kills", *OUTCOMES)), flush=True)
    return finish(result, phase, keys=("phase_seconds", "total_s"))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    from common import bench_parser, settings_from

    p = bench_parser(__doc__, "50 kills per writer (smoke run)")
    p.add_argument("--kills", type=int, help="kills per writer")
    p.add_argument("--writers", nargs="+", choices=WRITERS, help="subset of writers")
    p.add_argument("--seed", type=int, help="seed of the kill times")
    args = p.parse_args(argv)
    return args, settings_from(args, Settings)


def main(argv: list[str] | None = None) -> None:
    from common import bench_main
    from fault_injection_report import markdown  # it imports this module: imported only here

    bench_main(argv, parse_args, Settings, lambda s, args: run(s), markdown, "fault_injection")


if __name__ == "__main__":
    main()
