"""The run folder and its checkpoints: claiming the folder, accelerate's `save_state` holding only
the trainable tensors, the data position of a resumed run, and SIGINT/SIGTERM.

Checkpoints: every `checkpoint_every` optimizer steps, and when SIGINT or SIGTERM arrives (after
the step under way), accelerate's `save_state` writes `checkpoints/step-N/`: the trainable
tensors, optimizer, scheduler, gradient-accumulation counter, random states of every process,
and (a registered object, `state.RunState`) the step, the data position (epoch, batches done and
the shuffle generator's state when that epoch began), history and best-so-far.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import broadcast_object_list
from accelerate.utils.constants import SAFE_WEIGHTS_NAME
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from splice.core.errors import OutputExistsError, SpliceError
from splice.core.validation import config_changes
from splice.io.files import atomic_directory
from splice.train import report
from splice.train.config import TrainConfig
from splice.train.results import RunResult, RunState, TrainingInterrupted, nonfinite_tensors

KEEP_CHECKPOINTS = 1  # written whole and swapped in, so the newest one is always complete


def claim(processes: PartialState, path: str | Path, force: bool, resume: bool) -> report.RunFolder | None:
    """The main process claims the run folder; under `accelerate launch` the others learn
    whether it could, so that all of them stop (or go on) together."""
    folder, error = None, None
    if processes.is_main_process:
        try:
            folder = report.claim_run_dir(path, force=force, resume=resume)
        except SpliceError as err:
            error = err
    if processes.num_processes > 1:
        outcome = [None if error is None else (type(error).__name__, str(error))]
        broadcast_object_list(outcome)
        if outcome[0] is not None and error is None:
            kinds = {cls.__name__: cls for cls in (OutputExistsError, report.RunFolderBusy)}
            raise kinds.get(outcome[0][0], SpliceError)(outcome[0][1])
    if error is not None:
        raise error
    return folder


def comparable(config: TrainConfig) -> dict[str, Any]:
    """The config as a checkpoint records it (the folder it lives in may move), with the SHA-256
    of its data files: a file rewritten under the same name is other data to resume on."""
    out = {k: v for k, v in config.to_dict().items() if k != "output_dir"}
    out[DATA_FILES] = {value: _sha256(Path(value)) for value in (config.data, config.validation)
                       if isinstance(value, str) and Path(value).is_file()}
    return out


DATA_FILES = "data_files"  # the checkpointed config's key for its data files' hashes


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Fields added to TrainConfig after checkpoints were first written, with the value that does what
# such a checkpoint's run did: a checkpoint without them resumes under a config that has them so.
ADDED_FIELDS = {"group_by_length": False, "packing": False, "schedule": None, "quantize": None, "optimizer": "adamw",
                "selection": None}


def check_same_config(saved: dict[str, Any] | None, current: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume `saved`'s checkpoint under another config, naming every field that changed."""
    if saved is None:
        return
    saved = {**ADDED_FIELDS, **saved}
    if DATA_FILES not in saved:  # a checkpoint from before the hashes: nothing to compare them with
        current = {k: v for k, v in current.items() if k != DATA_FILES}
    if saved == current:
        return
    was, now = saved.get(DATA_FILES, {}), current.get(DATA_FILES, {})
    if was != now and {k: v for k, v in saved.items() if k != DATA_FILES} == \
            {k: v for k, v in current.items() if k != DATA_FILES}:
        changed = sorted(f for f in {*was, *now} if was.get(f) != now.get(f))
        raise SpliceError(f"the data changed since the checkpoint in {run_dir} was written ({', '.join(changed)}: "
                          "other contents); a resumed run continues on the same rows: restore the file, or start "
                          "a new run (--force)")
    raise SpliceError(f"{run_dir / 'config.yaml'} is not the config its checkpoint was written with "
                      f"({'; '.join(config_changes(saved, current))}); a resumed run continues the same config")


