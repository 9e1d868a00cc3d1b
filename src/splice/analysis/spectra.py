"""Spectra of adapters' weight changes: how many directions each adapted module really uses.

A LoRA of rank r may change a weight along all r directions or mostly along one. The singular
values σ₁ ≥ σ₂ ≥ ... of a module's delta weight ΔW say which, summarised three ways:

    entropy rank   exp(H(p)),  p_i = σ_i / Σ σ_j      (Roy & Vetterli, 2007: "effective rank")
    energy rank    smallest k with Σ_{i≤k} σ_i² ≥ f · Σ σ_i²   (f = 0.9, 0.99)
    stable rank    ‖ΔW‖_F² / ‖ΔW‖_2² = Σ σ_i² / σ₁²

All three are ≤ the numerical rank (σ_i above round-off), itself ≤ r for a low-rank form, and
equal it when the singular values are equal. They are computed from each adapter's net weight
change, `delta_weight() - initial_delta_weight()` (PiSSA's init is not counted as a change),
with convolution kernels flattened to a matrix [out, in·kernel]. A form with LoRA's shape
(`low_rank_factors`) is decomposed from its factors, O((out + in) r²) instead of a dense SVD,
so a 4096-wide model is analysed in seconds. Forms without an equivalent weight change
(representation edits, FlexiLoRA) are listed in `SpectraReport.skipped` with the reason.
The plots of a report are in `splice.analysis.spectra_plots` (also importable from here).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.analysis.spectra_plots import plot_effective_ranks, plot_spectra  # noqa: F401  (re-exported)
from splice.core.api import activate, active_adapters, adapters, detach
from splice.core.config import Adapter
from splice.core.errors import SpliceError
from splice.core.host import hosts
from splice.core.targets import layer_index
from splice.io import load

ENERGY_FRACTIONS = (0.9, 0.99)
# Relative slack of the energy threshold: a cumulative sum of squares that equals f exactly may
# land a few ulps below it in float64 (s = [3, 1] must give k = 1 for f = 0.9).
_ENERGY_SLACK = 1e-12


# -- numbers from singular values ----------------------------------------------------------------


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64) of a delta weight; kernels are flattened into columns."""
    return torch.linalg.svdvals(delta.detach().double().flatten(1))


def entropy_rank(s: torch.Tensor) -> float:
    """exp of the Shannon entropy of σ / Σσ (Roy & Vetterli, 2007); 0 for a zero matrix."""
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(-(p * p.log()).sum().item())


def energy_rank(s: torch.Tensor, fraction: float = 0.9) -> int:
    """The smallest k whose top-k squared singular values hold `fraction` of Σ σ²; 0 for zero."""
    if not 0.0 < fraction <= 1.0:
        raise SpliceError(f"energy fraction must be in (0, 1], got {fraction}")
    energy = s.double().square()
    total = energy.sum()
    if total <= 0:
        return 0
    reached = energy.cumsum(0) >= (fraction - _ENERGY_SLACK) * total
    return int(reached.nonzero()[0].item()) + 1


def stable_rank(s: torch.Tensor) -> float:
    """‖Δ‖_F² / ‖Δ‖_2²: a continuous, perturbation-robust count of dominant directions."""
    if s.numel() == 0 or s[0] <= 0:
        return 0.0
    return (s.square().sum() / s[0].square()).item()


def numerical_rank(s: torch.Tensor, tolerance: float) -> int:
    """How many singular values are above round-off."""
    return int((s > tolerance).sum().item())


# -- the delta weight of one adapter -------------------------------------------------------------


@dataclass(frozen=True)
class DeltaSVD:
    """Left singular vectors U [out, k] and singular values S [k] (descending) of a delta weight.

    `tolerance` is where round-off starts. For a dense delta, σ₁ · √max(shape) · eps of its dtype
    (a float32 LoRA's zero directions come out near 1e-7 σ₁ from a dense product, not at 0;
    numpy's `matrix_rank` rule, σ₁ · max(shape) · eps, would exceed σ₁ itself for a bf16 delta
    wider than 128). From factors, whose values are exact and whose product is formed in
    float64, s ‖B‖₂ ‖A‖₂ · max(shape) · float64's eps: a bf16 LoRA keeps every direction it has.
    """

    U: torch.Tensor
    S: torch.Tensor
    shape: tuple[int, int]
    tolerance: float


def delta_matrix(adapter: Adapter) -> torch.Tensor | None:
    """The adapter's net weight change as a float64 matrix [out, in·kernel]; None without one."""
    delta = _net_delta(adapter)
    return None if delta is None else delta.double().flatten(1)


def _net_delta(adapter: Adapter) -> torch.Tensor | None:
    """delta_weight() - initial_delta_weight(), in the adapter's dtype and layout."""
    if not adapter.has_weight_form():
        return None
    with torch.no_grad():
        delta = adapter.delta_weight()
        initial = adapter.initial_delta_weight()
    if delta is None or initial is None:
        return delta
    return delta - initial


