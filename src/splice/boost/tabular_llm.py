"""BoostLLM on a table with a language model: the two views of each row as text, the model's
pooled hidden states as representations, rounds of LoRA + head (`splice.boost.boostllm`), and
the scores a tabular user compares (accuracy, AUC, log-loss) on the rows not drawn as shots.

    from splice.boost import boostllm
    from splice.boost.tabular import draw_shots, load_table
    table = load_table("breast_cancer")
    result = boostllm("smollm2", table, draw_shots(table, shots=16, seed=0), rounds=3, shrinkage=0.5)
    result.test["accuracy"], result.test["auc"]

The features view is "The <column> is <value>." sentences (TabLLM); the path view is the split
conditions a depth-`tree_depth` decision tree, fitted on the training shots, applies to the row.
A decoder is read at its last real token, an encoder as the mean over real tokens.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from splice.boost.boostllm import BoostLLM, BoostLLMHistory, BoostLLMSettings, Inputs
from splice.boost.tabular import PathTree, Split, Table, fit_path_tree, path_texts, serialize_rows
from splice.core.errors import SpliceError
from splice.train import tasks

VIEWS = ("features", "path")
# Encoders read as the mean over real tokens; every other model at its last real token.
ENCODER_TYPES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "mpnet", "xlm-roberta"}


@dataclass
class TabularResult:
    """A BoostLLM fit on one draw of shots: its rounds and its scores on the test rows."""

    table: str
    shots: int
    seed: int
    views: list[str]
    tree_depth: int
    settings: dict[str, Any]
    history: dict[str, Any]
    test: dict[str, float]
    validation_rows: int
    test_rows: int
    truncated_rows: int  # view texts cut at max_length
    adapter_parameters: int  # per round
    seconds: float
    booster: BoostLLM | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "booster"}


def boostllm(model: str | nn.Module, table: Table, split: Split, *, tokenizer: Any = None, rounds: int = 3,
             shrinkage: float = 0.5, tree_depth: int = 3, views: tuple[str, ...] = VIEWS, max_length: int = 512,
             test_rows: int | None = None, device: str | torch.device | None = None,
             **settings: Any) -> TabularResult:
    """Fit BoostLLM on `split`'s training shots (early stopping on its validation rows) and score
    it on its test rows (the first `test_rows` of them, if given).

    `model`: a bundled name ("smollm2", "minilm") or a local folder, loaded bare (no head), or a
    loaded model with its `tokenizer` (a `*ForCausalLM` is read through its bare model). `device`:
    default CUDA, else Apple MPS, else CPU. Text longer than `max_length` tokens is cut (a warning
    says how many rows; `truncated_rows` records it). `settings`: BoostLLMSettings' other fields.
    `views=("features",)` with `rounds=1, shrinkage=1` is the LLM fine-tuned once on the
    serialised rows (TabLLM), the comparison the issue asks for.
    """
    started = time.perf_counter()
    unknown = sorted(set(views) - set(VIEWS))
    if unknown or not views:
        raise SpliceError(f"views must be some of {list(VIEWS)}, got {list(views)}")
    boost = BoostLLMSettings(rounds=rounds, shrinkage=shrinkage, **settings)  # refused before the model loads
    if max_length < 2:
        raise SpliceError(f"max_length must be >= 2 tokens, got {max_length}")
    if test_rows is not None and test_rows < 1:
        raise SpliceError(f"test_rows must be >= 1 (None scores every test row), got {test_rows}")
    backbone, tokenizer = _backbone(model, tokenizer)
    backbone.to(device or default_device())
    tree = fit_path_tree(table, split.train, depth=tree_depth, seed=boost.seed)
    texts = view_texts(table, tree, views)
    inputs = [tokenized(tokenizer, t, max_length) for t in texts]
    truncated = sum(int(length > max_length) for t in texts for length in token_lengths(tokenizer, t))
    if truncated:
        warnings.warn(f"{truncated} view text(s) of {table.name} are longer than max_length={max_length} tokens and "
                      "were cut (their last columns or conditions never reach the model); raise max_length",
                      stacklevel=2)
    booster = BoostLLM(backbone, pooled_encoder(backbone), inputs, table.labels, classes=len(table.classes),
                       hidden=backbone.config.hidden_size, settings=boost)
    history: BoostLLMHistory = booster.fit(split.train.tolist(), split.validation.tolist())
    test = scored_rows(split, test_rows, booster.settings.seed)
    probabilities = booster.predict_proba(test)
    per_round = sum(p.numel() for name, p in backbone.named_parameters() if ".round0." in name)
    per_round += booster.hidden * booster.classes + booster.classes
    return TabularResult(
        table=table.name, shots=len(split.train) + len(split.validation), seed=booster.settings.seed,
        views=list(views), tree_depth=tree_depth, settings=asdict(booster.settings), history=history.to_dict(),
        test=scores(probabilities.numpy(), np.asarray(table.labels)[test]), validation_rows=len(split.validation),
        test_rows=len(test), truncated_rows=truncated, adapter_parameters=per_round,
        seconds=time.perf_counter() - started, booster=booster)


def scored_rows(split: Split, limit: int | None, seed: int) -> list[int]:
    """The test rows scored: all, or a seeded sample of `limit` of them (in table order; tables
    are often sorted by class, so the first rows would be one class)."""
    rows = split.test.tolist()
    if not limit or limit >= len(rows):
        return rows
    picked = np.random.default_rng(seed).choice(len(rows), size=limit, replace=False)
    return sorted(rows[i] for i in picked)


def view_texts(table: Table, tree: PathTree, views: tuple[str, ...]) -> list[list[str]]:
    """Each view's text for every row of the table."""
    rows = range(len(table))
    makers = {"features": lambda: serialize_rows(table, rows), "path": lambda: path_texts(tree, table, rows)}
    return [makers[v]() for v in views]


