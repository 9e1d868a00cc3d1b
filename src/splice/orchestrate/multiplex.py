"""Train several tenants' adapters at once on one frozen backbone (MuxTune / mLoRA style).

    results = splice.orchestrate.multiplex([TrainConfig(...), TrainConfig(...), ...])

Each tenant is an ordinary training config (`splice train` would run it alone), trained by its
own `splice.train.Trainer`: the data order, optimizer and learning-rate schedule, non-finite
policy, history, evaluation, best checkpoint, output folder and report are the trainer's. All
tenants share one copy of the model; a tenant's trainer trains its *view* of it (`views`: the
shared backbone with the tenant's adapter and modules only) on the multiplexer's accelerator.

What the multiplexer does itself is the forward and backward. Every step takes the next batch of
each tenant's trainer, packs their rows into a few forward passes (`packing`), routes each row
through its tenant's adapter and head (`splice.route`), and runs one backward per pass; each
tenant's loss is the mean over its own rows (or label tokens), so gradients reach every adapter
exactly as if it trained alone. Each trainer then counts its batch (`Trainer.record_backward`)
and, once its accumulation is complete, takes its own checked optimizer step
(`Trainer.optimizer_step`: clipping over its own parameters, update, history, periodic
evaluation, best keeping, callbacks). A tenant that reaches its last step (or stops early)
finishes as a lone run does (`Trainer.finish`) and leaves the shared model while the others go
on; `Multiplexer.add` lets a tenant join at any step.

Equal to training alone: a tenant is set up by the code `splice.train.run` sets up with, in the
same order (`splice.train.run_setup.load_run`: seed, data, model load, attach or continue
`init_adapter`), and trained by the same trainer code, so its initial adapter and head, data
order, schedule, checks and evaluations are those of the lone run; its loss and clipping use
only its rows and parameters. With a dropout-free backbone the adapters match the lone run's up
to floating-point summation order. Dropout in the backbone draws its masks for the packed batch,
so with dropout the runs agree in distribution, not bit for bit.

Requirements: the tenants share the model, the task, the precision ("no" or "bf16") and the
base's quantization (`quantize`, QLoRA's 4-bit base); the
first tenant's `gradient_checkpointing` holds for the shared model.

Run folders: each tenant claims its output folder with the lock a lone run takes (refused at
once if another run holds it); its trainer writes config.yaml at the start and its best adapter
so far at every improvement; the folder is released when the tenant is done. Non-finite losses
or gradients follow each tenant's `on_nonfinite` ("stop" ends that tenant alone with its best
finite adapter; "skip" drops its update). Tenants are not checkpointed (`Tenancy`): an
interrupted multiplexed run leaves each tenant's best adapter but cannot be resumed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers import PreTrainedTokenizerBase

import splice
from splice.core import progress
from splice.core.api import adapter_name_problem, model_state
from splice.core.config import AdapterConfig
from splice.core.errors import SpliceError
from splice.core.quantization import quantize_options
from splice.orchestrate import packing
from splice.orchestrate.views import TenantModules, join
from splice.train import Callback, RunResult, TrainConfig, Trainer, report, tasks
from splice.train.data import IGNORE_INDEX
from splice.train.ending import Tenancy
from splice.train.evaluation import enable_gradient_checkpointing, make_accelerator
from splice.train.run_setup import load_run


@dataclass
class Tenant:
    """One training job inside a multiplexed run: its trainer and its place in the run."""

    name: str
    trainer: Trainer  # over the tenant's view of the shared model
    folder: report.RunFolder  # the claimed (locked) output folder
    num_labels: int | None  # a classifier's own columns of the packed (padded) logits
    joined_at: int

    @property
    def model(self) -> nn.Module:
        """The tenant's view of the shared model."""
        return self.trainer.plain_model


