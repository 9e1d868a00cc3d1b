"""The training loop: one readable function on accelerate, so CPU, CUDA, MPS, bf16/fp16 mixed
precision and `accelerate launch` on several GPUs all run the same code.

    config -> model + tokenizer -> attach adapter -> evaluate (before) -> train with periodic
    evaluation -> restore the best adapter -> evaluate (after) -> save adapter -> report

Best checkpoint: the trainable tensors (adapter and trained head) of the best evaluation are
kept in memory and restored at the end, then saved once with `splice.save`. A parameter-
efficient state is small (about 75k numbers for the main job), so copying it costs nothing,
while writing an adapter folder at every improvement would cost disk time and leave a folder
that a crash could half-write. The untrained state (step 0) is a candidate too: if training
never beats it, that is what gets saved, and the report says so (best_step 0).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

import splice
from splice.assets import Row
from splice.core.api import resolve_heads
from splice.train import report, tasks
from splice.train.config import TrainConfig
from splice.train.data import collator, load_eval_rows, load_splits, with_probe
from splice.train.data import train_loader as make_train_loader

Metrics = dict[str, float]


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


def run(config: TrainConfig, *, console: Console | None = None, force: bool = False) -> RunResult:
    """Train `config.adapter` on `config.data` and write the adapter and a report to output_dir.

    A non-empty output_dir is refused before any work unless `force=True`.
    """
    console = console or Console()
    started = time.perf_counter()
    run_dir = report.prepare_run_dir(config.output_dir, force)
    set_seed(config.seed)
    accelerator = _accelerator(config)
    show = console.print if accelerator.is_main_process else _quiet

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

    timings = {"load_s": time.perf_counter() - started}
    tick = time.perf_counter()
    before = evaluate_all()
    timings["eval_before_s"] = time.perf_counter() - tick
    show(report.metrics_line("before training", before))

    metric, higher_is_better = tasks.MAIN_METRIC[config.task]
    best = BestKeeper(metric, higher_is_better, config.early_stopping_patience)
    if "validation" in before:
        best.offer(before["validation"], 0, lambda: _snapshot(model, accelerator))
    history: list[dict[str, Any]] = []
    step, examples, micro_losses = 0, 0, []
    tick = time.perf_counter()
    with _progress_bar(console, accelerator.is_main_process) as progress:
        bar = progress.add_task("train", total=total_steps, loss="-", speed="-")
        model.train()
        for batch in _batches(train_loader, math.ceil(total_steps / steps_per_epoch)):
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                extra = splice.auxiliary_loss(plain_model)  # e.g. a rank router's budget penalty
                accelerator.backward(loss if extra is None else loss + extra)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            micro_losses.append(loss.detach())
            examples += len(batch["labels"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), "mean").item()
            micro_losses = []
            entry = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                     "lr": scheduler.get_last_lr()[0], "loss": step_loss}
            history.append(entry)
            speed = examples / (time.perf_counter() - tick)
            progress.update(bar, advance=1, loss=f"{step_loss:.4f}", speed=f"{speed:.1f}")
            if (step % eval_every == 0 or step == total_steps) and "validation" in loaders:
                entry["eval"] = _evaluate(model, loaders["validation"], config.task, accelerator)
                improved = best.offer(entry["eval"], step, lambda: _snapshot(model, accelerator))
                show(report.metrics_line(f"step {step}", {"validation": entry["eval"]}, best=improved))
                model.train()
            if step == total_steps or best.should_stop:
                break
    timings["train_s"] = time.perf_counter() - tick
    timings["examples_per_s"] = examples / max(timings["train_s"], 1e-9)
    if best.should_stop:
        show(f"early stopping: no improvement in {config.early_stopping_patience} evaluations")

    if best.state is not None:
        _restore(model, accelerator, best.state)
    tick = time.perf_counter()
    after = evaluate_all()
    timings["eval_after_s"] = time.perf_counter() - tick

    paths = {"run_dir": run_dir, "adapter": run_dir / "adapter"}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        splice.save(accelerator.unwrap_model(model), paths["adapter"], format=config.save_format, overwrite=True)
    timings["total_s"] = time.perf_counter() - started
    result = RunResult(
        metrics={"before": before, "after": after}, history=history, paths=paths, timings=timings,
        best_step=best.step if best.state is not None else step, stopped_early=best.should_stop,
        parameters={"trainable": parameters.trainable, "total": parameters.total},
    )
    if accelerator.is_main_process:
        result.paths.update(report.write_run(run_dir, config, result, parameters))
        console.print(report.results_table(result))
    # Under `accelerate launch` every process returns only once the main one has written the
    # adapter and the report, so code after `run` on any rank never reads a half-written folder.
    accelerator.wait_for_everyone()
    return result


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
    """Best-checkpoint keeping and early stopping on one validation metric."""

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
        improved = self.value is None or (value > self.value if self.higher_is_better else value < self.value)
        if improved:
            self.value, self.step, self.state, self.evals_since_best = value, step, snapshot(), 0
        else:
            self.evals_since_best += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_since_best >= self.patience


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


def _batches(loader: DataLoader, epochs: int) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches for several epochs, reshuffled (reproducibly) each epoch."""
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        yield from loader


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