def tokenized(tokenizer: Any, texts: list[str], max_length: int) -> Inputs:
    """Right-padded token ids and attention masks of `texts`, cut at `max_length` tokens (the
    tokenizer's own padding side is left as it was)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                            return_token_type_ids=False)
    finally:
        tokenizer.padding_side = side
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    """Each text's length in tokens, uncut."""
    return [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]


def default_device() -> torch.device:
    """CUDA, else Apple MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pooled_encoder(backbone: nn.Module):
    """`encode(model, inputs)`: the last hidden state at the last real token (decoders) or its
    mean over real tokens (encoders), float32."""
    mean = getattr(backbone.config, "model_type", "") in ENCODER_TYPES

    def encode(model: nn.Module, inputs: Inputs) -> torch.Tensor:
        hidden = model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"]
        if mean:
            weights = mask[..., None].float()
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        # the last 1 of the mask, whichever side the padding is on
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
        return hidden[torch.arange(len(hidden), device=hidden.device), last]

    return encode


def scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Accuracy, AUC (binary; one-vs-rest, macro, for more classes; None where the rows hold one
    class: JSON has no NaN) and log-loss of predicted class probabilities [rows, classes]."""
    from sklearn.metrics import log_loss, roc_auc_score

    classes = probabilities.shape[1]
    accuracy = float((probabilities.argmax(1) == labels).mean())
    present = np.unique(labels)
    if len(present) < 2:
        auc = None
    elif classes == 2:
        auc = float(roc_auc_score(labels, probabilities[:, 1]))
    else:  # one-vs-rest, macro over the classes the rows hold (sklearn's refuses a missing one)
        auc = float(np.mean([roc_auc_score(labels == c, probabilities[:, c]) for c in present]))
    clipped = np.clip(probabilities, 1e-12, 1.0)  # a class a model never saw has probability 0
    loss = float(log_loss(labels, clipped / clipped.sum(1, keepdims=True), labels=list(range(classes))))
    return {"accuracy": accuracy, "auc": auc, "log_loss": loss}


def _backbone(model: str | nn.Module, tokenizer: Any) -> tuple[nn.Module, Any]:
    """The bare model (a `*ForCausalLM` or classifier's `base_model`) and a tokenizer that pads
    (with eos where it has no pad token, as the trainer does)."""
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise SpliceError("a loaded model needs its tokenizer (tokenizer=...)")
        backbone = getattr(model, "base_model", model)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tasks.model_path(model))
        backbone = tasks.load_pretrained(model, "base")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return backbone, tokenizer
