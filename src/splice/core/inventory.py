"""A condensed view of a model's modules: layer-repeated names folded into one row each."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from splice.core.layers import describe
from splice.core.targets import named_base_modules


@dataclass
class ModuleGroup:
    """All modules whose names differ only in their numbers, e.g. `layer.{N}.attention.self.query`."""

    pattern: str
    type_name: str
    shape: str
    names: list[str]
    selected: int = 0


def shape_of(module: nn.Module) -> str:
    info = describe(module)
    if info is None:
        return ""
    arrow = f"{info.in_features}->{info.out_features}"
    return f"{arrow} k{info.kernel_size}" if info.kind == "conv" else arrow


def module_groups(model: nn.Module, selected: set[str], hostable_only: bool = True) -> list[ModuleGroup]:
    """Group modules by name pattern (numbers replaced by N), counting how many are selected."""
    groups: dict[tuple[str, str, str], ModuleGroup] = {}
    for name, module in named_base_modules(model):
        if not name or (hostable_only and describe(module) is None):
            continue
        pattern = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "N", name)
        key = (pattern, type(module).__name__, shape_of(module))
        group = groups.setdefault(key, ModuleGroup(pattern, key[1], key[2], []))
        group.names.append(name)
        group.selected += name in selected
    return list(groups.values())


def shared_prefix(names: list[str]) -> str:
    """The dotted prefix all names share (`bert.encoder.layer.`), so that table rows stay short."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return "".join(f"{p}." for p in parts[0][:shared])
