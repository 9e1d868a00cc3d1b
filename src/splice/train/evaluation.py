"""Evaluation and the accelerate set-up a training shares with every job built on it: a fresh
Accelerator per config, gradient checkpointing, metrics of a model on a loader or on rows."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

import splice
from splice.assets import Row
from splice.core import progress
from splice.train import tasks
from splice.train.config import TrainConfig
from splice.train.data import IGNORE_INDEX, collator, load_eval_rows

Metrics = dict[str, float]


def make_accelerator(config: TrainConfig) -> Accelerator:
    """A fresh Accelerator for this config's precision and accumulation.

    accelerate keeps mixed precision in a process-wide singleton that refuses to change; its
    non-distributed part is reset so that one process (a notebook, a test session) can run
    configs of different precisions. The distributed state of `accelerate launch` is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=config.precision, gradient_accumulation_steps=config.grad_accum)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
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


@torch.no_grad()
def evaluate_loader(model: torch.nn.Module, loader: DataLoader, task: str, accelerator: Accelerator,
              tokenizer: PreTrainedTokenizerBase | None = None, generate_rows: list[Row] | None = None,
              batch_size: int = 16) -> Metrics:
    """Loss and task metrics over a loader, gathered across processes; with `generate_rows`
    (causal LM only) also the greedy exact-match rate on those rows."""
    model.eval()
    main = accelerator.is_main_process
    stats: dict[str, list[torch.Tensor]] = defaultdict(list)
    for batch in progress.track(loader, "evaluate", enabled=main):
        for key, value in tasks.example_stats(task, model, batch).items():
            stats[key].append(accelerator.gather_for_metrics(value))
    metrics = tasks.reduce_stats(task, {k: torch.cat(v) for k, v in stats.items()})
    if task == "causal_lm" and generate_rows:
        unwrapped = accelerator.unwrap_model(model)
        metrics["exact_match"] = _exact_match(unwrapped, tokenizer, generate_rows, batch_size, main)
    return metrics


def _exact_match(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, rows: list[Row],
                 batch_size: int, bar: bool) -> float:
    """`tasks.exact_match` on `rows`, a batch at a time under a progress bar (shown if `bar`):
    greedy generation is the slowest part of a causal-LM evaluation."""
    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    hits = sum(round(tasks.exact_match(model, tokenizer, chunk, batch_size) * len(chunk))
               for chunk in progress.track(batches, "exact match", enabled=bar))
    return hits / max(len(rows), 1)


def evaluate(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: list[Row], config: TrainConfig
) -> Metrics:
    """Metrics of `model` on canonical rows: loss and accuracy (classification), or loss,
    perplexity and greedy exact match (causal LM). Uses config's task, batch size, max length
    and precision; the model is moved to accelerate's device.
    """
    accelerator = make_accelerator(config)
    collate = collator(config.task, tokenizer, config.max_length)
    loader = DataLoader(data, batch_size=config.batch_size, collate_fn=collate)
    model = accelerator.prepare_model(model, evaluation_mode=True)
    return evaluate_loader(model, accelerator.prepare(loader), config.task, accelerator, tokenizer, data,
                           config.batch_size)


@torch.no_grad()
def correct_rows(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[Row],
                 config: TrainConfig) -> torch.Tensor:
    """Per row, whether the model answers it right (bool, on the CPU): the class of largest logit
    is the label; for causal LM, every completion token is the most likely next token given the
    text before it (teacher forcing: one forward per batch, where greedy exact match generates;
    the two agree except that this does not ask the generation to stop after the completion:
    the end-of-sequence label after it is not checked)."""
    model.eval()
    device = next(model.parameters()).device
    collate = collator(config.task, tokenizer, config.max_length)
    hits = []
    for start in progress.track(range(0, len(rows), config.batch_size), "score rows"):
        batch = {k: v.to(device) for k, v in collate(rows[start : start + config.batch_size]).items()}
        logits, labels = model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"]
        if config.task == "classification":
            hits.append((logits.argmax(-1) == labels).cpu())
        else:
            predicted, targets = logits[:, :-1].argmax(-1), labels[:, 1:]
            unchecked = (targets == IGNORE_INDEX) | (targets == tokenizer.eos_token_id)
            hits.append(((predicted == targets) | unchecked).all(-1).cpu())
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


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

