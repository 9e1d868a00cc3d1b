"""The training loop: one readable function on accelerate, so CPU, CUDA, MPS, bf16/fp16 mixed
precision and `accelerate launch` on several GPUs all run the same code.

    claim the run folder -> config -> model + tokenizer -> attach adapter -> evaluate (before)
    -> train with periodic evaluation and checkpoints -> restore the best adapter -> evaluate
    (after) -> save adapter -> report -> release the folder

Best checkpoint: the trainable tensors (adapter and trained head) of the best evaluation are
kept in memory and restored at the end, and the adapter folder is rewritten (whole, through
`atomic_directory`) at every improvement, so that a run stopped at any point leaves its best
adapter so far. The untrained state (step 0) is a candidate too: if training never beats it,
that is what gets saved, and the report says so (best_step 0). A non-finite evaluation or
state is never a candidate, and no non-finite adapter or checkpoint is ever written.

Checkpoints and resuming: every `checkpoint_every` optimizer steps, and when SIGINT or SIGTERM
arrives (after the step under way), accelerate's `save_state` writes `checkpoints/step-N/`:
the trainable tensors, optimizer, scheduler, gradient-accumulation counter, random states of
every process, and (a registered object) the step, the data position (epoch, batches done and
the shuffle generator's state when that epoch began), history and best-so-far. `run(...,
resume=True)` (CLI: `splice train --resume RUN`) sets the run up as before, loads the newest
checkpoint with `load_state`, skips the batches already seen (accelerate's
`skip_first_batches`) and continues to the same result as a run that was never stopped.

Non-finite numbers: each step's loss and, before the optimizer step, its gradient norm are
checked. `on_nonfinite: stop` ends the run there (the best finite state is saved);
`on_nonfinite: skip` drops the step's update and goes on, and stops after 10 such steps in a
row.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env, set_seed
from accelerate.utils.constants import SAFE_WEIGHTS_NAME
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

import splice
from splice.assets import Row
from splice.core.api import resolve_heads
from splice.core.errors import OutputExistsError, SpliceError
from splice.io.files import atomic_directory
from splice.train import report, tasks
from splice.train.config import TrainConfig
from splice.train.data import collator, load_eval_rows, load_splits, with_probe
from splice.train.data import train_loader as make_train_loader

Metrics = dict[str, float]
KEEP_CHECKPOINTS = 1  # written whole and swapped in, so the newest one is always complete
MAX_SKIPS_IN_A_ROW = 10  # on_nonfinite: skip gives up after this many non-finite steps in a row


@dataclass
class RunResult:
    """What `run` returns: metrics before and after per split, the step history, the files.

    `history` has one entry per optimizer step (step, epoch, lr, loss) and an "eval" mapping on
    the steps that evaluated; `paths` names the run folder, the adapter and the report files.
    """

    metrics: dict[str, dict[str, Metrics]]
    history: list[dict[str, Any]]
    paths: dict[str, Path]
    timings: dict[str, float]
    best_step: int
    stopped_early: bool
    parameters: dict[str, int] = field(default_factory=dict)
    status: str = "finished"  # "finished", "diverged" (stopped on non-finite numbers) or "interrupted"
    message: str = ""
    skipped_steps: int = 0  # optimizer steps dropped for non-finite numbers (on_nonfinite: skip)


class TrainingInterrupted(SpliceError):
    """SIGINT or SIGTERM stopped the run after a step; it was checkpointed and can be resumed.

    `result` holds what the run had (metrics before, history, best step); `exit_code` is the
    shell's for that signal (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, result: RunResult, signal_number: int) -> None:
        super().__init__(message)
        self.result, self.signal_number = result, signal_number

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number


