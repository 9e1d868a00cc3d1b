"""A tensor-train form fitted on real MiniLM weights and 64 real Rotten Tomatoes reviews: the run
learns, and the saved adapter itself does the fitting (the head trains too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import logits
from rich.console import Console
from torch import nn
from transformers import AutoTokenizer

import splice
from splice.train import TrainConfig, run

LAYERS_AND_TARGETS = {"layers": [3, 4, 5], "targets": ["query", "value", "attention.output.dense"]}


def fit_reviews(tmp_path: Path, minilm: nn.Module, adapter: dict[str, Any], form: type, lr: float = 1e-2) -> None:
    """30 steps scored on the reviews they train on (a low-rank update needs more steps than this
    to generalise: LoRA ~50 here); the adapter reloaded onto fresh weights must hold the trained
    loss, and switching it off must cost most of what was gained."""
    rows = splice.assets.rotten_tomatoes().train[:64]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = TrainConfig(data=str(data), validation=str(data), adapter={**adapter, **LAYERS_AND_TARGETS},
                         max_steps=30, eval_every=30, max_length=32, lr=lr, output_dir=str(tmp_path / "run"))
    result = run(config, console=Console(quiet=True))
    before, after = result.metrics["before"]["validation"], result.metrics["after"]["validation"]
    assert after["loss"] < before["loss"] - 0.3
    assert after["accuracy"] > 0.9

    splice.load(minilm, result.paths["adapter"])
    assert isinstance(splice.adapters(minilm)["default"], form)
    on, off = review_loss(minilm, rows)
    assert on == pytest.approx(after["loss"], abs=1e-3)  # the file holds the trained adapter
    assert on < off - 0.2, (on, off)


def review_loss(model: nn.Module, rows: list[dict]) -> tuple[float, float]:
    """Cross-entropy on `rows` (text, label), adapter on and off."""
    tokenizer = AutoTokenizer.from_pretrained(splice.assets.minilm_path())
    batch = tokenizer([r["text"] for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt")
    labels = torch.tensor([r["label"] for r in rows])
    on = F.cross_entropy(logits(model, **batch), labels).item()
    with splice.disabled(model):
        off = F.cross_entropy(logits(model, **batch), labels).item()
    return on, off
