"""Two adapters side by side: per module, do they change the weight in the same directions, by
how much, and how alike are the changes?

For every module both adapters adapt, with ΔW_a and ΔW_b their net delta weights:

    angles     principal angles between the column spaces (the output directions each writes
               to) of the top-k_a and top-k_b left singular vectors (`principal_angles`)
    overlap    mean cos² of those angles = ‖Q_aᵀ Q_b‖_F² / min(k_a, k_b): 1 when one subspace
               contains the other, 0 when orthogonal, about max(k_a, k_b)/out for random ones.
               This is the normalised subspace similarity of the LoRA paper (Hu et al., 2021, §7.2)
    norm ratio ‖ΔW_b‖_F / ‖ΔW_a‖_F
    cosine     ⟨ΔW_a, ΔW_b⟩_F / (‖ΔW_a‖_F ‖ΔW_b‖_F): the flattened deltas; sign and input
               directions count here, unlike in the angles

k: by default each delta's 90%-energy rank (`energy_rank(s, 0.9)`): the directions that carry
90% of ‖ΔW‖_F². The tail of a trained delta is mostly noise, whose near-random directions would
pull every angle towards π/2 and hide a shared dominant direction. A given k is used on both
sides, capped at each delta's numerical rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.analysis.angles import principal_angles
from splice.analysis.spectra import (
    DeltaSVD,
    delta_matrix,
    delta_svd,
    energy_rank,
    loaded,
    matrix_svd,
    pick_adapter,
)
from splice.core.errors import SpliceError
from splice.core.host import hosts

SUBSPACE_ENERGY = 0.9


@dataclass
class ModuleComparison:
    """How adapter b's change of one module relates to adapter a's.

    Attributes:
        name: the module's path.
        k_a, k_b: how many leading left singular vectors of each delta span the compared subspaces.
        angles: principal angles in radians, ascending; min(k_a, k_b) of them.
        overlap: mean cos² of the angles (0 when either subspace is empty).
        norm_ratio: ‖ΔW_b‖_F / ‖ΔW_a‖_F (inf when only ΔW_a is zero, nan when both are).
        cosine: cosine similarity of the flattened deltas (nan when either is zero).
    """

    name: str
    k_a: int
    k_b: int
    angles: torch.Tensor
    overlap: float
    norm_ratio: float
    cosine: float

    @property
    def min_angle(self) -> float:
        """The smallest principal angle; π/2 when either subspace is empty."""
        return self.angles[0].item() if self.angles.numel() else math.pi / 2

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "k_a": self.k_a, "k_b": self.k_b, "angles": self.angles.tolist(),
                "min_angle_deg": math.degrees(self.min_angle), "overlap": self.overlap,
                "norm_ratio": _finite(self.norm_ratio), "cosine": _finite(self.cosine)}


@dataclass
class AdapterComparison:
    """Module-by-module comparison of two adapters, and the modules only one of them adapts."""

    a: str
    b: str
    modules: list[ModuleComparison]
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Means over shared modules; the norm ratio of the whole adapters (all shared modules)."""
        n = len(self.modules)
        out: dict[str, Any] = {"shared": n, "only_a": len(self.only_a), "only_b": len(self.only_b),
                               "skipped": len(self.skipped)}
        if n:
            out |= {"mean_min_angle_deg": sum(math.degrees(m.min_angle) for m in self.modules) / n,
                    "mean_overlap": sum(m.overlap for m in self.modules) / n,
                    "mean_cosine": _finite(sum(m.cosine for m in self.modules) / n)}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "summary": self.summary(),
                "modules": [m.to_dict() for m in self.modules],
                "only_a": self.only_a, "only_b": self.only_b, "skipped": self.skipped}


def _finite(value: float) -> float | None:
    """JSON has no inf or nan: they become null."""
    return value if math.isfinite(value) else None


def subspace_rank(svd: DeltaSVD, k: int | None = None) -> int:
    """How many leading singular vectors to compare: min(k, numerical rank), or the 90%-energy rank."""
    s = svd.S[svd.S > svd.tolerance]
    if k is None:
        return energy_rank(s, SUBSPACE_ENERGY)
    if k < 1:
        raise SpliceError(f"k must be >= 1, got {k}")
    return min(k, s.numel())


def compare_svds(name: str, svd_a: DeltaSVD, svd_b: DeltaSVD, delta_a: torch.Tensor, delta_b: torch.Tensor,
                 k: int | None = None) -> ModuleComparison:
    """Compare two deltas (float64 matrices [out, in·kernel]) given their SVDs."""
    if delta_a.shape != delta_b.shape:
        raise SpliceError(f"{name}: delta weights of different shapes {tuple(delta_a.shape)} and "
                          f"{tuple(delta_b.shape)}; were the adapters trained on the same base model?")
    k_a, k_b = subspace_rank(svd_a, k), subspace_rank(svd_b, k)
    angles = principal_angles(svd_a.U[:, :k_a], svd_b.U[:, :k_b])
    overlap = angles.cos().square().mean().item() if angles.numel() else 0.0
    norm_a, norm_b = delta_a.norm().item(), delta_b.norm().item()
    if norm_a > 0:
        ratio = norm_b / norm_a
    else:
        ratio = math.inf if norm_b > 0 else math.nan
    cosine = (delta_a * delta_b).sum().item() / (norm_a * norm_b) if norm_a * norm_b > 0 else math.nan
    return ModuleComparison(name, k_a, k_b, angles, overlap, ratio, cosine)


def compare_deltas(delta_a: torch.Tensor, delta_b: torch.Tensor, k: int | None = None,
                   name: str = "") -> ModuleComparison:
    """Compare two delta weights given as tensors (kernels are flattened into columns)."""
    return compare_svds(name, matrix_svd(delta_a), matrix_svd(delta_b), delta_a.detach().double().flatten(1),
                        delta_b.detach().double().flatten(1), k)


def compare_adapters(model: nn.Module, a: str, b: str, k: int | None = None) -> AdapterComparison:
    """Compare two adapters attached to the same model, module by module."""
    a, b = pick_adapter(model, a), pick_adapter(model, b)
    result = AdapterComparison(a, b, [])
    for name, _, host in hosts(model):
        if a not in host or b not in host:
            if a in host or b in host:
                (result.only_a if a in host else result.only_b).append(name)
            continue
        deltas = delta_matrix(host[a]), delta_matrix(host[b])
        if deltas[0] is None or deltas[1] is None:
            without = [type(host[n]).__name__ for n, d in zip((a, b), deltas, strict=True) if d is None]
            result.skipped[name] = f"{' and '.join(without)} has no equivalent weight change"
            continue
        result.modules.append(compare_svds(name, delta_svd(host[a]), delta_svd(host[b]), *deltas, k))
    return result


def compare_adapter_dirs(model: nn.Module, path_a: str | Path, path_b: str | Path,
                         k: int | None = None) -> AdapterComparison:
    """Compare two saved adapters, loaded onto `model` (their base model) meanwhile."""
    with loaded(model, path_a, path_b) as (name_a, name_b):
        result = compare_adapters(model, name_a, name_b, k)
    result.a, result.b = str(path_a), str(path_b)
    return result
