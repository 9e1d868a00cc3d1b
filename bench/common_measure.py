"""Paired interleaved timing and its statistics, garbage-collector and malloc control, memory
readings and memory children, fresh-subprocess runs and worker pools that survive a failing run:
the measuring half of the bench harness (bench/common.py re-exports all of it)."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, as_completed, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# -------------------------------------------------------------------------- paired timing core


def _nothing() -> None:
    return None


@dataclass
class Candidate:
    """One thing to time: `run(setup())`; only `run` is on the clock (setup builds fresh inputs,
    e.g. a copy of the base model for attach/load, outside the measurement)."""

    name: str
    run: Callable[[Any], object]
    setup: Callable[[], Any] = _nothing


@dataclass
class Sample:
    wall: float
    cpu: float


@contextmanager
def quiet_gc() -> Iterator[None]:
    """No garbage-collector pause inside a timed call (as `timeit` does), and cheap collections
    between calls: objects that already exist are frozen out of the collector's view (a full
    collection over transformers' object graph takes ~0.3 s here), so only what the rounds
    create (copies of models, which hold reference cycles) is examined."""
    gc.collect()
    gc.freeze()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def interleaved(candidates: list[Candidate], rounds: int, warmup: int) -> dict[str, list[Sample]]:
    """Run every candidate once per round, rotating which goes first (ABC -> ABC, BCA, CAB, ...).

    Slow drifts of the machine then hit all candidates of a round alike, so per-round ratios
    cancel them; the first `warmup` rounds are run but not recorded.
    """
    samples: dict[str, list[Sample]] = {c.name: [] for c in candidates}
    with quiet_gc():
        for i in range(warmup + rounds):
            k = i % len(candidates)
            for c in candidates[k:] + candidates[:k]:
                arg = c.setup()
                wall, cpu = time.perf_counter(), time.process_time()
                c.run(arg)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                del arg
                gc.collect()
                if i >= warmup:
                    samples[c.name].append(Sample(wall, cpu))
    return samples


def absolute(samples: list[Sample]) -> dict[str, float]:
    walls = [s.wall for s in samples]
    return {"min_s": min(walls), "median_s": float(np.median(walls)),
            "cpu_median_s": float(np.median([s.cpu for s in samples])), "n": len(walls)}


def ratio(samples: dict[str, list[Sample]], num: str, den: str) -> dict[str, float]:
    """Median and quartiles of the per-round ratios num/den (wall time), plus the CPU-time median."""
    walls = np.array([a.wall / b.wall for a, b in zip(samples[num], samples[den], strict=True)])
    cpus = np.array([a.cpu / b.cpu for a, b in zip(samples[num], samples[den], strict=True) if b.cpu > 0])
    q1, median, q3 = np.percentile(walls, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1),
            "cpu_median": float(np.median(cpus)) if len(cpus) else float("nan"), "n": len(walls)}


def compare(samples: dict[str, list[Sample]], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    return {"absolute": {name: absolute(s) for name, s in samples.items()},
            "ratios": {f"{a}/{b}": ratio(samples, a, b) for a, b in pairs}}


def versus_baseline(candidates: list[Candidate], baseline: str, rounds: int, warmup: int,
                    phase: Callable[[str], None], what: str) -> dict[str, Any]:
    """{"timing": `compare`} of every candidate against `baseline`, `rounds` interleaved rounds after
    `warmup`; {} when there is nothing to compare (the baseline or every other candidate failed to
    build). `what` names the candidates in the phase line."""
    names = [c.name for c in candidates]
    if baseline not in names or len(names) < 2:
        return {}
    phase(f"[step time] {rounds} interleaved rounds of {len(names)} {what}")
    samples = interleaved(candidates, rounds, warmup)
    return {"timing": compare(samples, [(n, baseline) for n in names if n != baseline])}


def overheads(samples: dict[str, list[Sample]], base: str, clock: str = "wall") -> dict[str, np.ndarray]:
    """Per-round relative overhead of every candidate over `base`: (t - t_base) / t_base, with t
    the wall time or (clock="cpu") the process CPU time."""
    t0 = np.array([getattr(s, clock) for s in samples[base]])
    return {name: np.array([getattr(s, clock) for s in ss]) / t0 - 1 for name, ss in samples.items() if name != base}


def quartiles(values: np.ndarray) -> dict[str, float]:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "n": len(values)}


def median_ratio_ci(num: np.ndarray, den: np.ndarray, reps: int = 2000, seed: int = 0) -> dict[str, float]:
    """median(num) / median(den) for paired per-round values, with a 95% bootstrap interval
    (rounds resampled together). nan where the denominator's median is not positive."""
    point = float(np.median(num) / np.median(den)) if np.median(den) > 0 else float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(reps, len(num)))
    dens = np.median(den[idx], axis=1)
    boot = np.median(num[idx], axis=1)[dens > 0] / dens[dens > 0]
    lo, hi = np.percentile(boot, [2.5, 97.5]) if len(boot) else (float("nan"), float("nan"))
    return {"value": point, "ci95_low": float(lo), "ci95_high": float(hi), "reps": reps}


