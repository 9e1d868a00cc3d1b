"""What an adapter directory holds, read from its files alone (no model needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splice.core.errors import SpliceError
from splice.core.registry import config_from_dict
from splice.io import native
from splice.io.adapter_files import WEIGHTS_NAME, read_adapter
from splice.io.peft_config import check_peft_config, portability_problems
from splice.io.peft_keys import is_head_key, split_keys
from splice.methods.lora import pattern_value


@dataclass
class ModuleEntry:
    name: str
    rank: int | None
    parameters: int
    shapes: dict[str, tuple[int, ...]]


@dataclass
class AdapterInfo:
    """Summary of an adapter directory, as `splice info` prints it."""

    path: Path
    format: str
    method: str
    config: dict[str, Any]
    modules: list[ModuleEntry]
    heads: dict[str, int]
    dtypes: list[str]
    file_bytes: int
    base_model: str | None
    portability: list[str] = field(default_factory=list)

    @property
    def adapter_parameters(self) -> int:
        return sum(m.parameters for m in self.modules)


def inspect_adapter(path: str | Path) -> AdapterInfo:
    """Read an adapter directory (PEFT's or splice's format) and describe it."""
    path = Path(path)
    config, tensors = read_adapter(path)
    weights_file = path / WEIGHTS_NAME
    return summarize(path, config, tensors, weights_file.stat().st_size if weights_file.is_file() else 0)


def summarize(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], file_bytes: int) -> AdapterInfo:
    """Describe an adapter from its config and tensors (as read from `path`, or just written there)."""
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    if config.get("format") == native.FORMAT:
        modules = _native_modules(config, tensors)
        heads = _head_sizes({k[len(native.HEAD_PREFIX):]: v for k, v in tensors.items()
                             if k.startswith(native.HEAD_PREFIX)}, config.get("train_also") or [])
        return AdapterInfo(path, "splice", config.get("method", "?"), config.get("config", {}), modules,
                           heads, dtypes, file_bytes, config.get("base_model_name_or_path"),
                           ["not a LoRA in PEFT's format"])
    check_peft_config(config, path)  # typed values, or a message naming the key (a NaN factor is shown)
    factors, head_tensors, _ = split_keys(tensors, config.get("modules_to_save") or [], where=path)
    modules = [
        ModuleEntry(name, pair["A"].shape[0], sum(v.numel() for v in pair.values()),
                    {k: tuple(v.shape) for k, v in pair.items()})
        for name, pair in factors.items()
    ]
    heads = _head_sizes(head_tensors, config.get("modules_to_save") or [])
    ranks = [m.rank for m in modules]
    alphas = [pattern_value(config.get("alpha_pattern") or {}, m.name, config.get("lora_alpha", 8)) for m in modules]
    method = "dora" if config.get("use_dora") else str(config.get("peft_type", "?")).lower()
    return AdapterInfo(path, "peft", method, config, modules, heads, dtypes, file_bytes,
                       config.get("base_model_name_or_path"), portability_problems(ranks, alphas, list(heads)))


def _native_modules(config: dict[str, Any], tensors: dict) -> list[ModuleEntry]:
    try:  # the config lists only non-default fields; the method's defaults give the rest
        rank = getattr(config_from_dict(config.get("config", {})), "r", None)  # None: DiaBlo, conv adapters
    except SpliceError:
        rank = None
    entries = []
    for name in config.get("modules", []):
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        entries.append(ModuleEntry(name, rank, sum(v.numel() for v in own.values()),
                                   {k: tuple(v.shape) for k, v in own.items()}))
    return entries


def _head_sizes(tensors: dict, heads: list[str]) -> dict[str, int]:
    """Parameters per head; a head entry may be a full path or a dotted suffix (as in PEFT)."""
    return {h: sum(v.numel() for k, v in tensors.items() if is_head_key(k, [h])) for h in heads}
