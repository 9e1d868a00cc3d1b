"""What a run leaves behind and shows: the run folder's files and the terminal tables.

A run folder holds `config.yaml` (written at the start; rerun with `splice train
runs/NAME/config.yaml`), `adapter/` (the best adapter so far, rewritten at every improvement
and at the end, so an interrupted run leaves its best adapter), `checkpoints/step-N/` (the
last resumable checkpoint, `splice train --resume runs/NAME`; removed when the run ends),
`metrics.json` (status, config, metrics before and after, history, timings, parameter counts,
library versions) and `curves.png` (training loss and validation metrics against steps).

While a run writes into its folder it holds the folder's lock file (`.splice-run.lock`, an
exclusive `flock` and the holder's PID): a second run into the same folder is refused at once,
naming that PID. A lock file whose process is gone (killed, crashed) holds no lock and is
taken over.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

import splice
from splice.core.errors import OutputExistsError, SpliceError
from splice.core.summaries import Summary
from splice.io.figures import pyplot, save_png
from splice.train.config import TrainConfig

try:
    import fcntl
except ImportError:  # not POSIX: an exclusively created lock file instead of flock
    fcntl = None

ROW_KEYS = ("what", "parameters", "trainable", "detail")  # of `Summary.rows()`
LOCK_NAME = ".splice-run.lock"
CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step-"
# A run that ended (with or without reaching its last step) has nothing to resume.
ENDED = ("finished", "diverged")

if TYPE_CHECKING:
    from splice.train.results import RunResult


class RunFolderBusy(SpliceError):
    """Another run holds the run folder's lock."""


class RunFolder:
    """A claimed run folder: `path`, and the lock that `release` gives back (idempotent)."""

    def __init__(self, path: Path, fd: int | None, stale_pid: int | None = None) -> None:
        self.path, self._fd, self.stale_pid = path, fd, stale_pid

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_NAME

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(self.lock_file, fd):  # remove it while it is ours (the lock is still held)
                self.lock_file.unlink()
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self) -> RunFolder:
        return self

    def __del__(self) -> None:  # a folder object dropped without release (e.g. an abandoned Multiplexer)
        with contextlib.suppress(Exception):
            self.release()

    def __exit__(self, *_: object) -> None:
        self.release()


def claim_run_dir(path: str | Path, *, force: bool = False, resume: bool = False) -> RunFolder:
    """Lock the run folder (creating it) before any work, and check that it may be written.

    A folder that another live run holds is refused at once, naming that run's PID (even with
    `force`). A new run refuses a non-empty folder (`splice.OutputExistsError`) unless `force`;
    with `force`, files of the same names are replaced, old checkpoints are removed and other
    files are left alone. `resume` needs a folder whose run has not ended and that holds a
    checkpoint. Release the lock with `RunFolder.release` (or use it as a context manager).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory")
    if resume and not path.is_dir():
        raise SpliceError(f"cannot resume {path}: no such run folder")
    path.mkdir(parents=True, exist_ok=True)
    folder = _lock(path)
    try:
        if resume:
            _check_resumable(path)
        else:
            others = sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME)
            if others and not force:
                resumable = latest_checkpoint(path) is not None and run_status(path) not in ENDED
                raise OutputExistsError(
                    f"{path} already exists and is not empty ({', '.join(others[:5])}"
                    f"{', ...' if len(others) > 5 else ''}); pass overwrite=True (CLI: --force) to replace it"
                    + (f", or continue its interrupted run with `splice train --resume {path}`" if resumable else ""))
            # A previous run's checkpoints and status (finished, ...) must not pass for this run's.
            shutil.rmtree(path / CHECKPOINTS, ignore_errors=True)
            (path / "metrics.json").unlink(missing_ok=True)
    except BaseException:
        folder.release()
        raise
    return folder


def _lock(path: Path) -> RunFolder:
    lock = path / LOCK_NAME
    if fcntl is None:
        return _lock_exclusive_create(path, lock)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusy(_busy_message(path, _holder(lock))) from None
        except OSError:  # a file system without flock (some network ones): the PID alone tells
            holder = _read_pid(fd)
            if holder is not None and _pid_alive(holder):
                os.close(fd)
                raise RunFolderBusy(_busy_message(path, holder)) from None
            break
        if _same_file(lock, fd):
            break
        os.close(fd)  # its holder removed it between our open and our lock: take the new one
    stale = _read_pid(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunFolder(path, fd, stale_pid=stale)


def _lock_exclusive_create(path: Path, lock: Path) -> RunFolder:
    """Without flock: create the lock file exclusively; one whose PID is gone is taken over."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is not None and not _pid_alive(holder):
                lock.unlink(missing_ok=True)
                continue
            raise RunFolderBusy(_busy_message(path, holder) + f" (if no run is using it, delete {lock})") from None
        os.write(fd, f"{os.getpid()}\n".encode())
        return RunFolder(path, fd)
    raise RunFolderBusy(_busy_message(path, _holder(lock)))