# ------------------------------------------------------------------------------- peak memory


MB = 2**20
# The memory children's malloc: a fixed 64 KiB mmap threshold makes every tensor buffer its own
# mapping, returned to the OS when freed, so RSS follows live memory and a step's RSS increase does
# not depend on what the allocator kept from earlier steps (bench/README.md).
RSS_FOLLOWS_LIVE = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed memory in the process instead of returning it to the OS.

    By default, large buffers are mmap-ed and the heap top is trimmed on free, so every forward
    pass faults its activation pages in anew; on this VM that page-fault churn was the largest
    source of timing noise (3x the system time, twice the spread of per-round overheads).
    M_MMAP_THRESHOLD 32 MiB (the maximum), M_TRIM_THRESHOLD 2 GiB and M_TOP_PAD 256 MiB make
    buffers be reused instead. Same process, same allocator for every candidate; returns False
    where mallopt is not available (not glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(mallopt(option, value) == 1 for option, value in (
        (m_mmap_threshold, 32 * 2**20), (m_trim_threshold, 2**31 - 1), (m_top_pad, 256 * 2**20)))


def proc_status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in MB; None off Linux."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    line = next((x for x in status.read_text().splitlines() if x.startswith(key + ":")), None)
    return int(line.split()[1]) / 1024 if line else None


def memory_marks() -> dict[str, float]:
    """Peak resident set of this process so far, in MB, read two ways.

    `ru_maxrss` (getrusage) is kept across execve on Linux, so a child spawned by a large parent
    starts with the parent's peak; that is why parents run their memory children before they
    load any model. `VmHWM` (/proc/self/status) belongs to the current address space and starts
    fresh at exec, so it is exact even then; both are recorded and should agree at the peak.
    """
    marks = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    hwm = proc_status_mb("VmHWM")
    if hwm is not None:
        marks["vmhwm_mb"] = hwm
    return marks


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM, and with it ru_maxrss) to the current RSS
    by writing "5" to /proc/self/clear_refs (Linux >= 4.0). Returns whether the reset took."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    hwm, rss = proc_status_mb("VmHWM"), proc_status_mb("VmRSS")
    return hwm is not None and rss is not None and hwm - rss < 1.0


