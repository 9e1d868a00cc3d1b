"""The end of a `Trainer`'s run (best state restored, evaluated, saved, reported; or stopped by a
signal), and `Tenancy`: what changes for a trainer an orchestrator drives among others."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from splice.core.errors import SpliceError
from splice.core.summaries import Summary
from splice.train import checkpoint, report
from splice.train.results import RunResult, TrainingInterrupted, nonfinite_tensors

if TYPE_CHECKING:
    from splice.train.trainer import Trainer

LAST_ADAPTER = "adapter-last"  # the final state, beside adapter/ (the best), when the two differ


@dataclass(frozen=True)
class Tenancy:
    """A trainer that is one tenant of several on a model and accelerator an orchestrator owns
    (`splice.orchestrate.Multiplexer`), training the tenant's view of the shared model.

    The model and the accelerator are the orchestrator's: the trainer turns on no gradient
    checkpointing and registers nothing for accelerate's checkpoints; it never checkpoints (so
    it cannot resume). Its messages start with `label`; its report counts `summary` (the
    tenant's parameters, counted on its own model before it joined: the shared one holds the
    other tenants' too); and `finish` reports a non-finite final state in the result, without
    raising, so that the other tenants go on.
    """

    summary: Summary
    label: str


def finish(trainer: Trainer) -> RunResult:
    """`Trainer.finish` after `begin`: restore the best state, evaluate, save, report."""
    final_messages(trainer)
    last = keep_last_state(trainer)
    if trainer.best.state is not None:
        trainer.restore(trainer.best.state)
    tick = time.perf_counter()
    after = trainer.evaluate()
    timings, state, run_dir = trainer.timings, trainer.state, trainer.run_dir
    timings.update(eval_after_s=time.perf_counter() - tick, train_s=state.train_s,
                   examples_per_s=state.examples / max(state.train_s, 1e-9))
    paths = {"run_dir": run_dir, "adapter": run_dir / "adapter", **({"last_adapter": last} if last else {})}
    status, message = trainer.stop or ("finished", untrained_warning(trainer, last))
    unsaved = nonfinite_tensors(trainer.trained)
    if unsaved:  # only without a validation split: the final state is all there is
        status = "diverged"
        message = (f"{message + ' ' if message else ''}The final state has non-finite tensors "
                   f"({', '.join(unsaved[:3])}{', ...' if len(unsaved) > 3 else ''}); no adapter was saved.")
        paths.pop("adapter")
        if trainer.tenancy is not None:
            trainer.show(f"[red]{escape(trainer.label + message)}[/]")
    trainer.accelerator.wait_for_everyone()
    if trainer.main and not unsaved:
        trainer.save(paths["adapter"])
    timings["total_s"] = time.perf_counter() - trainer.started
    result = RunResult(
        metrics={"before": state.before, "after": after}, history=state.history, paths=paths, timings=timings,
        best_step=trainer.best.step if trainer.best.state is not None else state.step,
        stopped_early=stopped_early(trainer),
        parameters={"trainable": trainer.parameters.trainable, "total": trainer.parameters.total},
        status=status, message=message, skipped_steps=state.skipped,
    )
    if trainer.main:
        result.paths.update(report.write_run(run_dir, trainer.config, result, trainer.parameters))
        report.prune_checkpoints(run_dir, keep=0)  # an ended run is not resumed
        table = report.results_table(result)
        table.title = f"{trainer.label}{table.title}"
        trainer.console.print(table)
    # Under `accelerate launch` every process returns only once the main one has written the
    # adapter and the report, so code after `fit` on any rank never reads a half-written folder.
    trainer.accelerator.wait_for_everyone()
    if unsaved and trainer.tenancy is None:
        raise SpliceError(f"{message} Report: {run_dir / 'metrics.json'}")
    return result


def keep_last_state(trainer: Trainer) -> Path | None:
    """Write the final state to adapter-last/ when the best one, which adapter/ gets, is another
    (the last steps may be what the user wanted to look at); its path, or None."""
    best, step = trainer.best, trainer.state.step
    path = trainer.run_dir / LAST_ADAPTER
    if best.state is None or best.step == step or nonfinite_tensors(trainer.trained):
        if trainer.main:  # an earlier run's (replaced with --force) must not pass for this one's
            shutil.rmtree(path, ignore_errors=True)
        return None
    if trainer.main:
        trainer.save(path)
    return path


def untrained_warning(trainer: Trainer, last: Path | None) -> str:
    """The loud message for a run in which no evaluation beat the untrained adapter (step 0), so
    that adapter/ holds an adapter that changes nothing (LoRA's B is still zero); else ""."""
    if trainer.best.state is None or trainer.best.step != 0 or trainer.state.step == 0:
        return ""
    where = f"; the final state (step {trainer.state.step}) is in {last}" if last else ""
    message = (f"no evaluation beat the untrained adapter (step 0), so {trainer.run_dir / 'adapter'} holds the "
               f"untrained state, which computes what the base model does{where}. Train longer, raise lr, or "
               "check the data and its labels.")
    trainer.show(f"[bold yellow]{escape(trainer.label)}warning: {escape(message)}[/]")
    return message


def stopped_early(trainer: Trainer) -> bool:
    """Early stopping ended the run before its last step (patience running out at the last
    evaluation of a run that took every step is no early stop)."""
    return trainer.best.should_stop and trainer.state.step < trainer.total_steps


def final_messages(trainer: Trainer) -> None:
    """Why the run ends where it does: early stopping, non-finite numbers, skipped steps."""
    label, state = escape(trainer.label), trainer.state
    if stopped_early(trainer):
        trainer.show(f"{label}early stopping: no improvement in {trainer.config.early_stopping_patience} evaluations")
    if trainer.stop is not None:
        trainer.show(f"[red]{label}{escape(trainer.stop[1])}[/]")
    elif state.skipped:
        trainer.show(f"[yellow]{label}{state.skipped} optimizer steps were skipped for non-finite numbers[/]")


def interruption(trainer: Trainer, signal_number: int) -> TrainingInterrupted:
    """Checkpoint, write what there is of the report, and the exception that says how to go on."""
    saved = trainer.save_checkpoint()
    return checkpoint.interruption(trainer.config, trainer.run_dir, trainer.state, trainer.parameters, signal_number,
                                   saved, trainer.timings, trainer.main)