def batches(loader: DataLoader, epochs: int, state: RunState,
             accelerator: Accelerator) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches for several epochs, reshuffled (reproducibly) each epoch, from the
    position in `state` on: after a resume, the rest of the epoch it stopped in, in the order
    the uninterrupted run had (the loader's generator is set back to the epoch's start)."""
    generator = loader.generator
    resuming = state.epoch_rng is not None
    for epoch in range(state.epoch, epochs):
        if resuming:
            generator.set_state(state.epoch_rng)
            resuming = False
        else:
            state.epoch, state.batches, state.epoch_rng = epoch, 0, generator.get_state()
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, state.batches) if state.batches else loader


def checkpoint_trainable_only(accelerator: Accelerator, trained: Mapping[str, torch.nn.Parameter]) -> None:
    """accelerate checkpoints a prepared model whole; these hooks make its checkpoint hold only
    what trains (`trained`: the adapter and its trained modules; the base is the model's own
    files) and load that back with an exact check of the names."""

    def save_trainable(models: list, weights: list, output_dir: str) -> None:
        weights[:] = [{k: p.detach().contiguous() for k, p in trained.items()}]

    def load_trainable(models: list, input_dir: str) -> None:
        tensors = load_file(str(Path(input_dir) / SAFE_WEIGHTS_NAME))
        if tensors.keys() != trained.keys():
            missing, extra = sorted(trained.keys() - tensors.keys()), sorted(tensors.keys() - trained.keys())
            raise SpliceError(f"checkpoint {input_dir} does not hold this run's trainable tensors "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for name, p in trained.items():
                p.copy_(tensors[name])
        models.clear()  # loaded here; accelerate must not load a whole model from the file

    accelerator.register_save_state_pre_hook(save_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)


def save_checkpoint(accelerator: Accelerator, trained: Mapping[str, torch.nn.Parameter], run_dir: Path, step: int,
                    show: Callable[..., None]) -> Path | None:
    """accelerate's `save_state` into checkpoints/step-N, written whole: the main process makes a
    temporary folder (every process writes its random states into it) and swaps it into place.
    Older checkpoints are removed; a state whose `trained` tensors are not finite is not written (None)."""
    if nonfinite_tensors(trained):
        show(f"[yellow]step {step}: the parameters are not finite; no checkpoint written[/]")
        return None
    target = report.checkpoint_dir(run_dir, step)
    with contextlib.ExitStack() as stack:
        where = [str(stack.enter_context(atomic_directory(target, overwrite=True)))
                 if accelerator.is_main_process else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(where)
        accelerator.save_state(where[0])
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        report.prune_checkpoints(run_dir, KEEP_CHECKPOINTS)
    return target


class StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current step (`received` is set); a
    second one stops at once. Only in the main thread, where Python delivers signals."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: Any) -> None:
        if self.received is not None:
            self._restore()
            if number == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + number)
        self.received = number
        with contextlib.suppress(OSError, ValueError):
            os.write(sys.stderr.fileno(), f"\n{signal.Signals(number).name}: stopping after this step with a "
                                          "checkpoint (send it again to stop at once)\n".encode())

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def __exit__(self, *_: object) -> None:
        self._restore()




def interruption(config: TrainConfig, run_dir: Path, state: RunState, parameters: Any, signal_number: int,
                 checkpoint: Path | None, timings: dict[str, float], main: bool) -> TrainingInterrupted:
    """Write what there is of the report, and the exception that says how to go on."""
    best = state.best
    adapter = run_dir / "adapter"
    name = signal.Signals(signal_number).name
    where = (f"checkpoint {checkpoint}" if checkpoint is not None else
             f"no new checkpoint (the parameters were not finite); the newest is {report.latest_checkpoint(run_dir)}")
    kept = f"; best adapter so far (step {best.step}) in {adapter}" if best.state is not None else ""
    message = (f"{name}: stopped after step {state.step} with {where}{kept}.\n"
               f"Continue with: splice train --resume {run_dir}")
    result = RunResult(
        metrics={"before": state.before}, history=state.history,
        paths={"run_dir": run_dir, **({"adapter": adapter} if best.state is not None else {})},
        timings={**timings, "train_s": state.train_s}, best_step=best.step, stopped_early=False,
        parameters={"trainable": parameters.trainable, "total": parameters.total},
        status="interrupted", message=message, skipped_steps=state.skipped,
    )
    if main:
        result.paths.update(report.write_run(run_dir, config, result, parameters))
    return TrainingInterrupted(message, result, signal_number)