@contextmanager
def saved_for_backward(exclude: set[int] | None = None) -> Iterator[dict[str, int]]:
    """Total the bytes of the tensors autograd saves for backward inside the block.

    Counted once per storage (a tensor saved by several nodes, or views of one buffer, count
    once), excluding the storages in `exclude` (pass `parameter_storages(model)`: weights exist
    anyway): what is left is the activation memory the backward needs, deterministic and
    independent of the allocator. Yields a dict that holds {"bytes", "tensors"} after the block.
    """
    skip = exclude or set()
    seen: dict[int, int] = {}
    out = {"bytes": 0, "tensors": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        for storage in storages(t):
            key = storage.data_ptr()
            if key not in skip and key not in seen:
                seen[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"], out["tensors"] = sum(seen.values()), len(seen)


def storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages holding a tensor's data: its own, or a wrapper subclass's inner tensors' (a torchao
    NF4 weight has no storage of its own, only its codes and scales)."""
    if hasattr(t, "__tensor_flatten__"):
        return [s for name in t.__tensor_flatten__()[0] for s in storages(getattr(t, name))]
    return [t.untyped_storage()]


def parameter_storages(model: nn.Module) -> set[int]:
    return {s.data_ptr() for t in [*model.parameters(), *model.buffers()] for s in storages(t)}


def step_memory(model: nn.Module, batch: dict[str, torch.Tensor], step: Callable[[], object],
                after_import: dict[str, float], steps: int = 1, detail: bool = False) -> dict[str, Any]:
    """What training steps cost in memory, read inside a fresh memory child whose model, adapter and
    optimizer are set up: a seeded warm-up `step()` (it creates the gradients and the optimizer
    state), the RSS high-water mark reset, `steps` measured steps, then one forward under
    `saved_for_backward` to total the activation bytes.

    Returns the bytes saved for backward, whether the reset worked, the step increase (VmHWM during
    the steps minus the RSS before them), the peak and the readings after imports (`after_import`,
    taken by the caller before it loaded anything) and after setup, in MB (VmHWM, ru_maxrss off
    Linux); `detail` adds the RSS before the steps and the ru_maxrss peak.
    """
    torch.manual_seed(0)
    step()
    after_setup = memory_marks()
    rss_before = proc_status_mb("VmRSS") or 0.0
    reset_ok = reset_peak_rss()
    for _ in range(steps):
        step()
    after_steps = memory_marks()
    with saved_for_backward(parameter_storages(model)) as saved:
        loss = model(**batch).loss
    loss.backward()
    key = "vmhwm_mb" if "vmhwm_mb" in after_steps else "ru_maxrss_mb"
    row = {"saved_mb": saved["bytes"] / MB, "saved_tensors": saved["tensors"], "hwm_reset_worked": reset_ok,
           "rss_before_steps_mb": rss_before,
           "step_delta_mb": after_steps[key] - rss_before if reset_ok else float("nan"),
           "peak_mb": max(after_setup[key], after_steps[key]),
           "peak_ru_maxrss_mb": max(after_setup["ru_maxrss_mb"], after_steps["ru_maxrss_mb"]),
           "after_import_mb": after_import[key], "after_setup_mb": after_setup[key]}
    if not detail:
        del row["rss_before_steps_mb"], row["peak_ru_maxrss_mb"]
    return row


def run_child(script: Path, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python script args` in a fresh interpreter; its last stdout line is a JSON object."""
    cmd = [sys.executable, str(script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------- continuable runs (--merge, --budget-min)


def keep_finished(previous: list[dict[str, Any]], rebuild: Callable[[dict[str, Any]], dict[str, Any]],
                  key: Callable[[dict[str, Any]], str]) -> tuple[list[dict[str, Any]], int]:
    """--merge: the finished runs of an earlier result that this invocation would run again with the
    same settings, and how many were dropped (failed, or other settings). `rebuild(run)` is the job
    this invocation makes for that run's identity (KeyError or ValueError: it makes none); `key(job)`
    is what makes two runs the same run (every setting, not the outcome)."""
    kept, dropped = [], 0
    for run in previous:
        try:
            same = "error" not in run and key(rebuild(run)) == key(run)
        except (KeyError, ValueError):
            same = False
        if same:
            kept.append(run)
        else:
            dropped += 1
    return kept, dropped


def budgeted_children(script: Path, jobs: Iterable[dict[str, Any]], runs: list[dict[str, Any]], *,
                      key: Callable[[dict[str, Any]], str], group: Callable[[dict[str, Any]], Any],
                      budget_min: float, phase: Callable[[str], None], label: Callable[[dict[str, Any]], str],
                      save: Callable[[], None], env: dict[str, str] | None = None,
                      workers: int = 1) -> list[dict[str, Any]]:
    """Run every job not yet in `runs` (by `key`), each in a fresh interpreter (`script --run-child
    JOB-as-JSON`, whose last stdout line is its row), `workers` at a time (threads that wait on the
    children); each row (the job, what the child printed or the "error" it died with, and
    "process_s") is appended to `runs` and `save()` called as it ends, so a stopped bench keeps what
    it finished. `jobs` may be a generator that looks at `runs` as they grow (a job that depends on
    earlier results; with several workers, on those finished when it is drawn).

    A job expected to end more than `budget_min` minutes after this call started is not started:
    returned, in order, with the others not run. Expected: the mean process time of the finished runs
    of its `group(job)`, else of any finished run (0 before the first)."""
    started = time.perf_counter()
    done = {key(run) for run in runs}
    not_run: list[dict[str, Any]] = []

    def ended(row: dict[str, Any]) -> None:
        runs.append(row)
        who = f"  {label(row)}:" if workers > 1 else " "  # out of order: say which run it was
        print(f"{who} failed: {row['error']}" if "error" in row else f"{who} done in {row['process_s']:.0f} s",
              flush=True)
        save()

    def startable(job: dict[str, Any]) -> bool:
        if key(job) in done:
            return False
        if (time.perf_counter() - started) / 60 + _expected_minutes(runs, job, group) > budget_min:
            not_run.append(job)
            return False
        phase(label(job))
        done.add(key(job))
        return True

    if workers <= 1:
        for job in jobs:
            if startable(job):
                ended(_child_row(script, job, env))
        return not_run
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: set[Any] = set()
        for job in jobs:
            while len(pending) >= workers:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    ended(future.result())
            if startable(job):
                pending.add(pool.submit(_child_row, script, job, env))
        for future in as_completed(pending):
            ended(future.result())
    return not_run


def _child_row(script: Path, job: dict[str, Any], env: dict[str, str] | None) -> dict[str, Any]:
    """`job` run in a fresh interpreter: its row (the identity stays the job's), or the error."""
    tick = time.perf_counter()
    try:
        row = {**run_child(script, ["--run-child", json.dumps(job)], env=env), **job}
    except RuntimeError as err:
        lines = [x for x in str(err).strip().splitlines() if x.strip()]
        row = {**job, "error": lines[-1][:300] if lines else "child failed"}
    row["process_s"] = time.perf_counter() - tick
    return row


def _expected_minutes(runs: list[dict[str, Any]], job: dict[str, Any], group: Callable[[dict[str, Any]], Any]) -> float:
    """Mean process minutes of the finished runs of `job`'s group, else of any finished run."""
    times = [r["process_s"] for r in runs if "process_s" in r and "error" not in r and group(r) == group(job)]
    times = times or [r["process_s"] for r in runs if "process_s" in r and "error" not in r]
    return sum(times) / len(times) / 60 if times else 0.0




def memory_children(script: Path, kinds: dict[str, list[str]], env: dict[str, str], phase: Callable[[str], None],
                    keep_going: bool = False) -> dict[str, dict[str, Any]]:
    """`script` with each kind's arguments in a fresh interpreter, one after another (never
    concurrently: each measures its own peak); every row printed as it comes. With `keep_going` a
    failed child's row is {"error": the last line it wrote to stderr} and the others still run."""
    rows: dict[str, dict[str, Any]] = {}
    for kind, args in kinds.items():
        phase(f"[memory] {kind}")
        try:
            rows[kind] = row = run_child(script, args, env=env)
        except RuntimeError as err:
            if not keep_going:
                raise
            lines = [x for x in str(err).strip().splitlines() if x.strip()]
            rows[kind] = row = {"error": lines[-1][:300] if lines else "child failed"}
        print(f"  failed: {row['error']}" if "error" in row else
              f"  saved {row['saved_mb']:7.1f} MB, step +{row['step_delta_mb']:6.1f} MB, peak {row['peak_mb']:7.1f} MB",
              flush=True)
    return rows


def run_sections(result: dict[str, Any], s: Any, phase: Any, sections: dict[str, Callable[..., dict[str, Any]]],
                 untimed: tuple[str, ...], timed: tuple[str, ...]) -> None:
    """Run the chosen (`s.sections`) sections into `result["sections"]`: `untimed` first (memory
    children and training pools, while this process is small), then glibc malloc set to keep freed
    memory (`keep_freed_memory`) and the `timed` ones, with a garbage collection after each."""
    for key in untimed:
        if key in s.sections:
            result["sections"][key] = sections[key](s, phase)
    result["environment"]["malloc_keeps_freed_memory"] = keep_freed_memory()
    for key in timed:
        if key in s.sections:
            result["sections"][key] = sections[key](s, phase)
            gc.collect()


# ------------------------------------------------------------------------------- worker pools


def torch_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def worker_pool(jobs: int, threads: int) -> ProcessPoolExecutor:
    """`jobs` worker processes, fresh interpreters (spawn: no state shared with this one), each
    with `threads` torch threads."""
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=torch_threads, initargs=(threads,))


def pool_runs(fn: Callable[..., dict[str, Any]], jobs: Iterable[tuple[Any, ...]], workers: int, threads: int,
              describe: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """`fn(*job)` for every job in a `worker_pool`, results in job order, each printed as it is
    collected (`describe(row)`)."""
    rows = []
    with worker_pool(workers, threads) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        for future in futures:
            rows.append(future.result())
            print(describe(rows[-1]), flush=True)
    return rows


def short_error(err: BaseException) -> str:
    """"TypeName: first line of the message", at most 300 characters: fits a table cell."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"[:300]


def guarded(job: dict[str, Any], fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """`fn(*args)` merged into `job`; an exception becomes job["error"] (and its traceback) instead,
    so that one failing run in a pool does not stop the others."""
    try:
        job.update(fn(*args))
    except Exception as err:
        job["error"] = short_error(err)
        job["traceback"] = traceback.format_exc()[-2000:]
    return job


def seed_runs(fn: Callable[..., dict[str, Any]], names: list[str], s: Any, phase: Callable[[str], None],
              describe: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """`fn(name, data, seed, asdict(s))` for every data set, seed and name of `s` (in that nesting),
    `s.jobs` at a time in a `worker_pool`: the accuracy runs behind a `seed_summary`."""
    jobs = [(name, data, seed, asdict(s)) for data in s.datasets for seed in s.seeds for name in names]
    phase(f"[accuracy] {len(jobs)} training runs, {s.jobs} at a time")
    return pool_runs(fn, jobs, s.jobs, s.threads, describe)
