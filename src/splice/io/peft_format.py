"""HF PEFT's LoRA directory layout, both ways.

Writing: `adapter_config.json` with only the keys PEFT and vLLM need (older PEFT releases crash
on keys they don't know), and `adapter_model.safetensors` with PEFT's tensor names:

    base_model.model.<module path>.lora_A.weight   [r, in]    (lora_embedding_A [r, num])
    base_model.model.<module path>.lora_B.weight   [out, r]   (lora_embedding_B [dim, r])
    base_model.model.<module path>.lora_magnitude_vector  [out]  (DoRA, with use_dora: true)
    base_model.model.<head path>.<param>                      (modules_to_save)

Reading: the same files as written by PEFT (LoRA, rsLoRA, DoRA on Linear layers, rank/alpha
patterns, modules_to_save, Conv and Embedding LoRA). Everything is validated against the model before anything changes.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.core.api import attach, model_state
from splice.core.errors import AdapterFileError, ShapeMismatchError, SpliceError
from splice.core.host import hosts
from splice.core.layers import describe
from splice.core.targets import matches, named_base_modules
from splice.io.files import base_model_name, write_config, write_weights
from splice.methods.dora import DoRA, DoRAAdapter
from splice.methods.lora import LoRA, LoRAAdapter, pattern_value

PREFIX = "base_model.model."
BASE_COPY = ".base_layer."
LORA_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "M",
}
UNSUPPORTED_OPTIONS = {
    "lora_bias": "LoRA biases (lora_bias=true) are not supported",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
}
TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}

# PEFT's task wrappers add these to modules_to_save (suffix match), see PeftModelForSequenceClassification.
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",),
}


@dataclass
class ExportedModule:
    name: str
    A: torch.Tensor
    B: torch.Tensor
    rank: int
    alpha: float
    embedding: bool
    transposed: bool
    magnitude: torch.Tensor | None = None  # DoRA


def can_write(model: nn.Module, name: str) -> bool:
    """PEFT's format holds LoRA adapters only."""
    return all(isinstance(host[name], LoRAAdapter) for _, _, host in hosts(model) if name in host)


def write(model: nn.Module, path: Path, name: str, portable: bool = False) -> None:
    record = model_state(model).adapters[name]
    config: LoRA = record.config
    modules = _exported_modules(model, name, config.rslora)
    if portable:
        _check_portable(modules, record.heads)
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if m.embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{m.name}.{a_key}"] = m.A
        tensors[f"{PREFIX}{m.name}.{b_key}"] = m.B
        if m.magnitude is not None:
            tensors[f"{PREFIX}{m.name}.lora_magnitude_vector"] = m.magnitude
    for head in record.heads:
        for key, value in model.get_submodule(head).state_dict().items():
            tensors[f"{PREFIX}{head}.{key}"] = value
    write_config(path, _peft_config(model, config, modules, record.heads))
    write_weights(path, tensors)


def _exported_modules(model: nn.Module, name: str, rslora: bool) -> list[ExportedModule]:
    out = []
    for module_name, _, host in hosts(model):
        if name not in host:
            continue
        adapter: LoRAAdapter = host[name]
        A, B, rank = adapter.exported_factors()
        alpha = adapter.scaling * (math.sqrt(rank) if rslora else rank)
        magnitude = adapter.lora_magnitude_vector.detach() if isinstance(adapter, DoRAAdapter) else None
        out.append(ExportedModule(module_name, A, B, rank, _tidy(alpha),
                                  adapter.info.kind == "embedding", adapter.info.transposed, magnitude))
    return out


def _tidy(value: float) -> float | int:
    rounded = round(value)
    return rounded if math.isclose(value, rounded, rel_tol=1e-9, abs_tol=1e-9) else value


def _peft_config(model: nn.Module, config: LoRA, modules: list[ExportedModule], heads: list[str]) -> dict[str, Any]:
    r = Counter(m.rank for m in modules).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model, heads),
        "base_model_name_or_path": base_model_name(model),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "use_dora": isinstance(config, DoRA),
        "bias": "none",
        "fan_in_fan_out": any(m.transposed for m in modules),
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": _target_modules(model, [m.name for m in modules], heads),
        "modules_to_save": heads or None,
        "rank_pattern": {m.name: m.rank for m in modules if m.rank != r},
        "alpha_pattern": {m.name: m.alpha for m in modules if m.alpha != alpha},
    }


