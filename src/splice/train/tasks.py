"""What differs between the two tasks: the model class, the adapter's head, and the metrics.

Classification loads `AutoModelForSequenceClassification` with one output per label and trains
its freshly initialised head in full next to the adapter (the head is added to the adapter's
`train_also`, as PEFT's task_type=SEQ_CLS adds it to `modules_to_save`): a random head behind
a frozen encoder would otherwise stay random. Causal LM loads `AutoModelForCausalLM`.

Metrics are computed from per-example numbers (`example_stats`) so that accelerate can gather
them across processes exactly, then reduced by `reduce_stats`.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from splice import assets
from splice.assets import Row
from splice.core.config import AdapterConfig
from splice.core.errors import ConfigError, SpliceError
from splice.core.quantization import quantize, quantize_options
from splice.core.targets import SEQ_CLS_HEAD_NAMES
from splice.train.config import TrainConfig
from splice.train.data import IGNORE_INDEX

BUNDLED_MODELS = {"minilm": assets.minilm_path, "smollm2": assets.smollm2_path}
# Which metric picks the best checkpoint, and whether higher is better.
MAIN_METRIC = {"classification": ("accuracy", True), "causal_lm": ("loss", False)}


def model_path(name: str) -> Path:
    """A bundled model's folder (by "minilm", "smollm2" or their Hub ids, as adapters record
    them) or a local transformers folder."""
    bundled = assets.bundled_model(name)
    if bundled is not None:
        return BUNDLED_MODELS[bundled]()
    path = Path(name)
    if not path.is_dir():
        raise SpliceError(f"model {name!r} is neither bundled ({', '.join(BUNDLED_MODELS)}) "
                          "nor a local folder (splice never downloads from a hub)")
    if not (path / "config.json").is_file():
        raise SpliceError(f"model folder {path} holds no config.json, so it is not a transformers model "
                          f"(found {sorted(p.name for p in path.iterdir())[:10]})")
    return path


def load_pretrained(name: str, task: str, label_names: tuple[str, ...] = ()) -> PreTrainedModel:
    """A bundled or local model in fp32 with the head `task` needs ("base": the bare model).

    Without `label_names` a classifier keeps the checkpoint's own label count.
    """
    path = model_path(name)
    if task == "classification":
        labels = {}
        if label_names:
            labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                      "label2id": {n: i for i, n in enumerate(label_names)}}
        return _classifier(path, labels)
    if task == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return AutoModel.from_pretrained(path, dtype=torch.float32)


def _classifier(path: Path, labels: dict[str, Any]) -> PreTrainedModel:
    """A sequence classifier whose head splice supplies (trained as `train_also`, or read from
    the adapter): transformers' report that the head was "newly initialized" is expected noise
    here and is silenced; any other missing or unexpected weight is still reported."""
    loader = logging.getLogger("transformers.modeling_utils")
    report = _LoadReportFilter()
    loader.addFilter(report)  # a filter, not a level: transformers 5 runs extra checks by the level
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, output_loading_info=True, **labels)
    finally:
        loader.removeFilter(report)
    heads = tuple(f"{name}." for name in SEQ_CLS_HEAD_NAMES)
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(heads))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    for what, keys in (("missing from the checkpoint besides the head, left randomly initialized", missing),
                       ("of another shape in the checkpoint, left randomly initialized", mismatched)):
        if keys:
            warnings.warn(f"loading {path}: weights {what}: {keys[:8]}{' ...' if len(keys) > 8 else ''}",
                          stacklevel=3)
    return model


class _LoadReportFilter(logging.Filter):
    """Drops transformers' report of newly initialized weights (5.x: "LOAD REPORT" table; 4.x:
    "Some weights ... newly initialized"); `_classifier` reports what is not the head itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "LOAD REPORT" not in message and "newly initialized" not in message


