"""HF PEFT's tensor names in `adapter_model.safetensors`, both ways.

    base_model.model.<module path>.lora_A.weight   [r, in]    (lora_embedding_A [r, num])
    base_model.model.<module path>.lora_B.weight   [out, r]   (lora_embedding_B [dim, r])
    base_model.model.<module path>.lora_B.bias     [out]      (with lora_bias: true)
    base_model.model.<module path>.lora_magnitude_vector  [out]  (DoRA, with use_dora: true)
    base_model.model.<head path>.<param>                      (modules_to_save)
    base_model.model.<module path>.base_layer.weight          (a copy of a targeted embedding)

Every key and value is checked here, without a model: what is refused names the file and the
tensor. `check_supported` and `check_base_copies` compare the keys with a model's modules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from splice.core.adapter_state import AdapterState
from splice.core.errors import AdapterFileError, ShapeMismatchError
from splice.core.layers import describe, unsupported_reason
from splice.core.targets import named_base_modules
from splice.core.validation import located, show, tensor_problem

PREFIX = "base_model.model."
BASE_COPY = ".base_layer."
# role of each tensor: A, B, the bias b of lora_B, DoRA's magnitude M; embeddings mark themselves
LORA_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "b", ".lora_embedding_A": "A",
    ".lora_embedding_B": "B", ".lora_magnitude_vector": "M",
}

Tensors = dict[str, torch.Tensor]


def peft_tensors(state: AdapterState) -> Tensors:
    """The tensors of a PEFT LoRA file holding `state`, under PEFT's names."""
    tensors: Tensors = {}
    for module_name, u in state.modules.items():
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if u.kind == "embedding" else ("lora_A.weight",
                                                                                             "lora_B.weight")
        tensors[f"{PREFIX}{module_name}.{a_key}"] = u.A
        tensors[f"{PREFIX}{module_name}.{b_key}"] = u.B
        if u.bias is not None:
            tensors[f"{PREFIX}{module_name}.lora_B.bias"] = u.bias
        if u.magnitude is not None:
            tensors[f"{PREFIX}{module_name}.lora_magnitude_vector"] = u.magnitude
    for key, value in state.head_tensors.items():
        tensors[f"{PREFIX}{key}"] = value
    return tensors


