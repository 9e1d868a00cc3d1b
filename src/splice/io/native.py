"""splice's own adapter format, for methods HF PEFT cannot represent.

Same layout as PEFT (`adapter_config.json` + `adapter_model.safetensors`), but the JSON names
the method, its config and the format version, and tensors are keyed `<module path>.<param>`
as the adapter's own state dict names them. A PEFT reader refuses it (no `peft_type`), which is
the point: it would not know the method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import splice
from splice.core.api import attaching, model_state
from splice.core.errors import AdapterFileError, ShapeMismatchError
from splice.core.heads import head_tensors
from splice.core.host import hosts
from splice.core.registry import config_from_dict
from splice.core.targets import exact_targets, named_base_modules
from splice.io.files import base_model_name, write_config, write_weights

FORMAT = "splice"
FORMAT_VERSION = 1
HEAD_PREFIX = "train_also."


def write(model: nn.Module, path: Path, name: str) -> None:
    record = model_state(model).adapters[name]
    tensors: dict[str, torch.Tensor] = {}
    modules = []
    for module_name, _, host in hosts(model):
        if name in host:
            modules.append(module_name)
            for key, value in host[name].state_dict().items():
                tensors[f"{module_name}.{key}"] = value
    tensors |= {f"{HEAD_PREFIX}{key}": value for key, value in head_tensors(model, record.heads, name).items()}
    write_config(path, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "splice_version": splice.__version__,
        "method": record.config.method,
        "config": record.config.to_dict(),
        "modules": modules,
        "train_also": record.heads,
        "base_model_name_or_path": base_model_name(model),
    })
    write_weights(path, tensors)


def read(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], name: str,
         trainable: bool) -> None:
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterFileError(f"splice adapter format version {version!r} is not supported "
                               f"(this splice reads version {FORMAT_VERSION})")
    modules: list[str] = config.get("modules") or []
    known = dict(named_base_modules(model))
    missing = [m for m in modules if m not in known]
    if missing:
        raise ShapeMismatchError(f"adapter targets modules the model does not have: {missing[:5]}")
    adapter_config = config_from_dict(config["config"]).replace(
        targets=exact_targets(model, modules), exclude=None, layers=None, train_also=config.get("train_also", [])
    )
    with attaching(model, adapter_config, name, trainable=trainable):  # a refused file leaves the model as it was
        _load_tensors(model, name, model_state(model).adapters[name].heads, tensors)


def _load_tensors(model: nn.Module, name: str, heads: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """Copy the file's tensors into the freshly attached adapter, checking names and shapes."""
    targets: dict[str, torch.Tensor] = {}
    for module_name, _, host in hosts(model):
        if name in host:
            targets |= {f"{module_name}.{k}": v for k, v in host[name].state_dict(keep_vars=True).items()}
    targets |= {f"{HEAD_PREFIX}{k}": v for k, v in head_tensors(model, heads, name, keep_vars=True).items()}
    unexpected, missing = sorted(set(tensors) - set(targets)), sorted(set(targets) - set(tensors))
    if unexpected or missing:
        raise AdapterFileError(f"adapter file does not match its config: unexpected tensors "
                               f"{unexpected[:5]}, missing tensors {missing[:5]}")
    for key, target in targets.items():
        if target.shape != tensors[key].shape:
            raise ShapeMismatchError(
                f"{key}: file has shape {tuple(tensors[key].shape)}, model needs {tuple(target.shape)}")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key])
