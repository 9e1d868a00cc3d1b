"""Adapter states in and out: from an adapter directory or an attached adapter, to a directory.

Merging and compression take "an adapter" in any of the forms a user holds one: a PEFT-format
directory (no model needed), or a model with the adapter attached, whatever its form: LoRA and
DoRA as they are, any other form with an equivalent weight change (TT-LoRA, DiaBlo, ...) as the
exact low-rank factorisation of that change. What they produce is written as a PEFT LoRA
directory, so HF PEFT, vLLM and splice all load it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from splice.core.adapter_state import AdapterState, ModuleUpdate
from splice.core.api import active_adapters, model_state
from splice.core.errors import AdapterFileError, SpliceError
from splice.core.heads import head_tensors
from splice.core.host import hosts
from splice.core.svd import factor_dense
from splice.io import native, peft_format
from splice.io.adapter_files import read_adapter
from splice.io.base_names import base_model_name
from splice.io.files import atomic_directory
from splice.io.manifest import write_manifest
from splice.io.model_card import card_entry, write_cards

AdapterSource = nn.Module | str | Path


def adapter_state(source: AdapterSource, name: str | None = None) -> AdapterState:
    """The adapter in `source` (a directory, or a model and the adapter's `name`) as tensors."""
    if isinstance(source, nn.Module):
        name = pick_adapter(source, name)
        if peft_format.can_write(source, name):
            return peft_format.lora_state(source, name)
        return _factored_state(source, name)
    config, tensors = read_adapter(source)
    if config.get("format") == native.FORMAT:
        raise AdapterFileError(
            f"{source} holds a {config.get('method')!r} adapter in splice's own format; load it onto its base "
            "model (splice.load) and pass the model instead of the directory")
    if "peft_type" not in config:
        raise AdapterFileError(f"{source} is neither a splice nor an HF PEFT adapter")
    state = peft_format.from_peft(config, tensors, source=source)
    if state.residual_init is not None:
        raise AdapterFileError(
            f"{source} is a {state.residual_init} adapter saved without conversion: its factors belong to a base "
            "weight its init changed. Load it onto its base model (splice.load) and pass the model instead")
    return state


def save_state(state: AdapterState, path: str | Path, *, overwrite: bool = False, portable: bool = False) -> Path:
    """Write `state` as a PEFT LoRA directory with its model card, whole or not at all
    (`io.files.atomic_directory`), with its provenance manifest (`io.manifest`; without a model,
    it records no base-weight hash); a non-empty `path` is refused unless `overwrite`."""
    if not state.modules:
        raise SpliceError("the adapter has no modules left to save")
    with atomic_directory(path, overwrite) as folder:
        config, tensors = peft_format.write_state(state, folder, portable=portable)
        write_manifest(folder)  # no model here: files and tensors, not the base weights
        write_cards(folder, [card_entry("default", "", folder, config, tensors)], replacing=Path(path))
    return Path(path)


def pick_adapter(model: nn.Module, name: str | None) -> str:
    """`name`, or the model's only adapter, or its only active one."""
    names = list(model_state(model).adapters)
    if name is not None:
        if name not in names:
            raise SpliceError(f"no adapter named {name!r}; attached: {names}")
        return name
    if len(names) == 1:
        return names[0]
    active = active_adapters(model)
    if len(active) == 1:
        return active[0]
    if not names:
        raise SpliceError("the model has no adapter")
    raise SpliceError(f"several adapters attached {names}; pass name=")


def _factored_state(model: nn.Module, name: str) -> AdapterState:
    """A non-LoRA adapter as the LoRA that has the same weight change, exactly: its own factors
    where it has LoRA's shape (TT-LoRA), else the SVD of its delta weight at numerical rank."""
    record = model_state(model).adapters[name]
    modules: dict[str, ModuleUpdate] = {}
    for module_name, _, host in hosts(model):
        if name not in host:
            continue
        adapter = host[name]
        if not adapter.has_weight_form() or adapter.info.kind != "linear":
            raise SpliceError(f"adapter {name!r} ({record.config.method}) on {module_name} has no low-rank weight "
                              "change to work on (only forms with an equivalent Linear weight change do)")
        modules[module_name] = _update_of(adapter)
    return AdapterState(modules, head_tensors(model, record.heads, name), list(record.heads),
                        base_model=base_model_name(model),
                        fan_in_fan_out=any(host[name].info.transposed for _, _, host in hosts(model) if name in host))


@torch.no_grad()
def _update_of(adapter: nn.Module) -> ModuleUpdate:
    bias = adapter.delta_bias()
    initial = adapter.initial_delta_weight()
    factors = adapter.low_rank_factors()
    if factors is not None and initial is None:
        return ModuleUpdate(factors.A.detach(), factors.B.detach(), factors.scaling, bias=bias)
    delta = adapter.delta_weight()
    exact = factor_dense(delta if initial is None else delta - initial)
    dtype = next((p.dtype for p in adapter.parameters() if p.dtype.is_floating_point), torch.float32)
    return ModuleUpdate(exact.A.to(dtype), exact.B.to(dtype), 1.0, bias=None if bias is None else bias.to(dtype))
