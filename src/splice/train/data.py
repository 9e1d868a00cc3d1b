"""Rows in, padded batches out: loading data sets and collating them for the two tasks.

Rows are plain dicts with canonical columns: "text" and an integer "label" for classification,
"prompt" and "completion" for causal LM. They come from a bundled data set (`splice.assets`), a
.jsonl or .csv file, a folder written by `datasets.Dataset.save_to_disk`, or any iterable of
mappings (a `datasets.Dataset` is one). Tokenisation happens per batch in the collators, so a
data set is never tokenised ahead of time.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from splice import assets
from splice.assets import DatasetSplits, Row
from splice.core.config import AdapterConfig
from splice.core.errors import SpliceError
from splice.train.config import TrainConfig

IGNORE_INDEX = -100  # the label torch's cross-entropy skips: prompt and padding positions


def read_rows(source: str | Path | Iterable[Mapping[str, Any]]) -> list[Row]:
    """Rows of a .jsonl / .csv file, a `save_to_disk` folder, or an iterable of mappings."""
    if not isinstance(source, (str, Path)):
        return [dict(row) for row in source]
    path = Path(source)
    if path.is_dir():
        return read_rows(_load_from_disk(path))
    if not path.is_file():
        raise SpliceError(f"data file {path} does not exist (bundled data sets: {', '.join(assets.DATASETS)})")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [_json_line(line, path, i) for i, line in enumerate(f, 1) if line.strip()]
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    raise SpliceError(f"cannot read {path}: expected a .jsonl or .csv file or a datasets folder")


def _json_line(line: str, path: Path, number: int) -> Row:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise SpliceError(f"{path}:{number} is not valid JSON: {err}") from None


def _load_from_disk(path: Path) -> Any:
    try:
        import datasets
    except ImportError:
        raise SpliceError(f"{path} is a folder; reading a saved Hugging Face data set needs "
                          "`pip install datasets` (or give a .jsonl / .csv file)") from None
    return datasets.load_from_disk(str(path))


def load_splits(config: TrainConfig) -> DatasetSplits:
    """The run's data: a bundled data set by name, or files with their columns renamed.

    A file without a `validation` file gives up a seeded 10% of its rows (`assets.split`) for
    validation; files have no test split. Training rows are shuffled with a fixed seed, so that
    `max_train_examples` keeps a fair sample; `max_eval_examples` keeps the first rows of each
    evaluation split.
    """
    if config.data in assets.DATASETS:
        splits = assets.dataset(config.data)
        if splits.task != config.task:
            raise SpliceError(f"data set {config.data!r} is for {splits.task}, but task is {config.task!r}")
    else:
        rows = read_rows(config.data)
        if config.validation:
            train, validation = assets.shuffled(rows), read_rows(config.validation)
        else:
            train, validation, held_out = assets.split(rows)
            validation += held_out
        splits = canonical_splits(train, validation, [], config)
    return DatasetSplits(
        train=splits.train[: config.max_train_examples],
        validation=splits.validation[: config.max_eval_examples],
        test=splits.test[: config.max_eval_examples],
        task=splits.task,
        label_names=splits.label_names,
    )


def load_eval_rows(config: TrainConfig, split: str = "test") -> DatasetSplits:
    """Rows to evaluate on: one split of a bundled data set, or a whole file, as `.test`."""
    if config.data in assets.DATASETS:
        splits = load_splits(config)
        if split not in ("train", "validation", "test"):
            raise SpliceError(f"split must be train, validation or test; got {split!r}")
        rows = getattr(splits, split)
    else:
        splits = canonical_splits([], [], read_rows(config.data), config)
        rows = splits.test
    return DatasetSplits([], [], rows[: config.max_eval_examples], splits.task, splits.label_names)


def canonical_splits(train: list[Row], validation: list[Row], test: list[Row], config: TrainConfig) -> DatasetSplits:
    """Rename the configured columns to the canonical ones; string labels become indices.

    String labels are numbered in sorted order ("neg"/"pos" become 0/1); integer labels keep
    their value.
    """
    if config.task == "causal_lm":
        columns = {config.prompt_column: "prompt", config.completion_column: "completion"}
        train, validation, test = (_rename(rows, columns) for rows in (train, validation, test))
        return DatasetSplits(train, validation, test, task="causal_lm")
    columns = {config.text_column: "text", config.label_column: "label"}
    train, validation, test = (_rename(rows, columns) for rows in (train, validation, test))
    keys = sorted({_label_key(r["label"]) for r in train + validation + test}, key=str)
    if all(isinstance(k, int) for k in keys):
        names, index = [str(i) for i in range(max(keys) + 1)], {k: k for k in keys}
    else:
        names, index = [str(k) for k in keys], {k: i for i, k in enumerate(keys)}
    for row in train + validation + test:
        row["label"] = index[_label_key(row["label"])]
    return DatasetSplits(train, validation, test, task="classification", label_names=tuple(names))


def _label_key(value: Any) -> int | str:
    """Labels from CSV are strings; "1" and 1 must be the same class."""
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def _rename(rows: list[Row], columns: dict[str, str]) -> list[Row]:
    if rows:
        missing = [c for c in columns if c not in rows[0]]
        if missing:
            raise SpliceError(f"data has no column {missing} (columns: {sorted(rows[0])}); "
                              "set --text-column / --label-column (or prompt/completion) to the right names")
    return [{new: row[old] for old, new in columns.items()} for row in rows]


@dataclass
class ClassificationCollator:
    """Tokenise a batch of texts, padded to the longest, with integer labels."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int

    def __call__(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer([r["text"] for r in rows], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        batch["labels"] = torch.tensor([int(r["label"]) for r in rows])
        return dict(batch)


@dataclass
class CausalLMCollator:
    """prompt + completion (+ eos) as one sequence; the loss is on the completion only.

    Prompt and completion are tokenised apart so that the boundary is exact, then joined;
    labels are IGNORE_INDEX on the prompt, and transformers' DataCollatorForSeq2Seq pads
    `labels` with IGNORE_INDEX as well (on the tokenizer's padding side). Sequences longer
    than `max_length` lose their end, so keep prompts short enough for the answer to fit.
    """

    tokenizer: PreTrainedTokenizerBase
    max_length: int

    def __post_init__(self) -> None:
        self.pad = DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")

    def __call__(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        return dict(self.pad([self.encode(r["prompt"], r["completion"]) for r in rows]))

    def encode(self, prompt: str, completion: str) -> dict[str, list[int]]:
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        completion_ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
        if self.tokenizer.eos_token_id is not None:
            completion_ids = completion_ids + [self.tokenizer.eos_token_id]
        input_ids = (prompt_ids + completion_ids)[: self.max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[: self.max_length]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def train_loader(rows: list[Row], config: TrainConfig, collate) -> DataLoader:
    """Shuffled training batches whose order depends on `config.seed` alone.

    The shuffle has its own generator, so a run's data order does not depend on how much of
    the global random stream model loading, adapter init or other jobs used before it; a
    tenant in a multiplexed run sees its batches in the order it would see alone.
    """
    generator = torch.Generator().manual_seed(config.seed)
    return DataLoader(rows, batch_size=config.batch_size, shuffle=True, collate_fn=collate, generator=generator)


def with_probe(adapter: AdapterConfig, rows: list[Row], config: TrainConfig, collate) -> AdapterConfig:
    """The adapter config, given probe batches from the training data if it chooses its sites
    from data (DomLoRA) and has none: a loader of its own, so the training order is unchanged."""
    if not adapter.needs_probe or getattr(adapter, "probe", None) is not None:
        return adapter
    return adapter.replace(probe=train_loader(rows, config, collate))


def collator(task: str, tokenizer: PreTrainedTokenizerBase, max_length: int):
    """The collator for `task` ("classification" or "causal_lm")."""
    cls = ClassificationCollator if task == "classification" else CausalLMCollator
    return cls(tokenizer, max_length)
