"""HF PEFT's `adapter_config.json` for LoRA, both ways.

Writing: only the keys PEFT and vLLM need (older PEFT releases crash on keys they don't know),
with the per-module ranks and alphas that differ from the most common ones in `rank_pattern` and
`alpha_pattern`, each key selecting exactly its module. Reading: every key splice reads is
type-checked, and options splice cannot reproduce are refused with the reason.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field
from torch import nn

from splice.core.adapter_state import AdapterState
from splice.core.errors import AdapterFileError
from splice.core.targets import matches, named_base_modules
from splice.core.validation import Problem, check_value, located, raise_problems, regex_error
from splice.methods.lora import exact_pattern

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


def peft_config(state: AdapterState) -> dict[str, Any]:
    """The adapter_config.json of a PEFT LoRA file holding `state`."""
    ranks, alphas, r, alpha = ranks_and_alphas(state)
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
        "modules_to_save": state.heads or None,
        "rank_pattern": exact_pattern({n: v for n, v in ranks.items() if v != r}, state.modules),
        "alpha_pattern": exact_pattern({n: v for n, v in alphas.items() if v != alpha}, state.modules),
    }
    if any(u.bias is not None for u in state.modules.values()):
        config["lora_bias"] = True  # written only when used: older PEFT releases do not know the key
    return config


def ranks_and_alphas(state: AdapterState) -> tuple[dict[str, int], dict[str, float], int, float]:
    """Per-module ranks and alphas, and the most common of each (the config's r and lora_alpha;
    the others go to rank_pattern and alpha_pattern)."""
    ranks = {n: u.rank for n, u in state.modules.items()}
    alphas = {n: tidy(state.alpha(u)) for n, u in state.modules.items()}
    return ranks, alphas, Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]


def tidy(value: float) -> float | int:
    """`value` as an int where it is one (up to rounding), so that 16.000000001 is written 16."""
    rounded = round(value)
    return rounded if math.isclose(value, rounded, rel_tol=1e-9, abs_tol=1e-9) else value


def task_type(model: nn.Module, heads: list[str]) -> str | None:
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


def target_modules(model: nn.Module, names: list[str], heads: list[str]) -> list[str]:
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


def check_readable(config: object, config_file: str | Path) -> None:
    """Refuse a config that is not a LoRA splice can read: not an object, another PEFT method,
    an option splice cannot reproduce, a badly typed key, a bias other than "none"."""
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


def residual_init(init: object) -> str | None:
    """"pissa" for a PiSSA adapter saved without conversion (its factors belong to the base
    weight minus its top-r singular part, which is recomputed on load exactly as PEFT does);
    None for a plain LoRA. Other inits that change the base weight cannot be reproduced."""
    if not isinstance(init, str):
        return None
    if init.lower() == "pissa":
        return "pissa"
    if init.lower().startswith(("pissa_niter", "olora", "corda", "loftq", "lora_ga")):
        raise AdapterFileError(
            f"the adapter was initialised with init_lora_weights={init!r}, which changed the base weights, and "
            "was saved without conversion; splice cannot rebuild that base exactly (randomised or data-dependent). "
            "Save it again in PEFT with save_pretrained(..., path_initial_model_for_weight_conversion=...) to get "
            "a plain LoRA for the original base")
    return None
