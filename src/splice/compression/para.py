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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from splice.compression.para_allocation import allocate
from splice.compression.para_report import (  # noqa: F401  (plot_sweep: re-exported, its home before)
    CompressionResult,
    ModuleReport,
    SweepPoint,
    plot_sweep,
)
from splice.core.adapter_state import AdapterState, ModuleUpdate
from splice.core.errors import SpliceError
from splice.core.svd import product_svd
from splice.io.adapter_states import AdapterSource, adapter_state
from splice.io.files import check_output_dir

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
    modules = {n: truncated(u, svds[n], ranks[n]) for n, u in state.modules.items() if ranks[n]}
    reports = {n: ModuleReport.of(n, u, svds[n], ranks[n]) for n, u in state.modules.items()}
    dropped = len(modules) < len(state.modules)
    compressed = state.like(modules=modules, rslora=False,
                            target_modules=None if dropped else state.target_modules)
    result = CompressionResult(compressed, state, reports, target, value, allocation, normalize, tau)
    if out is not None:
        result.save(out, overwrite=overwrite)
    return result


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
    problem = state.nonfinite_problem()
    if problem:
        raise SpliceError(f"cannot compress an adapter whose {problem} (a diverged training)")
    return state


# -- one adapter, several budgets ------------------------------------------------------------


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
    budgets = [float(b) for b in budgets]
    repeated = sorted({b for b in budgets if budgets.count(b) > 1})
    if repeated:
        raise SpliceError(f"budget {repeated[0]:g} is given more than once; a sweep keeps one point per budget")
    state = _state(source, name)
    points: dict[float, SweepPoint] = {}
    for budget in budgets:
        result = compress(state, budget=budget, allocation=allocation, normalize=normalize)
        metric = None if evaluate is None else float(evaluate(result.state))
        points[float(budget)] = SweepPoint(float(budget), result.parameters_after, metric, result.retained_energy,
                                           result)
    return points