def delta_svd(adapter: Adapter) -> DeltaSVD | None:
    """The SVD of `delta_matrix(adapter)`, from the low-rank factors when the form has them."""
    factors = adapter.low_rank_factors()
    if factors is not None:
        A, B = factors.A.detach(), factors.B.detach()
        eps = torch.finfo(torch.float64).eps  # the factors are exact; only the float64 products round
        # s B A = s Q_B (R_B R_Aᵀ) Q_Aᵀ with thin QRs of B and Aᵀ: only an r x r SVD is left.
        Q_b, R_b = torch.linalg.qr(B.double())
        _, R_a = torch.linalg.qr(A.double().T)
        U, S, _ = torch.linalg.svd(factors.scaling * R_b @ R_a.T)
        # Round-off scales with the factors, not with their product, which may cancel to ~0
        # (PiSSA at init: s(BA - B0A0) with B = B0, A = A0).
        scale = abs(factors.scaling) * _largest(R_b) * _largest(R_a)
        return DeltaSVD(Q_b @ U, S, (B.shape[0], A.shape[1]), scale * max(B.shape[0], A.shape[1]) * eps)
    delta = _net_delta(adapter)
    return None if delta is None else matrix_svd(delta)


def matrix_svd(delta: torch.Tensor) -> DeltaSVD:
    """The SVD of a delta weight (kernels flattened), with the round-off level of its dtype."""
    matrix = delta.detach().double().flatten(1)
    U, S, _ = torch.linalg.svd(matrix, full_matrices=False)
    shape = (matrix.shape[0], matrix.shape[1])
    return DeltaSVD(U, S, shape, _largest(matrix) * math.sqrt(max(shape)) * torch.finfo(delta.dtype).eps)


def _largest(matrix: torch.Tensor) -> float:
    """The spectral norm (0 for an empty matrix)."""
    return torch.linalg.matrix_norm(matrix, 2).item() if matrix.numel() else 0.0


def low_rank_bound(adapter: Adapter) -> int | None:
    """r of a form with LoRA's shape (2r for PiSSA, whose init is subtracted): a bound on every rank."""
    factors = adapter.low_rank_factors()
    return None if factors is None else factors.A.shape[0]


# -- per module and per adapter ------------------------------------------------------------------


class NamedModule:
    """A per-module report entry's layer index and module type, read from its `name`."""

    name: str

    @property
    def layer(self) -> int | None:
        return layer_index(self.name)

    @property
    def module_type(self) -> str:
        """The name with its numbers as N: `bert.encoder.layer.N.attention.self.query`."""
        return module_type(self.name)


@dataclass
class ModuleSpectrum(NamedModule):
    """The spectrum of one module's delta weight and the ranks read from it.

    Attributes:
        name: the module's path in the model.
        shape: the delta as a matrix, (out, in·kernel).
        singular_values: descending, float64; min(shape) of them, or r from a low-rank form.
        tolerance: singular values at or below it are round-off.
        entropy_rank, energy_ranks ({fraction: k}), stable_rank, numerical_rank: see the module doc.
        adapter_rank: r of a low-rank form, None for others (DoRA, DiaBlo, convolutions).
    """

    name: str
    shape: tuple[int, int]
    singular_values: torch.Tensor
    tolerance: float
    entropy_rank: float
    energy_ranks: dict[float, int]
    stable_rank: float
    numerical_rank: int
    adapter_rank: int | None = None

    @property
    def frobenius_norm(self) -> float:
        return self.singular_values.square().sum().sqrt().item()

    @property
    def spectral_norm(self) -> float:
        return self.singular_values[0].item() if self.singular_values.numel() else 0.0

    def to_dict(self, top_k: int | None = None) -> dict[str, Any]:
        """JSON-ready; `top_k` keeps only the leading singular values."""
        values = self.singular_values[:top_k] if top_k else self.singular_values
        return {
            "name": self.name, "layer": self.layer, "type": self.module_type, "shape": list(self.shape),
            "adapter_rank": self.adapter_rank, "numerical_rank": self.numerical_rank,
            "entropy_rank": self.entropy_rank,
            "energy_ranks": {str(f): k for f, k in self.energy_ranks.items()},
            "stable_rank": self.stable_rank, "frobenius_norm": self.frobenius_norm,
            "spectral_norm": self.spectral_norm, "singular_values": values.tolist(),
        }


