"""A task's rows as its spec asks: the data set loaded as `splice train` loads it, then
re-labelled (`labels`) or turned into prompt -> label-word rows for a generator (`as_words`)."""

from __future__ import annotations

import dataclasses

from splice.assets import DatasetSplits, Row
from splice.continual.sequence import TaskSpec
from splice.core.errors import ConfigError
from splice.train.config import TrainConfig
from splice.train.data import load_splits


def task_splits(spec: TaskSpec, config: TrainConfig) -> DatasetSplits:
    """The task's train/validation/test rows (`config` is the task's TrainConfig)."""
    source = dataclasses.replace(config, task="classification") if spec.as_words else config
    splits = load_splits(source)
    if spec.labels is not None:
        splits = relabelled(splits, spec)
    if spec.as_words:
        splits = as_words(splits, spec.prompt, spec.max_words)
    return splits


def relabelled(splits: DatasetSplits, spec: TaskSpec) -> DatasetSplits:
    """Every row's label renamed by `spec.labels` (old name -> new name), the new names sorted."""
    if splits.task != "classification":
        raise ConfigError(f"task {spec.name!r}: labels re-label a classification data set; {spec.data!r} is "
                          f"{splits.task}")
    mapping = dict(spec.labels or {})
    missing = [n for n in splits.label_names if n not in mapping]
    unknown = [n for n in mapping if n not in splits.label_names]
    if missing or unknown:
        raise ConfigError(f"task {spec.name!r}: labels must map every label of {spec.data!r} "
                          f"({', '.join(splits.label_names)}); "
                          + (f"missing {missing}" if missing else f"unknown {unknown}"))
    names = tuple(sorted(set(mapping.values())))
    if len(names) < 2:
        raise ConfigError(f"task {spec.name!r}: labels map everything to {names}; a task needs two classes")
    index = {old: names.index(mapping[old]) for old in splits.label_names}

    def change(rows: list[Row]) -> list[Row]:
        return [{**row, "label": index[splits.label_names[row["label"]]]} for row in rows]

    return DatasetSplits(change(splits.train), change(splits.validation), change(splits.test),
                         task="classification", label_names=names)


def as_words(splits: DatasetSplits, prompt: str, max_words: int | None = None) -> DatasetSplits:
    """Classification rows as prompt -> " label-name" rows (underscores read as spaces), each
    text cut to its first `max_words` words."""
    def text(row: Row) -> str:
        return row["text"] if max_words is None else " ".join(row["text"].split()[:max_words])

    def change(rows: list[Row]) -> list[Row]:
        return [{"prompt": prompt.format(text=text(row)),
                 "completion": " " + splits.label_names[row["label"]].replace("_", " ")} for row in rows]

    return DatasetSplits(change(splits.train), change(splits.validation), change(splits.test), task="causal_lm")
