"""Run a sequence of tasks with one strategy and measure what it remembers.

    from splice.continual import SequenceConfig, run_sequence
    result = run_sequence(SequenceConfig.from_yaml("examples/continual_minilm.yaml"))
    result.scores["task_incremental"].backward_transfer

One model is loaded; classification tasks get their own heads (`splice.continual.heads`). Each
task trains with `splice.train.Trainer` (its own optimizer, schedule, best-state selection and
run folder under `<output_dir>/tasks/<name>`) on the adapter the strategy gives it. Before any
training and after each task, every seen task and the next unseen one are evaluated with the
task id given (task-incremental); with `task_agnostic`, every seen task also without it (rows
routed by prototype or by confidence, `splice.continual.scoring`; the share routed to the right
task is kept as `routing`, the ceiling of a classification task's accuracy there). At every
switch from task t-1 to task t the smallest principal angle between the two tasks' gradient
subspaces is measured at the model as task t starts (`splice.analysis.gradient_subspace`), and
paired with the forgetting of task t-1 that task t causes, for the Geometric Forgetting Law's
fit (Steele 2026).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from rich.console import Console
from torch import nn

from splice.analysis.forgetting import fit_forgetting_law, gradient_subspace, subspace_angle
from splice.continual import checkpoint
from splice.continual import heads as task_heads
from splice.continual.data import task_splits
from splice.continual.metrics import Scores, scores
from splice.continual.scoring import Prototypes, confidence, correct_rows, eval_rows, eval_split
from splice.continual.sequence import SequenceConfig
from splice.continual.strategies import make_strategy
from splice.continual.strategies.base import Strategy, TaskContext
from splice.core import progress
from splice.core.errors import SpliceError
from splice.io.output_dirs import check_output_dir
from splice.train import Trainer
from splice.train import tasks as train_tasks
from splice.train.data import collator


@dataclass
class ContinualResult:
    """The accuracy matrices (per setting), their scores, and what each task cost."""

    config: SequenceConfig
    tasks: list[str]
    matrices: dict[str, list[list[float | None]]]
    before: list[float]
    scores: dict[str, Scores]
    switches: list[dict[str, Any]] = field(default_factory=list)
    law: dict[str, float] | None = None
    trainable_parameters: list[int] = field(default_factory=list)
    stored_bytes: list[int] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    eval_splits: list[str] = field(default_factory=list)  # per task: test, or validation where no test rows
    routing: list[list[float | None]] = field(default_factory=list)  # task-agnostic: rows sent to their own task
    model: nn.Module | None = field(default=None, repr=False)  # as the last task left it

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


class _Run:
    """The state of one sequence run: model, heads, tasks, strategy, and the numbers so far."""

    def __init__(self, config: SequenceConfig, console: Console, overwrite: bool, resuming: bool) -> None:
        self.config, self.console = config, console
        folder = None if resuming else check_output_dir(config.output_dir, overwrite)
        set_seed(config.seed)
        configs = [config.train_config(spec) for spec in config.tasks]
        splits = [task_splits(spec, c) for spec, c in zip(config.tasks, configs, strict=True)]
        self.model, self.tokenizer = train_tasks.load_model(configs[0], splits[0].label_names)
        collate = collator(config.task, self.tokenizer, configs[0].max_length)
        self.contexts = [TaskContext(i, spec, c, s, collate, [t.name for t in config.tasks[:i]])
                         for i, (spec, c, s) in enumerate(zip(config.tasks, configs, splits, strict=True))]
        self.heads, self.head_path = None, None
        if config.task == "classification":
            self.heads, self.head_path = task_heads.install(self.model)
            for context in self.contexts:
                if context.spec.head is None:
                    self.heads.add(context.name, len(context.splits.label_names))
                else:
                    owner = next(c for c in self.contexts if c.name == context.spec.head)
                    task_heads.check_same_labels(context.name, context.splits.label_names, owner.name,
                                                 owner.splits.label_names)
                    self.heads.share(context.name, context.spec.head)
        adapter = configs[0].adapter_config()  # no head in train_also: the heads are the run's
        self.strategy: Strategy = make_strategy(config.strategy, adapter, config.options)
        self.agnostic = "task_agnostic" in config.settings
        self.prototypes = (Prototypes(self.model, self.tokenizer, self.contexts, config.eval_split)
                           if self.agnostic and config.routing == "prototype" else None)
        if folder is not None and folder.exists() and overwrite:  # only once everything above was accepted
            shutil.rmtree(folder)

    def choice(self, task: int, seen: int) -> torch.Tensor:
        """For each eval row of task `task`, the index of the task it is routed to among the first `seen`."""
        if self.prototypes is not None:
            return self.prototypes.choice(task, seen)
        context = self.contexts[task]
        rows = eval_rows(context, self.config.eval_split)
        scores = []
        for route in self.contexts[:seen]:
            with self.strategy.agnostic_view(self.model, route.name):
                scores.append(confidence(self.model, context, rows, self.heads, route.name))
        return torch.stack(scores, dim=1).argmax(dim=1)

    def accuracy(self, task: int, agnostic_seen: int | None = None) -> float:
        """Task `task`'s accuracy, with its task id, or routed among the first `agnostic_seen` tasks."""
        context = self.contexts[task]
        rows = eval_rows(context, self.config.eval_split)
        if agnostic_seen is None:
            with self.strategy.view(self.model, context.name):
                hits = correct_rows(self.model, self.tokenizer, context, rows, self.heads)
            return hits.float().mean().item() if len(hits) else float("nan")
        chosen = self.choice(task, agnostic_seen)
        hits = torch.zeros(len(rows), dtype=torch.bool)
        for route in chosen.unique().tolist():
            picked = (chosen == route).nonzero().flatten().tolist()
            target = self.contexts[route].name
            with self.strategy.agnostic_view(self.model, target):
                hits[picked] = correct_rows(self.model, self.tokenizer, context, [rows[i] for i in picked],
                                            self.heads, head_of=target)
        return hits.float().mean().item() if len(hits) else float("nan")

    def row(self, task: int) -> dict[str, list[float | None]]:
        """After training task `task`: every seen task and the next unseen one with the task id,
        every seen one without it (routed among the seen tasks)."""
        K = len(self.contexts)
        out = {"task_incremental": [self.accuracy(j) if j <= task + 1 else None for j in range(K)]}
        if "task_agnostic" in self.config.settings:
            out["task_agnostic"] = [self.accuracy(j, task + 1) if j <= task else None for j in range(K)]
        return out

    def routing(self, task: int) -> list[float | None]:
        """After task `task`: the share of each seen task's eval rows routed to a task that answers
        with their own head (the task itself, or one sharing its head): a classification task's
        task-agnostic accuracy is at most this share."""
        shares: list[float | None] = []
        for j, context in enumerate(self.contexts):
            if j > task:
                shares.append(None)
                continue
            chosen = self.choice(j, task + 1).tolist()
            if self.heads is None:
                right = [route == j for route in chosen]
            else:
                owner = self.heads.owner(context.name)
                right = [self.heads.owner(self.contexts[route].name) == owner for route in chosen]
            shares.append(sum(right) / len(right) if right else float("nan"))
        return shares

    def switch_angle(self, task: TaskContext) -> dict[str, Any] | None:
        """θ_min between the previous task's and this task's gradient subspaces, at the model now."""
        k = self.config.angle_samples
        if k == 0 or task.index == 0:
            return None
        previous = self.contexts[task.index - 1]
        try:
            bases = [self._subspace(c, k) for c in (previous, task)]
        except SpliceError as err:  # e.g. a form with no weight to take gradients at (LoReFT)
            return {"between": [previous.name, task.name], "skipped": str(err)}
        angle = subspace_angle(*bases)
        return {"between": [previous.name, task.name], "theta_min_mean": angle.mean, "theta_min_min": angle.min}

    def _subspace(self, task: TaskContext, k: int) -> dict[str, torch.Tensor]:
        if self.heads is not None:
            task_heads.select(self.model, self.heads, task.name)
        self.model.eval()
        device = next(self.model.parameters()).device
        batches = [{key: v.to(device) for key, v in b.items()} for b in task.batches(k)]
        return gradient_subspace(self.model, batches, k=k)

    def train(self, task: TaskContext) -> tuple[Trainer, float, dict[str, Any] | None]:
        """The strategy's adapter for `task` (and its head) trained by a `Trainer`; its wall seconds,
        and the switch angle, measured once the adapter is attached (so at the adapted layers)."""
        if self.heads is not None:  # a strategy's statistics pass (LoDA's) runs the model through a head
            task_heads.select(self.model, self.heads, task.name)
        name = self.strategy.begin_task(self.model, task)
        switch = self.switch_angle(task)
        extra = []
        if self.heads is not None:
            task_heads.select(self.model, self.heads, task.name)  # the angle ran the previous task's head too
            self.heads.head(task.name).requires_grad_(True)
            extra = [f"{self.head_path}.heads.{self.heads.owner(task.name)}"]
        started = time.perf_counter()
        trainer = Trainer(self.model, self.tokenizer, task.config, adapter_name=name, splits=task.splits,
                          heads=extra, penalties=self.strategy.penalties(self.model, task), console=self.console)
        trainer.fit()
        seconds = time.perf_counter() - started
        if self.heads is not None:
            self.heads.head(task.name).requires_grad_(False)
        self.strategy.end_task(self.model, task)
        return trainer, seconds, switch

    def rebuild(self, state: dict[str, Any]) -> int:
        """The model as the saved run left it after its first `done` tasks; that number. The
        unfinished task's folder (and any after it) is cleared for its fresh start."""
        done = state["done"]
        for context in self.contexts[:done]:
            self.strategy.rebuild(self.model, context)
        checkpoint.restore(self.model, self.strategy, state)
        for context in self.contexts[done:]:
            shutil.rmtree(context.config.output_dir, ignore_errors=True)
        return done

    def stored_bytes(self, trained: int) -> int:
        """What the strategy keeps, plus the trained tasks' heads."""
        owners = {self.heads.owner(c.name) for c in self.contexts[:trained]} if self.heads is not None else set()
        heads = sum(t.numel() * t.element_size() for owner in owners for t in self.heads.heads[owner].parameters())
        return self.strategy.stored_bytes(self.model) + heads


