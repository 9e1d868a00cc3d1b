"""The tasks' rows, as one model sees them: each task's data loaded as `splice train` loads it,
classification data turned into label words for a generator, every input tagged with its task;
and a run's mixture, the concatenation its sampler draws batches from.

Tags: a generator reads "[sentiment] Review: ...\\nSentiment:" and "[arithmetic] Question: ...", so
that one adapter knows which task a prompt is (the spec's "instruction/prefix in the input"); a
classifier's tasks are told apart by their heads, so its texts are untagged unless a task sets
`tag`. A task's rows carry the same tag in every run (alone, in a pair, in the whole mixture), so
the runs differ only by what they are mixed with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splice import assets
from splice.assets import DatasetSplits, Row
from splice.continual.data import task_splits
from splice.continual.sequence import TaskSpec as ContinualTask
from splice.core.errors import ConfigError
from splice.multitask.config import MultitaskConfig, TaskSpec, words_settings_problem
from splice.train.config import TrainConfig
from splice.train.data import read_numbered_rows


@dataclass
class TaskData:
    """One task's rows, tagged, and where it is scored."""

    spec: TaskSpec
    key: int  # its place in the config's task list: seeds its row order and its head
    kind: str  # "classification" or "causal_lm", as the model computes it
    splits: DatasetSplits
    eval_split: str  # "test", or "validation" where the data has no test rows (or is asked for)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def eval_rows(self) -> list[Row]:
        return self.splits.test if self.eval_split == "test" else self.splits.validation

    @property
    def head(self) -> str:
        """The task whose head it computes with (its own name unless it shares one)."""
        return self.spec.head or self.spec.name


def load_tasks(config: MultitaskConfig) -> list[TaskData]:
    """Every task's rows as `config.task` computes them; tasks sharing a head must share labels."""
    tasks = [load_task(config, spec, key) for key, spec in enumerate(config.tasks)]
    by_name = {t.name: t for t in tasks}
    for task in tasks:
        if task.spec.head is not None:
            owner = by_name[task.spec.head]
            if owner.spec.head is not None:
                raise ConfigError(f"task {task.name!r} shares the head of {owner.name!r}, which shares "
                                  f"{owner.spec.head!r}'s: name the owner, head: {owner.spec.head}")
            if task.splits.label_names != owner.splits.label_names:
                raise ConfigError(f"task {task.name!r} shares the head of {owner.name!r} but its labels "
                                  f"{task.splits.label_names} are not {owner.name!r}'s {owner.splits.label_names}")
    return tasks


def load_task(config: MultitaskConfig, spec: TaskSpec, key: int) -> TaskData:
    """One task's splits, loaded (and re-labelled) as `splice train` / `splice continual` load
    them, classification rows as label words for a generator, every input tagged."""
    kind = spec.kind or data_kind(config, spec)
    if kind == "causal_lm" and config.task == "classification":
        raise ConfigError(f"task {spec.name!r}: {spec.data!r} holds prompt/completion rows, which a classifier "
                          "cannot learn; set task: causal_lm (a generator such as smollm2), or drop the task")
    as_words = kind == "classification" and config.task == "causal_lm"
    if not as_words and (problem := words_settings_problem(spec)) is not None:
        raise ConfigError(f"task {spec.name!r}: {spec.data!r} holds {kind} rows, so {problem}")
    continual_spec = ContinualTask(name=spec.name, data=spec.data, labels=spec.labels, as_words=as_words,
                                   prompt=spec.prompt, max_words=spec.max_words)
    splits = task_splits(continual_spec, config.data_config(spec, kind))
    tag = spec.tag if spec.tag is not None else (f"[{spec.name}] " if config.task == "causal_lm" else "")
    splits = tagged(splits, tag)
    if not splits.train:
        raise ConfigError(f"task {spec.name!r}: no training rows in {spec.data!r}")
    split = "validation" if config.eval_split == "validation" or not splits.test else "test"
    if not (splits.test if split == "test" else splits.validation):
        raise ConfigError(f"task {spec.name!r}: no {split} rows to score it on in {spec.data!r}")
    return TaskData(spec, key, splits.task, splits, split)


def data_kind(config: MultitaskConfig, spec: TaskSpec) -> str:
    """A bundled data set's own kind; a file's from its first row: causal_lm where it has the
    prompt and completion columns, else classification."""
    if spec.data in assets.DATASETS:
        return assets.dataset(spec.data).task
    rows, _ = read_numbered_rows(spec.data)
    columns = (spec.prompt_column or TrainConfig.prompt_column, spec.completion_column or TrainConfig.completion_column)
    return "causal_lm" if all(c in rows[0] for c in columns) else "classification"


def tagged(splits: DatasetSplits, tag: str) -> DatasetSplits:
    """Every row's input (prompt, or text to classify) with `tag` in front."""
    if not tag:
        return splits
    column = "prompt" if splits.task == "causal_lm" else "text"

    def change(rows: list[Row]) -> list[Row]:
        return [{**row, column: tag + row[column]} for row in rows]

    return DatasetSplits(change(splits.train), change(splits.validation), change(splits.test), task=splits.task,
                         label_names=splits.label_names)


@dataclass
class Mixture:
    """The training rows of a run's tasks, one after the other: what its sampler indexes."""

    tasks: list[TaskData]

    @property
    def rows(self) -> list[Row]:
        return [row for task in self.tasks for row in task.splits.train]

    @property
    def sizes(self) -> list[int]:
        return [len(task.splits.train) for task in self.tasks]


def described(task: TaskData) -> dict[str, Any]:
    """What a report says of a task's data."""
    return {"name": task.name, "data": task.spec.data, "kind": task.kind, "train_rows": len(task.splits.train),
            "eval_split": task.eval_split, "eval_rows": len(task.eval_rows),
            "labels": list(task.splits.label_names), "head": task.head}
