"""HF PEFT's LoRA directory layout, both ways.

Writing: `adapter_config.json` with only the keys PEFT and vLLM need (older PEFT releases crash
on keys they don't know), and `adapter_model.safetensors` with PEFT's tensor names:

    base_model.model.<module path>.lora_A.weight   [r, in]    (lora_embedding_A [r, num])
    base_model.model.<module path>.lora_B.weight   [out, r]   (lora_embedding_B [dim, r])
    base_model.model.<module path>.lora_B.bias     [out]      (with lora_bias: true)
    base_model.model.<module path>.lora_magnitude_vector  [out]  (DoRA, with use_dora: true)
    base_model.model.<head path>.<param>                      (modules_to_save)

Reading: the same files as written by PEFT (LoRA, rsLoRA, DoRA on Linear layers, rank/alpha
patterns, lora_bias, modules_to_save, Conv and Embedding LoRA). Everything is validated against
the model before anything changes. Both directions go through `AdapterState`, the model-free
form that merging and compression work on: `from_peft`/`to_peft` convert files, `lora_state`
reads an attached adapter, `attach_state` attaches one.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from splice.core.api import attaching, model_state
from splice.core.errors import AdapterFileError, ShapeMismatchError, SpliceError
from splice.core.heads import head_tensors
from splice.core.host import hosts
from splice.core.layers import describe, unsupported_reason
from splice.core.state import AdapterState, ModuleUpdate
from splice.core.targets import exact_targets, matches, named_base_modules
from splice.core.validation import Problem, check_value, located, raise_problems, regex_error, show, tensor_problem
from splice.io.files import (
    CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    base_model_name,
    write_config,
    write_weights,
)
from splice.methods.dora import DoRA, DoRAAdapter
from splice.methods.lora import LoRA, LoRAAdapter, exact_pattern, pattern_value

PREFIX = "base_model.model."
BASE_COPY = ".base_layer."
# role of each tensor: A, B, the bias b of lora_B, DoRA's magnitude M; embeddings mark themselves
LORA_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "b", ".lora_embedding_A": "A",
    ".lora_embedding_B": "B", ".lora_magnitude_vector": "M",
}
UNSUPPORTED_OPTIONS = {
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


def can_write(model: nn.Module, name: str) -> bool:
    """PEFT's format holds LoRA adapters only."""
    return all(isinstance(host[name], LoRAAdapter) for _, _, host in hosts(model) if name in host)


def write(model: nn.Module, path: Path, name: str, portable: bool = False) -> None:
    write_state(lora_state(model, name), path, portable=portable)


def write_state(state: AdapterState, path: Path, portable: bool = False) -> None:
    """Write an adapter state as a PEFT LoRA directory (into an existing, prepared `path`)."""
    if portable:
        problems = portability_problems([u.rank for u in state.modules.values()],
                                        [_tidy(state.alpha(u)) for u in state.modules.values()], state.head_modules)
        if problems:
            raise SpliceError("adapter is not portable to vLLM: " + "; ".join(problems))
    config, tensors = to_peft(state)
    write_config(path, config)
    write_weights(path, tensors)


def lora_state(model: nn.Module, name: str) -> AdapterState:
    """Adapter `name` of the model (LoRA or DoRA) as tensors, exact on the unmodified base."""
    record = model_state(model).adapters[name]
    config: LoRA = record.config
    modules: dict[str, ModuleUpdate] = {}
    transposed = False
    for module_name, _, host in hosts(model):
        if name not in host:
            continue
        adapter: LoRAAdapter = host[name]
        A, B = adapter.exported_factors()
        magnitude = adapter.lora_magnitude_vector.detach() if isinstance(adapter, DoRAAdapter) else None
        bias = None if adapter.lora_bias is None else adapter.lora_bias.detach()
        modules[module_name] = ModuleUpdate(A, B, adapter.scaling, adapter.info.kind, bias, magnitude)
        transposed |= adapter.info.transposed
    return AdapterState(
        modules, head_tensors(model, record.heads, name), list(record.heads), rslora=config.rslora,
        dropout=config.dropout,
        base_model=base_model_name(model), task_type=_task_type(model, record.heads),
        target_modules=_target_modules(model, list(modules), record.heads), fan_in_fan_out=transposed,
    )