class Multiplexer:
    """Tenants trained together on one shared model; see the module docstring.

    Args:
        max_rows: most rows in one forward pass. "auto" (default): the largest tenant batch
            size, so activation memory stays that of one tenant's step (measured on MiniLM with
            4 tenants: 1.18x one tenant's peak memory, against 1.94x without a limit, at the
            same speed on CPU); None: no limit (bigger passes, for GPUs with memory to spare).
        max_padding: largest share of padded token slots a packed forward may have before its
            rows are split into another, shorter pass.
        force: allow writing into non-empty output folders.
    """

    def __init__(self, *, max_rows: int | Literal["auto"] | None = "auto", max_padding: float = 0.25,
                 force: bool = False, console: Console | None = None) -> None:
        if max_rows != "auto" and max_rows is not None and max_rows < 1:
            raise SpliceError(f"max_rows must be >= 1, got {max_rows}")
        if not 0.0 <= max_padding < 1.0:
            raise SpliceError(f"max_padding must be in [0, 1), got {max_padding}")
        _refuse_several_processes()
        self.max_rows, self.max_padding, self.force = max_rows, max_padding, force
        self.console = console or Console()
        self.tenants: dict[str, Tenant] = {}
        self.results: dict[str, RunResult] = {}
        self.configs: dict[str, TrainConfig] = {}
        self.padding = packing.PaddingStats()
        self.global_step = 0
        self.shared: nn.Module | None = None
        self.routers: dict[str, TenantModules] = {}  # by module path
        self.accelerator: Accelerator | None = None
        self.first: TrainConfig | None = None
        self.claimed: dict[Path, report.RunFolder] = {}  # folders of tenants due to join (`run`)
        self.started = time.perf_counter()

    # -- tenants joining and leaving -------------------------------------------------------

    def add(self, config: TrainConfig, name: str | None = None, *, callbacks: Sequence[Callback] = ()) -> str:
        """Set up a tenant exactly as `splice.train.run` would, on the shared model, and evaluate
        its start; its name. `callbacks` are its trainer's (`splice.train.Callback`)."""
        name = name or _tenant_name(config, [*self.tenants, *self.results])
        if name in self.tenants or name in self.results:
            raise SpliceError(f"a tenant named {name!r} already exists")
        self._check_compatible(config)
        folder = Path(config.output_dir).expanduser().resolve()
        for other in self.tenants.values():
            if other.trainer.run_dir.expanduser().resolve() == folder:
                raise SpliceError(f"tenant {other.name} already writes to {folder}; every tenant needs its own "
                                  "output_dir")
        claimed = self.claimed.pop(folder, None) or report.claim_run_dir(config.output_dir, force=self.force)
        try:
            return self._add(config, name, claimed, callbacks)
        except BaseException:
            claimed.release()
            raise

    def _add(self, config: TrainConfig, name: str, claimed: report.RunFolder, callbacks: Sequence[Callback]) -> str:
        started = time.perf_counter()
        setup = load_run(config, name, check=functools.partial(_refuse_unpackable, name))
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in setup.model.modules()):
            raise SpliceError(f"tenant {name}: the model or adapter has BatchNorm layers, whose batch statistics "
                              "would mix the tenants' rows; train it alone with `splice train`")
        tenancy = Tenancy(summary=splice.summary(setup.model), label=name)  # counted alone, before joining
        adopted = self.shared is None
        if adopted:
            self._adopt(setup.model, config)
        try:
            tenant_view = join(self.shared, self.routers, name, setup.model, self.accelerator.device)
            trainer = Trainer(tenant_view, setup.tokenizer, config, adapter_name=name, splits=setup.splits,
                              callbacks=callbacks, console=self.console, accelerator=self.accelerator,
                              tenancy=tenancy)
            trainer.started = started
            num_labels = len(setup.splits.label_names) if config.task == "classification" else None
            self.tenants[name] = Tenant(name, trainer, claimed, num_labels, self.global_step)
            self.configs[name] = config
            self._refresh_trainability()  # the trainer made its adapter the only active one
            trainer.begin()  # config.yaml and the evaluation of the start, as a lone run begins
        except BaseException:
            self._leave(name)
            if adopted and not self.tenants:  # its model, settings and accelerator are no one's to share
                self.shared = self.first = self.accelerator = None
                self.routers = {}
            raise
        return name

    def _check_compatible(self, config: TrainConfig, first: TrainConfig | None = None) -> None:
        """Refuse a tenant whose model, task, precision or quantization differ from `first`'s
        (default: the first tenant's), which the shared model fixes."""
        if config.precision == "fp16":
            raise SpliceError("multiplexed training supports precision 'no' and 'bf16' (fp16 needs one loss "
                              "scaler per optimizer); use bf16")
        first = first or self.first
        if first is None:
            return
        for key in ("model", "task", "precision", "quantize"):
            if _setting(config, key) != _setting(first, key):
                raise SpliceError(f"tenants must share {key}: {getattr(config, key)!r} vs {getattr(first, key)!r}")

    def _adopt(self, model: nn.Module, config: TrainConfig) -> None:
        """The first tenant's model becomes the shared one; its head slot holds every tenant's."""
        self.first = config
        # One accelerate step per multiplexed step: each tenant's trainer counts its own accumulation.
        self.accelerator = make_accelerator(dataclasses.replace(config, grad_accum=1))
        self.shared = model.to(self.accelerator.device)
        if config.gradient_checkpointing:  # the tenants share the model, so this is for all of them
            enable_gradient_checkpointing(self.shared)

    def _refresh_trainability(self) -> None:
        """Every tenant's adapter and modules train; the backbone stays frozen. (A trainer makes
        its adapter the only active one on the hosts its view shares: this follows every join.)"""
        splice.activate(self.shared, list(self.tenants)) if self.tenants else splice.deactivate(self.shared)
        for tenant in self.tenants.values():
            for p in tenant.trainer.trained.values():
                p.requires_grad_(True)

    def _leave(self, name: str) -> None:
        """Take tenant `name` (done, or failed to join) off the shared model, and forget it."""
        self.tenants.pop(name, None)
        if name in model_state(self.shared).adapters:
            splice.detach(self.shared, name)
        for router in self.routers.values():
            if name in router.copies:
                del router.copies[name]
        self._refresh_trainability()
        # The accelerator forgets what it prepared for every tenant (their trainers hold their
        # own): so the one that left takes its view, optimizer state and loaders with it.
        self.accelerator.free_memory()

    # -- training ----------------------------------------------------------------------------

    def step(self) -> None:
        """One multiplexed step: a batch from every tenant, packed forwards, per-tenant updates."""
        if not self.tenants:
            raise SpliceError("no tenant is training; add one first")
        batches = {name: t.trainer.next_batch() for name, t in self.tenants.items()}
        counts = {name: _count(t.trainer.config.task, batches[name]) for name, t in self.tenants.items()}
        limit = (max(t.trainer.config.batch_size for t in self.tenants.values()) if self.max_rows == "auto"
                 else self.max_rows)
        groups = packing.plan(batches, limit, self.max_padding)
        packing.record(self.padding, batches, groups)
        losses = {name: torch.zeros((), device=self.accelerator.device) for name in self.tenants}
        self.shared.train()
        # accelerate's gradient sync holds for the whole step (gradient_accumulation_steps is 1), so
        # the tenants' prepared optimizers act whenever their own accumulation is complete.
        with self.accelerator.accumulate():
            batch_rows = {name: len(batch["labels"]) for name, batch in batches.items()}
            for group in groups:
                inputs, segments = packing.assemble(batches, group, self.shared.config.pad_token_id)
                ids = [name for name, n in segments for _ in range(n)]
                for router in self.routers.values():
                    router.segments = segments
                # backward inside the routing: activation checkpointing recomputes the forward there
                with splice.route(self.shared, ids):
                    self.accelerator.backward(self._group_loss(inputs, segments, counts, batch_rows, losses))
        self.global_step += 1
        for name in list(self.tenants):
            trainer = self.tenants[name].trainer
            if trainer.record_backward(losses[name], len(batches[name]["labels"])):
                trainer.optimizer_step()
            if trainer.done:
                self._finish(self.tenants[name])

    def _group_loss(self, inputs: dict[str, torch.Tensor], segments: list[tuple[str, int]],
                    counts: dict[str, float], batch_rows: dict[str, int],
                    losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """What one packed pass backpropagates: each tenant's share of its mean loss, over its
        accumulation; each tenant's share is added to `losses` (its batch's loss). A tenant's
        auxiliary losses (a MoE router's balancing) count at the share of its batch's rows in
        this pass: whole when the batch is one pass, as alone; split, each part on its own rows."""
        labels = inputs.pop("labels")
        with self.accelerator.autocast():
            logits = self.shared(**inputs).logits
        total = logits.new_zeros((), dtype=torch.float32)
        start = 0
        for name, n in segments:
            tenant = self.tenants[name]
            rows = slice(start, start + n)
            start += n
            out = logits[rows, : tenant.num_labels] if tenant.num_labels else logits[rows]
            stats = tasks.stats_from_logits(tenant.trainer.config.task, out, labels[rows])
            summed = stats["loss"].sum() if "loss" in stats else stats["loss_sum"].sum()
            loss = summed / counts[name]
            losses[name] += loss.detach()
            size = tenant.trainer.accumulation_size()  # grad_accum, or fewer at an epoch's end
            total = total + loss / size
            extra = splice.auxiliary_loss(self.shared, name)
            if extra is not None:
                total = total + extra * (n / batch_rows[name]) / size
        return total

    def _finish(self, tenant: Tenant) -> None:
        """The tenant's trainer ends its run as a lone one (best state restored, evaluated, saved,
        reported, with the steps it joined and left at); then it leaves the shared model."""
        trainer = tenant.trainer
        trainer.timings.update(joined_at_step=tenant.joined_at, left_at_step=self.global_step)
        try:
            self.results[tenant.name] = trainer.finish()
        finally:
            tenant.folder.release()
            self._leave(tenant.name)

    # -- driving -----------------------------------------------------------------------------

    def run(self, joining: Sequence[tuple[int, TrainConfig]] = ()) -> dict[str, RunResult]:
        """Step until every tenant is done; `joining` adds (step, config) tenants on the way."""
        pending = sorted(joining, key=lambda item: item[0])
        try:
            self._claim_all([config for _, config in pending])
            with progress.use(self.console), progress.task("tenants") as bar:
                while self.tenants or pending:
                    while pending and (pending[0][0] <= self.global_step or not self.tenants):
                        self.add(pending.pop(0)[1])
                    self.step()
                    bar.update(completed=self.global_step, total=self._last_step(pending))
        finally:
            self.close()
        self.console.print(self.summary_table())
        return self.results

    def _last_step(self, pending: Sequence[tuple[int, TrainConfig]]) -> int:
        """The step at which the last tenant known so far is due to finish: the bar's length (a
        tenant takes a batch per step, `grad_accum` of them per optimizer step)."""
        ends = [t.joined_at + t.trainer.total_steps * t.trainer.config.grad_accum for t in self.tenants.values()]
        return max([self.global_step, *ends, *(step for step, _ in pending)])

    def _claim_all(self, configs: Sequence[TrainConfig]) -> None:
        """Before any tenant is set up: every config compatible with the first, and every output
        folder claimed, so that a tenant due to join later is refused before the others train."""
        for config in configs:
            self._check_compatible(config, self.first or configs[0])
            folder = Path(config.output_dir).expanduser().resolve()
            if folder not in self.claimed:
                self.claimed[folder] = report.claim_run_dir(config.output_dir, force=self.force)

    def close(self) -> None:
        """Release the output folders of tenants still training (their best adapters stay) and
        of tenants that never joined."""
        for tenant in self.tenants.values():
            tenant.folder.release()
        for folder in self.claimed.values():
            folder.release()
        self.claimed = {}

    def summary_table(self) -> Table:
        table = Table(title=f"multiplexed training: {len(self.results)} tenants, {self.global_step} steps, "
                            f"{time.perf_counter() - self.started:.0f} s")
        for column in ("tenant", "steps", "joined", "left", "metric", "before", "after", "folder"):
            table.add_column(column, overflow="fold")  # names and folders whole, never cut to "…"
        for name, result in self.results.items():
            config = self.configs[name]
            metric, _ = tasks.MAIN_METRIC[config.task]
            split = "test" if "test" in result.metrics["after"] else "validation"
            before = result.metrics["before"].get(split, {}).get(metric, float("nan"))
            after = result.metrics["after"].get(split, {}).get(metric, float("nan"))
            table.add_row(name, str(len(result.history)), str(result.timings["joined_at_step"]),
                          str(result.timings["left_at_step"]), f"{split} {metric}", f"{before:.4f}",
                          f"{after:.4f}", str(result.paths["run_dir"]))
        stats = self.padding
        table.caption = (f"padded token slots: {stats.naive_share:.1%} if concatenated, {stats.packed_share:.1%} "
                         f"packed ({stats.forwards} forwards in {stats.steps} steps)")
        return table


def multiplex(configs: Sequence[TrainConfig], *, join_at: Sequence[int] | None = None,
              max_rows: int | Literal["auto"] | None = "auto", max_padding: float = 0.25, force: bool = False,
              console: Console | None = None) -> dict[str, RunResult]:
    """Train `configs` together on one shared backbone; results by tenant name.

    `join_at[i]` is the step at which tenant i joins (default: all at step 0). Tenant names
    come from the output folders' names. See `Multiplexer` for `max_rows` and `max_padding`.
    """
    if not configs:
        raise SpliceError("multiplex needs at least one tenant config")
    join_at = list(join_at) if join_at is not None else [0] * len(configs)
    if len(join_at) != len(configs):
        raise SpliceError(f"join_at has {len(join_at)} entries for {len(configs)} tenants")
    for step in join_at:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise SpliceError(f"join_at holds the step each tenant joins at, whole numbers from 0; got {step!r}")
    # Compared resolved: runs/x, runs/x/ and ./runs/x are one folder.
    folders = [Path(c.output_dir).expanduser().resolve() for c in configs]
    for i, folder in enumerate(folders):
        if folder in folders[:i]:
            first = folders.index(folder)
            raise SpliceError(f"every tenant needs its own output_dir; {configs[first].output_dir!r} and "
                              f"{configs[i].output_dir!r} are the same folder ({folder})")
    mux = Multiplexer(max_rows=max_rows, max_padding=max_padding, force=force, console=console)
    return mux.run(list(zip(join_at, configs, strict=True)))


def _setting(config: TrainConfig, key: str) -> Any:
    """A config field as the shared model sees it ("nf4" and {scheme: nf4} are one quantization)."""
    value = getattr(config, key)
    if key == "model" and isinstance(value, str) and Path(value).expanduser().is_dir():
        return str(Path(value).expanduser().resolve())  # a folder named two ways is one model
    return quantize_options(value) if key == "quantize" and value is not None else value


def _tenant_name(config: TrainConfig, taken: list[str]) -> str:
    base = "".join(c if c.isalnum() or c in "_-" else "-" for c in str(config.output_dir).rstrip("/").split("/")[-1])
    base = base if base and base[0].isalpha() and adapter_name_problem(base) is None else f"t-{base}"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def _refuse_several_processes() -> None:
    """Multiplexing runs in one process: its packed passes go through the plain shared model,
    so under `accelerate launch` / torchrun the ranks' tenants would never average gradients."""
    processes = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if processes > 1:
        raise SpliceError(f"multiplexed training runs in one process, and this is one of {processes} processes "
                          "(accelerate launch / torchrun): run it without a launcher, or train each tenant with "
                          "its own `splice train` under the launcher")


def _count(task: str, batch: dict[str, torch.Tensor]) -> float:
    """What a tenant's mean loss divides by: its rows, or its label tokens (causal LM)."""
    if task == "classification":
        return float(len(batch["labels"]))
    return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum().clamp(min=1))


def _refuse_unpackable(name: str, adapter: AdapterConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse, before it is attached and saying what to do instead, a tenant's adapter that a
    packed pass of several tenants' rows would not train as it trains alone."""
    if tokenizer.padding_side != "right":
        raise SpliceError(f"tenant {name}: multiplexing packs right-padded batches; the tokenizer pads "
                          f"{tokenizer.padding_side}")
    if adapter.takes_from_base():
        raise SpliceError(f"tenant {name}: init={getattr(adapter, 'init', None)!r} takes its part out of the base "
                          "weights, which the tenants share; use another init for multiplexed training")
    if adapter.reads_inputs and not adapter.row_local:
        raise SpliceError(f"tenant {name}: {adapter.method} reads each batch's token positions, which a packed "
                          "pass of several tenants' rows does not give it; train it alone with `splice train`")
