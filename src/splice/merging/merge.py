"""Merge several adapters into one, in weight-change space, correct for every LoRA variant.

Each adapter i changes module l's weight by ΔW_il (its true change: s·B A with its own rank
and scale, rsLoRA or not; DoRA's diag(m/‖W+sBA‖)(W+sBA) − W; plus a bias change s·b). The
merge is a rule on those changes, never on A and B separately (which is what makes HF PEFT's
`add_weighted_adapter` wrong for rsLoRA, DoRA, biases and differing ranks: issues #3737, #3761):

    cat              Σ_i w_i ΔW_i, exactly, as the concatenated factors (rank Σ r_i)
    linear           Σ_i w_i ΔW_i, exactly, re-factored to its numerical rank; w_i = 1/n by default
    task_arithmetic  the same with w_i = 1 by default (θ_0 + λ Σ τ_i with weights = λ)
    svd              Σ_i w_i ΔW_i truncated to `rank` (default: the largest input rank)
    ties, dare_ties, dare_linear, magnitude_prune
                     the rule of `splice.merging.task_vectors` on the dense changes (bias
                     appended), then the SVD at `rank` (default: Σ r_i, capped by the shape);
                     the relative error of that truncation is reported per module

The exact rules keep DoRA exact: with g_i = m_i/‖W+s_iB_iA_i‖ a linear combination is
W + diag(c)W + Σ diag(w_i g_i) s_i B_i A_i, c = Σ w_i (g_i − 1), which is again a DoRA of the
stacked factors scaled by 1/(1+c), with magnitude (1+c)‖W + B'A'‖. DoRA needs the base
weights (`base`); the element-wise rules give a plain LoRA of the dense change.

A module only some adapters change counts as an unchanged (zero) module in the others. Heads
trained in full (`train_also`) are averaged with the normalised weights (`heads="average"`),
taken from the first adapter that has them ("first"), or dropped ("none").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from splice.core import progress
from splice.core.adapter_state import AdapterState, ModuleUpdate
from splice.core.errors import IncompatibleAdaptersError, SpliceError
from splice.core.layers import dense_weight, describe
from splice.core.svd import Factors, factor_dense, factor_product
from splice.core.validation import nonfinite_problem
from splice.io.adapter_states import AdapterSource, adapter_state, save_state
from splice.merging import task_vectors

Method = Literal["cat", "linear", "task_arithmetic", "svd", "ties", "dare_ties", "dare_linear", "magnitude_prune"]
HeadRule = Literal["average", "first", "none"]
EXACT_METHODS = ("cat", "linear", "task_arithmetic", "svd")
ELEMENTWISE_METHODS = ("ties", "dare_ties", "dare_linear", "magnitude_prune")
METHODS = EXACT_METHODS + ELEMENTWISE_METHODS
BaseWeights = nn.Module | Mapping[str, torch.Tensor] | None


@dataclass
class MergeResult:
    """The merged adapter and how it was made; `errors` is ‖merged change − saved factors‖ /
    ‖merged change‖ per module (0 for the exact rules at full rank)."""

    state: AdapterState
    method: str
    weights: list[float]
    errors: dict[str, float] = field(default_factory=dict)
    heads: str = "none"

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        return save_state(self.state, path, overwrite=overwrite)

    def summary(self) -> str:
        ranks = sorted({u.rank for u in self.state.modules.values()})
        worst = max(self.errors.values(), default=0.0)
        return (f"{self.method} merge of {len(self.weights)} adapters (weights {self.weights}): "
                f"{len(self.state.modules)} modules, ranks {ranks[0]}-{ranks[-1]}, "
                f"{self.state.parameters:,} parameters, largest relative error {worst:.2e}, heads: {self.heads}")


def merge_adapters(
    adapters: Sequence[AdapterState | AdapterSource],
    method: Method = "linear",
    *,
    weights: Sequence[float] | None = None,
    density: float = 0.5,
    rank: int | None = None,
    majority: task_vectors.SignRule = "total",
    seed: int = 0,
    base: BaseWeights = None,
    heads: HeadRule = "average",
) -> MergeResult:
    """One adapter from several (states, adapter directories, or models with one adapter each).

    Args:
        method: the rule (module doc). weights: one per adapter (default 1/n for cat, linear,
            svd; 1 for the others). density: fraction kept by TIES, DARE and magnitude pruning.
        rank: target rank of the result (svd and the element-wise rules; linear truncates too
            when given). majority: TIES's sign election, "total" or "frequency".
        seed: DARE's random masks. base: the base model (or {module: weight}) for DoRA inputs.
        heads: how modules trained in full are combined: "average", "first" or "none".
    """
    if method not in METHODS:
        raise SpliceError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise SpliceError(f"rank must be a positive integer (the merged adapter's rank) or None for the method's "
                          f"default, got {rank!r}")
    adapters = list(adapters)
    states = [a if isinstance(a, AdapterState) else adapter_state(a) for a in adapters]
    if not states:
        raise SpliceError("merge needs at least one adapter")
    labels = [label_of(a, i) for i, a in enumerate(adapters)]
    weights = _weights(weights, len(states), method)
    if method == "cat" and rank is not None:
        raise SpliceError("cat is exact at rank Σ r_i; use method='svd' (or 'linear' with rank=) to truncate")
    base_model = check_inputs(states, labels)
    generator = torch.Generator().manual_seed(seed)
    dora = method in EXACT_METHODS and any(s.dora for s in states)
    if dora:  # every module of the result gets a magnitude; DoRA exists on Linear layers only
        other = sorted((name, u.kind) for s in states for name, u in s.modules.items() if u.kind != "linear")
        if other:
            raise SpliceError(f"a DoRA adapter makes the {method} merge a DoRA adapter, and DoRA adapts Linear "
                              f"layers only; {other[0][0]} is a {other[0][1]} layer: merge with an element-wise "
                              "method (ties, dare_linear, ...) or leave that adapter out")
    modules: dict[str, ModuleUpdate] = {}
    errors: dict[str, float] = {}
    for name in progress.track(_module_names(states), f"{method} merge"):
        updates = [s.modules.get(name) for s in states]
        template = _check_module(name, updates)
        if method in EXACT_METHODS:
            default_rank = max(u.rank for u in updates if u is not None) if method == "svd" else None
            modules[name], errors[name] = _exact(name, template, updates, weights, method, rank or default_rank,
                                                 base, dora)
        else:
            modules[name], errors[name] = _elementwise(name, template, updates, weights, method, density, rank,
                                                       majority, generator, base)
    head_tensors, heads, rule = _merge_heads(states, weights, heads)
    targets = {tuple(s.target_modules or ()) for s in states}
    same_modules = all(set(s.modules) == set(modules) for s in states)
    state = AdapterState(
        modules, head_tensors, heads, rslora=False, dropout=states[0].dropout, base_model=base_model,
        task_type=_common(states, "task_type", None),
        target_modules=states[0].target_modules if len(targets) == 1 and same_modules else None,
        fan_in_fan_out=any(s.fan_in_fan_out for s in states),
    )
    return MergeResult(state, method, weights, errors, rule)


def base_weight(base: BaseWeights, name: str) -> torch.Tensor | None:
    """Module `name`'s base weight, canonical layout, from a model or a {name: weight} mapping."""
    if base is None:
        return None
    if isinstance(base, nn.Module):
        module = base.get_submodule(name)
        return dense_weight(module, describe(module))
    return base[name]


