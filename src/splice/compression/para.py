"""PARA: cut a trained LoRA down to the ranks it really uses, after training and without data.

Kumaravelu, Gupta, Srijith, "PARA: Post-Optimization Adaptive Rank Allocation for LoRA",
arXiv 2604.27796 ("train first, tune later"). Train with a generous uniform rank r, then, per
adapted module l with ΔW_l = s B A (B [out, r], A [r, in·kernel], flattened):

    B = Q_B R_B,  Aᵀ = Q_A R_A                    thin QRs, O((out + in) r²)
    s R_B R_Aᵀ = U' Σ V'ᵀ                        the SVD of a small r×r matrix
    ΔW = (Q_B U') Σ (Q_A V')ᵀ                     exactly: the SVD of ΔW, never formed densely

Pool the singular values σ_{l,i} of all modules, choose one threshold τ, and keep
r_l = #{i : σ_{l,i} ≥ τ} directions of module l:

    B' = Q_B U'_{:r_l} Σ_{r_l}^{1/2},   A' = Σ_{r_l}^{1/2} V'ᵀ_{:r_l} Q_Aᵀ,   scale 1

so module l keeps its best rank-r_l approximation (Eckart-Young): the relative Frobenius error
is sqrt(Σ_dropped σ²) / ‖ΔW_l‖_F. Modules left with rank 0 are dropped. Each module thus gets
its own rank; at τ = 0 (or full rank) the result is ΔW exactly, up to floating point.

**Targets** (exactly one). `threshold`: τ itself, on the pooled (possibly normalised) σ.
`energy`: the smallest set that keeps that fraction of Σ σ². `budget`: the largest set whose
factors hold at most that fraction of the adapter's factor parameters, a kept σ of module l
costing out_l + in_l·kernel numbers (0.25 = 75% fewer). `rank`: k directions per module,
capped at its rank. Targets are measured on the adapter itself (raw σ², parameter counts);
normalisation only changes which directions come first. Ties at τ are kept or dropped together,
so `σ ≥ τ` always describes the result; a budget never keeps a direction with σ = 0.

**Choices where the paper is silent** (../shared/methods/volume-1.md §7).

- `normalize`: whether σ is divided per module before pooling: "none" (default, the spec's),
  "max" (by the module's σ₁: every module's top direction scores 1) or "frobenius" (by
  ‖ΔW_l‖_F). Unnormalised pooling favours modules with large updates.
- `allocation="per-module"` applies the criterion module by module instead of pooling: energy
  f keeps f of each module's own energy; budget b keeps ⌊b·r_l⌋ directions of each module (at
  least one where ΔW_l ≠ 0, so a module is never dropped by its budget share; on a uniform-rank
  adapter this is uniform rank truncation); a threshold is the same either way.
- Biases (PEFT's `lora_bias`) and trained heads are kept as they are (a bias is rescaled by
  the old s, since the new scale is 1). DoRA: the direction's low-rank change s B A is
  compressed and the magnitude vector kept as it is; at full rank this is exact, below it the
  magnitude stays what it was trained for while the direction loses its weakest components.
  A DoRA module keeps at least one direction (dropping it would also drop its magnitude, which
  changes the weight by itself).
- The result is plain LoRA (rsLoRA off, scale 1 = alpha/r with alpha = r per module), written
  with PEFT's per-module `rank_pattern`/`alpha_pattern`; when modules are dropped, the config
  lists the kept modules by full name so that PEFT does not re-create the dropped ones.

Sources: any adapter `splice.io.adapter_state` reads (a PEFT LoRA directory, or a model with
an attached adapter of any weight form: LoRA, DoRA, TT-LoRA, DiaBlo, ... as the exact low-rank
factorisation of its change), or an `AdapterState`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from splice.analysis.spectra import energy_rank, module_type
from splice.core.errors import SpliceError
from splice.core.inventory import shared_prefix
from splice.core.state import AdapterState, ModuleUpdate
from splice.core.svd import product_svd
from splice.io.files import check_output_dir
from splice.io.state import AdapterSource, adapter_state, save_state

Allocation = Literal["global", "per-module"]
Normalize = Literal["none", "max", "frobenius"]
ALLOCATIONS = ("global", "per-module")
NORMALIZATIONS = ("none", "max", "frobenius")
TARGETS = ("budget", "energy", "rank", "threshold")
DEFAULT_BUDGETS = (1.0, 0.5, 0.25, 0.1)


# -- one module ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleSVD:
    """ΔW = U diag(S) Vh exactly, in float64: U [out, n], S [n] descending, Vh [n, in·kernel],
    n = min(out, in·kernel, r). `cost` is what one kept direction stores: out + in·kernel."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    cost: int