def run_sequence(config: SequenceConfig, *, console: Console | None = None, quiet: bool = False,
                 overwrite: bool = False, resume: bool = False) -> ContinualResult:
    """Train the sequence's tasks in order with its strategy; the matrices, scores and costs,
    written to `config.output_dir` (a non-empty folder is refused unless `overwrite`).

    After every task the run is saved (`splice.continual.checkpoint`); `resume=True` continues a
    stopped run in `config.output_dir` at the task after the last one it finished, with the same
    config, and ends as the run that never stopped.
    """
    from splice.continual.report import write_report

    console = console or Console(quiet=quiet)
    started = time.perf_counter()
    saved = checkpoint.load(config.output_dir, config.to_dict()) if resume else None
    with progress.use(console, quiet=quiet):
        run = _Run(config, console, overwrite, resuming=saved is not None)
        names = [c.name for c in run.contexts]
        matrices: dict[str, list[list[float | None]]] = {s: [] for s in config.settings}
        result = ContinualResult(config, names, matrices, [], {}, model=run.model,
                                 eval_splits=[eval_split(c, config.eval_split) for c in run.contexts])
        done, earlier_seconds = 0, 0.0
        if saved is None:
            result.before = [float(run.accuracy(j)) for j in range(len(names))]  # pretrained model, untrained heads
        else:
            state, partial = saved
            done, earlier_seconds = run.rebuild(state), partial.pop("wall_seconds")
            for key, value in partial.items():
                if key not in ("done", "config"):
                    setattr(result, key, value)
            matrices = result.matrices
            console.print(f"resuming {config.output_dir} after task {done}/{len(names)} ({names[done - 1]})")
        before = result.before
        for task in progress.track(run.contexts[done:], "tasks"):
            console.print(f"[bold]task {task.index + 1}/{len(names)}: {task.name}[/] ({config.strategy})")
            trainer, seconds, switch = run.train(task)
            if switch is not None:
                result.switches.append(switch)
            for setting, values in run.row(task.index).items():
                if setting in matrices:
                    matrices[setting].append(values)
            if run.agnostic:
                result.routing.append(run.routing(task.index))
            result.trainable_parameters.append(sum(p.numel() for p in trainer.trained.values()))
            result.stored_bytes.append(run.stored_bytes(task.index + 1))
            result.train_seconds.append(seconds)
            if task.index + 1 < len(names):
                checkpoint.save(config.output_dir, run.model, run.strategy, task.index + 1,
                                _partial(result, earlier_seconds + time.perf_counter() - started))
        result.scores = {s: scores(m, before if s == "task_incremental" else None) for s, m in matrices.items()}
        result.law = _law(result)
        result.wall_seconds = earlier_seconds + time.perf_counter() - started
        write_report(result)
        checkpoint.remove(config.output_dir)
    return result


def _partial(result: ContinualResult, wall_seconds: float) -> dict[str, Any]:
    """What a resumed run needs of the result so far (plain values)."""
    return {"config": result.config.to_dict(), "before": result.before, "matrices": result.matrices,
            "routing": result.routing, "switches": result.switches,
            "trainable_parameters": result.trainable_parameters, "stored_bytes": result.stored_bytes,
            "train_seconds": result.train_seconds, "wall_seconds": wall_seconds}


def _law(result: ContinualResult) -> dict[str, float] | None:
    """F = a (1 - cos² θ_min) + b over the switches (task-incremental forgetting of the task left)."""
    matrix = result.matrices["task_incremental"]
    points = []
    for switch, t in zip(result.switches, range(1, len(matrix)), strict=False):
        if "theta_min_mean" in switch:
            switch["forgetting"] = matrix[t - 1][t - 1] - matrix[t][t - 1]
            points.append((switch["theta_min_mean"], switch["forgetting"]))
    if len({round(p[0], 9) for p in points}) < 2:
        return None
    law = fit_forgetting_law([p[0] for p in points], [p[1] for p in points])
    return {"a": law.a, "b": law.b, "r2": law.r2, "r": law.r, "n": law.n}