# -- one module ------------------------------------------------------------------------------


def _exact(name: str, template: ModuleUpdate, updates: list[ModuleUpdate | None], weights: list[float],
           method: str, rank: int | None, base: BaseWeights, dora: bool) -> tuple[ModuleUpdate, float]:
    """Σ w_i ΔW_i as stacked factors, re-factored unless `cat`. With `dora` the result is a DoRA
    (module doc), also where only LoRAs change this module (then g = 1): PEFT's `use_dora` is
    one flag for all modules."""
    weight = _dora_base(name, base) if dora else None
    Bs, As, bias, shift = [], [], None, torch.zeros(template.out_features, dtype=torch.float64)
    for w, u in zip(weights, updates, strict=True):
        if u is None or w == 0:
            continue
        row_scale = torch.full((u.out_features,), w * u.scaling, dtype=torch.float64)
        if u.magnitude is not None:
            g = _dora_scale(u, weight)
            row_scale = row_scale * g
            shift += w * (g - 1)
        Bs.append(u.B.flatten(1).double() * row_scale[:, None])
        As.append(u.A.flatten(1).double())
        if u.bias is not None:
            bias = (0 if bias is None else bias) + w * u.scaling * u.bias.double()
    if not Bs:  # every weight is 0: a zero change of rank 1 keeps the module well-formed
        Bs = [torch.zeros(template.out_features, 1, dtype=torch.float64)]
        As = [torch.zeros(1, template.A.flatten(1).shape[1], dtype=torch.float64)]
    B, A = torch.cat(Bs, dim=1), torch.cat(As, dim=0)
    if dora and bias is not None:
        raise SpliceError(f"{name}: merging DoRA with a LoRA that changes the bias (lora_bias) has no PEFT form "
                          "(DoRA has no bias change); use an element-wise method such as 'ties', or drop one")
    if dora:
        if (1 + shift).abs().min() < 1e-6:
            raise SpliceError(f"{name}: the weighted DoRA magnitudes cancel out (1 + Σ w_i (g_i - 1) = 0 for some "
                              "row); the merge has no DoRA form. Use weights that do not cancel")
        B = B / (1 + shift)[:, None]
    if method == "cat":
        factors = Factors(B, A, torch.zeros(0))
        error = 0.0
    else:
        factors = factor_product(B, A, rank)
        error = factors.relative_error()
    magnitude = None
    if dora:
        magnitude = (1 + shift) * (weight.double().flatten(1) + factors.B @ factors.A).norm(dim=1)
    return template.from_matrix_factors(factors.B, factors.A, bias=bias, magnitude=magnitude), error