def _busy_message(path: Path, pid: int | None) -> str:
    who = f"process {pid}" if pid is not None else "another process"
    return (f"{path} is in use by another training run ({who} holds {path / LOCK_NAME}); wait for it to "
            "finish or choose another output folder (CLI: --output-dir)")


def _holder(lock: Path) -> int | None:
    """The PID in a lock file; a holder may not have written it yet, so look a few times."""
    for _ in range(20):
        with contextlib.suppress(OSError, ValueError):
            return int(lock.read_text().strip())
        time.sleep(0.01)
    return None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _check_resumable(path: Path) -> None:
    status = run_status(path)
    if status in ENDED:
        raise SpliceError(f"the run in {path} has {'finished' if status == 'finished' else 'ended (' + status + ')'}; "
                          "there is nothing to resume. Start it again with --force, or choose another --output-dir")
    if latest_checkpoint(path) is None:
        raise SpliceError(f"{path} holds no checkpoint to resume from ({path / CHECKPOINTS} is empty or "
                          "missing: the run stopped before its first one); start it again with --force")


def run_status(run_dir: Path) -> str | None:
    """The status metrics.json records (finished, diverged, interrupted), or None."""
    try:
        return json.loads((Path(run_dir) / "metrics.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{STEP_PREFIX}{step}"


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in the run folder, in order (temporary folders are not)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    steps = [int(p.name[len(STEP_PREFIX):]) for p in folder.iterdir()
             if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(steps)


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = checkpoint_steps(run_dir)
    return checkpoint_dir(run_dir, steps[-1]) if steps else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (0: the whole checkpoints folder)."""
    if keep <= 0:
        shutil.rmtree(Path(run_dir) / CHECKPOINTS, ignore_errors=True)
        return
    for step in checkpoint_steps(run_dir)[:-keep]:
        shutil.rmtree(checkpoint_dir(run_dir, step), ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write a file whole: a temporary sibling renamed over it, so a reader never sees half of it."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_config(run_dir: Path, config: TrainConfig) -> Path:
    """config.yaml, written when the run starts (`--resume` reads it)."""
    path = Path(run_dir) / "config.yaml"
    write_text(path, config.to_yaml())
    return path


def versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    return {"splice": splice.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


def write_run(run_dir: Path, config: TrainConfig, result: RunResult, parameters: Summary) -> dict[str, Path]:
    """Write metrics.json and curves.png into `run_dir` (config.yaml is written when the run
    starts, `write_config`); returns the paths of the three.

    Also for a run that did not finish: metrics.json then has its status ("interrupted",
    "diverged"), the message, the history so far and no "after" if the run never got there.
    Non-finite numbers are written as null (JSON has no NaN).
    """
    paths = {"config": run_dir / "config.yaml", "metrics": run_dir / "metrics.json", "plot": run_dir / "curves.png"}
    report = {
        "status": result.status,
        "message": result.message,
        "config": config.to_dict(),
        "before": result.metrics.get("before", {}),
        "after": result.metrics.get("after"),
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "skipped_steps": result.skipped_steps,
        "parameters": {"trainable": parameters.trainable, "total": parameters.total,
                       "trainable_percent": parameters.trainable_percent,
                       "rows": [dict(zip(ROW_KEYS, row, strict=True)) for row in parameters.rows()]},
        "timings": result.timings,
        "history": result.history,
        "versions": versions(),
    }
    if report["after"] is None:
        del report["after"]
    write_text(paths["metrics"], json.dumps(_finite_or_null(report), indent=2, allow_nan=False) + "\n")
    if any(h.get("loss") is not None for h in result.history):
        plot_curves(result.history, paths["plot"], start=result.metrics.get("before", {}).get("validation"))
    else:
        paths.pop("plot")
    return paths


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def plot_curves(history: list[dict[str, Any]], path: Path, start: dict[str, float] | None = None) -> None:
    """Training loss per step (and its running mean) with validation loss on top; validation
    metrics in a second panel.

    `start`, the validation metrics before training, is drawn at step 0.
    """
    plt = pyplot()

    history = [h for h in history if h.get("loss") is not None]  # a skipped (non-finite) step has none
    during = [h for h in history if "eval" in h]
    others = sorted({k for h in during for k in h["eval"] if k != "loss"})
    evals = ([{"step": 0, "eval": start}] if start else []) + during
    fig, axes = plt.subplots(1, 1 + bool(others), figsize=(11 if others else 6, 4), squeeze=False)
    loss_ax = axes[0][0]
    steps, losses = [h["step"] for h in history], [h["loss"] for h in history]
    window = max(1, len(losses) // 25)  # one batch's loss is noisy; show a running mean as well
    running = np.convolve(losses, np.ones(window) / window, mode="valid")
    loss_ax.plot(steps, losses, lw=0.6, alpha=0.35, color="tab:blue")
    label = "train" if window == 1 else f"train (mean of {window} steps)"
    loss_ax.plot(steps[window - 1 :], running, color="tab:blue", label=label)
    loss_ax.plot([h["step"] for h in evals], [h["eval"]["loss"] for h in evals], "o-", color="tab:orange",
                 label="validation")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend()
    if others:
        metric_ax = axes[0][1]
        for key in others:
            steps, values = zip(*((h["step"], h["eval"][key]) for h in evals if key in h["eval"]), strict=True)
            metric_ax.plot(steps, values, "o-", label=key)
        metric_ax.set(xlabel="step", title="validation")
        metric_ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def summary_table(summary: Summary, title: str) -> Table:
    """`splice.summary` as a rich table."""
    table = Table(title=title)
    for header, justify in (("", "left"), ("parameters", "right"), ("trainable", "right"), ("", "left")):
        table.add_column(header, justify=justify, overflow="fold")  # the first holds adapters' names
    for row in summary.rows():
        table.add_row(*row)
    return table


def metrics_line(label: str, metrics: dict[str, dict[str, float]], best: bool = False) -> str:
    """One line such as `step 60  validation: loss 0.512, accuracy 0.771  (best)`."""
    parts = [f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()) for split, values in metrics.items()]
    return f"[bold]{label}[/]  " + "  ".join(parts) + ("  [green](best)[/]" if best else "")


def results_table(result: RunResult) -> Table:
    """Each split's metrics before and after training, and where the files went."""
    minutes = result.timings["total_s"] / 60
    table = Table(title=f"results (best step {result.best_step}, {minutes:.1f} min)",
                  caption=f"saved to {result.paths['run_dir']}")
    for header in ("split", "metric", "before", "after", "change"):
        table.add_column(header, justify="left" if header in ("split", "metric") else "right")
    for split, after in result.metrics["after"].items():
        for key, value in after.items():
            old = result.metrics["before"][split][key]
            table.add_row(split, key, f"{old:.4f}", f"{value:.4f}", f"{value - old:+.4f}")
    return table
