"""A toy classification model for SEA-PEFT's tests (imported as `sea_peft_toy`): ten parallel
Linear branches of which a fixed gate lets exactly one through, so that an adapter on any other
branch cannot change the output (its measured change is exactly zero) and only the adapter on
the live branch can fit the labels; the head is frozen (the search trains no head here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import sentiment_rows  # noqa: F401  (the toy tasks' rows; imported from here by the tests)
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from splice.train import TrainConfig

BUCKETS = 97  # token ids are hashed into a small embedding table


class Gated(nn.Module):
    def __init__(self, branches: int = 10, live: int = 6, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(BUCKETS, dim)
        self.branches = nn.ModuleList(nn.Linear(dim, dim) for _ in range(branches))
        self.register_buffer("gate", F.one_hot(torch.tensor(live), branches).float())
        self.classifier = nn.Linear(dim, 2)

    def forward(self, input_ids, attention_mask=None, labels=None, **_):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        e = self.embed(input_ids % BUCKETS) * mask.unsqueeze(-1)
        x = e.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        h = sum(g * branch(x) for g, branch in zip(self.gate, self.branches, strict=True))
        logits = self.classifier(h)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)




def toy_config(tmp_path, **overrides) -> TrainConfig:
    fields = dict(model="toy", data=sentiment_rows(96, 1), validation=sentiment_rows(32, 2), batch_size=8,
                  max_length=16, lr=3e-2, warmup_ratio=0.0, output_dir=str(tmp_path / "search"), seed=0)
    return TrainConfig(**(fields | overrides))


def branch_space(**overrides):
    """Ten sites (one per branch), one LoRA r=4 family: ten units; a budget of two."""
    from splice.selection.sea_peft import SeaPeftConfig

    fields = dict(budget=2 * 4 * 32, sites={f"b{i}": [f"branches.{i}"] for i in range(10)},
                  families=[{"method": "lora", "r": 4}], warmup=2, audit_every=2, audits=5, probe_steps=2)
    return SeaPeftConfig(**(fields | overrides))