def run(config: TrainConfig, *, console: Console | None = None, force: bool = False,
        resume: bool = False) -> RunResult:
    """Train `config.adapter` on `config.data` and write the adapter and a report to output_dir.

    The run folder is locked for the run's duration: a second run into it is refused at once.
    A non-empty output_dir is refused before any work unless `force=True`. `resume=True`
    continues the interrupted run in output_dir from its newest checkpoint (see `resume`).
    SIGINT/SIGTERM stop the run after the current step with a checkpoint and raise
    `TrainingInterrupted`; a second signal stops at once.
    """
    console = console or Console()
    started = time.perf_counter()
    # First, before any work. The process state as the Accelerator would make it (not the
    # Accelerator itself, whose shared state another run in this process may be using).
    processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    folder = _claim(processes, config.output_dir, force, resume)
    try:
        if folder is not None and folder.stale_pid is not None:
            console.print(f"took over {escape(str(folder.lock_file))} from process {folder.stale_pid}, which is gone")
        return _train(config, _accelerator(config), Path(config.output_dir), console, resume, started)
    finally:
        if folder is not None:
            folder.release()


def resume(run_dir: str | Path, *, console: Console | None = None) -> RunResult:
    """Continue the interrupted run in `run_dir` from its newest checkpoint, with its config.yaml.

    The result is that of the run had it never stopped (same batches, random states, schedule
    and best checkpoint). A run that has ended (finished or diverged) is refused.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise SpliceError(f"cannot resume {run_dir}: it has no config.yaml (not a `splice train` run folder)")
    return run(TrainConfig.from_yaml(config_file, output_dir=str(run_dir)), console=console, resume=True)


def _train(config: TrainConfig, accelerator: Accelerator, run_dir: Path, console: Console, resume: bool,
           started: float) -> RunResult:
    main = accelerator.is_main_process
    show = console.print if main else _quiet
    set_seed(config.seed)

    splits = load_splits(config)
    if not splits.train:
        raise splice.SpliceError(f"no training rows in {config.data!r}")
    model, tokenizer = tasks.load_model(config, splits.label_names)
    collate = collator(config.task, tokenizer, config.max_length)
    train_loader = make_train_loader(splits.train, config, collate)
    adapter = with_probe(tasks.adapter_config(config, model), splits.train, config, collate)
    splice.attach(model, adapter)
    if config.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    parameters = splice.summary(model)
    show(report.summary_table(parameters, title=f"{config.model} + {config.adapter['method']} on {config.data}"))
    eval_rows = {name: rows for name, rows in (("validation", splits.validation), ("test", splits.test)) if rows}
    eval_loaders = [DataLoader(rows, batch_size=config.batch_size, collate_fn=collate) for rows in eval_rows.values()]
    params = list(splice.trainable_parameters(model).values())
    optimizer = torch.optim.AdamW(_param_groups(model, adapter.train_also, config), weight_decay=config.weight_decay)
    plain_model = model  # accelerate may wrap it (DDP); splice's state lives on the model itself
    model, optimizer, train_loader, *eval_loaders = accelerator.prepare(model, optimizer, train_loader, *eval_loaders)
    loaders = dict(zip(eval_rows, eval_loaders, strict=True))

    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    eval_every = config.eval_every or steps_per_epoch
    # A prepared scheduler steps once per process per optimizer step, hence the factor.
    scheduler = accelerator.prepare(get_cosine_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * total_steps) * accelerator.num_processes,
        total_steps * accelerator.num_processes,
    ))

    def evaluate_all() -> dict[str, Metrics]:
        """Every evaluation split, with greedy exact match for causal LM (too slow per step)."""
        return {name: _evaluate(model, loaders[name], config.task, accelerator, tokenizer, rows, config.batch_size)
                for name, rows in eval_rows.items()}

    def keep_if_best(metrics: Metrics, step: int) -> bool:
        """Offer an evaluation to the keeper; an improvement is written to adapter/ at once."""
        improved = best.offer(metrics, step, lambda: _snapshot(model, accelerator))
        if improved and main:
            save_adapter(plain_model, run_dir / "adapter", config.save_format)
        return improved

    if main and not resume:  # once the data, model and adapter loaded: a typo leaves the folder empty
        report.write_config(run_dir, config)  # now, not at the end: `--resume` reads it
    metric, higher_is_better = tasks.MAIN_METRIC[config.task]
    best = BestKeeper(metric, higher_is_better, config.early_stopping_patience)
    state = RunState(config=_comparable(config), best=best)
    accelerator.register_for_checkpointing(state)
    _checkpoint_trainable_only(accelerator, plain_model)
    timings = {"load_s": time.perf_counter() - started}
    if resume:
        checkpoint = report.latest_checkpoint(run_dir)
        accelerator.load_state(str(checkpoint))
        _check_same_config(state.saved_config, state.config, run_dir)
        before = state.before
        show(f"resumed {escape(str(run_dir))} from {escape(str(checkpoint))} (step {state.step} of {total_steps})")
    else:
        tick = time.perf_counter()
        before = state.before = evaluate_all()
        timings["eval_before_s"] = time.perf_counter() - tick
        if "validation" in before:
            keep_if_best(before["validation"], 0)
    show(report.metrics_line("before training", before))

    history = state.history
    micro_losses: list[torch.Tensor] = []
    micro_totals: list[torch.Tensor] = []
    stop: tuple[str, str] | None = None  # (status, message) of a run that ends before its last step
    check_gradients = config.precision != "fp16"  # fp16's loss scaler skips overflowing steps itself
    tick = time.perf_counter()
    with _StopSignals() as signals, _progress_bar(console, main) as progress:
        bar = progress.add_task("train", total=total_steps, completed=state.step, loss="-", speed="-")
        model.train()
        for batch in _batches(train_loader, math.ceil(total_steps / steps_per_epoch), state, accelerator):
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                extra = splice.auxiliary_loss(plain_model)  # e.g. a rank router's budget penalty
                total = loss if extra is None else loss + extra
                accelerator.backward(total)
                micro_losses.append(loss.detach())
                micro_totals.append(total.detach())
                check = None
                if accelerator.sync_gradients:
                    check = _check_step(accelerator, micro_losses, micro_totals, params, config.max_grad_norm,
                                        check_gradients, signals.received is not None)
                if check is None or check.problem is None:
                    optimizer.step()
                elif accelerator.scaler is not None and config.max_grad_norm:
                    accelerator.scaler.update()  # clipping unscaled the gradients: close the scaler's step
                if check is None or check.problem is None or config.on_nonfinite == "skip":
                    scheduler.step()
                optimizer.zero_grad()
            state.batches += 1
            state.examples += len(batch["labels"]) * accelerator.num_processes
            if check is None:
                continue
            micro_losses, micro_totals = [], []
            if check.problem is not None and config.on_nonfinite == "stop":
                stop = ("diverged", _nonfinite_message(config, state.step + 1, check.problem, best, "stop"))
                break
            state.step += 1
            step = state.step
            entry = {"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": scheduler.get_last_lr()[0],
                     "loss": check.loss}
            if check.problem is not None:  # on_nonfinite: skip
                entry.update(loss=None, skipped=check.problem)
                state.skipped += 1
                state.skipped_in_a_row += 1
                show(f"[yellow]step {step}: non-finite {check.problem}; update skipped "
                     f"({state.skipped_in_a_row} in a row)[/]")
            else:
                state.skipped_in_a_row = 0
            history.append(entry)
            speed = state.examples / max(time.perf_counter() - tick + state.train_s, 1e-9)
            progress.update(bar, advance=1, loss="nan" if entry["loss"] is None else f"{entry['loss']:.4f}",
                            speed=f"{speed:.1f}")
            if (step % eval_every == 0 or step == total_steps) and "validation" in loaders:
                entry["eval"] = _evaluate(model, loaders["validation"], config.task, accelerator)
                improved = keep_if_best(entry["eval"], step)
                show(report.metrics_line(f"step {step}", {"validation": entry["eval"]}, best=improved))
                model.train()
            if state.skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
                stop = ("diverged", _nonfinite_message(config, step, check.problem, best, "skip"))
                break
            if step == total_steps or best.should_stop:
                break
            # one process: the signal itself; several: the flag they agreed on in `_check_step`
            if check.interrupted or (accelerator.num_processes == 1 and signals.received is not None):
                state.train_s += time.perf_counter() - tick
                saved = _save_checkpoint(accelerator, plain_model, run_dir, step, show)
                raise _interruption(config, run_dir, state, parameters, signals.received or signal.SIGINT,
                                    saved, timings, main)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                _save_checkpoint(accelerator, plain_model, run_dir, step, show)
    state.train_s += time.perf_counter() - tick
    timings["train_s"] = state.train_s
    timings["examples_per_s"] = state.examples / max(state.train_s, 1e-9)
    if best.should_stop:
        show(f"early stopping: no improvement in {config.early_stopping_patience} evaluations")
    if stop is not None:
        show(f"[red]{escape(stop[1])}[/]")
    elif state.skipped:
        show(f"[yellow]{state.skipped} optimizer steps were skipped for non-finite numbers[/]")

    if best.state is not None:
        _restore(model, accelerator, best.state)
    tick = time.perf_counter()
    after = evaluate_all()
    timings["eval_after_s"] = time.perf_counter() - tick

    paths = {"run_dir": run_dir, "adapter": run_dir / "adapter"}
    status, message = stop or ("finished", "")
    unsaved = _nonfinite_tensors(splice.trainable_parameters(plain_model))
    if unsaved:  # only without a validation split: the final state is all there is
        status = "diverged"
        message = (f"{message + ' ' if message else ''}The final state has non-finite tensors "
                   f"({', '.join(unsaved[:3])}{', ...' if len(unsaved) > 3 else ''}); no adapter was saved.")
        paths.pop("adapter")
    accelerator.wait_for_everyone()
    if main and not unsaved:
        save_adapter(plain_model, paths["adapter"], config.save_format)
    timings["total_s"] = time.perf_counter() - started
    result = RunResult(
        metrics={"before": before, "after": after}, history=history, paths=paths, timings=timings,
        best_step=best.step if best.state is not None else state.step, stopped_early=best.should_stop,
        parameters={"trainable": parameters.trainable, "total": parameters.total},
        status=status, message=message, skipped_steps=state.skipped,
    )
    if main:
        result.paths.update(report.write_run(run_dir, config, result, parameters))
        report.prune_checkpoints(run_dir, keep=0)  # an ended run is not resumed
        console.print(report.results_table(result))
    # Under `accelerate launch` every process returns only once the main one has written the
    # adapter and the report, so code after `run` on any rank never reads a half-written folder.
    accelerator.wait_for_everyone()
    if unsaved:
        raise SpliceError(f"{message} Report: {run_dir / 'metrics.json'}")
    return result


@dataclass
class StepCheck:
    """What an optimizer step's numbers say, the same on every process."""

    loss: float
    problem: str | None  # "loss nan", "gradient norm inf", ...
    interrupted: bool


