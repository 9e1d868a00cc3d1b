"""`olora`: O-LoRA (Wang et al., EMNLP 2023 Findings), the standard LoRA baseline for continual
learning. Each task trains a new LoRA while the earlier ones stay frozen in the model, and a
penalty keeps the new down-projection orthogonal to theirs:

    L = L_task + λ Σ_{i<t} Σ_layers ‖A_t A_iᵀ‖²_F

so the new task writes into input directions the earlier tasks' LoRAs do not read. Inference
uses the sum of all the task LoRAs, with no task id; here every finished LoRA is merged into
the base weights (exact in fp32), which is that sum. The paper's second regulariser (an L2
penalty on the new LoRA, λ2) is left out; AdamW's weight decay acts on the new LoRA instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

import splice
from splice.continual.strategies.base import (
    Penalty,
    Strategy,
    TaskContext,
    active,
    adapter_bytes,
    penalty_weight,
)
from splice.core.api import attaching
from splice.core.errors import ConfigError
from splice.core.host import hosts


class OLoRA(Strategy):
    """A LoRA per task, merged when its task ends; `penalty` is λ (the paper's λ1 = 0.5)."""

    name = "olora"

    def __init__(self, adapter, penalty: float = 0.5) -> None:
        super().__init__(adapter)
        self.penalty = penalty_weight(self.name, "penalty", penalty)

    def begin_task(self, model: nn.Module, task: TaskContext) -> str:
        """The task's LoRA, refused before any training when a layer's form has no factors A, B
        (the penalty reads A; the merge at the task's end needs the weight change)."""
        with attaching(model, self.adapter, task.name):
            for name, _, host in hosts(model):
                if task.name in host:
                    down_projection(host[task.name], name)
        return task.name

    def penalties(self, model: nn.Module, task: TaskContext) -> list[Penalty]:
        if not self.trained or self.penalty == 0:
            return []
        pairs = [(down_projection(host[task.name], name), [down_projection(host[old], name).detach()
                                                            for old in self.trained if old in host])
                 for name, _, host in hosts(model) if task.name in host]
        weight = self.penalty

        def orthogonality() -> torch.Tensor:
            return weight * sum(((new @ old.T) ** 2).sum() for new, olds in pairs for old in olds)

        return [orthogonality]

    def end_task(self, model: nn.Module, task: TaskContext) -> None:
        splice.merge(model, task.name)
        super().end_task(model, task)

    def rebuild(self, model: nn.Module, task: TaskContext) -> None:
        splice.attach(model, self.adapter, task.name)
        splice.merge(model, task.name)

    @contextmanager
    def view(self, model: nn.Module, task: str) -> Iterator[None]:
        with active(model, []):  # the finished LoRAs are in the weights
            yield

    def stored_bytes(self, model: nn.Module) -> int:
        return sum(adapter_bytes(model, name) for name in self.trained)


def down_projection(adapter: nn.Module, where: str) -> torch.Tensor:
    """The adapter's A [r, in] (LoRA's `lora_A`), as its low-rank factors give it."""
    factors = adapter.low_rank_factors() if hasattr(adapter, "low_rank_factors") else None
    if factors is None:
        raise ConfigError(f"olora needs a LoRA-shaped adapter (one with low-rank factors A, B) on a Linear "
                          f"layer; {where} has a {type(adapter).__name__}")
    return factors.A