def module_svd(update: ModuleUpdate) -> ModuleSVD:
    """The SVD of s B A from thin QRs of B and Aᵀ and the SVD of the small s R_B R_Aᵀ."""
    B, A = update.B.detach().flatten(1), update.A.detach().flatten(1)
    return ModuleSVD(*product_svd(B.double() * update.scaling, A), B.shape[0] + A.shape[1])


def truncated(update: ModuleUpdate, svd: ModuleSVD, rank: int) -> ModuleUpdate:
    """The module's best rank-`rank` approximation as factors of scale 1, bias and magnitude kept."""
    root = svd.S[:rank].sqrt()
    bias = None if update.bias is None else update.bias.double() * update.scaling
    return update.from_matrix_factors(svd.U[:, :rank] * root, root[:, None] * svd.Vh[:rank], scaling=1.0,
                                      bias=bias, magnitude=update.magnitude)


# -- the report ------------------------------------------------------------------------------


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


# -- compression -----------------------------------------------------------------------------


def compress(
    source: AdapterSource | AdapterState,
    *,
    budget: float | None = None,
    energy: float | None = None,
    rank: int | None = None,
    threshold: float | None = None,
    allocation: Allocation = "global",
    normalize: Normalize = "none",
    name: str | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> CompressionResult:
    """Compress an adapter to per-module ranks (PARA); data-free.

    Args:
        source: a PEFT LoRA directory, a model with an adapter attached (any form with a
            weight change), or an `AdapterState`.
        budget: fraction of the adapter's factor parameters to keep, in (0, 1]: 0.25 = 75% fewer.
        energy: fraction of Σ σ² to keep, in (0, 1].
        rank: directions per module (capped at each module's rank), >= 1.
        threshold: τ >= 0 on the pooled (possibly normalised) singular values.
        allocation: "global" (one τ over all modules) or "per-module" (the criterion applied to
            each module alone); see the module doc.
        normalize: "none", "max" or "frobenius": per-module division of σ before pooling.
        name: the adapter to take from a model source (default: its only or active one).
        out: save the result there (a PEFT LoRA directory, written whole or not at all); a
            non-empty folder is refused, before any work, unless `overwrite`.

    Exactly one of budget, energy, rank and threshold. Biases and trained heads are kept; DoRA
    magnitudes are kept and the direction's change s B A compressed (exact at full rank).
    """
    target, value = _target(budget=budget, energy=energy, rank=rank, threshold=threshold)
    _one_of("allocation", allocation, ALLOCATIONS)
    _one_of("normalize", normalize, NORMALIZATIONS)
    if out is not None:
        check_output_dir(out, overwrite)
    state = _state(source, name)
    svds = {n: module_svd(u) for n, u in state.modules.items()}
    minimum = {n: 1 if u.magnitude is not None else 0 for n, u in state.modules.items()}
    ranks, tau = allocate(svds, {n: u.rank for n, u in state.modules.items()}, target, value, allocation,
                          normalize, minimum)
    if not any(ranks.values()):
        largest = max((s.S[0].item() for s in svds.values() if s.S.numel()), default=0.0)
        raise SpliceError(f"{target}={value:g} keeps no direction of any module, so nothing would be left "
                          f"(the largest singular value is {largest:.3g})")
    modules: dict[str, ModuleUpdate] = {}
    reports: dict[str, ModuleReport] = {}
    for module_name, update in state.modules.items():
        svd, k = svds[module_name], ranks[module_name]
        if k:
            modules[module_name] = truncated(update, svd, k)
        energies = svd.S.square()
        total = energies.sum().item()
        error = math.sqrt(energies[k:].sum().item() / total) if total > 0 else 0.0  # Eckart-Young
        reports[module_name] = ModuleReport(
            module_name, update.kind, (svd.U.shape[0], svd.Vh.shape[1]), update.rank, k, svd.S,
            update.rank * svd.cost, k * svd.cost, error)
    dropped = len(modules) < len(state.modules)
    compressed = state.like(modules=modules, rslora=False,
                            target_modules=None if dropped else state.target_modules)
    result = CompressionResult(compressed, state, reports, target, value, allocation, normalize, tau)
    if out is not None:
        result.save(out, overwrite=overwrite)
    return result


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


def _target(**targets: float | None) -> tuple[str, float]:
    given = {k: v for k, v in targets.items() if v is not None}
    if len(given) != 1:
        named = ", ".join(given) if given else "none"
        raise SpliceError(f"give exactly one of budget, energy, rank and threshold (got {named}); e.g. "
                          "budget=0.25 keeps a quarter of the adapter's parameters")
    target, value = next(iter(given.items()))
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpliceError(f"{target} must be a finite number, got {value!r}")
    if target in ("budget", "energy") and not 0.0 < value <= 1.0:
        raise SpliceError(f"{target} is a fraction in (0, 1], got {value:g}"
                          + (" (0.25 keeps a quarter of the parameters)" if target == "budget" else ""))
    if target == "rank" and (value != int(value) or value < 1):
        raise SpliceError(f"rank must be a whole number >= 1, got {value:g}")
    if target == "threshold" and value < 0:
        raise SpliceError(f"threshold must be >= 0, got {value:g}")
    return target, float(value)


def _one_of(what: str, value: str, allowed: Iterable[str]) -> None:
    if value not in allowed:
        raise SpliceError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")


def _state(source: AdapterSource | AdapterState, name: str | None) -> AdapterState:
    if isinstance(source, AdapterState):
        if name is not None:
            raise SpliceError("name= picks an adapter of a model; an AdapterState is one adapter already")
        state = source
    else:
        state = adapter_state(source, name)
    if not state.modules:
        raise SpliceError("the adapter has no adapted modules to compress")
    return state


# -- one adapter, several budgets ------------------------------------------------------------


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


def sweep(
    source: AdapterSource | AdapterState,
    budgets: Iterable[float] = DEFAULT_BUDGETS,
    *,
    evaluate: Callable[[AdapterState], float] | None = None,
    allocation: Allocation = "global",
    normalize: Normalize = "none",
    name: str | None = None,
) -> dict[float, SweepPoint]:
    """One trained adapter cut to several budgets ("one-to-many"), each scored by `evaluate`.

    `evaluate` gets each compressed `AdapterState` and returns a number (e.g. attach it with
    `splice.io.peft_format.attach_state` to a fresh base model and measure accuracy); without
    it the points carry parameters and retained energy only. Returns budget -> SweepPoint, in
    the order given; `plot_sweep` draws it.
    """
    state = _state(source, name)
    points: dict[float, SweepPoint] = {}
    for budget in budgets:
        result = compress(state, budget=budget, allocation=allocation, normalize=normalize)
        metric = None if evaluate is None else float(evaluate(result.state))
        points[float(budget)] = SweepPoint(float(budget), result.parameters_after, metric, result.retained_energy,
                                           result)
    return points


def plot_sweep(points: Mapping[float, SweepPoint], path: str | Path, *, metric: str = "metric",
               reference: float | None = None, title: str | None = None) -> Path:
    """The metric (y) against the adapter parameters kept (x, log scale), one labelled point per
    budget; a dashed line at `reference` (the uncompressed adapter). Needs metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

