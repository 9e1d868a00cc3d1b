"""Rows in, padded batches out: loading data sets and collating them for the two tasks.

Rows are plain dicts with canonical columns: "text" and an integer "label" for classification,
"prompt" and "completion" for causal LM. They come from a bundled data set (`splice.assets`), a
.jsonl or .csv file, a folder written by `datasets.Dataset.save_to_disk`, or any iterable of
mappings (a `datasets.Dataset` is one). Tokenisation happens per batch in the collators, so a
data set is never tokenised ahead of time.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import warnings
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
from splice.core.errors import DataError
from splice.train.batching import LengthGroupedSampler, PackedCollator
from splice.train.config import IN_MEMORY_PREFIX, TrainConfig, describe_data

IGNORE_INDEX = -100  # the label torch's cross-entropy skips: prompt and padding positions


def read_rows(source: str | Path | Iterable[Mapping[str, Any]]) -> list[Row]:
    """Rows of a .jsonl / .csv file, a `save_to_disk` folder, or an iterable of mappings."""
    return read_numbered_rows(source)[0]


def read_numbered_rows(source: str | Path | Iterable[Mapping[str, Any]]) -> tuple[list[Row], list[str]]:
    """The rows and where each one is, for messages: "data.jsonl:3" (file and line; for a CSV
    row, the line it ends on), "data/:row 5" for a saved data set, "row 5" for an iterable.

    A file or folder with no rows (empty, blank, a CSV header alone) is refused, and so is a
    JSONL line or an item that is not an object (a mapping of column to value)."""
    if not isinstance(source, (str, Path)):
        rows = list(source)
        return _mappings(rows, [f"row {i}" for i in range(1, len(rows) + 1)])
    if str(source).startswith(IN_MEMORY_PREFIX):
        raise DataError(f"data {source!r} describes rows the run was given in memory, which config.yaml cannot "
                        "hold; give them again (TrainConfig(data=the_dataset)) to train or resume")
    path = Path(source)
    if path.is_dir():
        rows = list(_load_from_disk(path))
        rows, where = _mappings(rows, [f"{path}: row {i}" for i in range(1, len(rows) + 1)])
    elif not path.is_file():
        raise DataError(f"data file {path} does not exist (bundled data sets: {', '.join(assets.DATASETS)})")
    elif path.suffix in (".jsonl", ".csv"):
        try:
            rows, where = (_jsonl_rows if path.suffix == ".jsonl" else _csv_rows)(path)
        except UnicodeDecodeError as err:
            line = path.read_bytes()[: err.start].count(b"\n") + 1
            raise DataError(f"{path}:{line} is not UTF-8 text ({err.reason} at byte {err.start}); save the file as "
                            "UTF-8 (spreadsheets: 'CSV UTF-8')") from None
    else:
        raise DataError(f"cannot read {path}: expected a .jsonl or .csv file or a datasets folder")
    if not rows:
        raise DataError(f"{path} holds no rows (the file is empty or blank, or has only a header)")
    return rows, where


def _jsonl_rows(path: Path) -> tuple[list[Row], list[str]]:
    with path.open(encoding="utf-8") as f:
        numbered = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    return [_json_line(line, path, i) for i, line in numbered], [f"{path}:{i}" for i, _ in numbered]


def _csv_rows(path: Path) -> tuple[list[Row], list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows, where = [], []
        for row in reader:
            rows.append(row)
            where.append(f"{path}:{reader.line_num}")
        if reader.fieldnames is None:
            raise DataError(f"{path} is empty: a .csv file needs a header line and one line per row")
    return rows, where


def _mappings(rows: list[Any], where: list[str]) -> tuple[list[Row], list[str]]:
    for row, place in zip(rows, where, strict=True):
        if not isinstance(row, Mapping):
            raise DataError(f"{place} is a {type(row).__name__}, not a mapping of column names to values")
    return [dict(row) for row in rows], where


def _json_line(line: str, path: Path, number: int) -> Row:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{number} is not valid JSON: {err}") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{number} is not a JSON object: each line must be one object of column: value "
                        f"pairs, e.g. {{\"text\": \"...\", \"label\": 1}}; got a {_json_type(row)}")
    return row


def _json_type(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _load_from_disk(path: Path) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a folder; reading a saved Hugging Face data set needs "
                        "`pip install datasets` (or give a .jsonl / .csv file)") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        found = sorted(p.name for p in path.iterdir())[:8]
        raise DataError(f"{path} is a folder but not a data set saved with datasets' save_to_disk ({err}); it "
                        f"holds {found}: give one .jsonl or .csv file") from None
    if isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{path} is a DatasetDict with splits {sorted(loaded)}; give one split's folder, e.g. "
                        f"{path / 'train'} (and --validation {path / 'validation'})")
    return loaded


def load_splits(config: TrainConfig) -> DatasetSplits:
    """The run's data: a bundled data set by name, or files with their columns renamed.

    A file without a `validation` file gives up a seeded 10% of its rows (`assets.split`) for
    validation; files have no test split. Training rows are shuffled with a fixed seed, so that
    `max_train_examples` keeps a fair sample; `max_eval_examples` keeps the first N rows of each
    evaluation split (a validation file's first lines, a bundled split's first rows, or the first
    of the seeded hold-out), the same rows in every run, so that quick runs compare.

    Every row of a file is checked first (`check_rows`), and a classification file must hold at
    least two classes, in its training rows as well: with one class every prediction is right and
    the accuracy of 1.0 would mean nothing.
    """
    if isinstance(config.data, str) and config.data in assets.DATASETS:
        splits = assets.dataset(config.data)
        if splits.task != config.task:
            raise DataError(f"data set {config.data!r} is for {splits.task}, but task is {config.task!r}")
    else:
        rows, where = read_numbered_rows(config.data)
        kinds = check_rows(rows, where, config)
        if config.validation:
            validation_rows, validation_where = read_numbered_rows(config.validation)
            _same_label_kinds(kinds, check_rows(validation_rows, validation_where, config))
            train, validation = assets.shuffled(rows), validation_rows
        else:
            train, validation, held_out = assets.split(rows)
            validation += held_out
        splits = canonical_splits(train, validation, [], config)
        if splits.task == "classification" and config.validation:
            _validation_labels_trained(splits, validation_where, describe_data(config.data))
        if splits.task == "classification":
            _several_classes(splits.train + splits.validation, splits.label_names, describe_data(config.data), "rows")
            _several_classes(splits.train, splits.label_names, describe_data(config.data),
                             "training rows" + ("" if config.validation else " (what remains after holding out "
                                                "a tenth for validation)"))
    return DatasetSplits(
        train=splits.train[: config.max_train_examples],
        validation=splits.validation[: config.max_eval_examples],
        test=splits.test[: config.max_eval_examples],
        task=splits.task,
        label_names=splits.label_names,
    )


def _validation_labels_trained(splits: DatasetSplits, where: list[str], data: str) -> None:
    """Refuse a validation label the training rows never have (a typo such as "postive", or a
    class 2 where training has 0 and 1): it would become a class of its own that no row trains
    and that every prediction of it gets wrong."""
    trained = {row["label"] for row in splits.train}
    for row, place in zip(splits.validation, where, strict=True):
        if row["label"] not in trained:
            raise DataError(f"{place}: label {splits.label_names[row['label']]!r} never occurs in the training "
                            f"rows ({data}, labels {sorted(splits.label_names[i] for i in trained)}); fix the "
                            "label or add training rows of that class")


def load_eval_rows(config: TrainConfig, split: str = "test") -> DatasetSplits:
    """Rows to evaluate on: one split of a bundled data set, or a whole file, as `.test`.

    An evaluation file may hold a single class when its labels are class indices (the accuracy
    on that class is still meaningful); with class names it may not, since names are numbered
    from the file's own sorted names and one name alone would always become class 0.
    """
    if isinstance(config.data, str) and config.data in assets.DATASETS:
        splits = load_splits(config)
        if split not in ("train", "validation", "test"):
            raise DataError(f"split must be train, validation or test; got {split!r}")
        rows = getattr(splits, split)
    else:
        rows, where = read_numbered_rows(config.data)
        kinds = check_rows(rows, where, config)
        splits = canonical_splits([], [], rows, config)
        if "name" in kinds:
            _several_classes(splits.test, splits.label_names, describe_data(config.data), "rows (class names)")
        rows = splits.test
    return DatasetSplits([], [], rows[: config.max_eval_examples], splits.task, splits.label_names)


def check_rows(rows: list[Row], where: list[str], config: TrainConfig) -> dict[str, str]:
    """Refuse, naming the file and line, a row the task cannot use; return where each kind of
    label ("index", "name") first appears.

    Causal LM: the prompt and completion columns hold strings. Classification: the text column
    holds a string, and the label column a class, either an index (a whole number >= 0: 1, 1.0,
    "1") or a name (a non-blank string); null, negative (-1 often marks "no label"), fractional
    (0.5) and boolean labels are refused, and so is a file that mixes indices and names.
    """
    if config.task == "causal_lm":
        columns = (config.prompt_column, config.completion_column)
        names = "--prompt-column / --completion-column (prompt_column / completion_column in a config)"
    else:
        columns = (config.text_column,)
        names = "--text-column / --label-column (text_column / label_column in a config)"
    kinds: dict[str, str] = {}
    for row, place in zip(rows, where, strict=True):
        for column in (*columns, *(() if config.task == "causal_lm" else (config.label_column,))):
            if column not in row:
                raise DataError(f"{place}: the row has no column {column!r} (its columns: {sorted(row)}); set "
                                f"{names} to the right names")
        for column in columns:
            if not isinstance(row[column], str):
                raise DataError(f"{place}: column {column!r} is {_shown(row[column])}; expected a string")
        if config.task != "causal_lm":
            key = _label_key(row[config.label_column], f"{place}: label column {config.label_column!r}")
            kinds.setdefault("index" if isinstance(key, int) else "name", place)
    _same_label_kinds(kinds, {})
    return kinds


def _same_label_kinds(kinds: dict[str, str], more: dict[str, str]) -> None:
    both = {**more, **kinds}
    if len(both) > 1:
        raise DataError(f"the labels mix class indices ({both['index']}) and class names ({both['name']}); "
                        "use one or the other, or the classes would be numbered by accident")
    kinds.update(both)


def _several_classes(rows: list[Row], names: tuple[str, ...], source: str, what: str) -> None:
    present = sorted({r["label"] for r in rows})
    if len(present) < 2:
        found = f"only class {names[present[0]]!r}" if present else "no rows"
        raise DataError(f"{source}: the {what} hold {found}; classification needs at least two classes "
                        "(with one, every prediction is right and accuracy is 1.0 by construction)")


def canonical_splits(train: list[Row], validation: list[Row], test: list[Row], config: TrainConfig) -> DatasetSplits:
    """Rename the configured columns to the canonical ones; string labels become indices.

    String labels are numbered in sorted order ("neg"/"pos" become 0/1); integer labels keep
    their value ("2", 2 and 2.0 are the same class). Labels that are not a class (null, -1,
    0.5, true) and a mix of indices and names are refused (`check_rows`, which names the file and
    line, is the check for files; here a row is named by its split and position).
    """
    if config.task == "causal_lm":
        check_rows(train + validation + test, _places(train, validation, test), config)
        columns = {config.prompt_column: "prompt", config.completion_column: "completion"}
        train, validation, test = (_rename(rows, columns) for rows in (train, validation, test))
        return DatasetSplits(train, validation, test, task="causal_lm")
    check_rows(train + validation + test, _places(train, validation, test), config)
    columns = {config.text_column: "text", config.label_column: "label"}
    train, validation, test = (_rename(rows, columns) for rows in (train, validation, test))
    keyed = [(_label_key(row["label"], "label"), row) for row in train + validation + test]
    keys = sorted({key for key, _ in keyed}, key=str)
    if all(isinstance(k, int) for k in keys):
        names, index = [str(i) for i in range(max(keys, default=-1) + 1)], {k: k for k in keys}
    else:
        names, index = [str(k) for k in keys], {k: i for i, k in enumerate(keys)}
    for key, row in keyed:
        row["label"] = index[key]
    return DatasetSplits(train, validation, test, task="classification", label_names=tuple(names))


def _places(train: list[Row], validation: list[Row], test: list[Row]) -> list[str]:
    return [f"{split} row {i}" for split, rows in (("train", train), ("validation", validation), ("test", test))
            for i in range(1, len(rows) + 1)]


_WHOLE = re.compile(r"[-+]?\d+(\.0*)?")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _label_key(value: Any, place: str) -> int | str:
    """A label as a class index (int >= 0) or a class name (str); anything else is refused.

    Labels from CSV are strings; "1", 1 and 1.0 must be the same class."""
    if isinstance(value, bool) or value is None or not isinstance(value, (int, float, str)):
        hint = " (write 0 and 1, or class names)" if isinstance(value, bool) else ""
        raise DataError(f"{place} is {_shown(value)}; expected a class index (0, 1, ...) or a class name{hint}")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise DataError(f"{place} is blank; expected a class index (0, 1, ...) or a class name")
        if _WHOLE.fullmatch(text):
            value = int(float(text))
        elif _NUMBER.fullmatch(text):
            value = float(text)
        else:
            return text
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise DataError(f"{place} is {value!r}; expected a whole class index (0, 1, ...) or a class name")
        value = int(value)
    if value < 0:
        raise DataError(f"{place} is {value}; class indices start at 0 (a negative label often marks an "
                        "unlabelled row: drop such rows)")
    return value


def _shown(value: Any) -> str:
    return "null" if value is None else f"{value!r} (a {_json_type(value)})"


def _rename(rows: list[Row], columns: dict[str, str]) -> list[Row]:
    """The rows with only `columns`, under their new names (`check_rows` made sure they are there)."""
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

    def lengths(self, rows: list[Row]) -> list[int]:
        """Each row's token count as `__call__` encodes it (truncated, before padding)."""
        return token_counts(self.tokenizer, [r["text"] for r in rows], truncation=True, max_length=self.max_length)


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

    def lengths(self, rows: list[Row]) -> list[int]:
        """Each row's token count as `encode` makes it (prompt, completion and eos, cut at max_length)."""
        prompts = token_counts(self.tokenizer, [r["prompt"] for r in rows])
        completions = token_counts(self.tokenizer, [r["completion"] for r in rows], add_special_tokens=False)
        eos = int(self.tokenizer.eos_token_id is not None)
        return [min(p + c + eos, self.max_length) for p, c in zip(prompts, completions, strict=True)]


