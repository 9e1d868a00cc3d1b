"""EMR-style unify and decouple (EMR-merging, Huang et al., 2024; as ConDU uses it, Gao et al., ICLR
2026): many task vectors stored as one unified vector plus, per task, a 1-bit mask and a scale.

    σ     = sign(Σ_i τ_i)                  (0 -> −1, as ConDU's code)
    τ_U   = σ ⊙ max_i |τ_i|  over the tasks whose entry has the sign σ
    M_i   = [τ_i ⊙ σ > 0]
    λ_i   = Σ_p mean|τ_i,p| / Σ_p mean|M_i,p ⊙ τ_U,p|      (sums over parameter tensors p)
    τ̂_i  = λ_i · M_i ⊙ τ_U                                 (decouple)

For one task (or identical tasks) decouple(unify(τ)) = τ exactly. Task vectors are dicts of
tensors keyed by parameter name; a name missing from a task counts as zeros there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from splice.core.errors import ShapeMismatchError, SpliceError

TaskVector = Mapping[str, torch.Tensor]


@dataclass
class Unified:
    """τ_U per parameter, and per task its masks M_i and scale λ_i."""

    vector: dict[str, torch.Tensor]
    masks: list[dict[str, torch.Tensor]]
    scales: list[float]

    @property
    def tasks(self) -> int:
        return len(self.scales)


def unify(tasks: Sequence[TaskVector]) -> Unified:
    """Elect signs, keep the largest agreeing magnitude, and record each task's mask and scale."""
    if not tasks:
        raise SpliceError("unify needs at least one task vector")
    names = sorted({name for task in tasks for name in task})
    vector: dict[str, torch.Tensor] = {}
    masks: list[dict[str, torch.Tensor]] = [{} for _ in tasks]
    own, kept = torch.zeros(len(tasks), dtype=torch.float64), torch.zeros(len(tasks), dtype=torch.float64)
    for name in names:
        stack = _stack(tasks, name)
        sign = torch.where(stack.sum(dim=0) > 0, 1.0, -1.0).to(stack.dtype)
        agree = stack * sign > 0
        vector[name] = sign * (stack.abs() * agree).amax(dim=0)
        own += stack.abs().flatten(1).mean(dim=1).double()
        kept += (agree * vector[name]).abs().flatten(1).mean(dim=1).double()
        for i in range(len(tasks)):
            masks[i][name] = agree[i]
    scales = [float(o / k) if k > 0 else 0.0 for o, k in zip(own, kept, strict=True)]
    return Unified(vector, masks, scales)


def decouple(unified: Unified, task: int) -> dict[str, torch.Tensor]:
    """τ̂_i = λ_i · M_i ⊙ τ_U, task i's vector rebuilt from the unified one."""
    if not 0 <= task < unified.tasks:
        raise SpliceError(f"task index {task} out of range: the unified vector holds {unified.tasks} tasks")
    scale = unified.scales[task]
    return {name: value * unified.masks[task][name] * scale for name, value in unified.vector.items()}


def _stack(tasks: Sequence[TaskVector], name: str) -> torch.Tensor:
    present = [task[name] for task in tasks if name in task]
    shape = present[0].shape
    for tensor in present:
        if tensor.shape != shape:
            raise ShapeMismatchError(f"{name}: task vectors have shapes {tuple(shape)} and {tuple(tensor.shape)}")
    dtype = present[0].dtype
    return torch.stack([task[name].to(dtype) if name in task else torch.zeros(shape, dtype=dtype) for task in tasks])
