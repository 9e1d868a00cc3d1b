"""One training of a multi-task job: a fresh model and adapter (and heads) trained on a mixture
of some of the tasks by `splice.train.Trainer`, then scored on each of its tasks.

The trainer owns the optimizer, schedule, clipping, non-finite checks and history; the run feeds
it batches from its mixing sampler (`Trainer.record_backward` / `optimizer_step`, the public
pieces of a step that an orchestrator drives): each batch is one task's, computed through that
task's head. The trainer gets no validation rows: every task is scored once, at the end, on its
own evaluation rows through its own head (accuracy), or by greedy exact match for a generator.

A run of one task is the single-task baseline; of two, a pair of the transfer matrix; of
all, the shared multi-task adapter. Every run of a seed starts from the same adapter (the global
generator is seeded just before attaching it), each task from the same head and the same order
of its rows, so that runs differ by what they mix, not by their initialisation.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from rich.console import Console
from torch.utils.data import DataLoader

import splice
from splice.core import progress
from splice.core.errors import SpliceError
from splice.io.files import write_json
from splice.multitask.config import MultitaskConfig
from splice.multitask.data import Mixture, TaskData
from splice.multitask.heads import RunHeads
from splice.multitask.sampler import MixingSampler, mixing_weights
from splice.train import Trainer
from splice.train import tasks as train_tasks
from splice.train.batching import rows_in
from splice.train.config import TrainConfig
from splice.train.data import DatasetSplits, collator, with_probe
from splice.train.evaluation import evaluate_loader

ADAPTER = "multitask"
# The metric a task is scored by, for the tables and the transfer matrix.
SCORE = {"classification": "accuracy", "causal_lm": "exact_match"}


@dataclass
class RunRecord:
    """What one run trained, what it scored on each task, and what it cost."""

    name: str
    seed: int
    tasks: list[str]
    steps: int  # optimizer steps taken
    examples: int  # training rows seen (with repeats)
    batches: dict[str, int]  # batches of each task
    weights: dict[str, float]  # the mixing probabilities
    train_seconds: float
    eval_seconds: float
    scores: dict[str, float]  # each task's accuracy / exact match
    metrics: dict[str, dict[str, float]]  # each task's every metric (loss, perplexity, ...)
    adapter_parameters: int
    head_parameters: dict[str, int] = field(default_factory=dict)  # by head owner
    status: str = "finished"  # or "diverged" (non-finite numbers stopped it)
    message: str = ""
    losses: list[float | None] = field(default_factory=list)  # training loss of each step
    folder: str = ""

    @property
    def stored_parameters(self) -> int:
        """What a deployment of this run keeps: the adapter and its heads."""
        return self.adapter_parameters + sum(self.head_parameters.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_budget(config: MultitaskConfig, task: TaskData) -> int:
    """Optimizer steps of `task` trained alone: `train.max_steps`, else `epochs` over its rows."""
    shared = config.shared_config()
    return shared.max_steps or max(1, math.ceil(shared.epochs * len(task.splits.train) / shared.batch_size))


def run_budget(config: MultitaskConfig, tasks: list[TaskData]) -> int:
    """Steps of a run on `tasks`: the sum of their single-task budgets (`budget: per_task`) or
    their mean (`budget: total`)."""
    budgets = [task_budget(config, t) for t in tasks]
    return sum(budgets) if config.budget == "per_task" else max(1, round(sum(budgets) / len(budgets)))


@dataclass
class Base:
    """The pretrained model (never trained itself) and tokenizer that every run of a job starts
    from a copy of: one load per job instead of one per run."""

    model: torch.nn.Module
    tokenizer: Any


def load_base(config: TrainConfig) -> tuple[torch.nn.Module, Any]:
    """`config.model` as a run starts from it: its own classification head (the run replaces it)."""
    return train_tasks.load_model(config, ())


class MixtureRun:
    """One run set up: a fresh model with the adapter (and a head per task), its trainer, the
    mixing sampler. `train()` steps it to the end, `train_on` takes one batch, `score()` evaluates
    every task, `record()` says what it did. `keys`: every task's (and head owner's) key in the
    job, which seeds its row order and its head."""

    def __init__(self, config: MultitaskConfig, tasks: list[TaskData], seed: int, name: str, folder: Path,
                 keys: dict[str, int], steps: int | None = None, base: Base | None = None) -> None:
        self.config, self.tasks, self.seed, self.name, self.folder = config, tasks, seed, name, Path(folder)
        mixture = Mixture(tasks)
        self.rows = mixture.rows
        self.steps = steps or run_budget(config, tasks)
        run_config = config.run_config(seed, folder, self.steps, self.rows)
        set_seed(seed)
        self.model, self.tokenizer = (copy.deepcopy(base.model), base.tokenizer) if base else load_base(run_config)
        self.collate = collator(config.task, self.tokenizer, run_config.max_length)
        set_seed(seed)  # the adapter starts the same in every run of this seed, whatever the loading drew
        splice.attach(self.model, with_probe(run_config.adapter_config(), self.rows, run_config, self.collate),
                      ADAPTER)
        self.heads = RunHeads(self.model, tasks, seed, keys) if config.task == "classification" else None
        self.trainer = Trainer(self.model, self.tokenizer, run_config, adapter_name=ADAPTER,
                               splits=DatasetSplits(self.rows, [], [], task=config.task), console=Console(quiet=True),
                               heads=self.heads.paths if self.heads else ())
        self.weights = mixing_weights(mixture.sizes, config.mixing, config.temperature)
        self.sampler = MixingSampler(mixture.sizes, self.weights, run_config.batch_size, self.steps, seed=seed,
                                     keys=[t.key for t in tasks])
        self.trained = [0] * len(tasks)  # batches of each task trained on
        self.train_seconds = 0.0

    def train(self) -> None:
        """Every batch the sampler draws, until the trainer is done (its last step, or
        non-finite numbers that stopped it)."""
        self.trainer.begin()
        started = time.perf_counter()
        for task, indices in progress.track(zip(self.sampler.tasks, self.sampler, strict=True), self.name,
                                            total=self.steps):
            if self.trainer.done:
                break
            self.train_on(task, indices)
        self.train_seconds += time.perf_counter() - started

    def train_on(self, task: int, indices: list[int]) -> None:
        """One batch of the mixture's rows `indices`, all of `self.tasks[task]`, through its head:
        forward, backward, and the trainer's checked optimizer step (clipping, non-finite policy,
        history) that ends the accumulation."""
        trainer = self.trainer
        trainer.begin()
        if self.heads is not None:
            self.heads.select(self.tasks[task].name)
        batch = {key: value.to(trainer.accelerator.device)
                 for key, value in self.collate([self.rows[i] for i in indices]).items()}
        trainer.model.train()
        with trainer.accelerator.accumulate(trainer.model):
            loss = trainer.model(**batch).loss
            extra = splice.auxiliary_loss(trainer.plain_model)  # e.g. a MoE router's balancing loss
            total = loss if extra is None else loss + extra
            trainer.backward(total)
        if trainer.record_backward(loss, rows_in(batch), total):
            trainer.optimizer_step()
        self.trained[task] += 1

    @torch.no_grad()
    def score(self, task: TaskData) -> dict[str, float]:
        """`task`'s metrics on its evaluation rows, through its head: loss and accuracy; for a
        generator loss, perplexity and greedy exact match."""
        trainer = self.trainer
        if self.heads is not None:
            self.heads.select(task.name)
        batch_size = trainer.config.batch_size
        loader = trainer.accelerator.prepare(DataLoader(task.eval_rows, batch_size=batch_size,
                                                        collate_fn=self.collate))
        generate = task.eval_rows if task.kind == "causal_lm" else None
        return evaluate_loader(trainer.model, loader, task.kind, trainer.accelerator, self.tokenizer, generate,
                               batch_size)

    def record(self) -> RunRecord:
        """Score every task; the run's record."""
        started = time.perf_counter()
        metrics = {t.name: self.score(t) for t in self.tasks}
        eval_seconds = time.perf_counter() - started
        trainer, heads = self.trainer, self.heads
        status, message = trainer.stop or ("finished", "")
        head_prefixes = tuple(f"{h}." for h in heads.paths) if heads else ()
        adapter = sum(p.numel() for key, p in trainer.trained.items() if not key.startswith(head_prefixes))
        return RunRecord(
            name=self.name, seed=self.seed, tasks=[t.name for t in self.tasks], steps=trainer.step_count,
            examples=sum(self.trained) * trainer.config.batch_size,
            batches={t.name: c for t, c in zip(self.tasks, self.trained, strict=True)},
            weights={t.name: w for t, w in zip(self.tasks, self.weights, strict=True)},
            train_seconds=self.train_seconds, eval_seconds=eval_seconds,
            scores={n: m[SCORE[self.config.task]] for n, m in metrics.items()}, metrics=metrics,
            adapter_parameters=adapter, head_parameters=heads.parameters() if heads else {}, status=status,
            message=message, losses=[entry["loss"] for entry in trainer.history], folder=str(self.folder))