def _task_type(model: nn.Module, heads: list[str]) -> str | None:
    """PEFT's task for the model's class, unless PEFT would then expect head tensors we lack.

    For some tasks PEFT trains the usual head in full (`TASK_HEADS`) and fails to load a file
    without its tensors; such an adapter is written task-less, which PEFT loads as a plain model.
    """
    task = next((t for suffix, t in TASK_TYPES.items() if type(model).__name__.endswith(suffix)), None)
    auto = TASK_HEADS.get(task, ())
    wrapped = [n for n, _ in named_base_modules(model) if n and auto and n.endswith(auto)]
    if any(not any(n == h or n.startswith(h + ".") for h in heads) for n in wrapped):
        return None
    return task


def _target_modules(model: nn.Module, names: list[str], heads: list[str]) -> list[str]:
    """Leaf names when, under PEFT's rules, they select exactly these modules; else full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {
        n for n, _ in named_base_modules(model)
        if n and matches(leaves, n) and not any(n == h or n.startswith(h + ".") for h in heads)
    }
    return leaves if selected == set(names) else sorted(names)


def portability_problems(ranks: list[int], alphas: list[float], heads: list[str]) -> list[str]:
    """What keeps an adapter out of the subset vLLM serves (empty when it is portable)."""
    problems = []
    if heads:
        problems.append(f"it trains full modules {heads} (modules_to_save), which vLLM refuses")
    if len(set(ranks)) > 1:
        problems.append(f"ranks differ across modules {sorted(set(ranks))}; vLLM ignores rank_pattern")
    if len(set(alphas)) > 1:
        problems.append("alpha differs across modules; vLLM ignores alpha_pattern")
    return problems


def _check_portable(modules: list[ExportedModule], heads: list[str]) -> None:
    problems = portability_problems([m.rank for m in modules], [m.alpha for m in modules], heads)
    if problems:
        raise SpliceError("adapter is not portable to vLLM: " + "; ".join(problems))


# -- reading ---------------------------------------------------------------------------------


def read(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], name: str,
         trainable: bool) -> None:
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(
            f"unsupported PEFT method {config.get('peft_type')!r}: splice reads LORA adapters"
        )
    for key, reason in UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise AdapterFileError(f"{reason} ({key}={config[key]!r})")
    if config.get("bias", "none") != "none":
        raise AdapterFileError(f"bias={config['bias']!r} is not supported; only bias='none'")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda")):
        warnings.warn(f"adapter was initialised with {init!r} and saved without conversion: it is only "
                      "correct on the base model its init modified", stacklevel=3)
    factors, head_tensors = split_keys(tensors, config.get("modules_to_save") or [])
    lora_config = _lora_config(model, config, factors, head_tensors)
    check_base_copies(model, tensors)
    attach(model, lora_config, name, trainable=trainable)
    with torch.no_grad():
        for module_name, _, host in hosts(model):
            if name in host:
                host[name].lora_A.copy_(factors[module_name]["A"])
                host[name].lora_B.copy_(factors[module_name]["B"])
                if "M" in factors[module_name]:
                    host[name].lora_magnitude_vector.copy_(factors[module_name]["M"])
        params = _named_tensors(model)
        for key, value in head_tensors.items():
            params[key].copy_(value)


def split_keys(tensors: dict[str, torch.Tensor], modules_to_save: list[str]):
    factors: dict[str, dict[str, torch.Tensor]] = {}
    heads: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"tensor {key!r} does not start with {PREFIX!r}: not a PEFT LoRA file")
        path = key[len(PREFIX):]
        suffix = next((s for s in LORA_SUFFIXES if path.endswith(s)), None)
        if suffix is not None:
            factors.setdefault(path[: -len(suffix)], {})[LORA_SUFFIXES[suffix]] = value
        elif ".lora_" in path:
            raise AdapterFileError(f"unsupported LoRA tensor {key!r} (LoRA biases and variants other than DoRA "
                                   "are not read)")
        elif BASE_COPY in path:
            continue  # a copy of a targeted layer's own weight, checked by `check_base_copies`
        elif any(re.match(rf"(^|.*\.){re.escape(m)}\.", path) for m in modules_to_save):
            heads[path] = value
        else:
            raise AdapterFileError(f"unexpected tensor {key!r}: neither a LoRA factor nor in modules_to_save")
    for module_name, pair in factors.items():
        if not {"A", "B"} <= set(pair):
            raise AdapterFileError(f"module {module_name!r} has lora_{''.join(pair)} but not both A and B")
    if not factors:
        raise AdapterFileError("the adapter file holds no LoRA tensors")
    return factors, heads


def check_base_copies(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
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


def _lora_config(model: nn.Module, config: dict[str, Any], factors: dict, head_tensors: dict) -> LoRA:
    """A splice LoRA config selecting exactly the file's modules, with their ranks and alphas."""
    r, alpha = int(config.get("r", 8)), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    dora = bool(config.get("use_dora", False))
    modules = dict(named_base_modules(model))
    ranks, alphas = {}, {}
    for module_name, pair in factors.items():
        module = modules.get(module_name)
        info = describe(module) if module is not None else None
        if info is None:
            found = "no such module" if module is None else f"a {type(module).__name__}"
            raise ShapeMismatchError(f"adapter targets {module_name!r}, but the model has {found} there")
        if dora != ("M" in pair):
            raise AdapterFileError(f"{module_name}: use_dora={dora} but the file "
                                   f"{'lacks' if dora else 'has'} its lora_magnitude_vector")
        if dora and info.kind != "linear":
            raise AdapterFileError(f"{module_name}: DoRA on {info.kind} layers is not supported (Linear only)")
        rank = pair["A"].shape[0]
        expected = _expected_shapes(info, rank)
        for which, tensor in pair.items():
            if tuple(tensor.shape) != expected[which]:
                raise ShapeMismatchError(
                    f"{module_name}: {_TENSOR_NAMES[which]} has shape {tuple(tensor.shape)} but the model's "
                    f"{type(module).__name__} needs {expected[which]}"
                )
        declared = pattern_value(rank_pattern, module_name, r)
        if declared != rank:
            raise AdapterFileError(f"{module_name}: config says r={declared} but the tensors have rank {rank}")
        ranks[module_name] = rank
        alphas[module_name] = pattern_value(alpha_pattern, module_name, alpha)
    params = _named_tensors(model)
    for key, value in head_tensors.items():
        if key not in params:
            raise ShapeMismatchError(f"adapter holds {key!r} (modules_to_save) but the model has no such tensor")
        if params[key].shape != value.shape:
            raise ShapeMismatchError(
                f"{key}: adapter has shape {tuple(value.shape)}, model has {tuple(params[key].shape)}"
            )
    saved = config.get("modules_to_save") or []
    heads = [m for m in saved if any(re.match(rf"(^|.*\.){re.escape(m)}\.", k) for k in head_tensors)]
    return (DoRA if dora else LoRA)(
        r=r, alpha=alpha, rslora=rslora, dropout=float(config.get("lora_dropout", 0.0)), init="zeros",
        targets=list(factors), train_also=heads,
        rank_pattern={re.escape(n): v for n, v in ranks.items() if v != r},
        alpha_pattern={re.escape(n): v for n, v in alphas.items() if v != alpha},
    )


_TENSOR_NAMES = {"A": "lora_A", "B": "lora_B", "M": "lora_magnitude_vector"}


def _expected_shapes(info, rank: int) -> dict[str, tuple[int, ...]]:
    if info.kind == "conv":
        return {"A": (rank, info.in_features, *info.kernel_size),
                "B": (info.out_features, rank, *(1,) * info.conv_dims)}
    return {"A": (rank, info.in_features), "B": (info.out_features, rank), "M": (info.out_features,)}


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name: what a saved head's tensors are copied into."""
    return dict(model.named_parameters()) | dict(model.named_buffers())
