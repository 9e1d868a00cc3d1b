"""PARA's selection rules: how many directions of each module a target keeps, and the τ.

One threshold τ over the pooled (possibly normalised) singular values of all modules
(`allocation="global"`), or the criterion applied to each module alone ("per-module"). The
targets, and the choices where the paper is silent, are described in `splice.compression.para`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from splice.analysis.spectra import energy_rank
from splice.core.errors import SpliceError

if TYPE_CHECKING:
    from splice.compression.para import ModuleSVD


def allocate(svds: Mapping[str, ModuleSVD], ranks: Mapping[str, int], target: str, value: float,
             allocation: str = "global", normalize: str = "none",
             minimum: Mapping[str, int] | None = None) -> tuple[dict[str, int], float | None]:
    """The new rank of every module and the τ used (None where no single one applies).

    `ranks` are the modules' current ranks (a budget is a fraction of Σ rank·cost); `minimum`
    ranks are kept whatever the target (DoRA modules: 1)."""
    minimum = dict(minimum or {})
    floor = {n: min(minimum.get(n, 0), s.S.numel()) for n, s in svds.items()}
    scores = {n: _normalized(s.S, normalize) for n, s in svds.items()}
    if target == "rank":
        return {n: max(min(int(value), s.S.numel()), floor[n]) for n, s in svds.items()}, None
    if target == "threshold":
        return {n: max(int((scores[n] >= value).sum()), floor[n]) for n in svds}, float(value)
    if allocation == "per-module":
        if target == "energy":
            return {n: max(energy_rank(s.S, value), floor[n]) for n, s in svds.items()}, None
        return {n: max(min(math.floor(value * ranks[n] + 1e-9) or 1, int((s.S > 0).sum())), floor[n])
                for n, s in svds.items()}, None
    return _global(svds, scores, ranks, target, value, floor)


def _global(svds: Mapping[str, ModuleSVD], scores: Mapping[str, torch.Tensor], ranks: Mapping[str, int],
            target: str, value: float, floor: Mapping[str, int]) -> tuple[dict[str, int], float]:
    """One τ over the pooled scores: the fewest directions that reach an energy, or the most that
    fit a budget. Directions a module must keep (`floor`) come first whatever their score."""
    names = list(svds)
    pooled, raw, cost, owner = [], [], [], []
    for i, n in enumerate(names):
        score = scores[n].clone()
        score[: floor[n]] = math.inf
        pooled.append(score)
        raw.append(svds[n].S)
        cost.append(torch.full_like(score, float(svds[n].cost)))
        owner.append(torch.full(score.shape, i, dtype=torch.long))
    score, raw, cost, owner = (torch.cat(t) for t in (pooled, raw, cost, owner))
    order = torch.sort(score, descending=True, stable=True).indices
    score, raw, cost, owner = score[order], raw[order], cost[order], owner[order]
    forced = int(torch.isinf(score).sum())
    if not forced and not (raw > 0).any():
        raise SpliceError("the adapter's weight change is zero (every singular value is 0; an untrained "
                          "LoRA, B = 0?): there is nothing to keep")
    if target == "energy":
        n = max(energy_rank(raw, value), forced)
        while n < len(score) and score[n] == score[n - 1]:  # a tie at τ is kept whole
            n += 1
    else:  # budget
        allowed = value * sum(ranks[m] * svds[m].cost for m in names)
        usable = int((score > 0).sum())
        n = int((cost[:usable].cumsum(0) <= allowed * (1 + 1e-12)).sum())
        while 0 < n < len(score) and score[n] == score[n - 1]:  # a tie at τ is dropped whole
            n -= 1
        if n < forced:
            raise SpliceError(f"budget={value:g} cannot hold one direction of each DoRA module "
                              f"({int(cost[:forced].sum()):,} numbers; allowed {allowed:,.0f})")
        if n == 0:
            raise SpliceError(f"budget={value:g} ({allowed:,.0f} numbers) is too small to keep even the "
                              f"strongest direction ({int(cost[0]):,} numbers)" if len(cost) else
                              "the adapter has no direction to keep")
    kept = torch.bincount(owner[:n], minlength=len(names))
    tau = score[n - 1].item() if n else math.inf
    return {m: int(kept[i]) for i, m in enumerate(names)}, tau


def _normalized(s: torch.Tensor, normalize: str) -> torch.Tensor:
    if normalize == "none" or s.numel() == 0:
        return s.clone()
    norm = s[0] if normalize == "max" else s.square().sum().sqrt()
    return s / norm if norm > 0 else torch.zeros_like(s)
