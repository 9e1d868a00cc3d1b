"""What PARA did, for people and files: per-module reports, the result (summary table, JSON,
saving) and the points of a budget sweep with their plot. The compression itself is in
`splice.compression.para`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from splice.analysis.spectra import module_type
from splice.core.adapter_state import AdapterState, ModuleUpdate
from splice.core.errors import SpliceError
from splice.core.inventory import shared_prefix
from splice.io.adapter_states import save_state
from splice.io.figures import pyplot, save_png

if TYPE_CHECKING:
    from splice.compression.para import ModuleSVD


@dataclass
class ModuleReport:
    """What compression did to one module.

    `shape` is ΔW as a matrix (out, in·kernel); `singular_values` all of ΔW's (float64,
    descending); parameters count the two factors; `error` is ‖ΔW − ΔW'‖_F / ‖ΔW‖_F (1 for a
    dropped module, 0 for a zero one).
    """

    name: str
    kind: str
    shape: tuple[int, int]
    rank_before: int
    rank_after: int
    singular_values: torch.Tensor
    parameters_before: int
    parameters_after: int
    error: float

    @classmethod
    def of(cls, name: str, update: ModuleUpdate, svd: ModuleSVD, rank: int) -> ModuleReport:
        """The report of `update` cut to its top `rank` directions of `svd` (its exact SVD); the
        error is that of the best rank-`rank` approximation (Eckart-Young)."""
        energies = svd.S.square()
        total = energies.sum().item()
        error = math.sqrt(energies[rank:].sum().item() / total) if total > 0 else 0.0
        return cls(name, update.kind, (svd.U.shape[0], svd.Vh.shape[1]), update.rank, rank, svd.S,
                   update.rank * svd.cost, rank * svd.cost, error)

    @property
    def dropped(self) -> bool:
        return self.rank_after == 0

    @property
    def retained_energy(self) -> float:
        energy = self.singular_values.square()
        total = energy.sum().item()
        return 1.0 if total <= 0 else energy[: self.rank_after].sum().item() / total

    @property
    def module_type(self) -> str:
        return module_type(self.name)

    def to_dict(self, top_k: int | None = None) -> dict[str, Any]:
        values = self.singular_values[:top_k] if top_k else self.singular_values
        return {"name": self.name, "type": self.module_type, "kind": self.kind, "shape": list(self.shape),
                "rank_before": self.rank_before, "rank_after": self.rank_after,
                "parameters_before": self.parameters_before, "parameters_after": self.parameters_after,
                "retained_energy": self.retained_energy, "relative_error": self.error,
                "singular_values": values.tolist()}


@dataclass
class CompressionResult:
    """The compressed adapter and what it cost.

    Attributes:
        state: the compressed adapter (plain LoRA, per-module ranks, scale 1).
        original: the adapter it came from.
        modules: per-module reports, in the adapter's order (dropped modules included).
        target, value: which target was met and its value ("budget", 0.25).
        allocation, normalize: as passed.
        threshold: the τ used on the pooled scores (None where no single τ describes the
            result: rank targets, per-module energy and budget).
        path: where it was saved, if it was.
    """

    state: AdapterState
    original: AdapterState
    modules: dict[str, ModuleReport]
    target: str
    value: float
    allocation: str
    normalize: str
    threshold: float | None
    path: Path | None = None

    @property
    def ranks_before(self) -> dict[str, int]:
        return {n: m.rank_before for n, m in self.modules.items()}

    @property
    def ranks_after(self) -> dict[str, int]:
        """Every module's new rank, 0 for a dropped one."""
        return {n: m.rank_after for n, m in self.modules.items()}

    @property
    def singular_values(self) -> dict[str, torch.Tensor]:
        return {n: m.singular_values for n, m in self.modules.items()}

    @property
    def errors(self) -> dict[str, float]:
        """Per-module relative Frobenius error ‖ΔW − ΔW'‖_F / ‖ΔW‖_F."""
        return {n: m.error for n, m in self.modules.items()}

    @property
    def dropped(self) -> list[str]:
        return [n for n, m in self.modules.items() if m.dropped]

    @property
    def parameters_before(self) -> int:
        """Adapter numbers before: factors, biases and magnitudes (heads not counted)."""
        return self.original.parameters

    @property
    def parameters_after(self) -> int:
        return self.state.parameters

    @property
    def factor_parameters_before(self) -> int:
        """The factors' numbers before, what a budget is a fraction of."""
        return sum(m.parameters_before for m in self.modules.values())

    @property
    def factor_parameters_after(self) -> int:
        return sum(m.parameters_after for m in self.modules.values())

    @property
    def reduction(self) -> float:
        """The share of adapter parameters removed (0.75 = 75% fewer)."""
        return 1.0 - self.parameters_after / self.parameters_before if self.parameters_before else 0.0

    @property
    def retained_energy(self) -> float:
        """Σ kept σ² / Σ σ² over all modules (raw σ, whatever the normalisation)."""
        total = sum(m.singular_values.square().sum().item() for m in self.modules.values())
        kept = sum(m.singular_values[: m.rank_after].square().sum().item() for m in self.modules.values())
        return 1.0 if total <= 0 else kept / total

    def ranks_by_type(self) -> dict[str, list[int]]:
        """New ranks grouped by module type (layer numbers as N), in the adapter's order."""
        groups: dict[str, list[int]] = {}
        for m in self.modules.values():
            groups.setdefault(m.module_type, []).append(m.rank_after)
        return groups

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the compressed adapter as a PEFT LoRA directory (HF PEFT and splice load it),
        whole or not at all; a non-empty `path` is refused unless `overwrite`."""
        self.path = save_state(self.state, path, overwrite=overwrite)
        return self.path

    def headline(self) -> str:
        """One line: parameters before -> after, energy kept, τ, modules dropped."""
        line = (f"{len(self.modules)} modules, adapter parameters {self.parameters_before:,} -> "
                f"{self.parameters_after:,} ({self.reduction:.1%} fewer), energy kept {self.retained_energy:.2%}")
        if self.threshold is not None:
            line += f", tau = {self.threshold:.4g}"
        if self.dropped:
            line += f"; {len(self.dropped)} modules dropped (rank 0)"
        return line

    def summary(self) -> Any:
        """A rich Table: one row per module (rank before -> after, parameters, energy, error)."""
        from rich.table import Table

        names = list(self.modules)
        prefix = shared_prefix(names)
        target = f"{self.target} {self.value:g}, {self.allocation}" + (
            f", normalize {self.normalize}" if self.normalize != "none" else "")
        table = Table(title=f"PARA ({target})", caption=self.headline())
        table.add_column(f"{prefix}*" if prefix else "module", overflow="fold")
        for column in ("r", "new r", "parameters", "energy kept", "rel. error", "sigma_1"):
            table.add_column(column, justify="right")
        for name, m in self.modules.items():
            sigma = m.singular_values[0].item() if m.singular_values.numel() else 0.0
            table.add_row(name.removeprefix(prefix), str(m.rank_before),
                          "[dim]dropped[/]" if m.dropped else str(m.rank_after),
                          f"{m.parameters_before:,} -> {m.parameters_after:,}", f"{m.retained_energy:.1%}",
                          f"{m.error:.3g}", f"{sigma:.3g}")
        return table

    def to_dict(self, top_k: int | None = None) -> dict[str, Any]:
        """JSON-ready; `top_k` keeps only the leading singular values of each module."""
        return {"target": self.target, "value": self.value, "allocation": self.allocation,
                "normalize": self.normalize, "threshold": self.threshold,
                "parameters_before": self.parameters_before, "parameters_after": self.parameters_after,
                "factor_parameters_before": self.factor_parameters_before,
                "factor_parameters_after": self.factor_parameters_after, "reduction": self.reduction,
                "retained_energy": self.retained_energy, "dropped": self.dropped,
                "ranks_by_type": self.ranks_by_type(), "path": None if self.path is None else str(self.path),
                "modules": [m.to_dict(top_k) for m in self.modules.values()]}


@dataclass
class SweepPoint:
    """One budget of a sweep: adapter parameters kept, the metric (None without `evaluate`),
    the energy kept, and the full `CompressionResult`."""

    budget: float
    parameters: int
    metric: float | None
    retained_energy: float
    result: CompressionResult = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "parameters": self.parameters, "metric": self.metric,
                "retained_energy": self.retained_energy, "factor_parameters": self.result.factor_parameters_after,
                "reduction": self.result.reduction, "threshold": self.result.threshold,
                "ranks_by_type": self.result.ranks_by_type()}


def plot_sweep(points: Mapping[float, SweepPoint], path: str | Path, *, metric: str = "metric",
               reference: float | None = None, title: str | None = None) -> Path:
    """The metric (y) against the adapter parameters kept (x, log scale), one labelled point per
    budget; a dashed line at `reference` (the uncompressed adapter). Needs metrics."""
    plt = pyplot()

    scored = [p for p in points.values() if p.metric is not None]
    if not scored:
        raise SpliceError("the sweep has no metric to plot; pass evaluate=")
    scored.sort(key=lambda p: p.parameters)
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    ax.plot([p.parameters for p in scored], [p.metric for p in scored], marker="o")
    for p in scored:
        ax.annotate(f"{p.budget:g}", (p.parameters, p.metric), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    if reference is not None:
        ax.axhline(reference, ls="--", lw=0.8, color="gray", label="uncompressed")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel="adapter parameters kept (labels: budget)", ylabel=metric)
    ax.set_title(title or f"PARA: {metric} against budget", fontsize=10)
    path = Path(path)
    save_png(fig, path)
    return path
