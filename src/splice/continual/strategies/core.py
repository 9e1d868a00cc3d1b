"""`core`: CoRe, continual representation finetuning (Luo et al., arXiv 2603.11201; volume 2, §1).

Each task gets its own set of ReFT interventions (the sequence's adapter must be a ReFT form,
`method: loreft`; LoReFT edits hidden states at chosen prompt positions inside an r-dimensional
orthonormal subspace R). Earlier tasks' interventions are frozen and never change again: the
task id picks a task's interventions, so a task keeps exactly what it learned, like `separate`.
The paper's "explicit objectives" for stability and plasticity are not public; what is
implemented is the spec's inferred form: an optional overlap penalty that pushes the new task's
subspaces away from the earlier ones',

    L = L_task + λ Σ_{i<t} Σ_sites ‖R_t R_iᵀ‖²_F

and, with no task id, the harness's prototype routing as the task-selection rule.
"""

from __future__ import annotations

import torch
from torch import nn

from splice.continual.strategies.base import Penalty, TaskContext, penalty_weight
from splice.continual.strategies.separate import Separate
from splice.core.config import AdapterConfig
from splice.core.errors import ConfigError
from splice.core.host import hosts


class CoRe(Separate):
    """Separate ReFT interventions per task, with an overlap penalty of weight `overlap` (λ)."""

    name = "core"

    def __init__(self, adapter: AdapterConfig, overlap: float = 0.0) -> None:
        super().__init__(adapter)
        if getattr(adapter, "method", None) != "loreft":
            raise ConfigError(f"core trains ReFT interventions: the sequence's adapter must have method: loreft, "
                              f"not {getattr(adapter, 'method', type(adapter).__name__)!r}")
        self.overlap = penalty_weight(self.name, "overlap", overlap)

    def penalties(self, model: nn.Module, task: TaskContext) -> list[Penalty]:
        if not self.trained or self.overlap == 0:
            return []
        pairs = [(new, [old.R.detach() for name in self.trained if name in host
                        for old in host[name].interventions.values()])
                 for _, _, host in hosts(model) if task.name in host
                 for new in host[task.name].interventions.values()]
        weight = self.overlap

        def overlap() -> torch.Tensor:
            return weight * sum(((new.R @ old.T) ** 2).sum() for new, olds in pairs for old in olds)

        return [overlap]