def _elementwise(name: str, template: ModuleUpdate, updates: list[ModuleUpdate | None], weights: list[float],
                 method: str, density: float, rank: int | None, majority: task_vectors.SignRule,
                 generator: torch.Generator, base: BaseWeights) -> tuple[ModuleUpdate, float]:
    """The rule on each adapter's dense change (bias as an extra column), then the SVD."""
    has_bias = any(u is not None and u.bias is not None for u in updates)
    weight = _dora_base(name, base) if any(u is not None and u.magnitude is not None for u in updates) else None
    shape = template.matrix().shape
    taus = []
    for u in updates:
        tau = torch.zeros(shape, dtype=torch.float64) if u is None else u.effective_matrix(weight)
        if has_bias:
            bias = u.scaled_bias() if u is not None else None
            tau = torch.cat([tau, (bias if bias is not None else torch.zeros(shape[0], dtype=torch.float64))[:, None]],
                            dim=1)
        taus.append(tau)
    stack, w = torch.stack(taus), torch.tensor(weights, dtype=torch.float64)
    if method == "ties":
        merged = task_vectors.ties(stack, w, density, majority)
    elif method == "dare_ties":
        merged = task_vectors.dare_ties(stack, w, density, generator, majority)
    elif method == "dare_linear":
        merged = task_vectors.dare_linear(stack, w, density, generator)
    else:
        merged = task_vectors.magnitude(stack, w, density)
    bias = merged[:, -1] if has_bias else None
    change = merged[:, :-1] if has_bias else merged
    if rank is None:
        rank = min(sum(u.rank for u in updates if u is not None), *shape)
    factors = factor_dense(change, rank)
    return template.from_matrix_factors(factors.B, factors.A, bias=bias), factors.relative_error()


def _dora_base(name: str, base: BaseWeights) -> torch.Tensor:
    weight = base_weight(base, name)
    if weight is None:
        raise SpliceError(f"{name}: merging a DoRA adapter needs the base model's weights (its change depends "
                          "on them); pass base=model (CLI: --model)")
    problem = nonfinite_problem(weight.detach())
    if problem:
        raise SpliceError(f"{name}: the base weight {problem}; nothing was merged")
    return weight


def _dora_scale(update: ModuleUpdate, weight: torch.Tensor) -> torch.Tensor:
    """g = m / ‖W + s B A‖ per output row, in float64."""
    combined = weight.double().flatten(1) + update.matrix()
    return update.magnitude.double() / combined.norm(dim=1)


# -- checks and bookkeeping ------------------------------------------------------------------


def _weights(weights: Sequence[float] | None, n: int, method: str) -> list[float]:
    if weights is None:
        return [1.0 / n] * n if method in ("cat", "linear", "svd") else [1.0] * n
    bad = [w for w in weights if isinstance(w, (str, bytes, bool)) or not _is_finite(w)]
    if bad:
        raise SpliceError(f"weights must be finite numbers, one per adapter; got {list(weights)}")
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise SpliceError(f"{len(weights)} weights for {n} adapters; give one weight per adapter")
    return weights


def _module_names(states: list[AdapterState]) -> list[str]:
    names: dict[str, None] = {}
    for state in states:
        names.update(dict.fromkeys(state.modules))
    return list(names)


def _check_module(name: str, updates: list[ModuleUpdate | None]) -> ModuleUpdate:
    present = [u for u in updates if u is not None]
    first = present[0]
    for u in present[1:]:
        if u.kind != first.kind or u.A.shape[1:] != first.A.shape[1:] or u.out_features != first.out_features:
            raise IncompatibleAdaptersError(
                f"{name}: adapters disagree on the layer: a {first.kind} update of A {tuple(first.A.shape)}, "
                f"B {tuple(first.B.shape)} and a {u.kind} update of A {tuple(u.A.shape)}, B {tuple(u.B.shape)}; "
                "they were made for different models")
    return first