def is_head_key(path: str, modules_to_save: list[str]) -> bool:
    """Whether tensor `path` belongs to a module of `modules_to_save` (a full path or, as in PEFT,
    a dotted suffix of one)."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}\.", path) for m in modules_to_save)


def split_keys(tensors: Tensors, modules_to_save: list[str], *, where: str | Path | None = None,
               ) -> tuple[dict[str, Tensors], Tensors, set[str]]:
    """(tensors of each adapted module by role, head tensors by path, modules that are embeddings).

    `where` (the weights file) starts the messages of what is refused: a key outside PEFT's
    layout, a value that is not a tensor, a module with only one of its two factors."""
    if not isinstance(tensors, Mapping):
        raise AdapterFileError(located(where, f"holds a {type(tensors).__name__}, not a mapping of names to tensors"))
    if not isinstance(modules_to_save, list) or not all(isinstance(m, str) for m in modules_to_save):
        raise AdapterFileError(f"modules_to_save must be a list of module names, got {show(modules_to_save)}")
    factors: dict[str, Tensors] = {}
    heads: Tensors = {}
    embeddings: set[str] = set()
    for key, value in tensors.items():
        path = _checked_path(key, value, where)
        suffix = next((s for s in LORA_SUFFIXES if path.endswith(s)), None)
        if suffix is not None:
            module_name = path[: -len(suffix)]
            factors.setdefault(module_name, {})[LORA_SUFFIXES[suffix]] = value
            if "embedding" in suffix:
                embeddings.add(module_name)
        elif ".lora_" in path:
            raise AdapterFileError(located(where, f"unsupported LoRA tensor {key!r} (LoRA variants other than DoRA "
                                                  "are not read)"))
        elif BASE_COPY in path:
            continue  # a copy of a targeted layer's own weight, checked by `check_base_copies`
        elif is_head_key(path, modules_to_save):
            heads[path] = value
        else:
            raise AdapterFileError(located(where, f"unexpected tensor {key!r}: neither a LoRA factor nor in "
                                                  "modules_to_save"))
    for module_name, pair in factors.items():
        if not {"A", "B"} <= set(pair):
            raise AdapterFileError(located(where, f"module {module_name!r} has lora_{''.join(pair)} but not both "
                                                  "A and B"))
    if not factors:
        raise AdapterFileError(located(where, "the adapter file holds no LoRA tensors"))
    return factors, heads, embeddings


def _checked_path(key: object, value: object, where: str | Path | None) -> str:
    """The module path of tensor `key` (PEFT's prefix taken off); refuses a key outside PEFT's
    layout and a value that is not a tensor."""
    if not isinstance(key, str) or not key.startswith(PREFIX):
        raise AdapterFileError(located(where, f"tensor {key!r} does not start with {PREFIX!r}: not a PEFT LoRA file"))
    if not isinstance(value, torch.Tensor):
        raise AdapterFileError(located(where, f"{key!r} is a {type(value).__name__}, not a tensor"))
    return key[len(PREFIX):]


def check_peft_tensors(tensors: Tensors, where: str | Path | None = None, *, finite: bool = True) -> None:
    """Refuse factors that are not floating-point matrices with a rank of at least 1, and any
    NaN or infinite value in a factor, bias, magnitude or head, naming the tensor."""
    for key, value in tensors.items():
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        role = LORA_SUFFIXES.get(suffix)
        if role in ("A", "B"):
            problem = tensor_problem(value, min_dim=2, nonempty=True, finite=finite)
            if problem and problem.startswith("is empty"):
                problem += ": a rank-0 factor, expected rank >= 1"
        elif role in ("b", "M"):
            problem = tensor_problem(value, min_dim=1, max_dim=1, nonempty=True, finite=finite)
        elif BASE_COPY in key:
            continue  # compared with the model's own weight by `check_base_copies`
        else:  # a head trained in full: any dtype (integer buffers exist), finite if floating
            problem = tensor_problem(value, floating=False, finite=finite)
        if problem:
            raise AdapterFileError(located(where, f"tensor {key!r} {problem}"))


def check_supported(model: nn.Module, tensors: Tensors) -> None:
    """Refuse, naming the module and its type, an adapter on a layer splice cannot host (a
    grouped convolution, a MultiheadAttention, whose inner projection PEFT wraps), before the
    factors' shapes would give a misleading message."""
    modules = dict(named_base_modules(model))
    names = {key[len(PREFIX):].rsplit(".lora_", 1)[0] for key in tensors if ".lora_" in key and key.startswith(PREFIX)}
    for name in sorted(names):
        outer = name.partition(BASE_COPY)[0] if BASE_COPY in f"{name}." else name
        module = modules.get(outer)
        if module is None:
            continue  # reported with the other modules the model lacks
        reason = unsupported_reason(module) if describe(module) is not None else (
            "splice hosts LoRA on Linear, transformers Conv1D, Conv1d/Conv2d and Embedding layers only")
        if outer != name or reason:
            raise AdapterFileError(f"the adapter adapts {outer!r}, a {type(module).__name__}, which is not "
                                   f"supported: {reason or 'PEFT wraps a layer inside it'}")


def check_base_copies(model: nn.Module, tensors: Tensors) -> None:
    """PEFT also saves a targeted embedding's own weight (`<module>.base_layer.weight`), in case
    the vocabulary was resized. splice never overwrites base weights, so the copy must be the
    model's weight as it is; anything else is refused before the model changes."""
    for key, value in tensors.items():
        path = key[len(PREFIX):]
        if BASE_COPY not in path:
            continue
        module_name, _, param_name = path.partition(BASE_COPY)
        try:
            target = model.get_submodule(module_name).get_parameter(param_name)
        except AttributeError:
            raise ShapeMismatchError(
                f"adapter holds a copy of {module_name}.{param_name}, which the model does not have"
            ) from None
        if target.shape != value.shape:
            raise ShapeMismatchError(
                f"{module_name}.{param_name}: the adapter's copy of the base weight has shape "
                f"{tuple(value.shape)}, the model's is {tuple(target.shape)} (resized vocabulary?)"
            )
        if not torch.equal(value.to(device=target.device, dtype=target.dtype), target.detach()):
            raise AdapterFileError(
                f"the adapter carries its own {module_name}.{param_name}, which differs from the "
                "model's (PEFT saves it when embeddings were resized or trained); splice does not "
                "overwrite base weights: load it onto the base model it was trained from"
            )