def train_run(config: MultitaskConfig, tasks: list[TaskData], seed: int, name: str, folder: Path,
              keys: dict[str, int], console: Console | None = None, steps: int | None = None,
              base: Base | None = None) -> RunRecord:
    """Train a fresh adapter (and heads) on the mixture of `tasks` for `steps` (default
    `run_budget`), on a copy of `base` (default: `config.model` loaded), and score it on each
    task; the record, also written to `folder`/run.json with the adapter (adapter/) and the
    heads (heads.safetensors, heads.json)."""
    run = MixtureRun(config, tasks, seed, name, folder, keys, steps, base)
    run.train()
    record = run.record()
    save_run(run, record, console or Console(quiet=True))
    return record


def save_run(run: MixtureRun, record: RunRecord, console: Console) -> None:
    """The adapter, the heads and run.json in the run's folder (a non-finite adapter is not saved)."""
    run.folder.mkdir(parents=True, exist_ok=True)
    try:
        run.trainer.save(run.folder / "adapter")
    except SpliceError as err:  # non-finite tensors: the record says it, the job goes on
        record.status, record.message = "diverged", f"{record.message} {err}".strip()
        console.print(f"[red]{record.name} (seed {record.seed}): {err}[/]")
    else:
        if run.heads is not None:
            run.heads.save(run.folder)
    write_json(run.folder / "run.json", record.to_dict())
