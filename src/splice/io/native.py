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
from splice.core.config import filled_from_file
from splice.core.errors import AdapterFileError, ShapeMismatchError
from splice.core.heads import head_tensors
from splice.core.host import hosts, initial_deltas_given_back
from splice.core.registry import config_from_dict
from splice.core.targets import exact_targets, named_base_modules
from splice.core.validation import Problem, check_value, describe_type, located, raise_problems, tensor_problem
from splice.io.adapter_files import CONFIG_NAME, WEIGHTS_NAME, paired_tensors
from splice.io.base_names import base_model_name
from splice.io.files import write_config, write_weights

FORMAT = "splice"
FORMAT_VERSION = 1
HEAD_PREFIX = "train_also."


def write(model: nn.Module, path: Path, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Write adapter `name` of the model in splice's format into `path`; the config and tensors written."""
    record = model_state(model).adapters[name]
    tensors: dict[str, torch.Tensor] = {}
    modules = []
    for module_name, _, host in hosts(model):
        if name in host:
            modules.append(module_name)
            for key, value in host[name].state_dict().items():
                tensors[f"{module_name}.{key}"] = value
    tensors |= {f"{HEAD_PREFIX}{key}": value for key, value in head_tensors(model, record.heads, name).items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "splice_version": splice.__version__,
        "method": record.config.method,
        "config": record.config.to_dict(),
        "modules": modules,
        "train_also": record.heads,
        "base_model_name_or_path": base_model_name(model),
        "model_class": type(model).__name__,  # which head the modules' names sit under (analyze, eval)
    }
    write_config(path, config)
    write_weights(path, tensors)
    return config, tensors


# The keys of a splice-format adapter_config.json that `read` uses, and what each must be.
NATIVE_FIELDS: dict[str, Any] = {
    "format_version": int,
    "method": str,
    "config": dict[str, Any],
    "modules": list[str],
    "train_also": list[str] | None,
}


def read(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], name: str,
         trainable: bool, *, source: str | Path | None = None, allow_nonfinite: bool = False,
         heads: bool = True) -> None:
    """Attach a splice-format directory's contents as adapter `name` (`heads=False`: without the
    modules it trained in full).

    The config is type-checked (every key, its value and what was expected are named, with the
    file when `source`, the directory, is given), the method's own config is rebuilt through
    `config_from_dict` (unknown keys and wrong types refused), and the tensors are checked before
    anything is attached: a tensor the adapter holds as floating point must be floating point
    in the file, and no floating tensor may hold NaN or infinite values (unless `allow_nonfinite`).
    """
    if not heads:
        config = {**config, "train_also": []}
        tensors = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
    where = Path(source) / CONFIG_NAME if source is not None else CONFIG_NAME
    inner_method = _checked_method(config, where)
    modules = config["modules"]
    known = dict(named_base_modules(model))
    missing = [m for m in modules if m not in known]
    if missing:
        raise ShapeMismatchError(f"adapter targets modules the model does not have: {missing[:5]}")
    for key, value in tensors.items():
        problem = tensor_problem(value, floating=False, finite=not allow_nonfinite)
        if problem:
            raise AdapterFileError(located(_weights_file(source), f"tensor {key!r} {problem}"))
    adapter_config = config_from_dict({**config["config"], "method": inner_method}, source=where).replace(
        targets=exact_targets(model, modules), exclude=None, layers=None, train_also=config.get("train_also") or []
    )
    # a refused file leaves the model as it was
    with filled_from_file(), attaching(model, adapter_config, name, trainable=trainable):
        targets = adapter_tensors(model, name)
        _check_dtypes(targets, tensors, _weights_file(source))
        with torch.no_grad(), initial_deltas_given_back(model, name):  # the base loses the file's initial deltas
            for target, value in paired_tensors(targets, tensors, "the adapter file"):
                target.copy_(value)


def _checked_method(config: dict[str, Any], where: Path | str) -> str:
    """The method of a splice-format config, after checking its version and the types of the keys
    `read` uses; every problem is named with the file."""
    version = config.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise AdapterFileError(located(where, f"splice adapter format version {version!r} is not supported "
                                              f"(this splice reads version {FORMAT_VERSION})"))
    problems = [Problem(key, config[key], expected) for key, annotation in NATIVE_FIELDS.items()
                if key in config and (expected := check_value(annotation, config[key])) is not None]
    problems += [Problem(key, "(missing)", describe_type(NATIVE_FIELDS[key]))
                 for key in ("method", "config", "modules") if key not in config]
    raise_problems(problems, AdapterFileError, where)
    method = config["method"]
    inner_method = config["config"].get("method", method)
    if not isinstance(inner_method, str) or inner_method.lower() != method.lower():
        raise AdapterFileError(located(where, f"the file names method {method!r} but its config is for "
                                              f"{inner_method!r}"))
    return inner_method


def _weights_file(source: str | Path | None) -> Path | str:
    return Path(source) / WEIGHTS_NAME if source is not None else WEIGHTS_NAME


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors (its own state dict on every module, its heads) under the names
    splice's format stores them by; the parameters themselves, to copy a file's values into."""
    targets: dict[str, torch.Tensor] = {}
    for module_name, _, host in hosts(model):
        if name in host:
            targets |= {f"{module_name}.{k}": v for k, v in host[name].state_dict(keep_vars=True).items()}
    heads = model_state(model).adapters[name].heads
    return targets | {f"{HEAD_PREFIX}{k}": v for k, v in head_tensors(model, heads, name, keep_vars=True).items()}


def _check_dtypes(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: Path | str) -> None:
    """A tensor the attached adapter holds in floating point must be floating point in the file
    (an int or bool tensor would be cast silently); integer buffers stay integers."""
    for key, target in targets.items():
        value = tensors.get(key)
        if value is not None and target.is_floating_point() and not value.is_floating_point():
            dtype, wanted = (str(t.dtype).removeprefix("torch.") for t in (value, target))
            raise AdapterFileError(located(where, f"tensor {key!r} has dtype {dtype}; expected a floating-point "
                                                  f"tensor (the adapter holds it as {wanted})"))