def default_task(name: str) -> str:
    """causal_lm for a decoder checkpoint, classification otherwise (what `splice train` would use)."""
    config = AutoConfig.from_pretrained(model_path(name))
    if config.architectures:
        decoder = any(a.endswith("ForCausalLM") for a in config.architectures)
    else:  # decoder-only families have a causal-LM class and no masked-LM one
        decoder = (config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                   and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    return "causal_lm" if decoder else "classification"


def load_model(
    config: TrainConfig, label_names: tuple[str, ...] = ()
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer for `config.task`, in fp32 (accelerate's autocast does mixed precision),
    its Linear layers in 4-bit when `config.quantize` says so.

    A tokenizer without a pad token (most decoders) pads with its eos token. A `max_length`
    beyond the model's positions is refused before the weights load.
    """
    positions = getattr(AutoConfig.from_pretrained(model_path(config.model)), "max_position_embeddings", None)
    if isinstance(positions, int) and config.max_length > positions:
        raise ConfigError(f"max_length {config.max_length} is more than model {config.model!r} takes "
                          f"({positions} positions); set max_length to {positions} or less")
    tokenizer = AutoTokenizer.from_pretrained(model_path(config.model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_pretrained(config.model, config.task, label_names)
    model.config.pad_token_id = tokenizer.pad_token_id
    if config.quantize is not None:
        quantize(model, **quantize_options(config.quantize))
    return model, tokenizer


def head_name(model: nn.Module) -> str:
    """Name of a sequence-classification head: `classifier` (BERT, RoBERTa) or `score` (Llama)."""
    for name in SEQ_CLS_HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise SpliceError(f"{type(model).__name__} has no classification head named "
                      f"{' or '.join(SEQ_CLS_HEAD_NAMES)}; add yours to the adapter's train_also")


def adapter_config(config: TrainConfig, model: nn.Module) -> AdapterConfig:
    """The configured adapter; for classification with the head added to `train_also`."""
    adapter = config.adapter_config()
    if config.task == "classification":
        head = head_name(model)
        if head not in adapter.train_also:
            adapter = adapter.replace(train_also=[*adapter.train_also, head])
    return adapter


def example_stats(task: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-example numbers for one batch: loss and correctness, or summed token loss and count."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return stats_from_logits(task, logits, batch["labels"])


def stats_from_logits(task: str, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """`example_stats` from logits already computed (a multiplexed batch slices its rows)."""
    logits = logits.float()
    if task == "classification":
        loss = F.cross_entropy(logits, labels, reduction="none")
        return {"loss": loss, "correct": (logits.argmax(-1) == labels).float()}
    # Position t predicts token t+1; the model shifts the same way when given labels.
    logits, labels = logits[:, :-1], labels[:, 1:]
    token_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return {"loss_sum": token_loss.sum(-1), "tokens": (labels != IGNORE_INDEX).sum(-1).float()}


def reduce_stats(task: str, stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metrics from the concatenated per-example numbers of a whole split."""
    if task == "classification":
        return {"loss": stats["loss"].mean().item(), "accuracy": stats["correct"].mean().item()}
    loss = (stats["loss_sum"].sum() / stats["tokens"].sum().clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def exact_match(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[Row],
                batch_size: int, max_new_tokens: int | None = None) -> float:
    """Share of prompts whose greedy continuation, up to its first line break, is the completion."""
    return sum(exact_match_hits(model, tokenizer, rows, batch_size, max_new_tokens)) / max(len(rows), 1)


@torch.no_grad()
def exact_match_hits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[Row],
                     batch_size: int, max_new_tokens: int | None = None) -> list[bool]:
    """For each prompt, whether its greedy continuation, up to its first line break, is the completion.

    Prompts are left-padded for generation, so the tokenizer's padding side is switched for
    the duration and restored. `max_new_tokens` (default: each batch's longest completion plus
    a margin, at least 8) must let a right answer be read whole and a longer one be told apart.
    """
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    hits: list[bool] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            inputs = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True,
                               return_token_type_ids=False).to(model.device)
            budget = max_new_tokens or _answer_budget(tokenizer, chunk)
            output = model.generate(**inputs, max_new_tokens=budget, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            answers = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            hits += [_first_line(a) == r["completion"].strip() for a, r in zip(answers, chunk, strict=True)]
    finally:
        tokenizer.padding_side = side
    return hits


def _answer_budget(tokenizer: PreTrainedTokenizerBase, rows: list[Row]) -> int:
    """New tokens enough for the longest completion of `rows` and a few more (its tokens in
    context may differ by one or two from its own, and what follows a right answer must show)."""
    longest = max(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for r in rows)
    return max(8, longest + 4)


def _first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()