def _common(states: list[AdapterState], key: str, conflict: str | None, labels: list[str] | None = None):
    values = {getattr(s, key) for s in states if getattr(s, key) is not None}
    if len(values) > 1:
        if conflict:
            named = "" if labels is None else " (" + ", ".join(
                f"{label}: {getattr(s, key)!r}" for s, label in zip(states, labels, strict=True)) + ")"
            raise IncompatibleAdaptersError(f"the adapters {conflict}: {sorted(values)}{named}")
        return None
    return next(iter(values), None)


def label_of(adapter: AdapterState | AdapterSource, index: int) -> str:
    """How an input is named in messages: its directory, or its position."""
    if isinstance(adapter, (str, Path)):
        return str(adapter)
    kind = "" if isinstance(adapter, AdapterState) else f" (a {type(adapter).__name__})"
    return f"adapter {index + 1}{kind}"


def check_inputs(states: list[AdapterState], labels: list[str]) -> str | None:
    """Refuse adapters that cannot be combined: non-finite values, different recorded base
    models, modules or shapes that do not belong to one model. Returns the common base model."""
    for state, label in zip(states, labels, strict=True):
        _check_finite(state, label)
    base_model = _common(states, "base_model", "were trained on different base models", labels)
    _check_belong_together(states, labels, base_model)
    return base_model


def _check_finite(state: AdapterState, label: str) -> None:
    """NaN or infinite values (a diverged training) would reach the SVD; refuse them by name."""
    problem = state.nonfinite_problem()
    if problem:
        raise SpliceError(f"{label}: {problem}; nothing was merged")


def _check_belong_together(states: list[AdapterState], labels: list[str], base_model: str | None) -> None:
    """Refuse adapters whose modules cannot be of one model: an adapter that shares no module, and
    no parent module, with the others (a BERT adapter and a Llama adapter), unless every adapter
    records the same base model (then disjoint targets, say `query` and `value`, are fine)."""
    if len(states) < 2 or (base_model is not None and all(s.base_model is not None for s in states)):
        return
    outline = [set(s.modules) | {a for m in s.modules for a in _ancestors(m)} for s in states]
    group, frontier = {0}, [0]
    while frontier:
        i = frontier.pop()
        for j in range(len(states)):
            if j not in group and outline[i] & outline[j]:
                group.add(j)
                frontier.append(j)
    if len(group) < len(states):
        apart = [j for j in range(len(states)) if j not in group]

        def sample(j: int) -> str:
            names = sorted(states[j].modules)
            return f"{labels[j]} ({', '.join(names[:2])}{', ...' if len(names) > 2 else ''})"

        raise IncompatibleAdaptersError(
            f"the adapters do not belong to one model: {', '.join(sample(j) for j in sorted(group))} and "
            f"{', '.join(sample(j) for j in apart)} share no module and no parent module, and no common base "
            "model is recorded; merge adapters trained on the same base model")


def _ancestors(name: str) -> list[str]:
    """The parent modules of a dotted module name ('' for a top-level module)."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))] or [""]


def _is_finite(value: object) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _merge_heads(states: list[AdapterState], weights: list[float],
                 rule: HeadRule) -> tuple[dict[str, torch.Tensor], list[str], str]:
    holders = [(s, w) for s, w in zip(states, weights, strict=True) if s.head_tensors]
    if rule == "none" or not holders:
        return {}, [], "none"
    if rule == "first":
        return dict(holders[0][0].head_tensors), list(holders[0][0].heads), "first"
    if rule != "average":
        raise SpliceError(f"heads must be 'average', 'first' or 'none', got {rule!r}")
    keys = {tuple(sorted(s.head_tensors)) for s in states}
    if len(keys) > 1:
        raise SpliceError("the adapters train different heads "
                          f"({[sorted(s.head_tensors)[:3] for s in states]}); pass heads='first' or heads='none'")
    total = sum(weights)
    if total == 0:
        raise SpliceError("the weights sum to 0, so the heads cannot be averaged; pass heads='first' or 'none'")
    merged = {key: sum(w / total * s.head_tensors[key].double() for s, w in zip(states, weights, strict=True))
              .to(states[0].head_tensors[key].dtype) for key in states[0].head_tensors}
    return merged, list(states[0].heads), "average"