def module_type(name: str) -> str:
    """A module's name with its numbers as N, the same for every layer."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "N", name)


def spectrum_from_values(name: str, s: torch.Tensor, shape: tuple[int, int], tolerance: float,
                         fractions: tuple[float, ...] = ENERGY_FRACTIONS,
                         adapter_rank: int | None = None) -> ModuleSpectrum:
    """A `ModuleSpectrum` from singular values; values at or below `tolerance` count as zero."""
    s = torch.where(s > tolerance, s, torch.zeros_like(s))
    return ModuleSpectrum(
        name=name, shape=shape, singular_values=s, tolerance=tolerance, entropy_rank=entropy_rank(s),
        energy_ranks={f: energy_rank(s, f) for f in fractions}, stable_rank=stable_rank(s),
        numerical_rank=numerical_rank(s, tolerance), adapter_rank=adapter_rank,
    )


def module_spectrum(name: str, adapter: Adapter,
                    fractions: tuple[float, ...] = ENERGY_FRACTIONS) -> ModuleSpectrum | None:
    """The spectrum of one adapter's net delta weight; None for a form without one."""
    svd = delta_svd(adapter)
    if svd is None:
        return None
    return spectrum_from_values(name, svd.S, svd.shape, svd.tolerance, fractions, low_rank_bound(adapter))


@dataclass
class SpectraReport:
    """Spectra of every module of one adapter, and the modules that have no weight form."""

    adapter: str
    modules: list[ModuleSpectrum]
    skipped: dict[str, str] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """The table: one flat row per module, without the singular values (`pandas.DataFrame(rows)`)."""
        rows = []
        for m in self.modules:
            row = {"module": m.name, "shape": f"{m.shape[0]}x{m.shape[1]}", "r": m.adapter_rank,
                   "numerical rank": m.numerical_rank, "entropy rank": m.entropy_rank}
            row |= {f"energy {f:.0%}": k for f, k in m.energy_ranks.items()}
            row |= {"stable rank": m.stable_rank, "|dW|_F": m.frobenius_norm, "sigma_1": m.spectral_norm}
            rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        """Means and extremes over modules of the entropy and stable ranks."""
        entropy = [m.entropy_rank for m in self.modules]
        stable = [m.stable_rank for m in self.modules]
        if not entropy:
            return {"modules": 0, "skipped": len(self.skipped)}
        return {"modules": len(self.modules), "skipped": len(self.skipped),
                "entropy_rank": {"mean": sum(entropy) / len(entropy), "min": min(entropy), "max": max(entropy)},
                "stable_rank": {"mean": sum(stable) / len(stable), "min": min(stable), "max": max(stable)},
                "max_numerical_rank": max(m.numerical_rank for m in self.modules)}

    def to_dict(self, top_k: int | None = None) -> dict[str, Any]:
        return {"adapter": self.adapter, "summary": self.summary(),
                "modules": [m.to_dict(top_k) for m in self.modules], "skipped": self.skipped}


def pick_adapter(model: nn.Module, name: str | None) -> str:
    """`name`, or the model's only adapter when None."""
    names = list(adapters(model))
    if name is None and len(names) == 1:
        return names[0]
    if name not in names:
        raise SpliceError(f"no adapter named {name!r}; attached: {names}" if name is not None
                          else f"several adapters attached {names}; pass name=")
    return name


def adapter_spectra(model: nn.Module, name: str | None = None,
                    fractions: tuple[float, ...] = ENERGY_FRACTIONS) -> SpectraReport:
    """Spectra of every module of adapter `name` (default: the only one attached)."""
    name = pick_adapter(model, name)
    modules, skipped = [], {}
    for module_name, _, host in hosts(model):
        if name not in host:
            continue
        spectrum = module_spectrum(module_name, host[name], fractions)
        if spectrum is None:
            skipped[module_name] = f"{type(host[name]).__name__} has no equivalent weight change"
        else:
            modules.append(spectrum)
    return SpectraReport(name, modules, skipped)


def adapter_dir_spectra(model: nn.Module, path: str | Path,
                        fractions: tuple[float, ...] = ENERGY_FRACTIONS) -> SpectraReport:
    """Spectra of the adapter saved in `path`, loaded onto `model` (its base model) meanwhile."""
    with loaded(model, path) as (name,):
        report = adapter_spectra(model, name, fractions)
    report.adapter = str(path)
    return report


@contextmanager
def loaded(model: nn.Module, *paths: str | Path) -> Iterator[list[str]]:
    """Saved adapters attached to `model` for the block only, under names it does not use yet;
    afterwards they are detached and the adapters that were active are active again."""
    active = active_adapters(model)
    names: list[str] = []
    try:
        for path in paths:
            name = unused_name(model, "saved")
            load(model, path, name)
            names.append(name)
        yield names
    finally:
        for name in names:
            detach(model, name)
        if active:
            activate(model, active)


def unused_name(model: nn.Module, stem: str) -> str:
    """`stem`, or `stem1`, `stem2`...: an adapter name the model does not use yet."""
    taken, n = set(adapters(model)), 0
    while f"{stem}{n or ''}" in taken:
        n += 1
    return f"{stem}{n or ''}"
