"""The optimizer a training config names: `optimizer: adamw | loft | loraplus`, or a mapping
with options, e.g. `{name: loraplus, lr_ratio: 16}` or `{name: loft, betas: [0.9, 0.999]}`.

The learning rates, weight decay and clipping threshold are the config's own (`lr`, `head_lr`,
`weight_decay`, `max_grad_norm`) whatever the optimizer; modules trained in full (heads) keep
`head_lr` and take AdamW steps under all three. Biases and normalisation weights take no weight
decay, by transformers' Trainer's rule (`decayed_names`), which HF PEFT users train with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.trainer_pt_utils import get_parameter_names

from splice.core.errors import SpliceError
from splice.optim import LoFT, factor_pairs, loraplus_groups

# transformers' Trainer.get_decay_parameter_names: what a name holds when its parameter takes no decay
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]

# name -> {option: default}; the options a config may give each optimizer
OPTIONS: dict[str, dict[str, Any]] = {
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-8},
    "loft": {"betas": (0.9, 0.999), "eps": 1e-8, "damping": 1e-8},
    "loraplus": {"betas": (0.9, 0.999), "eps": 1e-8, "lr_ratio": 16.0, "lr_embedding": 1e-6},
}


def optimizer_options(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, options with defaults filled in) of a config's `optimizer`; a clear error for an
    unknown name, option or value."""
    options = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = options.pop("name", None)
    if name not in OPTIONS:
        raise SpliceError(f"optimizer {name!r} is not known; optimizers: {', '.join(OPTIONS)} "
                          "(or a mapping such as {name: loraplus, lr_ratio: 16})")
    unknown = sorted(set(options) - set(OPTIONS[name]))
    if unknown:
        raise SpliceError(f"optimizer {name!r} has no option {unknown}; its options: {sorted(OPTIONS[name])}")
    chosen = {**OPTIONS[name], **options}
    betas = chosen["betas"]
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise SpliceError(f"optimizer {name!r}: betas must be two numbers in [0, 1), got {betas!r}")
    chosen["betas"] = tuple(float(b) for b in betas)
    for key in ("eps", "lr_embedding"):
        if key in chosen and not _number(chosen[key], minimum=0.0):
            raise SpliceError(f"optimizer {name!r}: {key} must be a number >= 0, got {chosen[key]!r}")
    for key in ("lr_ratio", "damping"):  # damping: B starts at zero, so BᵀB alone is singular at first
        if key in chosen and not _number(chosen[key], minimum=0.0, strict=True):
            raise SpliceError(f"optimizer {name!r}: {key} must be a positive number, got {chosen[key]!r}")
    return name, chosen


def make_optimizer(spec: str | Mapping[str, Any], model: nn.Module, trained: Mapping[str, nn.Parameter],
                   heads: list[str], *, lr: float, head_lr: float | None, weight_decay: float,
                   max_grad_norm: float | None) -> torch.optim.Optimizer:
    """The optimizer over `trained` (name in `model` -> parameter): the adapter's parameters at
    `lr`, those under the `heads` module paths at `head_lr` (or `lr`)."""
    name, options = optimizer_options(spec)
    decayed = decayed_names(model)
    undecayed = {id(p) for key, p in trained.items() if key not in decayed}
    return _split_decay(_optimizer(name, options, model, trained, heads, lr=lr, head_lr=head_lr,
                                   weight_decay=weight_decay, max_grad_norm=max_grad_norm), undecayed)


def decayed_names(model: nn.Module) -> set[str]:
    """The parameters transformers' Trainer applies weight decay to: all but those of LayerNorm
    modules and those whose names hold "bias" or a norm (`NO_DECAY_PATTERNS`)."""
    return set(get_parameter_names(model, [nn.LayerNorm], NO_DECAY_PATTERNS))


def _split_decay(optimizer: torch.optim.Optimizer, undecayed: set[int]) -> torch.optim.Optimizer:
    """`optimizer` with the `undecayed` parameters of each decaying group moved to a copy of
    that group with weight_decay 0 (before any step, so no state moves)."""
    groups = []
    for group in optimizer.param_groups:
        moved = [p for p in group["params"] if id(p) in undecayed]
        if not group.get("weight_decay") or not moved or group.get("pair"):
            groups.append(group)
            continue
        kept = [p for p in group["params"] if id(p) not in undecayed]
        if kept:
            groups.append({**group, "params": kept})
        groups.append({**group, "params": moved, "weight_decay": 0.0})
    optimizer.param_groups = groups
    return optimizer


def _optimizer(name: str, options: dict[str, Any], model: nn.Module, trained: Mapping[str, nn.Parameter],
               heads: list[str], *, lr: float, head_lr: float | None, weight_decay: float,
               max_grad_norm: float | None) -> torch.optim.Optimizer:
    """The optimizer `name` with its groups (adapter, heads) at the config's rates and decay."""
    prefixes = tuple(f"{head}." for head in heads)
    adapter = {key: p for key, p in trained.items() if not key.startswith(prefixes)}
    in_heads = [p for key, p in trained.items() if key.startswith(prefixes)]
    head_group = [{"params": in_heads, "lr": head_lr or lr, "weight_decay": weight_decay}] if in_heads else []
    betas, eps = options["betas"], options["eps"]
    if name == "loraplus":
        groups = loraplus_groups(model, adapter, lr=lr, lr_ratio=options["lr_ratio"],
                                 lr_embedding=options["lr_embedding"], weight_decay=weight_decay)
        return torch.optim.AdamW(groups + head_group, betas=betas, eps=eps)
    adapter_groups = [{"params": list(adapter.values()), "lr": lr, "weight_decay": weight_decay}] if adapter else []
    if name == "adamw":
        return torch.optim.AdamW(adapter_groups + head_group, betas=betas, eps=eps)
    pairs = factor_pairs(model, adapter.values())
    if not pairs:
        raise SpliceError("optimizer loft needs a LoRA-shaped adapter (trainable A and B on Linear layers: lora, "
                          "dora, ...); this adapter has none. Use optimizer adamw or loraplus")
    paired = {id(p) for pair in pairs for p in (pair.A, pair.B)}
    rest = [p for p in adapter.values() if id(p) not in paired]
    groups = LoFT.groups(pairs, rest, lr=lr, weight_decay=weight_decay) + head_group
    return LoFT(groups, betas=betas, eps=eps, damping=options["damping"], max_grad_norm=max_grad_norm)


def _number(value: Any, minimum: float, strict: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value > minimum if strict else value >= minimum