def _check_step(accelerator: Accelerator, micro_losses: list[torch.Tensor], micro_totals: list[torch.Tensor],
                params: list[torch.nn.Parameter], max_grad_norm: float | None, check_gradients: bool,
                interrupted: bool) -> StepCheck:
    """The step's mean loss, whether its loss or gradient norm is non-finite (clipping on the
    way, when configured), and whether a process got a stop signal: agreed by all processes."""
    step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), "mean")
    flags = torch.stack([(~torch.isfinite(torch.stack(micro_totals))).sum().float(),
                         torch.tensor(float(interrupted), device=step_loss.device)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "sum")
    if max_grad_norm:
        norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    elif check_gradients:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    else:
        norm = None
    loss = step_loss.item()
    nonfinite_losses, stop_signal = flags.tolist()
    problem = None
    if nonfinite_losses or not math.isfinite(loss):
        problem = f"loss {loss}"
    elif check_gradients and norm is not None and not math.isfinite(norm := float(norm)):
        problem = f"gradient norm {norm}"
    return StepCheck(loss, problem, bool(stop_signal))


def _nonfinite_message(config: TrainConfig, step: int, problem: str, best: BestKeeper, policy: str) -> str:
    what = (f"step {step}: non-finite {problem}; stopped (on_nonfinite: stop)" if policy == "stop" else
            f"step {step}: {MAX_SKIPS_IN_A_ROW} optimizer steps in a row had a non-finite loss or gradient "
            f"(last: {problem}); stopped")
    kept = (f"the best finite state (step {best.step}) is kept" if best.state is not None else
            "there is no validation split, so the final state is all there is")
    return (f"{what}; {kept}. The training diverged: lower the learning rate (lr {config.lr:g}), set "
            "max_grad_norm, or check the data.")


def _interruption(config: TrainConfig, run_dir: Path, state: RunState, parameters: Any, signal_number: int,
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
    timings = {**timings, "train_s": state.train_s}
    result = RunResult(
        metrics={"before": state.before}, history=state.history,
        paths={"run_dir": run_dir, **({"adapter": adapter} if best.state is not None else {})},
        timings=timings, best_step=best.step, stopped_early=False,
        parameters={"trainable": parameters.trainable, "total": parameters.total},
        status="interrupted", message=message, skipped_steps=state.skipped,
    )
    if main:
        result.paths.update(report.write_run(run_dir, config, result, parameters))
    return TrainingInterrupted(message, result, signal_number)


def _claim(processes: PartialState, path: str | Path, force: bool, resume: bool) -> report.RunFolder | None:
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


def _comparable(config: TrainConfig) -> dict[str, Any]:
    """The config as a checkpoint records it; the folder it lives in may move."""
    return {k: v for k, v in config.to_dict().items() if k != "output_dir"}


def _check_same_config(saved: dict[str, Any] | None, current: dict[str, Any], run_dir: Path) -> None:
    if saved is None or saved == current:
        return
    changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
               if saved.get(k) != current.get(k)]
    raise SpliceError(f"{run_dir / 'config.yaml'} is not the config its checkpoint was written with "
                      f"({'; '.join(changed)}); a resumed run continues the same config")


@dataclass
class RunState:
    """Where a run is, in the form a checkpoint stores it (accelerate's `register_for_checkpointing`).

    The data position is the epoch, the number of its loader batches already trained on, and
    the state of the loader's shuffle generator when that epoch began: restoring that state
    gives the epoch's order again, and the batches done are skipped.
    """

    config: dict[str, Any]
    best: BestKeeper
    step: int = 0
    epoch: int = 0
    batches: int = 0
    epoch_rng: torch.Tensor | None = None
    examples: int = 0
    skipped: int = 0
    skipped_in_a_row: int = 0
    train_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, Metrics] = field(default_factory=dict)
    saved_config: dict[str, Any] | None = None  # the config of a loaded checkpoint

    FIELDS = ("step", "epoch", "batches", "epoch_rng", "examples", "skipped", "skipped_in_a_row", "train_s",
              "history", "before")

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "config": self.config, "best": self.best.state_dict(),
                **{name: getattr(self, name) for name in self.FIELDS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved_config = state["config"]
        self.best.load_state_dict(state["best"])
        for name in self.FIELDS:
            setattr(self, name, state[name])


def _batches(loader: DataLoader, epochs: int, state: RunState,
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


def _checkpoint_trainable_only(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """accelerate checkpoints a prepared model whole; these hooks make its checkpoint hold only
    what trains (adapter and trained modules; the base is the model's own files) and load that
    back with an exact check of the names."""

    def save_trainable(models: list, weights: list, output_dir: str) -> None:
        weights[:] = [{k: p.detach().contiguous() for k, p in splice.trainable_parameters(model).items()}]

    def load_trainable(models: list, input_dir: str) -> None:
        tensors = load_file(str(Path(input_dir) / SAFE_WEIGHTS_NAME))
        own = splice.trainable_parameters(model)
        if tensors.keys() != own.keys():
            missing, extra = sorted(own.keys() - tensors.keys()), sorted(tensors.keys() - own.keys())
            raise SpliceError(f"checkpoint {input_dir} does not hold this run's trainable tensors "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(tensors[name])
        models.clear()  # loaded here; accelerate must not load a whole model from the file

    accelerator.register_save_state_pre_hook(save_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)


def _save_checkpoint(accelerator: Accelerator, model: torch.nn.Module, run_dir: Path, step: int,
                     show: Callable[..., None]) -> Path | None:
    """accelerate's `save_state` into checkpoints/step-N, written whole: the main process makes a
    temporary folder (every process writes its random states into it) and swaps it into place.
    Older checkpoints are removed; a state with non-finite tensors is not written (None)."""
    if _nonfinite_tensors(splice.trainable_parameters(model)):
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


def save_adapter(model: torch.nn.Module, path: Path, save_format: str = "auto", name: str | None = None,
                 tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """`splice.save`, which writes the folder whole (`atomic_directory`: a reader, or a run
    stopped at any point, finds the old complete adapter or the new one). Refuses a state whose
    trainable tensors (or `tensors`) are not all finite."""
    bad = _nonfinite_tensors(splice.trainable_parameters(model) if tensors is None else tensors)
    if bad:
        raise SpliceError(f"refusing to save a non-finite adapter to {path}: {', '.join(bad[:3])}"
                          f"{', ...' if len(bad) > 3 else ''} hold NaN or inf")
    return splice.save(model, path, name, format=save_format, overwrite=True)


def _nonfinite_tensors(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in `tensors` that hold a NaN or an infinity."""
    return [name for name, t in tensors.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


class _StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current step (`received` is set); a
    second one stops at once. Only in the main thread, where Python delivers signals."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
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


def evaluate(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: list[Row], config: TrainConfig
) -> Metrics:
    """Metrics of `model` on canonical rows: loss and accuracy (classification), or loss,
    perplexity and greedy exact match (causal LM). Uses config's task, batch size, max length
    and precision; the model is moved to accelerate's device.
    """
    accelerator = _accelerator(config)
    collate = collator(config.task, tokenizer, config.max_length)
    loader = DataLoader(data, batch_size=config.batch_size, collate_fn=collate)
    model = accelerator.prepare_model(model, evaluation_mode=True)
    return _evaluate(model, accelerator.prepare(loader), config.task, accelerator, tokenizer, data, config.batch_size)


def evaluate_adapter(config: TrainConfig, adapter: str | Path, split: str = "test") -> Metrics:
    """Load `config.model`, attach the adapter saved in `adapter`, evaluate on `config.data`.

    A bundled data set is evaluated on `split`; a file is evaluated whole. The classification
    head's size comes from the data's labels, so the data must name every class (integer
    labels do by their largest value).
    """
    rows = load_eval_rows(config, split)
    model, tokenizer = tasks.load_model(config, rows.label_names)
    splice.load(model, adapter)
    return evaluate(model, tokenizer, rows.test, config)


@dataclass
class BestKeeper:
    """Best-checkpoint keeping and early stopping on one validation metric.

    An evaluation with a non-finite number, or a state with a non-finite tensor, is never the
    best (a diverged model that predicts one class can beat the start on accuracy); it counts
    as an evaluation without improvement.
    """

    metric: str
    higher_is_better: bool
    patience: int | None
    value: float | None = None
    step: int = 0
    state: dict[str, torch.Tensor] | None = None
    evals_since_best: int = 0

    def offer(self, metrics: Metrics, step: int, snapshot: Callable[[], dict[str, torch.Tensor]]) -> bool:
        """Record an evaluation; keep `snapshot()` if it is the best so far. True if it was."""
        value = metrics[self.metric]
        finite = all(math.isfinite(v) for v in metrics.values())
        better = self.value is None or (value > self.value if self.higher_is_better else value < self.value)
        improved = finite and better
        state = snapshot() if improved else None
        if improved and not _nonfinite_tensors(state):
            self.value, self.step, self.state, self.evals_since_best = value, step, state, 0
            return True
        self.evals_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_since_best >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "step": self.step, "state": self.state, "evals_since_best": self.evals_since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.step, self.state = state["value"], state["step"], state["state"]
        self.evals_since_best = state["evals_since_best"]


def _accelerator(config: TrainConfig) -> Accelerator:
    """A fresh Accelerator for this config's precision and accumulation.

    accelerate keeps mixed precision in a process-wide singleton that refuses to change; its
    non-distributed part is reset so that one process (a notebook, a test session) can run
    configs of different precisions. The distributed state of `accelerate launch` is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=config.precision, gradient_accumulation_steps=config.grad_accum)


def _enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' gradient (activation) checkpointing, non-reentrant.

    Non-reentrant because it connects a recomputed block to the graph through the parameters
    inside it, not only through the block's inputs (which a frozen base leaves without grad;
    `splice.attach` covers reentrant checkpointing too), and because reentrant checkpointing
    runs a nested backward that DistributedDataParallel supports only in restricted settings.
    It is what PyTorch recommends and what recent transformers use by default.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise splice.SpliceError(f"{type(model).__name__} does not support gradient checkpointing; "
                                 "set gradient_checkpointing to false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _progress_bar(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} ex/s"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled)


@torch.no_grad()
def _evaluate(model: torch.nn.Module, loader: DataLoader, task: str, accelerator: Accelerator,
              tokenizer: PreTrainedTokenizerBase | None = None, generate_rows: list[Row] | None = None,
              batch_size: int = 16) -> Metrics:
    """Loss and task metrics over a loader, gathered across processes; with `generate_rows`
    (causal LM only) also the greedy exact-match rate on those rows."""
    model.eval()
    stats: dict[str, list[torch.Tensor]] = defaultdict(list)
    for batch in loader:
        for key, value in tasks.example_stats(task, model, batch).items():
            stats[key].append(accelerator.gather_for_metrics(value))
    metrics = tasks.reduce_stats(task, {k: torch.cat(v) for k, v in stats.items()})
    if task == "causal_lm" and generate_rows:
        unwrapped = accelerator.unwrap_model(model)
        metrics["exact_match"] = tasks.exact_match(unwrapped, tokenizer, generate_rows, batch_size)
    return metrics


def _param_groups(model: torch.nn.Module, train_also: list[str], config: TrainConfig) -> list[dict[str, Any]]:
    """Adapter parameters at `lr`; parameters of modules trained in full at `head_lr`."""
    heads = tuple(f"{name}." for name in resolve_heads(model, train_also))
    groups: dict[bool, list[torch.nn.Parameter]] = {False: [], True: []}
    for name, p in splice.trainable_parameters(model).items():
        groups[name.startswith(heads)].append(p)
    lrs = {False: config.lr, True: config.head_lr or config.lr}
    return [{"params": ps, "lr": lrs[is_head]} for is_head, ps in groups.items() if ps]


def _snapshot(model: torch.nn.Module, accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable tensors (adapter and trained head)."""
    trainable = splice.trainable_parameters(accelerator.unwrap_model(model))
    return {name: p.detach().to("cpu", copy=True) for name, p in trainable.items()}


def _restore(model: torch.nn.Module, accelerator: Accelerator, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in splice.trainable_parameters(accelerator.unwrap_model(model)).items():
            p.copy_(state[name])


def _quiet(*_: Any, **__: Any) -> None:
    """`print` for processes other than the main one."""
