"""DMEP: module-wise expert pruning of a MoELoRA during training (volume-1 §10; arXiv 2604.26340).

Three phases on one run of the trainer:

1. Steps 1..T₁ (T₁ = `prune_at` of the run's steps): train with the load-balancing loss while
   counting, per module, how many routed slots of the training tokens each expert got
   (training forwards only; `MoELoRAAdapter.take_training_slots`).
2. At T₁, per module: keep the fewest experts whose share of the slots reaches `keep_mass`
   (at least top_k), remove the others physically (factor rows, router rows; their optimizer
   state goes too, the kept experts keep theirs), and record the counts in the adapter's config,
   so the saved adapter loads pruned. The pruning is written to RUN/dmep.json.
3. Steps T₁+1..end: train on with the balancing loss off (λ = 0), so the kept experts can
   specialise.

The selection rule (cumulative share ≥ ρ) is the spec's inferred one; the paper's exact
criterion was not readable. Resuming after T₁ prunes again from dmep.json before the checkpoint
loads; resuming within phase 1 counts the routing from the resumed step on (the counts before
it are not checkpointed).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from splice.core.api import adapters
from splice.core.errors import SpliceError
from splice.io.files import write_json
from splice.methods.moelora import MoELoRA, moe_adapters, prune_experts, reconfigure
from splice.train.callbacks import Callback, register_schedule
from splice.train.report import checkpoint_steps

if TYPE_CHECKING:
    from splice.train.trainer import Trainer

RECORD = "dmep.json"


@register_schedule("dmep")
@dataclass
class DMEP(Callback):
    """The DMEP schedule for the trainer's MoELoRA adapter (`schedule: {name: dmep, ...}`).

    Attributes:
        prune_at: T₁ as a share of the run's optimizer steps (the paper: 10-20%).
        keep_mass: ρ, the share of routed slots the kept experts of a module must hold.
    """

    prune_at: float = 0.15
    keep_mass: float = 0.9
    usage: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    pruned_at: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.prune_at < 1.0:
            raise SpliceError(f"dmep prune_at is a share of the run's steps in (0, 1), got {self.prune_at}")
        if not 0.0 < self.keep_mass <= 1.0:
            raise SpliceError(f"dmep keep_mass is a share of the routed slots in (0, 1], got {self.keep_mass}")

    def prune_step(self, trainer: Trainer) -> int:
        return max(1, round(self.prune_at * trainer.total_steps))

    def on_begin(self, trainer: Trainer) -> None:
        config = adapters(trainer.plain_model).get(trainer.adapter_name)
        if not isinstance(config, MoELoRA):
            raise SpliceError(f"the dmep schedule prunes a MoELoRA's experts; adapter {trainer.adapter_name!r} is "
                              f"{type(config).__name__} (use adapter: {{method: moelora, ...}})")
        record = trainer.run_dir / RECORD
        checkpoint = _latest_checkpoint_step(trainer.run_dir) if trainer.resuming else None
        if checkpoint is not None and record.exists():
            saved = json.loads(record.read_text())
            if checkpoint >= saved["step"]:  # the checkpoint holds the pruned shapes
                self._prune(trainer, saved["keep"], saved["step"])
        for adapter in moe_adapters(trainer.plain_model, trainer.adapter_name)[1].values():
            adapter.take_training_slots()  # from this step on

    def on_step_end(self, trainer: Trainer, entry: dict[str, Any]) -> None:
        if self.pruned_at is not None:
            return
        _, found = moe_adapters(trainer.plain_model, trainer.adapter_name)
        for module, adapter in found.items():  # on the adapter's device: no wait for it here
            self.usage[module] = self.usage.get(module, 0) + adapter.take_training_slots().double()
        if entry["step"] >= self.prune_step(trainer):
            keep = {module: keep_by_mass(self.usage[module].cpu(), adapter.routed, adapter.config.top_k, self.keep_mass)
                    for module, adapter in found.items()}
            if not any(float(u.sum()) for u in self.usage.values()):
                trainer.show("[yellow]dmep: no training token was routed before the pruning step; nothing pruned[/]")
            removed = self._prune(trainer, keep, entry["step"])
            if trainer.main:
                write_json(trainer.run_dir / RECORD, {
                    "step": entry["step"], "keep_mass": self.keep_mass, "keep": keep,
                    "usage": {m: (u / u.sum().clamp_min(1)).cpu().tolist() for m, u in self.usage.items()},
                    "parameters_removed": removed})
            trainer.show(_summary(removed, entry["step"]))

    def _prune(self, trainer: Trainer, keep: dict[str, list[int]], step: int) -> dict[str, dict[str, int]]:
        """Phase 2 and the switch to phase 3; parameters before and after per module type."""
        model, name = trainer.plain_model, trainer.adapter_name
        _, found = moe_adapters(model, name)
        before = {m: sum(p.numel() for p in a.parameters()) for m, a in found.items()}
        trainer.replace_parameters(prune_experts(model, keep, name))
        reconfigure(model, name, aux_loss=0.0)
        self.pruned_at = step
        removed: dict[str, dict[str, int]] = defaultdict(lambda: {"before": 0, "after": 0, "experts_removed": 0})
        for module, adapter in found.items():
            kind = removed[module.rsplit(".", 1)[-1]]
            kind["before"] += before[module]
            kind["after"] += sum(p.numel() for p in adapter.parameters())
            kind["experts_removed"] += adapter.config.experts - adapter.config.shared_experts - adapter.routed
        return dict(removed)


def keep_by_mass(usage: torch.Tensor | None, experts: int, top_k: int, mass: float) -> list[int]:
    """The fewest experts whose share of `usage` reaches `mass`, at least `top_k`, in index
    order; every expert when nothing was counted."""
    if usage is None or float(usage.sum()) == 0:
        return list(range(experts))
    share = usage / usage.sum()
    order = share.argsort(descending=True, stable=True)
    needed = int((share[order].cumsum(0) < mass - 1e-12).sum()) + 1
    return sorted(order[: max(needed, top_k)].tolist())


def _latest_checkpoint_step(run_dir: Path) -> int | None:
    steps = checkpoint_steps(run_dir)
    return steps[-1] if steps else None


def _summary(removed: dict[str, dict[str, int]], step: int) -> str:
    parts = [f"{kind} {v['before']:,} -> {v['after']:,} ({v['experts_removed']} experts)"
             for kind, v in removed.items()]
    total_before = sum(v["before"] for v in removed.values())
    total_after = sum(v["after"] for v in removed.values())
    return (f"dmep: pruned at step {step}: {total_before:,} -> {total_after:,} adapter parameters "
            f"({1 - total_after / max(total_before, 1):.0%} fewer); " + "; ".join(parts) + "; balancing loss off")
