"""Static weight audit: does this adapter's weight change look like the benign adapters it claims
to be one of? No input is run; only the weights are read (issue 21, item 2).

Per adapted module the true change ΔW (`ModuleUpdate.effective_matrix`: s·B A, DoRA's
diag(m/‖W+sBA‖)(W+sBA) − W) is summarised by its singular values σ₁ ≥ σ₂ ≥ ...:

    norm             ‖ΔW‖_F = √Σσ²
    relative_norm    ‖ΔW‖_F / ‖W0‖_F                (only with the base weights W0)
    spectral_share   σ₁² / Σσ²                       (how much of the change one direction holds)
    effective_rank   exp(H(p)), p_i = σ_i / Σσ       (Roy & Vetterli, 2007)
    bias_norm        ‖s·b‖                           (only where the update changes the bias)

plus the `top_k` largest σ (kept, not compared: `norm` and `spectral_share` carry their scale and
shape). A backdoor written into one layer tends to need a change unlike the others': much larger,
or concentrated in one direction. Whether that is
a reliable detector is not established (arXiv 2604.08844 separates 38 LoRA deltas by training
objective from such spectral features; that is evidence it is feasible, nothing more), so the
audit compares, it does not judge: against a reference set of benign adapters of the same kind
(same base, targets and recipe), each module's features get robust z-scores

    z = (x − median_ref) / (1.4826 · MAD_ref)

(1.4826 · MAD estimates a standard deviation for normal data without letting one odd reference
inflate it). Where the references agree exactly (MAD = 0: copies of one adapter, a rank-1 recipe
whose effective rank is always 1) the scale is floored at `MAD_FLOOR` · |median| (and
`ABSOLUTE_FLOOR` for a zero median), so that a difference of 0.1% of the median counts as one
standard deviation rather than infinitely many. A module needs `MIN_REFERENCES` references that
adapt it (and a feature as many that have it) to be compared; the rest are reported as notes,
never dropped silently. The adapter's outlier score is the largest |z|; every module with a
|z| above `z_threshold` gets a warning (not a flag: the features are no validated backdoor
detector, and `splice audit --fail-on warning` fails on them if you want it to).

Few references make flags cheap: the median and MAD of a few values are themselves uncertain,
so a benign feature, even a normal one, passes |z| = 3.5 with probability 0.047 against 8
references, 0.011 against 20, 0.0025 against 50 (simulated, 200,000 draws each), and an adapter
has several modules x features. Random rank-4 LoRAs on the tiny test Llama (4 modules)
gave a flag to 15 of 60 benign adapters against 8 references, 5 of 60 against 20, mostly
through the effective rank, whose spread is narrow below its bound r with a tail towards lower
values. So each audit also scores every reference against the others, and its summary says how
many of them would be flagged: the false-flag rate of the reference set at hand.

A LoRA-shaped change is decomposed from its factors (thin QRs and an r x r SVD, as
`splice.core.svd.product_svd`), so a 4096-wide model is profiled in seconds; a DoRA change is
full-rank and takes a dense SVD per module. So does a module the adapter trains in full
(`train_also`, a classifier or LM head): its change is the adapter's copy minus the base's
original, profiled with the base given and noted (never dropped) without it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.analysis.spectra import entropy_rank
from splice.audit.findings import Finding
from splice.core import progress
from splice.core.adapter_state import ModuleUpdate
from splice.core.errors import ShapeMismatchError, SpliceError
from splice.core.heads import all_head_copies
from splice.core.host import hosts
from splice.core.svd import product_svd
from splice.core.validation import nonfinite_problem
from splice.io.adapter_states import AdapterSource, adapter_state
from splice.io.figures import pyplot, save_png
from splice.merging.merge import BaseWeights, base_weight

FEATURES = ("relative_norm", "norm", "spectral_share", "effective_rank", "bias_norm")
MIN_REFERENCES = 3
MAD_TO_SIGMA = 1.4826  # 1 / Φ⁻¹(3/4): MAD · this estimates σ for normal data
MAD_FLOOR = 1e-3  # the smallest scale, relative to |median| (module doc)
ABSOLUTE_FLOOR = 1e-12  # the smallest scale where the median is 0
DEFAULT_TOP_K = 8
DEFAULT_Z_THRESHOLD = 3.5


@dataclass
class ModuleProfile:
    """One module's change: `features` (see the module doc; `relative_norm` only with the base,
    `bias_norm` only with a bias change) and its `top_k` largest singular values, descending."""

    name: str
    features: dict[str, float]
    top_singular_values: list[float]


@dataclass
class WeightProfile:
    """The module profiles of one adapter, by module name (the modules it trains in full
    included); `notes`, by module name, say how such a module was profiled, or why it was not."""

    modules: dict[str, ModuleProfile]
    notes: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {name: {"features": m.features, "top_singular_values": m.top_singular_values}
                for name, m in self.modules.items()}


# What can be audited or serve as a reference: what `weight_profile` reads (a folder, a model with
# one adapter, a model and the adapter's name), or a profile computed before (a bench profiles its
# references once).
Source = AdapterSource | tuple[nn.Module, str]
Reference = Source | WeightProfile


@dataclass(frozen=True)
class ReferenceStats:
    """One feature of one module over the references that have it."""

    median: float
    mad: float
    low: float
    high: float
    count: int

    @property
    def scale(self) -> float:
        """1.4826 · MAD, floored where the references agree (module doc)."""
        return max(MAD_TO_SIGMA * self.mad, MAD_FLOOR * abs(self.median), ABSOLUTE_FLOOR)

    def z(self, value: float) -> float:
        return (value - self.median) / self.scale

    @classmethod
    def of(cls, values: list[float]) -> ReferenceStats:
        x = torch.tensor(values, dtype=torch.float64)
        median = _median(x)
        return cls(median, _median((x - median).abs()), float(x.min()), float(x.max()), len(values))


@dataclass
class StaticAudit:
    """The static audit of one adapter against `references` benign ones.

    `z[module][feature]` are the robust z-scores (empty with fewer than `MIN_REFERENCES`
    references), `score` the largest |z| and `worst` its (module, feature); `reference_stats`
    the reference median, MAD and range behind each z; `reference_scores` each reference's own
    score against the others (`leave_one_out_scores`: what a benign adapter scores here).
    `findings`: a warning per module with a |z| above `z_threshold`, notes for what could not be
    compared and a summary note.
    """

    profile: WeightProfile
    references: int
    z: dict[str, dict[str, float]]
    score: float | None
    worst: tuple[str, str] | None
    findings: list[Finding]
    z_threshold: float = DEFAULT_Z_THRESHOLD
    reference_stats: dict[str, dict[str, ReferenceStats]] = field(default_factory=dict)
    reference_scores: list[float | None] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON: everything above, the profile and statistics per module."""
        return {
            "check": "static", "references": self.references, "z_threshold": self.z_threshold,
            "score": self.score, "worst": list(self.worst) if self.worst else None,
            "profile": self.profile.as_dict(), "z": self.z,
            "reference_stats": {m: {f: asdict(s) for f, s in stats.items()}
                                for m, stats in self.reference_stats.items()},
            "reference_scores": self.reference_scores,
            "findings": [f.as_dict() for f in self.findings],
        }

    def table(self) -> str:
        """A markdown table, one row per module: each feature's value (and z where compared), σ₁
        and the module's largest |z| (bold above the threshold)."""
        features = [f for f in FEATURES if any(f in m.features for m in self.profile.modules.values())]
        header = ["module", *features, "σ1", "max abs z"]
        rows = [[name, *[self._cell(m, f) for f in features], _number(m.top_singular_values[0]), self._worst_cell(name)]
                for name, m in self.profile.modules.items()]
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                          *["| " + " | ".join(r) + " |" for r in rows]])

    def plot(self, path: str | Path) -> Path:
        """A PNG: per module, this adapter's relative norm (its norm without the base) against the
        references' median and min-max band, and a heatmap of the z-scores (features x modules,
        grey where not compared)."""
        names = list(self.profile.modules)
        fig, (top, bottom) = pyplot().subplots(2, 1, figsize=(min(40.0, 3.0 + 0.3 * len(names)), 7.0),
                                               sharex=True, layout="constrained")
        self._draw_norms(top, names)
        self._draw_z(fig, bottom, names)
        bottom.set_xticks(range(len(names)), _short_names(names), rotation=90, fontsize=7)
        fig.suptitle(f"static weight audit against {self.references} references"
                     + (f"\nscore {self.score:.1f}: {self.worst[1]} of {self.worst[0]}" if self.worst else ""),
                     fontsize=10)
        return save_png(fig, path)

    def _cell(self, module: ModuleProfile, feature: str) -> str:
        if feature not in module.features:
            return "-"
        z = self.z.get(module.name, {}).get(feature)
        return _number(module.features[feature]) + ("" if z is None else f" ({z:+.1f})")

    def _worst_cell(self, name: str) -> str:
        scores = self.z.get(name)
        if not scores:
            return "-"
        feature = max(scores, key=lambda f: abs(scores[f]))
        cell = f"{abs(scores[feature]):.1f} ({feature})"
        return f"**{cell}**" if abs(scores[feature]) > self.z_threshold else cell

    def _draw_norms(self, ax: Any, names: list[str]) -> None:
        modules = self.profile.modules
        feature = "relative_norm" if all("relative_norm" in modules[n].features for n in names) else "norm"
        bands = {i: s for i, n in enumerate(names) if (s := self.reference_stats.get(n, {}).get(feature))}
        if bands:
            ax.vlines(list(bands), [s.low for s in bands.values()], [s.high for s in bands.values()], lw=6,
                      color="tab:blue", alpha=0.3, label="references (min-max)")
            ax.scatter(list(bands), [s.median for s in bands.values()], marker="_", s=150, color="tab:blue",
                       label="reference median")
        values = [modules[n].features[feature] for n in names]
        flagged = {f.subject for f in self.findings if f.severity == "warning" and f.subject in self.z}
        ax.scatter(range(len(names)), values, c=["tab:red" if n in flagged else "black" for n in names], zorder=3,
                   s=18, label="this adapter (red: flagged)")
        if min([*values, *(s.low for s in bands.values())]) > 0:  # a log scale drops zeros (untrained modules)
            ax.set_yscale("log")
        ax.set_ylabel(feature.replace("_", " "))
        ax.legend(fontsize=7, loc="best")

    def _draw_z(self, fig: Any, ax: Any, names: list[str]) -> None:
        features = [f for f in FEATURES if any(f in m.features for m in self.profile.modules.values())]
        values = torch.tensor([[self.z.get(n, {}).get(f, math.nan) for n in names] for f in features])
        cmap = pyplot().get_cmap("RdBu_r").with_extremes(bad="lightgrey")
        limit = 2 * self.z_threshold
        image = ax.imshow(values.numpy(), aspect="auto", cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_yticks(range(len(features)), [f.replace("_", " ") for f in features], fontsize=8)
        if not self.z:
            ax.text(0.5, 0.5, f"no z-scores: {self.references} references (need {MIN_REFERENCES})",
                    transform=ax.transAxes, ha="center", va="center")
        fig.colorbar(image, ax=ax, label=f"robust z (clipped at ±{limit:g})")


def weight_profile(adapter: Source, base: BaseWeights = None, *,
                   name: str | None = None, top_k: int = DEFAULT_TOP_K) -> WeightProfile:
    """The features of every module `adapter` changes (module doc).

    `adapter`: a PEFT-format folder (what `splice.save` writes for LoRA-shaped adapters), a model
    with the adapter attached (`name` picks it; a `(model, name)` pair also does). `base`: the
    base model or a {module name: weight} mapping; without it `relative_norm` is absent and a DoRA
    adapter is refused (its change depends on W0). A live model can be its own base while its
    adapters are unmerged.

    A module the adapter trains in full (`train_also`: a classifier or LM head, the likeliest
    place for a backdoor) is profiled too, by its weight's change, the adapter's copy minus the
    base's original: a full-rank change, decomposed by a dense SVD (for a large vocabulary's LM
    head, seconds to a minute). Without `base` it cannot be, and `notes` say so.
    """
    if top_k < 1:
        raise SpliceError(f"top_k must be >= 1, got {top_k}")
    if isinstance(adapter, tuple):
        adapter, name = adapter
    _check_unmerged(base)
    state = adapter_state(adapter, name)
    modules = {}
    ordered = sorted(state.modules.items(), key=lambda item: _in_layer_order(item[0]))
    for module_name, update in progress.track(ordered, "profile weight changes"):
        modules[module_name] = module_profile(module_name, update, _base_of(base, module_name, update), top_k)
    heads, notes = _head_profiles(state.head_tensors, base, top_k)
    return WeightProfile(modules | heads, notes)


def module_profile(name: str, update: ModuleUpdate, weight: torch.Tensor | None = None,
                   top_k: int = DEFAULT_TOP_K) -> ModuleProfile:
    """The features of one module's change; `weight` is its base weight W0 (canonical layout)."""
    _check_finite(name, update)
    return _profile(name, _singular_values(update, weight), weight, update.scaled_bias(), top_k)


def _profile(name: str, s: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             top_k: int) -> ModuleProfile:
    """A module's features from the singular values `s` of its change, its base weight (for the
    relative norm) and its bias change."""
    energy = s.square().sum()
    norm = float(energy.sqrt())
    features = {"norm": norm, "spectral_share": float(s[0].square() / energy) if energy > 0 else 0.0,
                "effective_rank": entropy_rank(s)}
    if weight is not None:
        features["relative_norm"] = norm / float(weight.detach().double().norm())
    if bias is not None:
        features["bias_norm"] = float(bias.double().norm())
    ordered = {f: features[f] for f in FEATURES if f in features}
    return ModuleProfile(name, ordered, [float(v) for v in s[:top_k]])


def _head_profiles(tensors: dict[str, torch.Tensor], base: BaseWeights,
                   top_k: int) -> tuple[dict[str, ModuleProfile], dict[str, str]]:
    """Profiles of the weight matrices of the modules the adapter trains in full (`tensors`,
    keyed "classifier.weight"), and a note per module on how it was profiled or why not."""
    profiles, notes = {}, {}
    paths = [key.removesuffix(".weight") for key, t in tensors.items() if key.endswith(".weight") and t.dim() >= 2]
    for path in paths:
        found = _head_profile(path, tensors, base, top_k)
        if isinstance(found, str):
            notes[path] = f"trained in full by the adapter (train_also), not profiled: {found}"
            continue
        profiles[path] = found
        notes[path] = ("trained in full by the adapter (train_also): profiled by its weight's change, the adapter's "
                       "copy minus the base's original (a full-rank change, unlike a low-rank update's)")
    profiled = {f"{path}.{part}" for path in paths for part in ("weight", "bias")}
    if rest := sorted(key for key in tensors if key not in profiled):
        notes["heads"] = f"tensors of modules trained in full, not weight matrices, not profiled: {', '.join(rest)}"
    return profiles, notes


def _head_profile(path: str, tensors: dict[str, torch.Tensor], base: BaseWeights, top_k: int) -> ModuleProfile | str:
    """The profile of module `path`'s change (the adapter's copy minus the base's original), or
    why there is none."""
    copy = tensors[f"{path}.weight"]
    if (problem := nonfinite_problem(copy)) is not None:
        raise SpliceError(f"the adapter's copy of {path}.weight (trained in full) {problem}; it cannot be profiled")
    original = _original_head(base, path)
    if original is None:
        return "no base weights were given to take its change from" if base is None else "the base has no such module"
    weight = _matching(original[0], copy)
    if weight is None:
        return f"the base's weight has shape {tuple(original[0].shape)}, the adapter's copy {tuple(copy.shape)}"
    change = copy.detach().double() - weight.detach().double()
    bias, base_bias = tensors.get(f"{path}.bias"), original[1]
    bias_change = None if bias is None or base_bias is None else bias.double() - base_bias.detach().double()
    return _profile(path, torch.linalg.svdvals(change.flatten(1)), weight, bias_change, top_k)


def _original_head(base: BaseWeights, path: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The base's own (weight, bias) of module `path`, which an adapter trains in full: a model's
    original tensors (not those of the adapter copy it computes with now), or a mapping's weight;
    None without a base or where it has no such module."""
    if base is None:
        return None
    if not isinstance(base, nn.Module):
        return (base[path], None) if path in base else None
    copies = next((c for c in all_head_copies(base) if path == c.path or path.startswith(c.path + ".")), None)
    try:
        module = base.get_submodule(path) if copies is None else copies.original.get_submodule(
            path.removeprefix(copies.path).removeprefix("."))
    except AttributeError:
        return None
    weight = getattr(module, "weight", None)
    return (weight, getattr(module, "bias", None)) if isinstance(weight, torch.Tensor) else None


def _matching(weight: torch.Tensor, copy: torch.Tensor) -> torch.Tensor | None:
    """The base `weight` in the copy's layout (a mapping holds a transposed Conv1D weight
    transposed back); None where their shapes do not match."""
    if weight.shape == copy.shape:
        return weight
    return weight.T if weight.dim() == 2 and weight.T.shape == copy.shape else None


def static_audit(adapter: Reference, base: BaseWeights = None,
                 references: Iterable[Reference] = (), *, name: str | None = None, top_k: int = DEFAULT_TOP_K,
                 z_threshold: float = DEFAULT_Z_THRESHOLD) -> StaticAudit:
    """Profile `adapter` (or take its profile) and compare it with the `references`' (module doc).

    References are profiled like the adapter, with the same `base` (not `name`: that picks the
    audited adapter; pass a `(model, name)` pair for a reference among several in one model).
    """
    if not z_threshold > 0:
        raise SpliceError(f"z_threshold must be > 0, got {z_threshold}")
    profile = _profile_of(adapter, base, name, top_k)
    refs = [_reference_profile(r, base, top_k) for r in progress.track(list(references), "profile references")]
    if len(refs) < MIN_REFERENCES:
        note = Finding("static", "note", "references",
                       f"{len(refs)} reference adapter(s) given; robust z-scores need at least {MIN_REFERENCES} "
                       "benign adapters of the same kind, so no module was compared or flagged")
        return StaticAudit(profile, len(refs), {}, None, None, [note, *_profile_notes(profile)], z_threshold)
    stats = reference_stats(profile, refs)
    z = z_scores(profile, stats)
    score, worst = _worst(z)
    calibration = leave_one_out_scores(refs)
    findings = [*_flags(profile, z, stats, z_threshold), *_profile_notes(profile),
                *_coverage_notes(profile, refs, stats), _summary(z, len(refs), score, worst, calibration, z_threshold)]
    return StaticAudit(profile, len(refs), z, score, worst, findings, z_threshold, stats, calibration)


def reference_stats(profile: WeightProfile, references: list[WeightProfile]) -> dict[str, dict[str, ReferenceStats]]:
    """Median, MAD and range of each feature of each of `profile`'s modules over the references
    that have it, where at least `MIN_REFERENCES` do."""
    out: dict[str, dict[str, ReferenceStats]] = {}
    for name, module in profile.modules.items():
        for feature in module.features:
            values = [r.modules[name].features[feature] for r in references
                      if name in r.modules and feature in r.modules[name].features]
            if len(values) >= MIN_REFERENCES:
                out.setdefault(name, {})[feature] = ReferenceStats.of(values)
    return out


def z_scores(profile: WeightProfile, stats: dict[str, dict[str, ReferenceStats]]) -> dict[str, dict[str, float]]:
    """z[module][feature] for every feature `stats` has references for."""
    return {m: {f: stats[m][f].z(v) for f, v in module.features.items() if f in stats[m]}
            for m, module in profile.modules.items() if m in stats}


def leave_one_out_scores(references: list[WeightProfile]) -> list[float | None]:
    """Each reference's score (largest |z|) against the others: how far benign adapters of this
    set stray by the same measure, i.e. how often a small set flags a benign adapter (module
    doc); None where too few others adapt its modules."""
    scores = []
    for i, reference in enumerate(references):
        others = references[:i] + references[i + 1:]
        scores.append(_worst(z_scores(reference, reference_stats(reference, others)))[0])
    return scores


# -- profiles ------------------------------------------------------------------------------------


def _reference_profile(source: Reference, base: BaseWeights, top_k: int) -> WeightProfile:
    """A reference's profile; its errors say which reference (one of another base, say)."""
    try:
        return _profile_of(source, base, None, top_k)
    except SpliceError as err:
        label = source if isinstance(source, (str, Path)) else type(source).__name__
        raise type(err)(f"reference {label}: {err} (a reference must adapt the same base model)") from None


def _profile_of(source: Reference, base: BaseWeights, name: str | None, top_k: int) -> WeightProfile:
    return source if isinstance(source, WeightProfile) else weight_profile(source, base, name=name, top_k=top_k)


def _singular_values(update: ModuleUpdate, weight: torch.Tensor | None) -> torch.Tensor:
    """σ of the true change, descending, float64: from the factors for LoRA, dense for DoRA."""
    if update.magnitude is not None:
        return torch.linalg.svdvals(update.effective_matrix(weight))
    return product_svd(update.B.flatten(1).double() * update.scaling, update.A.flatten(1).double())[1]


def _check_finite(name: str, update: ModuleUpdate) -> None:
    for label, tensor in (("lora_A", update.A), ("lora_B", update.B), ("bias", update.bias),
                          ("magnitude", update.magnitude)):
        if tensor is not None and (problem := nonfinite_problem(tensor)) is not None:
            raise SpliceError(f"the adapter's {label} at {name} {problem}; its change cannot be profiled")


def _check_unmerged(base: BaseWeights) -> None:
    """A model whose weights include a merged adapter does not hold W0."""
    if isinstance(base, nn.Module):
        for module_name, _, host in hosts(base):
            if host.merged:
                raise SpliceError(f"the base's weight at {module_name} has adapter(s) {host.merged} merged into it, "
                                  "so it is not the base weight; unmerge them (splice.unmerge) or pass the base model")


def _base_of(base: BaseWeights, name: str, update: ModuleUpdate) -> torch.Tensor | None:
    """Module `name`'s base weight, checked against the change's shape."""
    try:
        weight = base_weight(base, name)
    except (AttributeError, KeyError) as err:
        kind = "model" if isinstance(base, nn.Module) else "mapping"
        raise SpliceError(f"the base {kind} has no module {name!r}, which the adapter changes") from err
    changed = update.out_features * update.A[0].numel()
    if weight is not None and weight.numel() != changed:
        raise ShapeMismatchError(f"the base weight of {name} has shape {tuple(weight.shape)}, but the adapter changes "
                                 f"{update.out_features} x {update.A[0].numel()} numbers")
    return weight


# -- comparison ----------------------------------------------------------------------------------


def _median(x: torch.Tensor) -> float:
    """The median, the mean of the two middle values for an even count (torch's is the lower one)."""
    ordered = x.sort().values
    n = ordered.numel()
    return float(ordered[n // 2]) if n % 2 else float((ordered[n // 2 - 1] + ordered[n // 2]) / 2)


def _worst(z: dict[str, dict[str, float]]) -> tuple[float | None, tuple[str, str] | None]:
    cells = [(abs(v), (m, f)) for m, scores in z.items() for f, v in scores.items()]
    if not cells:
        return None, None
    score, worst = max(cells, key=lambda c: c[0])
    return score, worst


def _flags(profile: WeightProfile, z: dict[str, dict[str, float]], stats: dict[str, dict[str, ReferenceStats]],
           threshold: float) -> list[Finding]:
    """A warning per module with a |z| above `threshold`, its outlying features by |z|: a warning,
    not a flag, since weight outliers are no validated backdoor detector (bench/results/audit.md
    measures how well they separate backdoored from clean adapters) and a small reference set
    puts benign adapters above the threshold too (module doc)."""
    findings = []
    for name, scores in z.items():
        out = sorted((f for f, v in scores.items() if abs(v) > threshold), key=lambda f: -abs(scores[f]))
        if out:
            parts = [f"{f} = {_number(profile.modules[name].features[f])} against a reference median of "
                     f"{_number(stats[name][f].median)} (z = {scores[f]:+.1f})" for f in out]
            message = "weight change unlike the references': " + "; ".join(parts) + f" (|z| > {threshold:g})"
            findings.append(Finding("static", "warning", name, message))
    return findings


def _profile_notes(profile: WeightProfile) -> list[Finding]:
    """The profile's notes (modules trained in full: how they were profiled, or why not) as findings."""
    return [Finding("static", "note", subject, message) for subject, message in profile.notes.items()]


def _coverage_notes(profile: WeightProfile, refs: list[WeightProfile],
                    stats: dict[str, dict[str, ReferenceStats]]) -> list[Finding]:
    """Notes for what was not compared: modules too few references adapt, features too few have,
    and modules the references adapt that this adapter leaves alone."""
    notes = []
    for name, module in profile.modules.items():
        if name not in stats:
            count = sum(name in r.modules for r in refs)
            notes.append(Finding("static", "note", name, f"adapted by {count} of {len(refs)} references (at least "
                                 f"{MIN_REFERENCES} needed); this module's change was not compared"))
            continue
        if missing := [f for f in module.features if f not in stats[name]]:
            notes.append(Finding("static", "note", name, f"feature(s) {', '.join(missing)} present in fewer than "
                                 f"{MIN_REFERENCES} references' profiles of this module; not compared"))
    extra = sorted({m for r in refs for m in r.modules} - set(profile.modules))
    if extra:
        notes.append(Finding("static", "note", "modules", f"{len(extra)} module(s) adapted by references but not by "
                             f"this adapter: {', '.join(extra)}"))
    return notes


def _summary(z: dict[str, dict[str, float]], references: int, score: float | None, worst: tuple[str, str] | None,
             calibration: list[float | None], threshold: float) -> Finding:
    """What was compared, the largest |z|, and how many references score above the threshold
    against the others (the false-flag rate of this reference set)."""
    compared = sum(len(scores) for scores in z.values())
    where = f"; largest |z| = {score:.2f} ({worst[1]} of {worst[0]})" if worst else ""
    scored = [s for s in calibration if s is not None]
    benign = (f"; against the others, {sum(s > threshold for s in scored)} of {len(scored)} references would "
              f"themselves be flagged (their scores reach {max(scored):.2f})") if scored else (
        f"; the references could not be scored against each other (each needs {MIN_REFERENCES} others: give "
        f"{MIN_REFERENCES + 1} or more to learn how often this set warns on a benign adapter)")
    return Finding("static", "note", "weights", f"{compared} features of {len(z)} modules compared with "
                   f"{references} reference adapters{where}{benign}")


# -- text ----------------------------------------------------------------------------------------


def _in_layer_order(name: str) -> list[tuple[int, int | str]]:
    """A sort key that puts layers.2 before layers.10 (a file's keys come sorted as text)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


def _number(value: float) -> str:
    return f"{value:.4g}"


def _short_names(names: list[str]) -> list[str]:
    """Module names without the dotted prefix all of them share ("model.layers.")."""
    parts = [n.split(".") for n in names]
    shared = min(len(os.path.commonprefix(parts)), *(len(p) - 1 for p in parts)) if len(parts) > 1 else 0
    return [".".join(p[shared:]) for p in parts]

