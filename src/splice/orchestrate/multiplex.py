"""Train several tenants' adapters at once on one frozen backbone (MuxTune / mLoRA style).

    results = splice.orchestrate.multiplex([TrainConfig(...), TrainConfig(...), ...])

Each tenant is an ordinary training config (`splice train` would run it alone): its own data,
adapter, optimizer and learning-rate schedule, evaluation, best checkpoint and output folder.
All tenants share one copy of the model. Every step takes one batch from each tenant, packs
their rows into a few forward passes (`packing`), routes each row through its tenant's adapter
and head (`splice.route`), and runs one backward per pass; each tenant's loss is the mean over
its own rows (or label tokens), so gradients reach every adapter exactly as if it trained alone.
Then every tenant whose accumulation is complete takes its own optimizer and scheduler step.
A tenant that reaches its last step (or stops early) is evaluated, saved and detached while the
others go on; `Multiplexer.add` lets a tenant join at any step.

Equal to training alone: a tenant's setup runs the same code in the same order as
`splice.train.run` (seed, data, model load, attach), so its initial adapter and head, its data
order and its schedule are those of the lone run; the per-tenant loss and clipping use only its
rows and parameters. With a dropout-free backbone the adapters match the lone run's up to
floating-point summation order. Dropout in the backbone draws its masks for the packed batch,
so with dropout the runs agree in distribution, not bit for bit.

Requirements: the tenants share the model, the task and the precision ("no" or "bf16").

Run folders: each tenant claims its output folder with the lock a lone run takes (refused at
once if another run holds it), writes config.yaml at the start and its best adapter so far at
every improvement, and releases the folder when it is done. Non-finite losses or gradients
follow each tenant's `on_nonfinite` ("stop" ends that tenant alone with its best finite
adapter; "skip" drops its update). Tenants are not checkpointed: an interrupted multiplexed
run leaves each tenant's best adapter but cannot be resumed.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

import splice
from splice.core.api import model_state, resolve_heads
from splice.core.config import AdapterConfig
from splice.core.errors import SpliceError
from splice.core.heads import release_head
from splice.core.host import hosts
from splice.core.summary import Summary
from splice.core.targets import HOST_ATTRIBUTE, exact_targets
from splice.orchestrate import packing
from splice.orchestrate.views import TenantModules, view
from splice.train import report, tasks
from splice.train.config import TrainConfig
from splice.train.data import IGNORE_INDEX, collator, load_splits, train_loader, with_probe
from splice.train.evaluation import enable_gradient_checkpointing, evaluate_loader, make_accelerator
from splice.train.results import (
    MAX_SKIPS_IN_A_ROW,
    BestKeeper,
    RunResult,
    nonfinite_message,
    nonfinite_tensors,
    save_adapter,
)

Metrics = dict[str, float]


@dataclass
class Tenant:
    """One training job inside a multiplexed run: its model view, data, optimizer and progress."""

    name: str
    config: TrainConfig
    model: nn.Module
    tokenizer: Any
    parameters: dict[str, nn.Parameter]
    summary: Summary
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: Iterator[dict[str, torch.Tensor]]
    eval_rows: dict[str, list]
    eval_loaders: dict[str, DataLoader]
    run_dir: Any
    total_steps: int
    steps_per_epoch: int
    eval_every: int
    best: BestKeeper
    batches_per_epoch: int = 1
    num_labels: int | None = None
    joined_at: int = 0
    step: int = 0
    micro: int = 0  # loader batches since the last epoch boundary
    micro_losses: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, Metrics] = field(default_factory=dict)
    examples: int = 0
    train_time: float = 0.0
    folder: report.RunFolder | None = None  # the claimed (locked) output folder
    stop: str | None = None  # why a tenant ends before its last step (non-finite numbers)
    skipped: int = 0
    skipped_in_a_row: int = 0

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps or self.best.should_stop or self.stop is not None


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
        self.started = time.perf_counter()

    # -- tenants joining and leaving -------------------------------------------------------

    def add(self, config: TrainConfig, name: str | None = None) -> str:
        """Set up a tenant exactly as `splice.train.run` would, on the shared model; its name."""
        name = name or _tenant_name(config, [*self.tenants, *self.results])
        if name in self.tenants or name in self.results:
            raise SpliceError(f"a tenant named {name!r} already exists")
        self._check_compatible(config)
        folder = Path(config.output_dir).expanduser().resolve()
        for other in self.tenants.values():
            if Path(other.run_dir).expanduser().resolve() == folder:
                raise SpliceError(f"tenant {other.name} already writes to {folder}; every tenant needs its own "
                                  "output_dir")
        claimed = report.claim_run_dir(config.output_dir, force=self.force)
        try:
            return self._add(config, name, claimed)
        except BaseException:
            claimed.release()
            raise

    def _add(self, config: TrainConfig, name: str, claimed: report.RunFolder) -> str:
        run_dir = claimed.path
        set_seed(config.seed)
        splits = load_splits(config)
        if not splits.train:
            raise SpliceError(f"tenant {name}: no training rows in {config.data!r}")
        own, tokenizer = tasks.load_model(config, splits.label_names)
        if tokenizer.padding_side != "right":
            raise SpliceError(f"tenant {name}: multiplexing packs right-padded batches; the tokenizer pads "
                              f"{tokenizer.padding_side}")
        collate = collator(config.task, tokenizer, config.max_length)
        adapter = with_probe(tasks.adapter_config(config, own), splits.train, config, collate)
        if getattr(adapter, "init", None) == "pissa":
            raise SpliceError(f"tenant {name}: init='pissa' takes its part out of the base weights, which the "
                              "tenants share; use another init for multiplexed training")
        if adapter.reads_inputs:
            raise SpliceError(f"tenant {name}: {adapter.method} reads each batch's token positions, which a packed "
                              "pass of several tenants' rows does not give it; train it alone with `splice train`")
        splice.attach(own, adapter, name)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in own.modules()):
            raise SpliceError(f"tenant {name}: the model or adapter has BatchNorm layers, whose batch statistics "
                              "would mix the tenants' rows; train it alone with `splice train`")
        summary = splice.summary(own)
        if self.shared is None:
            self._adopt(own, config)
        tenant_view = self._join(name, own, adapter)
        del own
        parameters = self._parameters(tenant_view, name)
        optimizer = torch.optim.AdamW(self._param_groups(parameters, name, config), weight_decay=config.weight_decay)
        loader = train_loader(splits.train, config, collate)
        steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
        total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
        scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
        eval_rows = {n: rows for n, rows in (("validation", splits.validation), ("test", splits.test)) if rows}
        eval_loaders = {n: self.accelerator.prepare(DataLoader(rows, batch_size=config.batch_size, collate_fn=collate))
                        for n, rows in eval_rows.items()}
        metric, higher = tasks.MAIN_METRIC[config.task]
        tenant = Tenant(
            name=name, config=config, model=tenant_view, tokenizer=tokenizer, parameters=parameters,
            summary=summary, optimizer=optimizer, scheduler=scheduler,
            batches=_epochs(loader, math.ceil(total_steps / steps_per_epoch)), eval_rows=eval_rows,
            eval_loaders=eval_loaders, run_dir=run_dir, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
            eval_every=config.eval_every or steps_per_epoch, batches_per_epoch=len(loader),
            best=BestKeeper(metric, higher, config.early_stopping_patience),
            num_labels=len(splits.label_names) if config.task == "classification" else None,
            joined_at=self.global_step, folder=claimed,
        )
        self.tenants[name] = tenant
        self.configs[name] = config
        self._refresh_trainability()
        report.write_config(run_dir, config)  # at the start (once set up), as a lone run does
        tenant.before = self._evaluate_all(tenant)
        if "validation" in tenant.before:
            self._keep_if_best(tenant, tenant.before["validation"], 0)
        self.console.print(report.metrics_line(f"{name}: before training", tenant.before))
        return name

    def _check_compatible(self, config: TrainConfig) -> None:
        if config.precision == "fp16":
            raise SpliceError("multiplexed training supports precision 'no' and 'bf16' (fp16 needs one loss "
                              "scaler per optimizer); use bf16")
        first = self.first
        if first is None:
            return
        for key in ("model", "task", "precision"):
            if getattr(config, key) != getattr(first, key):
                raise SpliceError(f"tenants must share {key}: {getattr(config, key)!r} vs {getattr(first, key)!r}")

    def _adopt(self, model: nn.Module, config: TrainConfig) -> None:
        """The first tenant's model becomes the shared one; its head slot holds every tenant's."""
        self.first = config
        self.accelerator = make_accelerator(config)
        self.shared = model.to(self.accelerator.device)
        if config.gradient_checkpointing:  # the tenants share the model, so this is for all of them
            enable_gradient_checkpointing(self.shared)

    def _join(self, name: str, own: nn.Module, adapter: AdapterConfig) -> nn.Module:
        """Move a tenant's freshly initialised adapter and trained modules onto the shared model."""
        shared = self.shared
        if own is not shared:  # the same modules as on its own model, named in full
            hosted = [module_name for module_name, _, host in hosts(own) if name in host]
            exact = adapter.replace(train_also=[], targets=exact_targets(shared, hosted), exclude=None, layers=None)
            splice.attach(shared, exact, name)
            with torch.no_grad():
                theirs = {k: v for k, v in own.named_parameters() if f".{HOST_ATTRIBUTE}.{name}." in k}
                for key, param in shared.named_parameters():
                    if key in theirs:
                        param.copy_(theirs[key])
        for path in model_state(own).adapters[name].heads:  # the tenants' trained modules are managed here
            release_head(own, path, name)
        if own is shared:
            model_state(shared).adapters[name].heads = []
        own_modules = {}
        for path in resolve_heads(own, adapter.train_also):
            module = own.get_submodule(path)
            _refuse_tied(own, path, module, name)
            router = self.routers.get(path)
            if router is None:
                original = copy.deepcopy(module).requires_grad_(False) if own is shared else shared.get_submodule(path)
                router = self.routers[path] = TenantModules(original)
                shared.set_submodule(path, router)
            router.copies[name] = own_modules[path] = module.to(self.accelerator.device)
        return view(shared, name, adapter, own_modules, own.config)

    def _parameters(self, tenant_view: nn.Module, name: str) -> dict[str, nn.Parameter]:
        """The tenant's adapter parameters and those of the modules it trains, by name in its view."""
        paths = tuple(f"{p}." for p in model_state(tenant_view).adapters[name].heads)
        return {k: p for k, p in tenant_view.named_parameters()
                if f".{HOST_ATTRIBUTE}.{name}." in k or k.startswith(paths)}

    def _param_groups(self, parameters: dict[str, nn.Parameter], name: str,
                      config: TrainConfig) -> list[dict[str, Any]]:
        """Adapter parameters at `lr`, trained modules at `head_lr`, as `splice train` does."""
        adapter = [p for k, p in parameters.items() if f".{HOST_ATTRIBUTE}.{name}." in k]
        heads = [p for k, p in parameters.items() if f".{HOST_ATTRIBUTE}.{name}." not in k]
        groups = [{"params": adapter, "lr": config.lr}]
        if heads:
            groups.append({"params": heads, "lr": config.head_lr or config.lr})
        return groups

    def _refresh_trainability(self) -> None:
        """Every tenant's adapter and head trains; the backbone stays frozen."""
        splice.activate(self.shared, list(self.tenants)) if self.tenants else splice.deactivate(self.shared)
        for tenant in self.tenants.values():
            for p in tenant.parameters.values():
                p.requires_grad_(True)

    # -- training ----------------------------------------------------------------------------

    def step(self) -> None:
        """One multiplexed step: a batch from every tenant, packed forwards, per-tenant updates."""
        if not self.tenants:
            raise SpliceError("no tenant is training; add one first")
        tick = time.perf_counter()
        device = self.accelerator.device
        batches = {name: {k: v.to(device) for k, v in next(t.batches).items()} for name, t in self.tenants.items()}
        counts = {name: self._count(t, batches[name]) for name, t in self.tenants.items()}
        limit = max(t.config.batch_size for t in self.tenants.values()) if self.max_rows == "auto" else self.max_rows
        groups = packing.plan(batches, limit, self.max_padding)
        packing.record(self.padding, batches, groups)
        losses = dict.fromkeys(self.tenants, 0.0)
        self.shared.train()
        for group in groups:
            inputs, segments = packing.assemble(batches, group, self.shared.config.pad_token_id)
            ids = [name for name, n in segments for _ in range(n)]
            for router in self.routers.values():
                router.segments = segments
            # backward inside the routing: activation checkpointing recomputes the forward there
            with splice.route(self.shared, ids):
                self.accelerator.backward(self._group_loss(inputs, segments, counts, losses))
        self.global_step += 1
        elapsed = time.perf_counter() - tick
        for name in list(self.tenants):
            tenant = self.tenants[name]
            tenant.train_time += elapsed
            tenant.examples += len(batches[name]["labels"])
            tenant.micro_losses.append(losses[name])
            tenant.micro += 1
            end_of_epoch = tenant.micro == tenant.batches_per_epoch
            if end_of_epoch or tenant.micro % tenant.config.grad_accum == 0:
                # as accelerate's `accumulate`: an epoch's last batch steps even with a partial accumulation
                tenant.micro = 0 if end_of_epoch else tenant.micro
                self._optimizer_step(tenant)
            if tenant.done:
                self._finish(tenant)

    def _count(self, tenant: Tenant, batch: dict[str, torch.Tensor]) -> float:
        """What the tenant's mean loss divides by: its rows, or its label tokens (causal LM)."""
        if tenant.config.task == "classification":
            return float(len(batch["labels"]))
        return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum().clamp(min=1))

    def _group_loss(self, inputs: dict[str, torch.Tensor], segments: list[tuple[str, int]],
                    counts: dict[str, float], losses: dict[str, float]) -> torch.Tensor:
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
            stats = tasks.stats_from_logits(tenant.config.task, out, labels[rows])
            summed = stats["loss"].sum() if "loss" in stats else stats["loss_sum"].sum()
            loss = summed / counts[name]
            losses[name] += loss.item()
            total = total + loss / tenant.config.grad_accum
        return total

    def _optimizer_step(self, tenant: Tenant) -> None:
        """The tenant's optimizer step, unless its loss or gradient norm is not finite: then its
        `on_nonfinite` policy ends the tenant ("stop") or drops the update ("skip")."""
        config = tenant.config
        params = [p for p in tenant.parameters.values() if p.grad is not None]
        if config.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        loss = sum(tenant.micro_losses) / len(tenant.micro_losses)
        tenant.micro_losses = []
        problem = (f"loss {loss}" if not math.isfinite(loss) else
                   f"gradient norm {float(norm)}" if not math.isfinite(float(norm)) else None)
        if problem is not None and config.on_nonfinite == "stop":
            tenant.optimizer.zero_grad()
            tenant.stop = nonfinite_message(config, tenant.step + 1, problem, tenant.best, "stop")
            return
        if problem is None:
            tenant.optimizer.step()
        tenant.scheduler.step()
        tenant.optimizer.zero_grad()
        tenant.step += 1
        entry = {"step": tenant.step, "epoch": round(tenant.step / tenant.steps_per_epoch, 4),
                 "lr": tenant.scheduler.get_last_lr()[0], "loss": loss}
        if problem is not None:
            entry.update(loss=None, skipped=problem)
            tenant.skipped += 1
            tenant.skipped_in_a_row += 1
            self.console.print(f"[yellow]{tenant.name} step {tenant.step}: non-finite {problem}; update skipped[/]")
        else:
            tenant.skipped_in_a_row = 0
        tenant.history.append(entry)
        if (tenant.step % tenant.eval_every == 0 or tenant.step == tenant.total_steps) \
                and "validation" in tenant.eval_loaders:
            entry["eval"] = self._evaluate(tenant, "validation")
            improved = self._keep_if_best(tenant, entry["eval"], tenant.step)
            self.console.print(report.metrics_line(f"{tenant.name} step {tenant.step}",
                                                   {"validation": entry["eval"]}, best=improved))
        if tenant.skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
            tenant.stop = nonfinite_message(config, tenant.step, problem, tenant.best, "skip")

    def _keep_if_best(self, tenant: Tenant, metrics: Metrics, step: int) -> bool:
        """Offer an evaluation to the tenant's keeper; an improvement is written to its adapter/ at once."""
        improved = tenant.best.offer(metrics, step, lambda: self._snapshot(tenant))
        if improved:
            save_adapter(tenant.model, tenant.run_dir / "adapter", tenant.config.save_format, name=tenant.name,
                              tensors=tenant.parameters)
        return improved

    def _finish(self, tenant: Tenant) -> None:
        """Evaluate the tenant's best state, save it like a lone run, and take it off the model."""
        if tenant.best.state is not None:
            self._restore(tenant, tenant.best.state)
        after = self._evaluate_all(tenant)
        paths = {"run_dir": tenant.run_dir, "adapter": tenant.run_dir / "adapter"}
        status, message = ("diverged", tenant.stop) if tenant.stop else ("finished", "")
        unsaved = nonfinite_tensors(tenant.parameters)
        if unsaved:  # no validation split, so no finite best state to fall back on
            status, message = "diverged", f"{message} The final state has non-finite tensors; no adapter was saved."
            paths.pop("adapter")
        else:
            save_adapter(tenant.model, paths["adapter"], tenant.config.save_format, name=tenant.name,
                              tensors=tenant.parameters)
        if message:
            self.console.print(f"[red]{tenant.name}: {escape(message.strip())}[/]")
        result = RunResult(
            metrics={"before": tenant.before, "after": after}, history=tenant.history, paths=paths,
            timings={"train_s": tenant.train_time, "examples_per_s": tenant.examples / max(tenant.train_time, 1e-9),
                     "joined_at_step": tenant.joined_at, "left_at_step": self.global_step},
            best_step=tenant.best.step if tenant.best.state is not None else tenant.step,
            stopped_early=tenant.best.should_stop,
            parameters={"trainable": tenant.summary.trainable, "total": tenant.summary.total},
            status=status, message=message.strip(), skipped_steps=tenant.skipped,
        )
        result.paths.update(report.write_run(tenant.run_dir, tenant.config, result, tenant.summary))
        if tenant.folder is not None:
            tenant.folder.release()
        self.results[tenant.name] = result
        self.console.print(report.metrics_line(f"{tenant.name}: done after {tenant.step} steps", after))
        del self.tenants[tenant.name]
        splice.detach(self.shared, tenant.name)
        for router in self.routers.values():
            if tenant.name in router.copies:
                del router.copies[tenant.name]
        self._refresh_trainability()

    # -- evaluation and checkpoints ----------------------------------------------------------

    def _evaluate(self, tenant: Tenant, split: str, generate: bool = False) -> Metrics:
        rows = tenant.eval_rows[split] if generate else None
        with splice.route(tenant.model, [tenant.name]), self.accelerator.autocast():
            return evaluate_loader(tenant.model, tenant.eval_loaders[split], tenant.config.task, self.accelerator,
                                  tenant.tokenizer, rows, tenant.config.batch_size)

    def _evaluate_all(self, tenant: Tenant) -> dict[str, Metrics]:
        return {split: self._evaluate(tenant, split, generate=True) for split in tenant.eval_loaders}

    def _snapshot(self, tenant: Tenant) -> dict[str, torch.Tensor]:
        return {k: p.detach().to("cpu", copy=True) for k, p in tenant.parameters.items()}

    def _restore(self, tenant: Tenant, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in tenant.parameters.items():
                p.copy_(state[k])

    # -- driving -----------------------------------------------------------------------------

    def run(self, joining: Sequence[tuple[int, TrainConfig]] = ()) -> dict[str, RunResult]:
        """Step until every tenant is done; `joining` adds (step, config) tenants on the way."""
        pending = sorted(joining, key=lambda item: item[0])
        try:
            while self.tenants or pending:
                while pending and (pending[0][0] <= self.global_step or not self.tenants):
                    self.add(pending.pop(0)[1])
                self.step()
        finally:
            self.close()
        self.console.print(self.summary_table())
        return self.results

    def close(self) -> None:
        """Release the output folders of tenants still training (their best adapters stay)."""
        for tenant in self.tenants.values():
            if tenant.folder is not None:
                tenant.folder.release()

    def summary_table(self) -> Table:
        table = Table(title=f"multiplexed training: {len(self.results)} tenants, {self.global_step} steps, "
                            f"{time.perf_counter() - self.started:.0f} s")
        for column in ("tenant", "steps", "joined", "left", "metric", "before", "after", "folder"):
            table.add_column(column)
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
    # Compared resolved: runs/x, runs/x/ and ./runs/x are one folder.
    folders = [Path(c.output_dir).expanduser().resolve() for c in configs]
    for i, folder in enumerate(folders):
        if folder in folders[:i]:
            first = folders.index(folder)
            raise SpliceError(f"every tenant needs its own output_dir; {configs[first].output_dir!r} and "
                              f"{configs[i].output_dir!r} are the same folder ({folder})")
    mux = Multiplexer(max_rows=max_rows, max_padding=max_padding, force=force, console=console)
    return mux.run(list(zip(join_at, configs, strict=True)))


def _tenant_name(config: TrainConfig, taken: list[str]) -> str:
    base = "".join(c if c.isalnum() or c in "_-" else "-" for c in str(config.output_dir).rstrip("/").split("/")[-1])
    base = base if base and base[0].isalpha() else f"t-{base}"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def _refuse_tied(model: nn.Module, path: str, module: nn.Module, name: str) -> None:
    """A trained module whose weights are tied elsewhere (lm_head = embeddings) cannot get a
    per-tenant copy: training it alone would change the other module too."""
    own = {id(p) for p in module.parameters()}
    elsewhere = [k for k, p in model.named_parameters(remove_duplicate=False)
                 if id(p) in own and not k.startswith(f"{path}.")]
    if elsewhere:
        raise SpliceError(f"tenant {name}: train_also module {path!r} shares its weights with {elsewhere}; "
                          "a multiplexed tenant cannot train tied weights. Untie them or train it alone.")


def _epochs(loader: DataLoader, epochs: int) -> Iterator[dict[str, torch.Tensor]]:
    for _ in range(epochs):
        yield from loader

