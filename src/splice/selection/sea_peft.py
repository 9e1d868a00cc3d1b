"""SEA-PEFT: choose which adapters to train by switching candidates off and on during training and
measuring what each is worth per parameter (Ly & Nguyen, "Self-Auditing Parameter-Efficient
Fine-Tuning", arXiv 2603.05822).

The candidate space is sites x forms x hyperparameters that splice already has, e.g. the query,
value and FFN projections of every layer x {LoRA r=4, 8, 16; DoRA; DiaBlo} plus a LoReFT
intervention per layer. Each candidate (a *unit*) is attached under its own adapter name; the
active ones train together in one `Trainer` (the others as its companions: their parameters
are in its optimizer but, inactive, they get no gradient, so AdamW leaves them alone).

    warm-up: train the initial set (nothing but the head by default, or a seeded random fill)
    every `audit_every` steps, audit ~20% of the units (`sea_peft_allocation.audit_sample`):
        active unit:    delta = metric(set) - metric(set without it)      (one evaluation)
        inactive unit:  train it alone for `probe_steps` steps on top of the set (everything
                        else frozen), delta = metric(set + it) - metric(set); it keeps what it
                        learned for later audits
        density = delta * reference / params   (reference: the median unit's parameters, so
                  that a typical unit's density is its change of the metric)
        update EMA, robust score, uncertainty; allocate under the budget with hysteresis and
        guard cycles (`sea_peft_allocation.allocate`); switch
    after the last audit: export the active set as adapter configs (`export`) and fine-tune
    them from a fresh model (`finetune`).

The metric is the validation set's negative loss by default ("loss"), or its accuracy: the loss
is continuous, so switching one small unit off moves it even when no prediction flips (with a
few hundred validation rows accuracy moves in steps of 0.3-1 points and most units would
measure exactly 0); both come from the same evaluation pass, so they cost the same.

The budget bounds the parameters of the allocated set at every audit and of what is exported,
counted as splice counts them (`splice.summary`); the classification head, trained in full in
every configuration, is not a unit and is not counted. A probe trains one unit alone, so the
trainable parameters never exceed the budget either when that unit fits it; units larger than
the budget are left out of the search (the report lists them).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console
from torch import nn

import splice
from splice.core.config import AdapterConfig
from splice.core.errors import ConfigError, SpliceError
from splice.core.host import hosts
from splice.core.registry import config_class, config_from_dict
from splice.core.targets import named_base_modules, resolve_targets
from splice.core.validation import did_you_mean, show, yaml_number
from splice.selection.sea_peft_allocation import (
    Scores,
    Unit,
    allocate,
    audit_sample,
    audit_size,
    initial_fill,
)

Metric = Literal["loss", "accuracy"]
# Keys that say where an adapter goes: the search sets them, a family may not.
PLACEMENT_KEYS = ("targets", "exclude", "layers", "layers_pattern", "train_also")


def default_families() -> list[dict[str, Any]]:
    return [{"method": "lora", "r": [4, 8, 16]}]


@dataclass
class SeaPeftConfig:
    """The candidate space and the audit loop's settings.

    Attributes:
        budget: the most adapter parameters the chosen set may hold (splice's count; the head
            trained in full is not counted).
        sites: where units go: "all-linear" (every Linear but the output head, each module its
            own site), or a mapping of site names to targets (module names, suffixes or a regex,
            as an adapter's `targets`), e.g. {q: [query], ffn: [intermediate.dense]}.
        layers: with a mapping of sites, one site per listed layer index and site name
            ("L3.q"); with "all-linear", only the modules of these layers. Block forms (LoReFT)
            get one site per transformer layer (of these layers, when given).
        families: the forms, each an adapter mapping without placement keys; a key with a list
            value is the family's candidates (`{method: lora, r: [4, 8, 16]}` is three units per
            site). LoRA-shaped forms without `alpha` get alpha = 2r. `name` names a family (two
            LoRA families with different options, say); default the method.
        warmup: training steps before the first audit.
        audit_every: training steps between audits (probe steps not counted).
        audits: how many audits the search takes; it ends with the last one.
        audit_fraction: the share of units each audit measures (at least one).
        uniform_audits: audits that draw their sample uniformly; later ones weight it by
            uncertainty and coverage. Units never audited always come first.
        probe_steps: training steps an inactive unit gets, alone, before it is measured.
        ema, window, iqr_weight, uncertainty_weight: the score's smoothing (0.93), the EMA
            values the robust score reads (5), its IQR weight (0.25) and the uncertainty bonus
            of the allocation's value (0.5).
        add_above, drop_below: the hysteresis: an inactive unit comes in above `add_above`
            (0), an active one goes only below `drop_below` (-0.02), in metric units per
            reference-sized unit.
        guard: audits during which a unit just switched keeps its state (3).
        metric: "loss" (the negative validation loss) or "accuracy" (classification).
        eval_examples: validation rows each audit measurement evaluates (None: the training
            config's validation rows).
        initial: the set trained during warm-up: "empty" (no unit: the warm-up trains the heads
            alone, and the first audit probes units from nothing), "fill" (a seeded random fill
            of the budget, one unit per site and family), or a list of unit names.
        reference_params: the parameters that make density comparable to the thresholds
            (None: the median unit's).
        seed: the audit sampling's and initial fill's seed (None: the training config's).
    """

    budget: int
    sites: str | dict[str, str | list[str]] = "all-linear"
    layers: list[int] | None = None
    families: list[dict[str, Any]] = field(default_factory=default_families)
    warmup: int = 10
    audit_every: int = 10
    audits: int = 5
    audit_fraction: float = 0.2
    uniform_audits: int = 3
    probe_steps: int = 2
    ema: float = 0.93
    window: int = 5
    iqr_weight: float = 0.25
    uncertainty_weight: float = 0.5
    add_above: float = 0.0
    drop_below: float = -0.02
    guard: int = 3
    metric: Metric = "loss"
    eval_examples: int | None = None
    initial: str | list[str] = "empty"
    reference_params: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        elif isinstance(self.layers, range):
            self.layers = list(self.layers)
        self.validate()

    def validate(self) -> None:
        def positive_int(name: str, value: Any, zero: bool = False) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
                raise _error(name, f"{name} must be an integer >= {0 if zero else 1}, got {show(value)}")

        positive_int("budget", self.budget)
        for name in ("audit_every", "audits"):
            positive_int(name, getattr(self, name))
        for name in ("warmup", "probe_steps", "uniform_audits", "guard"):
            positive_int(name, getattr(self, name), zero=True)
        positive_int("window", self.window)
        for name in ("eval_examples", "reference_params"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if self.seed is not None:
            positive_int("seed", self.seed, zero=True)
        if not _number(self.audit_fraction) or not 0 < self.audit_fraction <= 1:
            raise _error("audit_fraction", f"audit_fraction must be in (0, 1], got {show(self.audit_fraction)}")
        if not _number(self.ema) or not 0 <= self.ema < 1:
            raise _error("ema", f"ema must be in [0, 1), got {show(self.ema)}")
        for name in ("iqr_weight", "uncertainty_weight", "add_above", "drop_below"):
            value = getattr(self, name)
            if not _number(value) or not math.isfinite(value):
                raise _error(name, f"{name} must be a number, got {show(value)}")
        if self.drop_below > self.add_above:
            raise _error("drop_below", f"drop_below ({self.drop_below}) must not be above add_above "
                         f"({self.add_above}): an active unit would be dropped at values that let it in")
        if self.metric not in ("loss", "accuracy"):
            raise _error("metric", f"metric must be 'loss' or 'accuracy', got {show(self.metric)}")
        if not (self.sites == "all-linear" or (isinstance(self.sites, dict) and self.sites)):
            raise _error("sites", "sites must be 'all-linear' or a mapping of site names to targets, e.g. "
                         f"{{q: [query], v: [value]}}; got {show(self.sites)}")
        if self.layers is not None and (not isinstance(self.layers, list) or not self.layers or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers)):
            raise _error("layers", f"layers must be a non-empty list of layer indices, got {show(self.layers)}")
        if isinstance(self.initial, str) and self.initial not in ("fill", "empty"):
            raise _error("initial", "initial must be 'empty', 'fill' or a list of unit names, got "
                         f"{show(self.initial)}")
        if not isinstance(self.families, list) or not self.families:
            raise _error("families", "families must be a non-empty list of adapter mappings, got "
                         f"{show(self.families)}")
        for family in self.families:
            family_candidates(family)  # refuses bad families now, not after the model has loaded

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> SeaPeftConfig:
        """From a YAML mapping (`sea_peft:` of a config file); None-valued overrides are ignored.
        Numbers in exponent notation that PyYAML leaves strings (`-2e-2`) are read as numbers,
        as TrainConfig reads them."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"sea_peft must be a mapping of settings, got {show(data)}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                raise _error(key, f"unknown sea_peft setting {key!r}{did_you_mean(key, known)}")
        merged = {k: yaml_number(v) for k, v in {**data, **{k: v for k, v in overrides.items()
                                                             if v is not None}}.items()}
        if "budget" not in merged:
            raise _error("budget", "sea_peft needs a parameter budget: budget: N (or --budget N)")
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _selection_refused() -> ConfigError:
    err = ConfigError("selection: SEA-PEFT's search cannot run with a gradient rule (selection: {name: ...}): its "
                      "probes freeze and switch adapters on and off, which a rule that makes the gradients itself "
                      "(per-sample, over every trained parameter) does not expect; remove selection")
    err.key = "selection"
    return err


def _number(value: Any) -> bool:
    """An int or float, not a bool (True would pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _error(key: str, message: str) -> ConfigError:
    err = ConfigError(f"sea_peft: {message}")
    err.key = key
    return err


# ----------------------------------------------------------------------------- candidate space


def family_candidates(family: Mapping[str, Any]) -> tuple[str, type[AdapterConfig], list[dict[str, Any]]]:
    """A family mapping's name, config class and candidate mappings (the product of its list
    values), checked; LoRA-shaped candidates without alpha get alpha = 2r."""
    if not isinstance(family, Mapping) or "method" not in family:
        raise _error("families", f"a family must be an adapter mapping with a 'method' key, e.g. "
                     f"{{method: lora, r: [4, 8]}}; got {show(family)}")
    options = dict(family)
    name = str(options.pop("name", options["method"]))
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        raise _error("families", f"family name {name!r} must be an identifier (letters, digits, _ or -)")
    cls = config_class(options["method"], ConfigError)
    placed = sorted(set(options) & set(PLACEMENT_KEYS))
    if placed:
        raise _error("families", f"family {name!r} sets {placed}: the search places the units itself "
                     "(use sites and layers)")
    grid = {k: v for k, v in options.items() if isinstance(v, list)}
    for key, values in grid.items():
        if not values:
            raise _error("families", f"family {name!r}: {key} lists no candidates")
    fixed = {k: v for k, v in options.items() if k not in grid}
    candidates = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values, strict=True))
        mapping = {**fixed, **point}
        if _lora_shaped(cls) and "alpha" not in mapping and "r" in mapping:
            mapping["alpha"] = 2 * mapping["r"]
        try:
            config_from_dict({**mapping, "targets": ["_check"]} if cls.site == "layer" else mapping, error=ConfigError)
        except ConfigError as err:
            raise _error("families", f"family {name!r}: {err}") from None
        candidates.append({"label": "_".join(f"{k}{v}" for k, v in point.items()), "mapping": mapping})
    return name, cls, candidates


def _lora_shaped(cls: type[AdapterConfig]) -> bool:
    """Forms whose rank and scale can vary per module in one config (LoRA, DoRA, ...)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {"r", "alpha", "rank_pattern", "alpha_pattern"} <= names


def candidate_specs(model: nn.Module, space: SeaPeftConfig) -> list[Unit]:
    """Every unit of the space on `model`, with its adapter mapping (params still 0: counted
    once attached, `attach_units`). Names are `u<index>_<site>_<family>_<candidate>`."""
    layer_sites = _layer_sites(model, space)
    block_sites: list[tuple[str, dict[str, Any]]] | None = None
    units: list[Unit] = []
    for family in space.families:
        name, cls, candidates = family_candidates(family)
        if cls.site == "block":
            if block_sites is None:
                probe = config_from_dict({**candidates[0]["mapping"], "layers": space.layers}, error=ConfigError)
                blocks = [module for module, _ in resolve_targets(model, probe)]
                block_sites = [(_block_label(module), {"targets": [module]}) for module in blocks]
            sites = block_sites
        else:
            sites = layer_sites
        for site, where in sites:
            for candidate in candidates:
                label = "_".join(part for part in (site, name, candidate["label"]) if part)
                units.append(Unit(f"u{len(units):03d}_{_identifier(label)}", site, name, 0,
                                  {**candidate["mapping"], **where}))
    return units


def _layer_sites(model: nn.Module, space: SeaPeftConfig) -> list[tuple[str, dict[str, Any]]]:
    if space.sites == "all-linear":
        probe = config_from_dict({"method": "lora", "targets": "all-linear", "layers": space.layers}, error=ConfigError)
        return [(module, {"targets": [module]}) for module, _ in resolve_targets(model, probe)]
    sites = []
    for layer in space.layers or [None]:
        for site, targets in space.sites.items():
            label = site if layer is None else f"L{layer}.{site}"
            sites.append((label, {"targets": targets} | ({} if layer is None else {"layers": [layer]})))
    return sites


def _block_label(module: str) -> str:
    found = re.search(r"\.(\d+)$", module)
    return f"L{found[1]}.block" if found else module


def _identifier(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_")


def attach_units(model: nn.Module, units: Sequence[Unit]) -> list[Unit]:
    """Attach every unit, trainable, under its name; the units with their parameter counts
    (splice's count, `splice.summary`)."""
    for unit in units:
        splice.attach(model, config_from_dict(unit.config, error=ConfigError), unit.name)
    counts = {a.name: a.parameters for a in splice.summary(model).adapters}
    return [dataclasses.replace(unit, params=counts[unit.name]) for unit in units]


def unit_modules(model: nn.Module) -> dict[str, list[str]]:
    """Adapter name -> the modules it is attached to, in model order."""
    out: dict[str, list[str]] = {}
    for module, _, host in hosts(model):
        for name in host:
            out.setdefault(name, []).append(module)
    return out


# -------------------------------------------------------------------------------------- export


def export(units: Sequence[Unit], chosen: Sequence[str], modules: Mapping[str, Sequence[str]],
           all_modules: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The chosen units as ordinary adapter mappings, one per family (and per distinct option
    set within it), each with its modules as explicit `targets`. A LoRA-shaped family is one
    mapping whatever its ranks: the most common rank and alpha are `r` and `alpha`, the others
    per module in `rank_pattern` / `alpha_pattern` (keys that match exactly one of
    `all_modules`, the model's module names, by PEFT's rule). Names are the family names
    (`<family>-2`, ... for a second option set); the order is the families'."""
    from splice.methods.lora import exact_pattern

    by_name = {u.name: u for u in units}
    unknown = sorted(set(chosen) - set(by_name))
    if unknown:
        raise SpliceError(f"chosen units {unknown} are not among the candidates")
    groups: dict[tuple[str, str], list[Unit]] = {}
    for u in sorted((by_name[n] for n in chosen), key=lambda u: units.index(u)):
        cls = config_class(u.config["method"], ConfigError)
        options = {k: v for k, v in u.config.items() if k not in PLACEMENT_KEYS
                   and not (_lora_shaped(cls) and k in ("r", "alpha"))}
        groups.setdefault((u.family, repr(sorted(options.items()))), []).append(u)
    out: dict[str, dict[str, Any]] = {}
    for (family, _), members in groups.items():
        name = family if family not in out else next(f"{family}-{i}" for i in itertools.count(2)
                                                     if f"{family}-{i}" not in out)
        first = members[0].config
        cls = config_class(first["method"], ConfigError)
        mapping = {k: v for k, v in first.items() if k not in PLACEMENT_KEYS}
        targets = [m for u in members for m in modules[u.name]]
        if len(set(targets)) != len(targets):
            raise SpliceError(f"family {family!r}: two chosen units share a module; one unit per site and family")
        mapping["targets"] = targets
        if _lora_shaped(cls):
            ranks = {m: u.config.get("r", _default(cls, "r")) for u in members for m in modules[u.name]}
            alphas = {m: u.config.get("alpha", _default(cls, "alpha")) for u in members for m in modules[u.name]}
            r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
            mapping["r"], mapping["alpha"] = r, alpha
            names = list(all_modules) or targets
            rank_pattern = exact_pattern({m: v for m, v in ranks.items() if v != r}, names)
            alpha_pattern = exact_pattern({m: v for m, v in alphas.items() if v != alpha}, names)
            if rank_pattern:
                mapping["rank_pattern"] = rank_pattern
            if alpha_pattern:
                mapping["alpha_pattern"] = alpha_pattern
        out[name] = mapping
    return out


def _default(cls: type[AdapterConfig], key: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == key)


def _most_common(values: Any) -> Any:
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


# ------------------------------------------------------------------------------------ the loop


@dataclass
class Selection:
    """What a search found: the candidates, the chosen units and their exported configs, the
    audit log, and how long it took."""

    units: list[Unit]
    chosen: list[str]
    budget: int
    adapters: dict[str, dict[str, Any]]
    audits: list[dict[str, Any]]
    left_out: list[dict[str, Any]]
    reference_params: int
    steps: dict[str, int]
    seconds: float

    @property
    def params(self) -> int:
        by_name = {u.name: u for u in self.units}
        return sum(by_name[n].params for n in self.chosen)

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "params": self.params, "chosen": self.chosen, "adapters": self.adapters,
                "reference_params": self.reference_params, "steps": self.steps, "seconds": self.seconds,
                "units": [{"name": u.name, "site": u.site, "family": u.family, "params": u.params,
                           "config": u.config} for u in self.units],
                "left_out": self.left_out, "audits": self.audits}


class Search:
    """The audit loop on one model: attach the units, train, audit, switch; `run()` gives the
    `Selection`. Drives a public `Trainer` (its run folder is `config.output_dir`, where it
    writes its config and its first unit's adapter; the search's own report is the caller's).

    `heads`: modules trained in full along with the units (default: the classification head of
    a classification task, none for a causal LM). `on_audit(entry)` is called after each audit.
    A config with a gradient rule (`selection`, e.g. GAST) is refused: the probes freeze and
    switch units, and inactive units must get no gradient at all, which such a rule does not
    know.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: Any, space: SeaPeftConfig, *, splits: Any,
                 heads: Sequence[str] | None = None, console: Console | None = None,
                 on_audit: Callable[[dict[str, Any]], None] | None = None) -> None:
        from splice.train import Trainer, tasks

        if getattr(config, "selection", None) is not None:
            raise _selection_refused()
        if space.metric == "accuracy" and config.task != "classification":
            raise _error("metric", f"metric 'accuracy' needs a classification task; {config.task} has loss only")
        if not splits.validation:
            raise SpliceError("SEA-PEFT measures units on validation rows; the data has none")
        if splice.adapters(model):
            raise SpliceError(f"the model already carries adapters {list(splice.adapters(model))}; "
                              "SEA-PEFT attaches its candidates to a bare model")
        self.started = time.perf_counter()
        self.model, self.space, self.console = model, space, console or Console(quiet=True)
        self.on_audit = on_audit
        seed = config.seed if space.seed is None else space.seed
        self.rng = np.random.default_rng(seed)
        if heads is None:
            heads = [tasks.head_name(model)] if config.task == "classification" else []
        self.heads = [model.get_submodule(h) for h in heads]

        specs = candidate_specs(model, space)
        names = {u.name for u in specs}
        if len(names) != len(specs):
            raise SpliceError("two candidate units got the same name")
        units = attach_units(model, specs)
        self.left_out = [{"name": u.name, "params": u.params} for u in units if u.params > space.budget]
        for row in self.left_out:
            splice.detach(model, row["name"])
        self.units = [u for u in units if u.params <= space.budget]
        if not self.units:
            smallest = min(u.params for u in units)
            raise _error("budget", f"budget {space.budget:,} is below the smallest unit ({smallest:,} parameters)")
        self.by_name = {u.name: u for u in self.units}
        self.modules = unit_modules(model)
        self.all_modules = [n for n, _ in named_base_modules(model) if n]
        self.params = {u.name: [p for _, _, host in hosts(model) if u.name in host
                                for p in host[u.name].parameters()] for u in self.units}
        self.reference = space.reference_params or int(np.median([u.params for u in self.units]))
        self.scores = Scores([u.name for u in self.units], ema=space.ema, window=space.window,
                             iqr_weight=space.iqr_weight, uncertainty_weight=space.uncertainty_weight)
        self.order = [self.units[int(i)].name for i in self.rng.permutation(len(self.units))]
        self.active = self._initial()

        per_audit = audit_size(len(self.units), space.audit_fraction)
        self.regular_steps = space.warmup + (space.audits - 1) * space.audit_every
        budget_steps = self.regular_steps + space.audits * per_audit * space.probe_steps
        search_config = dataclasses.replace(
            config, max_steps=budget_steps, eval_every=budget_steps, checkpoint_every=None,
            early_stopping_patience=None, output_dir=str(config.output_dir))
        search_splits = dataclasses.replace(
            splits, test=[], validation=splits.validation[: space.eval_examples or len(splits.validation)])
        # Every unit active while the trainer builds its optimizer, so that all of them are in it;
        # then the initial set. An inactive unit's parameters get no gradient, which AdamW skips.
        self._activate([u.name for u in self.units])
        first, *others = [u.name for u in self.units]
        self.trainer = Trainer(model, tokenizer, search_config, adapter_name=first, companions=others,
                               heads=list(heads), splits=search_splits, console=Console(quiet=True))
        self._activate(self.ordered(self.active))
        self.steps = {"train": 0, "probe": 0}
        self.evaluations = 0

    def _initial(self) -> set[str]:
        space = self.space
        if space.initial == "empty":
            return set()
        if space.initial == "fill":
            return initial_fill(self.units, space.budget, self.rng)
        unknown = [n for n in space.initial if n not in self.by_name]
        if unknown:
            raise _error("initial", f"initial names units {unknown} that are not candidates; units: "
                         f"{[u.name for u in self.units][:10]}...")
        if sum(self.by_name[n].params for n in space.initial) > space.budget:
            raise _error("initial", "the initial units hold more parameters than the budget")
        return set(space.initial)

    def ordered(self, names: Sequence[str] | set[str]) -> list[str]:
        return [u.name for u in self.units if u.name in set(names)]

    def _activate(self, names: list[str], only: str | None = None) -> None:
        """Exactly `names` active; the heads train. `only`: train that unit alone (the others
        and the heads stay active but frozen), for a probe."""
        splice.activate(self.model, names)
        for head in self.heads:
            head.requires_grad_(only is None)
        if only is not None:
            for name in names:
                if name != only:
                    for p in self.params[name]:
                        p.requires_grad_(False)

    def measure(self) -> float:
        """The metric on the search's validation rows, higher is better."""
        metrics = self.trainer.evaluate(["validation"], generate=False)["validation"]
        self.evaluations += 1
        return -metrics["loss"] if self.space.metric == "loss" else metrics["accuracy"]

    def _step(self, kind: str) -> None:
        entry = self.trainer.step()
        if entry is None:
            reason = self.trainer.stop[1] if self.trainer.stop else "the trainer has no steps left"
            raise SpliceError(f"SEA-PEFT search stopped at step {self.trainer.step_count}: {reason}")
        self.steps[kind] += 1

    def active_params(self) -> int:
        return sum(self.by_name[n].params for n in self.active)

    def audit(self, index: int) -> dict[str, Any]:
        """Measure a sample of units, update their scores, allocate and switch."""
        started = time.perf_counter()
        space, active = self.space, self.ordered(self.active)
        base = self.measure()
        sample = audit_sample(self.order, self.scores, index, space.audit_fraction, space.uniform_audits, self.rng)
        measured = []
        for name in sample:
            unit = self.by_name[name]
            if name in self.active:
                self._activate([n for n in active if n != name])
                delta = base - self.measure()
            else:
                self._activate(self.ordered([*active, name]), only=name)
                for _ in range(space.probe_steps):
                    self._step("probe")
                delta = self.measure() - base
            self._activate(active)
            self.scores.update(name, delta, delta * self.reference / unit.params)
            measured.append({"unit": name, "was_active": name in self.active, **self.scores.row(name)})
        guarded = self.scores.guarded(index, space.guard)
        chosen = allocate(self.units, self.scores.values(), self.active, space.budget, guarded=guarded,
                          add_above=space.add_above, drop_below=space.drop_below)
        on, off = sorted(chosen - self.active), sorted(self.active - chosen)
        values = self.scores.values()
        for name in on + off:
            self.scores.records[name].last_switch = index
        self.active = chosen
        self._activate(self.ordered(chosen))
        entry = {"audit": index, "step": self.trainer.step_count, "train_steps": self.steps["train"],
                 "metric": base, "measured": measured, "on": on, "off": off,
                 "switched_values": {n: values[n] for n in on + off}, "guarded": sorted(guarded),
                 "active": self.ordered(chosen), "active_params": self.active_params(),
                 "seconds": time.perf_counter() - started}
        self.console.print(f"audit {index + 1}/{space.audits} at step {entry['step']}: {space.metric} "
                           f"{abs(base):.4f}, measured {len(measured)}, on {on or '-'}, off {off or '-'}; "
                           f"{len(chosen)} units, {entry['active_params']:,} / {space.budget:,} parameters")
        if self.on_audit is not None:
            self.on_audit(entry)
        return entry

    def train(self, steps: int) -> None:
        """`steps` training steps of the active units and the heads (none when nothing would train:
        no unit active and no head)."""
        if self.active or self.heads:
            for _ in range(steps):
                self._step("train")

    def run(self) -> Selection:
        """Warm-up, then `audits` audits `audit_every` training steps apart; the selection."""
        space = self.space
        audits = []
        self.train(space.warmup)
        for index in range(space.audits):
            if index:
                self.train(space.audit_every)
            audits.append(self.audit(index))
        chosen = self.ordered(self.active)
        return Selection(units=self.units, chosen=chosen, budget=space.budget,
                         adapters=export(self.units, chosen, self.modules, self.all_modules) if chosen else {},
                         audits=audits, left_out=self.left_out, reference_params=self.reference,
                         steps={**self.steps, "evaluations": self.evaluations},
                         seconds=time.perf_counter() - self.started)


# -------------------------------------------------------------------------- from a config, end to end


def search(config: Any, space: SeaPeftConfig, *, console: Console | None = None,
           on_audit: Callable[[dict[str, Any]], None] | None = None) -> Selection:
    """Seed, load `config`'s data and model (its `adapter` is ignored: the search chooses it) and
    run the search; the trainer's folder is `config.output_dir`."""
    from accelerate.utils import set_seed

    from splice.train import tasks
    from splice.train.data import load_splits

    set_seed(config.seed)
    splits = load_splits(config)
    model, tokenizer = tasks.load_model(config, splits.label_names)
    return Search(model, tokenizer, config, space, splits=splits, console=console, on_audit=on_audit).run()


def finetune(config: Any, adapters: Mapping[str, Mapping[str, Any]], *, console: Console | None = None,
             force: bool = False) -> Any:
    """Train the exported adapters from a fresh model with `config` (its `adapter` replaced);
    the `RunResult`.

    One mapping is an ordinary run (`splice.train.run`, what `splice train` does with the
    exported YAML). Several (mixed forms) are attached under their names and trained together
    by one `Trainer` (the first with the classification head, the others as its companions):
    the first is saved to <run>/adapter as usual, each other one to <run>/adapter-<name>. Either
    way the run folder is claimed (locked) first and held for the whole fine-tune: a folder
    another live run holds is refused even with `force`, a non-empty one without it.
    """
    from accelerate.state import PartialState
    from accelerate.utils import parse_flag_from_env, set_seed

    from splice.io.output_dirs import check_output_dir
    from splice.train import Trainer, run, tasks
    from splice.train.checkpoint import claim
    from splice.train.data import load_splits

    if not adapters:
        raise SpliceError("nothing to fine-tune: the search chose no unit (raise the budget, or look at the "
                          "audits: no unit measured a gain)")
    names = list(adapters)
    first = dataclasses.replace(config, adapter=dict(adapters[names[0]]))
    if len(names) == 1:
        return run(first, console=console, force=force)
    check_output_dir(first.output_dir, force)
    # As `splice.train.run` does: the process state as the Accelerator would make it.
    folder = claim(PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")), first.output_dir, force, False)
    try:
        set_seed(first.seed)
        splits = load_splits(first)
        model, tokenizer = tasks.load_model(first, splits.label_names)
        splice.attach(model, tasks.adapter_config(first, model), names[0])
        for name in names[1:]:
            splice.attach(model, config_from_dict(dict(adapters[name]), error=ConfigError), name)
        splice.activate(model, names)
        trainer = Trainer(model, tokenizer, first, adapter_name=names[0], companions=names[1:], splits=splits,
                          console=console)
        result = trainer.fit()
        for name in names[1:]:
            splice.save(model, Path(first.output_dir) / f"adapter-{name}", name, overwrite=True)
        return result
    finally:
        if folder is not None:
            folder.release()