def check_completions_fit(splits: DatasetSplits, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
    """Refuse a causal-LM split whose every prompt fills `max_length` (no completion token would be
    left to learn or score: a loss of nothing, NaN), and warn where some rows lose their answer."""
    for split, rows in (("training", splits.train), ("validation", splits.validation)):
        if not rows:
            continue
        prompts = token_counts(tokenizer, [r["prompt"] for r in rows])
        lost = [i for i, n in enumerate(prompts) if n >= max_length]
        if len(lost) == len(rows):
            raise DataError(f"max_length {max_length} leaves no completion token in any {split} row (the shortest "
                            f"prompt is {min(prompts)} tokens): raise max_length or shorten the prompts")
        if lost:
            warnings.warn(f"max_length {max_length}: {len(lost)} of {len(rows)} {split} rows have prompts of "
                          f"{max_length}+ tokens and no completion token left (e.g. {split} row {lost[0] + 1}); "
                          "they count for nothing", stacklevel=2)


def token_counts(tokenizer: PreTrainedTokenizerBase, texts: list[str], chunk: int = 4096, **kwargs: Any) -> list[int]:
    """The number of tokens of each text (`kwargs` as the tokenizer's call), tokenised `chunk` at a
    time: once per row at the start of a run, for lengths only (a fast tokenizer does Rotten
    Tomatoes' 3,892 reviews in well under a second; the ids are not kept)."""
    return [len(ids) for i in range(0, len(texts), chunk)
            for ids in tokenizer(texts[i: i + chunk], **kwargs)["input_ids"]]


def train_loader(rows: list[Row], config: TrainConfig, collate, processes: int = 1) -> DataLoader:
    """Shuffled training batches whose order depends on `config.seed` (and, length-grouped, on the
    rows of one optimizer step over all `processes`) alone.

    The shuffle has its own generator, so a run's data order does not depend on how much of
    the global random stream model loading, adapter init or other jobs used before it; a
    tenant in a multiplexed run sees its batches in the order it would see alone.
    `config.group_by_length` groups rows of similar length (`batching.LengthGroupedSampler`, on
    lengths `collate.lengths` counts once); `config.packing` packs a causal-LM batch into one
    row without padding (`batching.PackedCollator`) and leaves the order plain shuffled, since
    there is no padding left for grouping to save.
    """
    generator = torch.Generator().manual_seed(config.seed)
    if config.packing:
        collate = PackedCollator(collate.encode)
    elif config.group_by_length:
        sampler = LengthGroupedSampler(collate.lengths(rows), config.batch_size * config.grad_accum * processes,
                                       generator)
        return DataLoader(rows, batch_size=config.batch_size, sampler=sampler, collate_fn=collate, generator=generator)
    return DataLoader(rows, batch_size=config.batch_size, shuffle=True, collate_fn=collate, generator=generator)


def probe_loader(rows: list[Row], config: TrainConfig, collate) -> DataLoader:
    """Padded batches in the plain seeded shuffle, whatever `group_by_length` says: a sample of the
    data for probing it (a length-grouped epoch starts with its longest step: a biased sample)."""
    return train_loader(rows, dataclasses.replace(config, group_by_length=False, packing=False), collate)


def with_probe(adapter: AdapterConfig, rows: list[Row], config: TrainConfig, collate) -> AdapterConfig:
    """The adapter config, given probe batches from the training data if it chooses its sites
    from data (DomLoRA) and has none: a loader of its own (`probe_loader`), so the training order
    is unchanged."""
    if not adapter.needs_probe or getattr(adapter, "probe", None) is not None:
        return adapter
    return adapter.replace(probe=probe_loader(rows, config, collate))


def collator(task: str, tokenizer: PreTrainedTokenizerBase, max_length: int):
    """The collator for `task` ("classification" or "causal_lm")."""
    cls = ClassificationCollator if task == "classification" else CausalLMCollator
    return cls(tokenizer, max_length)
