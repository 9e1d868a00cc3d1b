"""The reusable unit of training: one adapter of one model on one data set, on accelerate (CPU,
CUDA, MPS, bf16/fp16 and `accelerate launch` run the same code).

    trainer = Trainer.from_config(TrainConfig(...))       # loads the model, attaches the adapter
    trainer = Trainer(model, tokenizer, config, adapter_name="task2")  # a model you built
    result = trainer.fit()                                 # or: while not trainer.done: trainer.step()
                                                           #     result = trainer.finish()

The trainer owns the accelerator, optimizer, scheduler, data loaders, evaluation, checkpoints,
resume and the report. Jobs made of several trainings (continual learning, orchestration,
benchmarks) drive it through `step()`, `evaluate()`, `fit()` and `Callback`s, never its privates.

A step is three public pieces, which `step()` composes and an orchestrator may drive itself
(`splice.orchestrate` runs the forward and backward of several trainers' batches at once):

    batch = trainer.next_batch()                     # the run's own data order
    ... forward and backward of the batch ...
    if trainer.record_backward(loss, examples):      # the accumulation is complete
        entry = trainer.optimizer_step()             # checked update, history, evaluation, best

Best checkpoint: the trainable tensors (adapter and trained head) of the best evaluation are
kept in memory and restored at the end, and the adapter folder is rewritten (whole, through
`atomic_directory`) at every improvement, so that a run stopped at any point leaves its best
adapter so far. The untrained state (step 0) is a candidate too: if training never beats it,
that is what gets saved, and the report says so (best_step 0). A non-finite evaluation or state
is never a candidate, and no non-finite adapter or checkpoint is ever written.

Non-finite numbers: each step's loss and, before the optimizer step, its gradient norm are
checked. `on_nonfinite: stop` ends the run there (the best finite state is saved);
`on_nonfinite: skip` drops the step's update and goes on, and stops after 10 such steps in a
row. Checkpoints, resuming and signals: see `splice.train.checkpoint`.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.markup import escape
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

import splice
from splice.core.errors import SpliceError
from splice.core.progress import use as progress_to
from splice.train import checkpoint, ending, report, tasks
from splice.train.adapters import adapter_parameters, trainable_adapter
from splice.train.batching import check_packing, rows_in
from splice.train.callbacks import Callback, progress_bar, schedule_callback
from splice.train.config import TrainConfig, describe_data
from splice.train.data import DatasetSplits, collator, load_splits
from splice.train.data import train_loader as make_train_loader
from splice.train.ending import Tenancy
from splice.train.evaluation import Metrics, enable_gradient_checkpointing, evaluate_loader, make_accelerator
from splice.train.gradients import gradient_rule
from splice.train.optimizers import make_optimizer
from splice.train.results import (
    MAX_SKIPS_IN_A_ROW,
    BestKeeper,
    RunResult,
    RunState,
    StepCheck,
    check_step,
    nonfinite_message,
    save_adapter,
)
from splice.train.run_setup import load_run


class Trainer:
    """Trains adapter `adapter_name` (attached, trainable) of `model` as `config` says.

    The model may carry other adapters: `adapter_name` is made the only active one, so only it
    (and its own heads) trains. The data comes from `config` (or `splits`); the run folder is
    `config.output_dir` (config.yaml at the start, adapter/ at every improvement, checkpoints,
    and the report at the end). The folder is not locked here: `splice.train.run` locks it.
    `resume=True` continues from the newest checkpoint in the folder. `tenancy` makes it one of
    several trainers an orchestrator drives on its own model and `accelerator` (see `Tenancy`).
    A job that owns more of the model (a continual run's per-task heads, its penalties) gives
    `heads`, paths of modules outside the adapter trained in full at `head_lr` (their parameters
    already require grad), and `penalties`, callables whose scalar is added to each batch's loss.
    `companions` are other attached adapters trained along with `adapter_name`, active with it
    (Med-DualLoRA's local adapter beside the global one); what is saved is `adapter_name`.
    `objective(model, batch)` replaces the model's own loss as the task loss (a federated
    method's local objective: FedEU's evidential loss, FED-FSTQ's loss on selected tokens).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: TrainConfig, *,
                 adapter_name: str = "default", splits: DatasetSplits | None = None,
                 callbacks: Sequence[Callback] = (), console: Console | None = None, resume: bool = False,
                 accelerator: Accelerator | None = None, tenancy: Tenancy | None = None,
                 heads: Sequence[str] = (), penalties: Sequence[Callable[[], torch.Tensor]] = (),
                 companions: Sequence[str] = (),
                 objective: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None) -> None:
        if tenancy is not None and (resume or penalties or objective):
            raise SpliceError("a tenant trainer is not checkpointed and its orchestrator computes the loss: it "
                              "cannot " + ("resume" if resume else "take penalties" if penalties else
                                           "take an objective"))
        self.gradient_rule = gradient_rule(config.selection)
        if self.gradient_rule is not None and (tenancy is not None or penalties or objective):
            raise SpliceError(f"selection {config.selection['name']!r} computes each batch's gradients itself: it "
                              "cannot run in a multiplexed tenant, nor with penalties or an objective")
        self.penalties = list(penalties)
        self.objective = objective
        self.started = time.perf_counter()
        self.config, self.tokenizer, self.adapter_name, self.tenancy = config, tokenizer, adapter_name, tenancy
        self.console = console or Console()
        self.callbacks = list(callbacks) + schedule_callback(config.schedule)
        if isinstance(self.gradient_rule, Callback):  # a rule that adds to the history entries (GAST)
            self.callbacks.append(self.gradient_rule)
        self.accelerator = accelerator or make_accelerator(config)
        self.main = self.accelerator.is_main_process
        self.run_dir = Path(config.output_dir)
        self.resuming = resume
        self.label = f"{tenancy.label}: " if tenancy is not None else ""  # starts the trainer's messages
        splits = splits if splits is not None else load_splits(config)
        if not splits.train:
            raise SpliceError(f"no training rows in {describe_data(config.data)}")
        heads = trainable_adapter(model, adapter_name, companions) + list(heads)
        self.trained = adapter_parameters(model, adapter_name, companions)  # what snapshots, clipping and saving touch
        if config.gradient_checkpointing and tenancy is None:
            enable_gradient_checkpointing(model)
        self.parameters = splice.summary(model) if tenancy is None else tenancy.summary
        self.show(report.summary_table(self.parameters, title=f"{self.label}{config.model} + "
                                       f"{config.adapter['method']} on {describe_data(config.data)}"))
        self._prepare(model, splits, heads)
        metric, higher_is_better = tasks.MAIN_METRIC[config.task]
        self.best = BestKeeper(metric, higher_is_better, config.early_stopping_patience)
        self.state = RunState(config=checkpoint.comparable(config), best=self.best)
        if tenancy is None:
            self.accelerator.register_for_checkpointing(self.state)
            if hasattr(self.gradient_rule, "state_dict"):  # a rule with state of its own resumes with the run
                self.accelerator.register_for_checkpointing(self.gradient_rule)
            checkpoint.checkpoint_trainable_only(self.accelerator, self.trained)
        self.timings: dict[str, float] = {}  # what the report gives under "timings"; callers may add theirs
        self.stop: tuple[str, str] | None = None  # (status, message) of a run that ends before its last step
        self.last_check: StepCheck | None = None
        self._begun, self._batches, self._signals = False, None, None
        self._step_started: float | None = None  # when the accumulation under way took its first batch
        self._micro_losses: list[torch.Tensor] = []
        self._micro_totals: list[torch.Tensor] = []

    @classmethod
    def from_config(cls, config: TrainConfig, **kwargs: Any) -> Trainer:
        """Seed, load the data and `config.model`, attach `config.adapter` (or load
        `config.init_adapter`, trainable), and build the trainer (keywords as `Trainer`)."""
        started = time.perf_counter()
        accelerator = kwargs.pop("accelerator", None) or make_accelerator(config)
        setup = load_run(config, kwargs.get("adapter_name", "default"))
        trainer = cls(setup.model, setup.tokenizer, config, splits=setup.splits, accelerator=accelerator, **kwargs)
        trainer.started = started
        return trainer

    def _prepare(self, model: torch.nn.Module, splits: DatasetSplits, heads: list[str]) -> None:
        """Loaders, optimizer and schedule, through `accelerator.prepare`."""
        config, accelerator = self.config, self.accelerator
        collate = collator(config.task, self.tokenizer, config.max_length)
        if config.packing:
            check_packing(model, collate, tenant=self.tenancy is not None)
        self.train_rows = splits.train
        train_loader = make_train_loader(splits.train, config, collate, accelerator.num_processes)
        self.eval_rows = {n: rows for n, rows in (("validation", splits.validation), ("test", splits.test)) if rows}
        eval_loaders = [DataLoader(rows, batch_size=config.batch_size, collate_fn=collate)
                        for rows in self.eval_rows.values()]
        optimizer = make_optimizer(config.optimizer, model, self.trained, heads, lr=config.lr, head_lr=config.head_lr,
                                   weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm)
        self.clipped_by_optimizer = getattr(optimizer, "clips_gradients", False)  # LoFT clips in W's space
        self.plain_model = model  # accelerate may wrap it (DDP); splice's state lives on the model itself
        self.model, self.optimizer, self.train_loader, *eval_loaders = accelerator.prepare(
            model, optimizer, train_loader, *eval_loaders)
        self.loaders = dict(zip(self.eval_rows, eval_loaders, strict=True))
        self.steps_per_epoch = math.ceil(len(self.train_loader) / config.grad_accum)
        self.total_steps = config.max_steps or math.ceil(config.epochs * self.steps_per_epoch)
        self.eval_every = config.eval_every or self.steps_per_epoch
        # A prepared scheduler steps once per process per optimizer step, hence the factor. Built on
        # the plain optimizer, which accelerate then ties to this trainer's prepared optimizer alone
        # (an orchestrator's accelerator prepares several).
        self.scheduler = accelerator.prepare(get_cosine_schedule_with_warmup(
            optimizer, int(config.warmup_ratio * self.total_steps) * accelerator.num_processes,
            self.total_steps * accelerator.num_processes,
        ))

    # -- the public steps ---------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        return self.state.step

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.state.history

    @property
    def done(self) -> bool:
        """The last step is taken, early stopping struck, or non-finite numbers stopped the run."""
        return self.stop is not None or self.state.step >= self.total_steps or self.best.should_stop

    def begin(self) -> None:
        """Write config.yaml and evaluate the untrained state (step 0), or load the newest
        checkpoint when resuming. `step` and `fit` call it; once only."""
        if self._begun:
            return
        self._begun = True
        for callback in self.callbacks:
            callback.on_begin(self)
        if self.main and not self.resuming:  # now, not at the end: `--resume` reads it
            self.run_dir.mkdir(parents=True, exist_ok=True)
            report.write_config(self.run_dir, self.config)
        self.timings["load_s"] = time.perf_counter() - self.started
        if self.resuming:
            latest = report.latest_checkpoint(self.run_dir)
            self.accelerator.load_state(str(latest))
            checkpoint.check_same_config(self.state.saved_config, self.state.config, self.run_dir)
            self.show(f"resumed {escape(str(self.run_dir))} from {escape(str(latest))} "
                      f"(step {self.state.step} of {self.total_steps})")
        else:
            tick = time.perf_counter()
            self.state.before = self.evaluate()
            self.timings["eval_before_s"] = time.perf_counter() - tick
            if "validation" in self.state.before:
                self._keep_if_best(self.state.before["validation"], 0)
        self.show(report.metrics_line(f"{self.label}before training", self.state.before))

    def step(self) -> dict[str, Any] | None:
        """One optimizer step (`grad_accum` batches), the periodic evaluation and checkpoint that
        fall on it; its history entry. None when the run is over or non-finite numbers stopped it."""
        self.begin()
        if self.done:
            return None
        self.model.train()
        while (batch := self.next_batch()) is not None:
            with self.accelerator.accumulate(self.model):
                loss, total = self._forward_backward(batch)
            if self.record_backward(loss, rows_in(batch) * self.accelerator.num_processes, total):
                return self.optimizer_step()
        return None  # the data ran out (cannot happen before the last step)

    def next_batch(self) -> dict[str, torch.Tensor] | None:
        """The next training batch in this run's own data order (reshuffled each epoch, resumed
        where a checkpoint left it), on the accelerator's device; None when the epochs are over."""
        self.begin()
        if self._batches is None:
            epochs = math.ceil(self.total_steps / self.steps_per_epoch)
            self._batches = checkpoint.batches(self.train_loader, epochs, self.state, self.accelerator)
        if self._step_started is None:
            self._step_started = time.perf_counter()
        return next(self._batches, None)

    def record_backward(self, loss: torch.Tensor, examples: int, total: torch.Tensor | None = None) -> bool:
        """Count a batch from `next_batch` whose backward has run (in `step`, or in an orchestrator's
        pass over several trainers' batches): its task `loss`, its number of `examples` (on all
        processes) and the `total` backpropagated if more (auxiliary losses). True when the
        accumulation is complete (as accelerate's `accumulate`: every `grad_accum` batches and at
        an epoch's last batch), and `optimizer_step` is due."""
        self._micro_losses.append(loss.detach())
        self._micro_totals.append((loss if total is None else total).detach())
        self.state.batches += 1
        self.state.examples += examples
        return self.state.batches % self.config.grad_accum == 0 or self.state.batches == len(self.train_loader)

    def optimizer_step(self) -> dict[str, Any] | None:
        """The checked optimizer step that ends an accumulation, and what falls on it; its history entry.

        Unless the loss or gradient norm is not finite, the (clipped) update and the schedule's
        step; then the non-finite policy, the history entry, the periodic evaluation and best
        keeping, the callbacks' `on_step_end` and a checkpoint when due. None when non-finite
        numbers stopped the run.
        """
        check = self._update()
        self.last_check = check
        entry = self._end_step(check)
        if self._step_started is not None:
            self.state.train_s += time.perf_counter() - self._step_started
            self._step_started = None
        if entry is not None:
            for callback in self.callbacks:  # first: what they change (DMEP's pruning) goes in the checkpoint
                callback.on_step_end(self, entry)
            if self.tenancy is None and not self.done and not self.interrupt_requested \
                    and self.config.checkpoint_every and entry["step"] % self.config.checkpoint_every == 0:
                self.save_checkpoint()
        return entry

    def evaluate(self, splits: Sequence[str] | None = None, *, generate: bool = True) -> dict[str, Metrics]:
        """Metrics on each evaluation split (default: all); `generate` adds greedy exact match
        for causal LM (too slow for every periodic evaluation)."""
        config = self.config
        with progress_to(self.console, quiet=not self.main):  # its bars go where its messages go
            metrics = {name: evaluate_loader(self.model, self.loaders[name], config.task, self.accelerator,
                                             self.tokenizer if generate else None,
                                             self.eval_rows[name] if generate else None, config.batch_size)
                       for name in (self.loaders if splits is None else splits)}
        for callback in self.callbacks:
            callback.on_evaluate(self, metrics)
        return metrics

    def fit(self) -> RunResult:
        """Step to the end (or an early stop), then `finish`. SIGINT/SIGTERM stop after the step
        under way with a checkpoint and raise `TrainingInterrupted`; a second signal stops at once."""
        self.begin()
        with checkpoint.StopSignals() as signals, progress_bar(self.console, self.main) as progress:
            self._signals = signals
            bar = progress.add_task("train", total=self.total_steps, completed=self.state.step, loss="-", speed="-")
            try:
                while not self.done:
                    entry = self.step()
                    if entry is None:
                        break
                    speed = self.state.examples / max(self.state.train_s, 1e-9)
                    progress.update(bar, advance=1, speed=f"{speed:.1f}",
                                    loss="nan" if entry["loss"] is None else f"{entry['loss']:.4f}")
                    if not self.done and self.interrupt_requested:
                        raise ending.interruption(self, signals.received or signal.SIGINT)
            finally:
                self._signals = None
        return self.finish()

    def finish(self) -> RunResult:
        """Restore the best state, evaluate it, save the adapter, write the report; the result.

        A final state with non-finite tensors (possible only without a validation split) is not
        saved: the report says so and `SpliceError` is raised (a tenant's result says it instead).
        """
        self.begin()
        return ending.finish(self)

    @property
    def interrupt_requested(self) -> bool:
        """One process: a signal arrived; several: the flag they agreed on in `check_step`."""
        check, signals = self.last_check, self._signals
        received = signals is not None and signals.received is not None
        return bool(check and check.interrupted) or (self.accelerator.num_processes == 1 and received)

    def save(self, path: str | Path) -> Path:
        """Write the adapter (and its trained heads) to `path`, whole; callbacks' `on_save` first."""
        for callback in self.callbacks:
            callback.on_save(self, Path(path))
        return save_adapter(self.plain_model, Path(path), self.config.save_format, name=self.adapter_name,
                            tensors=self.trained)

    def replace_parameters(self, moves: Mapping[torch.nn.Parameter, tuple[torch.nn.Parameter, torch.Tensor, int]],
                           ) -> None:
        """Follow a change of the adapter's parameters made during the run (DMEP's pruning):
        `moves` maps each replaced parameter to (its successor, the indices of the old one it
        kept, the dimension they index). The optimizer gets the successors, their state cut to
        the kept indices; what is trained, clipped, checkpointed and saved is read again; and the
        best state kept so far, of the old shapes, is dropped: best keeping restarts on the new
        model. One process only (DDP registers its parameters once)."""
        if self.accelerator.num_processes > 1:
            raise SpliceError("the adapter's parameters cannot change during a multi-process run "
                              f"({self.accelerator.num_processes} processes: DDP registered them at the start)")
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper, or a plain one
        for group in optimizer.param_groups:
            group["params"] = [moves[p][0] if p in moves else p for p in group["params"]]
        for old, (new, index, dim) in moves.items():
            state = optimizer.state.pop(old, None)
            if state is not None:
                optimizer.state[new] = {key: value.index_select(dim, index.to(value.device))
                                        if torch.is_tensor(value) and value.shape == old.shape else value
                                        for key, value in state.items()}
        trained = adapter_parameters(self.plain_model, self.adapter_name)
        self.trained.clear()  # in place: the checkpoint hooks hold this mapping
        self.trained.update(trained)
        if self.tenancy is None:
            self.parameters = splice.summary(self.plain_model)
        self.best.value, self.best.state, self.best.evals_since_best = None, None, 0

    def save_checkpoint(self) -> Path | None:
        """A resumable checkpoint of this step in the run folder (see `splice.train.checkpoint`)."""
        if self.tenancy is not None:
            raise SpliceError("a tenant trainer is not checkpointed")
        return checkpoint.save_checkpoint(self.accelerator, self.trained, self.run_dir, self.state.step, self.show)

    def show(self, *args: Any, **kwargs: Any) -> None:
        """`console.print` on the main process only."""
        if self.main:
            self.console.print(*args, **kwargs)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trainable tensors (adapter and trained heads)."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self.trained.items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a `snapshot` back into the trainable tensors."""
        with torch.no_grad():
            for name, p in self.trained.items():
                p.copy_(state[name])

    # -- inside a step ------------------------------------------------------------------------

    def _forward_backward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's task loss and what was backpropagated (with auxiliary losses, if any);
        a gradient rule (`selection`) makes the gradients its own way."""
        if self.gradient_rule is not None:
            return self.gradient_rule.backward(self, batch)
        loss = self.model(**batch).loss if self.objective is None else self.objective(self.model, batch)
        extra = splice.auxiliary_loss(self.plain_model)  # e.g. a rank router's budget penalty
        total = loss if extra is None else loss + extra
        for penalty in self.penalties:
            total = total + penalty()
        self.backward(total)
        return loss, total

    def backward(self, total: torch.Tensor) -> None:
        """Backpropagate `total` as one batch of the accumulation under way: scaled by 1 / the
        number of batches in it, `grad_accum` or fewer at an epoch's end (as transformers'
        Trainer does), so every optimizer step applies its batches' mean gradient. accelerate
        keeps the accumulation count process-wide: another Trainer built since may have set its
        own, so this one's is set again first."""
        accelerator, accum, size = self.accelerator, self.config.grad_accum, self.accumulation_size()
        accelerator.gradient_accumulation_steps = accum
        accelerator.backward(total if size == accum else total * (accum / size))

    def accumulation_size(self) -> int:
        """How many batches the accumulation under way holds: `grad_accum`, or fewer in an
        epoch's last one (the step `record_backward` ends at the epoch's last batch)."""
        accum = self.config.grad_accum
        if accum == 1:  # also for a driver that draws its own batches past the loader's length (multitask)
            return 1
        first = self.state.batches - self.state.batches % accum  # its first batch's place in the epoch
        return max(1, min(accum, len(self.train_loader) - first))

    def _update(self) -> StepCheck:
        """Check the accumulated step (`check_step`, clipping on the way); the optimizer's update
        unless a number is not finite, and the schedule's step unless the policy stops the run."""
        accelerator, optimizer, config = self.accelerator, self.optimizer, self.config
        received = self._signals is not None and self._signals.received is not None
        check = check_step(accelerator, self._micro_losses, self._micro_totals, list(self.trained.values()),
                           None if self.clipped_by_optimizer else config.max_grad_norm,
                           config.precision != "fp16", received)
        self._micro_losses, self._micro_totals = [], []
        if check.problem is None:
            optimizer.step()
        elif accelerator.scaler is not None and config.max_grad_norm and not self.clipped_by_optimizer:
            accelerator.scaler.update()  # clipping unscaled the gradients: close the scaler's step
        if check.problem is None or config.on_nonfinite == "skip":
            self.scheduler.step()
        optimizer.zero_grad()
        return check

    def _end_step(self, check: StepCheck) -> dict[str, Any] | None:
        """History entry, the non-finite policy and the periodic evaluation of a finished step."""
        config, state = self.config, self.state
        if check.problem is not None and config.on_nonfinite == "stop":
            self.stop = ("diverged", nonfinite_message(config, state.step + 1, check.problem, self.best, "stop"))
            return None
        state.step += 1
        step = state.step
        entry = {"step": step, "epoch": round(step / self.steps_per_epoch, 4),
                 "lr": self.scheduler.get_last_lr()[0], "loss": check.loss}
        if check.problem is not None:  # on_nonfinite: skip
            entry.update(loss=None, skipped=check.problem)
            state.skipped += 1
            state.skipped_in_a_row += 1
            self.show(f"[yellow]{escape(self.label)}step {step}: non-finite {check.problem}; update skipped "
                      f"({state.skipped_in_a_row} in a row)[/]")
        else:
            state.skipped_in_a_row = 0
        state.history.append(entry)
        if (step % self.eval_every == 0 or step == self.total_steps) and "validation" in self.loaders:
            entry["eval"] = self.evaluate(["validation"], generate=False)["validation"]
            improved = self._keep_if_best(entry["eval"], step)
            self.show(report.metrics_line(f"{self.label}step {step}", {"validation": entry["eval"]}, best=improved))
            self.model.train()
        if state.skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
            self.stop = ("diverged", nonfinite_message(config, step, check.problem, self.best, "skip"))
        return entry

    def _keep_if_best(self, metrics: Metrics, step: int) -> bool:
        """Offer an evaluation to the keeper; an improvement is written to adapter/ at once."""
        improved = self.best.offer(metrics, step, self.snapshot)
        if improved and self.main:
            self.save(self.run_dir / "adapter")
        return improved