def to_peft(state: AdapterState) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json contents, tensors) of a PEFT LoRA directory holding `state`."""
    tensors: dict[str, torch.Tensor] = {}
    for module_name, u in state.modules.items():
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if u.kind == "embedding" else ("lora_A.weight",
                                                                                             "lora_B.weight")
        tensors[f"{PREFIX}{module_name}.{a_key}"] = u.A
        tensors[f"{PREFIX}{module_name}.{b_key}"] = u.B
        if u.bias is not None:
            tensors[f"{PREFIX}{module_name}.lora_B.bias"] = u.bias
        if u.magnitude is not None:
            tensors[f"{PREFIX}{module_name}.lora_magnitude_vector"] = u.magnitude
    for key, value in state.heads.items():
        tensors[f"{PREFIX}{key}"] = value
    ranks, alphas, r, alpha = _ranks_and_alphas(state)
    config = {
        "peft_type": "LORA",
        "task_type": state.task_type,
        "base_model_name_or_path": state.base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": state.dropout,
        "use_rslora": state.rslora,
        "use_dora": state.dora,
        "bias": "none",
        "fan_in_fan_out": state.fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": state.target_modules if state.target_modules is not None else sorted(state.modules),
        "modules_to_save": state.head_modules or None,
        "rank_pattern": exact_pattern({n: v for n, v in ranks.items() if v != r}, state.modules),
        "alpha_pattern": exact_pattern({n: v for n, v in alphas.items() if v != alpha}, state.modules),
    }
    if any(u.bias is not None for u in state.modules.values()):
        config["lora_bias"] = True  # written only when used: older PEFT releases do not know the key
    return config, tensors


def _ranks_and_alphas(state: AdapterState) -> tuple[dict[str, int], dict[str, float], int, float]:
    """Per-module ranks and alphas, and the most common of each (the config's r and lora_alpha;
    the others go to rank_pattern and alpha_pattern)."""
    ranks = {n: u.rank for n, u in state.modules.items()}
    alphas = {n: _tidy(state.alpha(u)) for n, u in state.modules.items()}
    return ranks, alphas, Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]


def _tidy(value: float) -> float | int:
    rounded = round(value)
    return rounded if math.isclose(value, rounded, rel_tol=1e-9, abs_tol=1e-9) else value


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


# -- reading ---------------------------------------------------------------------------------


def read(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], name: str,
         trainable: bool, *, source: str | Path | None = None, allow_nonfinite: bool = False) -> None:
    """Attach the PEFT directory's contents as adapter `name`; `source` (the directory) is named
    in every error about the files."""
    check_supported(model, tensors)
    state = from_peft(config, tensors, source=source, allow_nonfinite=allow_nonfinite)
    check_base_copies(model, tensors)
    attach_state(model, state, name, trainable=trainable)


# The keys of adapter_config.json that splice reads, and what each must be. PEFT writes many more
# (revision, layers_to_transform, megatron_config, ...); those are ignored.
PositiveInt = Annotated[int, Field(ge=1)]
PEFT_FIELDS: dict[str, Any] = {
    "r": PositiveInt,
    "lora_alpha": float,  # strict: an int or a float, finite; not a string, not a bool
    "lora_dropout": Annotated[float, Field(ge=0, lt=1)],
    "use_rslora": bool,
    "use_dora": bool,
    "lora_bias": bool,
    "fan_in_fan_out": bool,
    "rank_pattern": dict[str, PositiveInt] | None,
    "alpha_pattern": dict[str, float] | None,
    "target_modules": str | list[str] | None,
    "modules_to_save": list[str] | None,
    "init_lora_weights": bool | str,
    "bias": str,
    "base_model_name_or_path": str | None,
    "task_type": str | None,
}


def check_peft_config(config: dict[str, Any], where: str | Path | None = None) -> None:
    """Refuse an adapter_config.json whose keys splice reads hold values of the wrong type
    (`"use_rslora": "false"`, `"lora_alpha": "16"`, NaN, `"r": 2.5`, a pattern key that is not a
    regex), naming the file, every bad key, its value and what was expected."""
    problems = [Problem(key, config[key], expected) for key, annotation in PEFT_FIELDS.items()
                if key in config and (expected := check_value(annotation, config[key])) is not None]
    for key in ("rank_pattern", "alpha_pattern"):
        if isinstance(config.get(key), dict):
            problems += [Problem(key, {pattern: value}, f"keys that are module names or valid regular expressions "
                                 f"({pattern!r}: {err})")
                         for pattern, value in config[key].items() if (err := regex_error(pattern)) is not None]
    target = config.get("target_modules")
    if isinstance(target, str) and target != "all-linear" and (err := regex_error(target)) is not None:
        problems.append(Problem("target_modules", target, f"module names or a valid regular expression ({err})"))
    raise_problems(problems, AdapterFileError, where)


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


def from_peft(config: dict[str, Any], tensors: dict[str, torch.Tensor], *, source: str | Path | None = None,
              allow_nonfinite: bool = False) -> AdapterState:
    """A PEFT LoRA directory's contents as an adapter state, checked for consistency (no model).

    Every key splice reads is type-checked (`check_peft_config`) and every tensor checked for its
    dtype, shape and finite values (`check_peft_tensors`; `allow_nonfinite=True` lets NaN and
    infinite values through, for inspecting a diverged run). `source`, the directory, is named
    in the errors.
    """
    config_file = Path(source) / CONFIG_NAME if source is not None else CONFIG_NAME
    weights_file = _weights_file(source)
    if not isinstance(config, dict):
        raise AdapterFileError(located(config_file, f"must hold a JSON object, not {type(config).__name__}"))
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(located(
            config_file, f"unsupported PEFT method {config.get('peft_type')!r}: splice reads LORA adapters"))
    for key, reason in UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise AdapterFileError(located(config_file, f"{reason} ({key}={config[key]!r})"))
    check_peft_config(config, config_file)
    if config.get("bias", "none") != "none":
        raise AdapterFileError(located(config_file, f"bias={config['bias']!r} is not supported; only bias='none'"))
    residual_init = _residual_init(config.get("init_lora_weights", True))
    head_modules = config.get("modules_to_save") or []
    factors, heads, embeddings = split_keys(tensors, head_modules, where=weights_file)
    check_peft_tensors(tensors, weights_file, finite=not allow_nonfinite)
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora, dora, lora_bias = (config.get(k, False) for k in ("use_rslora", "use_dora", "lora_bias"))
    modules = {}
    for module_name, pair in factors.items():
        if dora != ("M" in pair):
            raise AdapterFileError(located(source, f"{module_name}: use_dora={dora} but the file "
                                                   f"{'lacks' if dora else 'has'} its lora_magnitude_vector"))
        if ("b" in pair) != lora_bias:
            raise AdapterFileError(located(source, f"{module_name}: lora_bias={lora_bias} in the config but the "
                                                   f"file {'has' if 'b' in pair else 'lacks'} its lora_B.bias"))
        rank = pair["A"].shape[0]
        declared = pattern_value(rank_pattern, module_name, r)
        if declared != rank:
            raise AdapterFileError(located(source, f"{module_name}: config says r={declared} but the tensors "
                                                   f"have rank {rank}"))
        module_alpha = pattern_value(alpha_pattern, module_name, alpha)
        kind = "embedding" if module_name in embeddings else "conv" if pair["A"].dim() > 2 else "linear"
        try:
            modules[module_name] = ModuleUpdate(
                pair["A"], pair["B"], module_alpha / (math.sqrt(rank) if rslora else rank), kind,
                pair.get("b"), pair.get("M"))
        except ShapeMismatchError as err:
            raise AdapterFileError(located(source, f"{module_name}: {err}")) from None
    held = [m for m in head_modules if any(re.match(rf"(^|.*\.){re.escape(m)}\.", k) for k in heads)]
    return AdapterState(
        modules, heads, held, rslora=rslora, dropout=float(config.get("lora_dropout", 0.0)),
        base_model=config.get("base_model_name_or_path"), task_type=config.get("task_type"),
        target_modules=config.get("target_modules"), fan_in_fan_out=config.get("fan_in_fan_out", False),
        residual_init=residual_init,
    )


def _weights_file(source: str | Path | None) -> Path | str:
    """The weights file of directory `source` (safetensors, or PEFT's legacy .bin), for messages."""
    if source is None:
        return WEIGHTS_NAME
    legacy = Path(source) / LEGACY_WEIGHTS_NAME
    return legacy if legacy.is_file() and not (Path(source) / WEIGHTS_NAME).is_file() else Path(source) / WEIGHTS_NAME


def _residual_init(init: object) -> str | None:
    """"pissa" for a PiSSA adapter saved without conversion (its factors belong to the base
    weight minus its top-r singular part, which is recomputed on load exactly as PEFT does);
    None for a plain LoRA. Other inits that change the base weight cannot be reproduced."""
    if not isinstance(init, str):
        return None
    if init.lower() == "pissa":
        return "pissa"
    if init.lower().startswith(("pissa_niter", "olora", "corda", "loftq")):
        raise AdapterFileError(
            f"the adapter was initialised with init_lora_weights={init!r}, which changed the base weights, and "
            "was saved without conversion; splice cannot rebuild that base exactly (randomised or data-dependent). "
            "Save it again in PEFT with save_pretrained(..., path_initial_model_for_weight_conversion=...) to get "
            "a plain LoRA for the original base")
    return None


def attach_state(model: nn.Module, state: AdapterState, name: str = "default", trainable: bool = False) -> nn.Module:
    """Attach an adapter state as LoRA (DoRA if it has magnitudes) adapter `name`, after checking
    every module, kind, shape and head against the model; nothing changes when one does not fit."""
    lora_config = _lora_config(model, state)
    try:
        with attaching(model, lora_config, name, trainable=trainable):
            _copy_state(model, state, name)
    except (KeyError, RuntimeError) as err:
        raise AdapterFileError(f"the adapter does not fit the model; nothing was attached ({err})") from err
    # Built from zeros and then filled; the recorded config says how a fresh one would start, so
    # that attaching it again to another model gives an adapter that trains.
    record = model_state(model).adapters[name]
    record.config = record.config.replace(init=state.residual_init or "default")
    return model


def _copy_state(model: nn.Module, state: AdapterState, name: str) -> None:
    """Copy the state's tensors into adapter `name`, just attached for it; shapes must agree exactly."""
    pairs = []
    for module_name, _, host in hosts(model):
        if name in host:
            update, adapter = state.modules[module_name], host[name]
            pairs += [(f"{module_name}.lora_A", adapter.lora_A, update.A), (f"{module_name}.lora_B", adapter.lora_B,
                                                                            update.B)]
            if update.bias is not None:
                pairs.append((f"{module_name}.lora_B.bias", adapter.lora_bias, update.bias))
            if update.magnitude is not None:
                pairs.append((f"{module_name}.lora_magnitude_vector", adapter.lora_magnitude_vector, update.magnitude))
    heads = head_tensors(model, model_state(model).adapters[name].heads, name, keep_vars=True)
    pairs += [(key, heads[key], value) for key, value in state.heads.items()]
    for key, target, value in pairs:
        if target.shape != value.shape:
            raise ShapeMismatchError(f"{key}: the adapter has shape {tuple(value.shape)}, the model needs "
                                     f"{tuple(target.shape)}")
    with torch.no_grad():
        for _, target, value in pairs:
            target.copy_(value)


Tensors = dict[str, torch.Tensor]


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
        if not isinstance(key, str) or not key.startswith(PREFIX):
            raise AdapterFileError(located(where, f"tensor {key!r} does not start with {PREFIX!r}: "
                                                  "not a PEFT LoRA file"))
        if not isinstance(value, torch.Tensor):
            raise AdapterFileError(located(where, f"{key!r} is a {type(value).__name__}, not a tensor"))
        path = key[len(PREFIX):]
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
        elif any(re.match(rf"(^|.*\.){re.escape(m)}\.", path) for m in modules_to_save):
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


def _lora_config(model: nn.Module, state: AdapterState) -> LoRA:
    """A splice LoRA config selecting exactly the state's modules, with their ranks and alphas."""
    modules = dict(named_base_modules(model))
    for module_name, update in state.modules.items():
        module = modules.get(module_name)
        info = describe(module) if module is not None else None
        if info is None:
            found = "no such module" if module is None else f"a {type(module).__name__}"
            raise ShapeMismatchError(f"adapter targets {module_name!r}, but the model has {found} there")
        if info.kind != update.kind:
            raise ShapeMismatchError(f"{module_name}: the adapter is for a {update.kind} layer, the model has "
                                     f"a {type(module).__name__} there")
        if update.magnitude is not None and info.kind != "linear":
            raise AdapterFileError(f"{module_name}: DoRA on {info.kind} layers is not supported (Linear only)")
        if update.bias is not None and getattr(module, "bias", None) is None:
            raise AdapterFileError(f"{module_name}: the adapter changes the bias (lora_bias) but the model's "
                                   f"{type(module).__name__} has no bias")
        expected = _expected_shapes(info, update.rank)
        present = {"A": update.A, "B": update.B, "M": update.magnitude, "b": update.bias}
        for which, tensor in present.items():
            if tensor is not None and tuple(tensor.shape) != expected[which]:
                raise ShapeMismatchError(
                    f"{module_name}: {_TENSOR_NAMES[which]} has shape {tuple(tensor.shape)} but the model's "
                    f"{type(module).__name__} needs {expected[which]}"
                )
    params = _named_tensors(model)
    for key, value in state.heads.items():
        if key not in params:
            raise ShapeMismatchError(f"adapter holds {key!r} (modules_to_save) but the model has no such tensor")
        if params[key].shape != value.shape:
            raise ShapeMismatchError(
                f"{key}: adapter has shape {tuple(value.shape)}, model has {tuple(params[key].shape)}"
            )
    ranks, alphas, r, alpha = _ranks_and_alphas(state)
    return (DoRA if state.dora else LoRA)(
        r=r, alpha=alpha, rslora=state.rslora, dropout=state.dropout, init=state.residual_init or "zeros",
        targets=exact_targets(model, list(state.modules)), train_also=list(state.head_modules),
        lora_bias=any(u.bias is not None for u in state.modules.values()),
        rank_pattern=exact_pattern({n: v for n, v in ranks.items() if v != r}, state.modules),
        alpha_pattern=exact_pattern({n: v for n, v in alphas.items() if v != alpha}, state.modules),
    )


_TENSOR_NAMES = {"A": "lora_A", "B": "lora_B", "M": "lora_magnitude_vector", "b": "lora_B.bias"}


def _expected_shapes(info, rank: int) -> dict[str, tuple[int, ...]]:
    if info.kind == "conv":
        return {"A": (rank, info.in_features, *info.kernel_size),
                "B": (info.out_features, rank, *(1,) * info.conv_dims), "b": (info.out_features,)}
    return {"A": (rank, info.in_features), "B": (info.out_features, rank), "M": (info.out_features,),
            "b": (info.out_features,)}


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name: what a saved head's tensors are copied into."""
    return dict(model.named_parameters()) | dict(model.named_buffers())
