"""Which modules of a model an adapter config selects.

The rules are HF PEFT's (`check_target_module_exists`) so that users can reuse their configs:
`exclude` first, modules trained in full (`train_also`) are never targets, a string is a
full-match regex, a list entry matches a name equal to it or ending in ".entry", and
"all-linear" selects every Linear/Conv1D except the output head. Two deliberate differences:
`layers` also restricts regex targets (PEFT silently ignores it there), and a list entry that
matches no module at all is refused as a typo (PEFT adapts what the other entries match).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterator

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from splice.core.config import AdapterConfig, Targets
from splice.core.errors import TargetError
from splice.core.layers import LayerInfo, describe, unsupported_reason

ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("classifier", "score")
COMMON_LAYER_SEGMENTS = ("layers", "layer", "h", "block", "blocks")  # names of a transformer's stack of layers
HOST_ATTRIBUTE = "splice"  # the child of a base layer that holds its adapters (core.host)
HEADS_ATTRIBUTE = "splice_heads"  # the model root's child that holds copies of modules trained in full (core.heads)

# PEFT's per-architecture defaults (utils/constants.py) for the families users bring most.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "t5": ["q", "v"],
    "vit": ["query", "value"],
}


def named_base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module of the model except splice's own (hosts, adapters, copies of trained heads),
    each once under its first name, as `nn.Module.named_modules` (and PEFT) give it: a module
    registered at two paths is one module to adapt."""
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        if id(module) in seen:
            return
        seen.add(id(module))
        yield prefix, module
        for child_name, child in module.named_children():
            if is_splice_child(child_name, child):
                continue
            yield from walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    yield from walk(model, "")


def tied_parameters(model: nn.Module) -> dict[int, list[str]]:
    """Parameters held by more than one module (tied embeddings), by id, with their names."""
    holders: dict[int, list[str]] = {}
    for module_name, module in named_base_modules(model):
        for param_name, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append(f"{module_name}.{param_name}".lstrip("."))
    return {key: names for key, names in holders.items() if len(names) > 1}


def is_splice_child(name: str, child: nn.Module) -> bool:
    """Whether a child module is one splice added (a host of adapters, copies of a trained head):
    those classes say so with a `splice_internal` class attribute."""
    return name in (HOST_ATTRIBUTE, HEADS_ATTRIBUTE) and getattr(type(child), "splice_internal", False)


def matches(pattern: Targets, name: str) -> bool:
    """PEFT's name rule for one pattern (a regex string or a list of names/suffixes)."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in pattern)


def exact_targets(model: nn.Module, names: list[str]) -> Targets:
    """`targets` that select exactly these modules: the list of names where no other module's
    name ends with one of them (a list entry also selects "<anything>.entry"), else a regex."""
    selected = {n for n, _ in named_base_modules(model) if n and matches(names, n)}
    return list(names) if selected == set(names) else "|".join(re.escape(n) for n in names)


def layer_index(name: str, layers_pattern: str | list[str] | None = None) -> int | None:
    """The layer number in a module path, by PEFT's rule (`layers_to_transform`): the first
    number that follows a segment named in `layers_pattern`, or without one the first number
    that follows any segment but the first (`encoder.block.3.layer.1.SelfAttention.q` is layer 3)."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        found = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name))), None)
    return int(found.group(1)) if found else None


def output_head_names(model: nn.Module) -> set[str]:
    """The output layer that "all-linear" leaves alone, by PEFT's rule: on a transformers model
    its output embeddings (the LM head), else for a sequence classifier its `classifier` or
    `score` head (what PEFT does with task_type SEQ_CLS, the task every PEFT user of such a model
    sets); on any other module nothing (PEFT adapts a plain model's `classifier` too)."""
    if not isinstance(model, PreTrainedModel):
        return set()
    head = model.get_output_embeddings()
    if head is None and type(model).__name__.endswith("ForSequenceClassification"):
        heads = [getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
        return {name for name, module in model.named_modules() if any(module is h for h in heads)}
    return {name for name, module in model.named_modules() if module is head} if head is not None else set()


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise TargetError(
        f"no default targets for model type {model_type!r}; pass targets= explicitly "
        f"(module names, a regex, or {ALL_LINEAR!r}). Linear modules here: "
        f"{_describe_names(_linear_names(model))}"
    )


def resolve_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs `config` selects, in model order; an error if there are none."""
    if config.site == "block":
        return _block_targets(model, config)
    targets = config.targets if config.targets is not None else default_targets(model)
    heads = output_head_names(model) if targets == ALL_LINEAR else set()
    selected = []
    for name, module in named_base_modules(model):
        if not name or matches(config.exclude, name) or _inside(config.train_also, name):
            continue
        if targets == ALL_LINEAR:  # every Linear that can host one (an explicit target that cannot is refused)
            hit = (isinstance(module, (nn.Linear, Conv1D)) and not _inside(list(heads), name)
                   and unsupported_reason(module) is None)
        else:
            hit = matches(targets, name)
        if hit and config.layers is not None:
            hit = layer_index(name, config.layers_pattern) in config.layers
        if not hit:
            continue
        if describe(module) is None:
            raise TargetError(
                f"target {targets!r} selects {name!r}, a {type(module).__name__}; adapters can be "
                "attached to Linear, transformers Conv1D, Conv1d/Conv2d and Embedding modules"
            )
        reason = unsupported_reason(module)
        if reason:
            raise TargetError(f"cannot attach to {name!r} ({type(module).__name__}): {reason}")
        selected.append((name, module))
    if not selected:
        raise TargetError(_no_match_message(model, targets, config))
    if isinstance(targets, list):
        _refuse_unmatched_entries(model, targets)
    _refuse_unmatched_excludes(model, config.exclude)
    return selected


def site_info(model: nn.Module, name: str, module: nn.Module, config: AdapterConfig) -> LayerInfo:
    """The `LayerInfo` an adapter of `config` is built from at module `name`."""
    if config.site != "block":
        info = describe(module)
        assert info is not None, name  # resolve_targets only selects hostable layers
        return info
    width = hidden_size(model, name, module)
    return LayerInfo("block", width, width)


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The main stack of layers: the largest ModuleList held under a usual name (layers, h, ...)."""
    stacks = [
        (name, module) for name, module in named_base_modules(model)
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in COMMON_LAYER_SEGMENTS and len(module)
    ]
    if not stacks:
        return []
    name, stack = max(stacks, key=lambda item: len(item[1]))
    return [(f"{name}.{i}", block) for i, block in enumerate(stack)]


def hidden_size(model: nn.Module, name: str, module: nn.Module) -> int:
    """Width of the hidden states a block outputs: the model config's, else its last Linear's."""
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    linears = [m for m in module.modules() if isinstance(m, (nn.Linear, Conv1D))]
    if linears:
        return describe(linears[-1]).out_features
    raise TargetError(f"cannot tell the hidden size of {name!r} ({type(module).__name__}): the model has no "
                      "config.hidden_size and the module holds no Linear layer")


def _block_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """Whole modules whose output an adapter edits: the transformer layers, or named modules."""
    blocks = transformer_blocks(model)
    if config.targets is None:
        if not blocks:
            raise TargetError("found no stack of transformer layers (a ModuleList named layers, layer, h, "
                              "block or blocks); name the modules to edit with targets=")
        candidates = blocks
    else:
        candidates = [(n, m) for n, m in named_base_modules(model) if n and matches(config.targets, n)]
    index = {name: i for i, (name, _) in enumerate(blocks)}
    selected = [
        (name, module) for name, module in candidates
        if not matches(config.exclude, name)
        and (config.layers is None or index.get(name, layer_index(name + ".", config.layers_pattern)) in config.layers)
    ]
    if not selected:
        names = [n for n, _ in blocks] or [n for n, _ in named_base_modules(model) if n][:12]
        raise TargetError(f"targets {config.targets!r} (layers {config.layers}) selected no module to edit; "
                          f"the model's layers: {_describe_names(names)}, e.g. {names[0]!r}")
    return selected


def _inside(names: list[str], name: str) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(n)}($|\..*)", name) for n in names)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in named_base_modules(model) if n and describe(m) is not None]


def _describe_names(names: list[str], limit: int = 12) -> str:
    leaves = Counter(n.rsplit(".", 1)[-1] for n in names)
    listed = ", ".join(f"{leaf} (x{count})" for leaf, count in leaves.most_common(limit))
    return listed or "none"


def _refuse_unmatched_entries(model: nn.Module, targets: list[str]) -> None:
    """A list entry that names no module is a typo (["quary", "value"] would adapt `value` alone,
    silently, in HF PEFT): refused with the names that are close."""
    names = [n for n, _ in named_base_modules(model) if n]
    unmatched = [entry for entry in targets if not any(matches([entry], n) for n in names)]
    if not unmatched:
        return
    leaves = sorted({n.rsplit(".", 1)[-1] for n in _linear_names(model)})
    hints = [f"{entry!r} (did you mean {', '.join(map(repr, close))}?)" if close else repr(entry)
             for entry in unmatched for close in [difflib.get_close_matches(entry, leaves, n=3, cutoff=0.5)]]
    raise TargetError(f"targets entries {', '.join(hints)} match no module of the model (the other entries "
                      f"do). Modules that can host an adapter: {_describe_names(_linear_names(model))}. To name "
                      "modules that only some models have, use a regex (targets='.*(q_proj|qkv_proj)').")


def _refuse_unmatched_excludes(model: nn.Module, exclude: Targets) -> None:
    """An exclude list entry that names no module is a typo, and the module meant to be left
    out would get an adapter (HF PEFT warns of it): refused with the names that are close."""
    if not isinstance(exclude, list):
        return
    names = [n for n, _ in named_base_modules(model) if n]
    unmatched = [entry for entry in exclude if not any(matches([entry], n) for n in names)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in _linear_names(model)})
        close = difflib.get_close_matches(unmatched[0], leaves, n=3, cutoff=0.5)
        raise TargetError(f"exclude entries {unmatched} match no module of the model, so nothing would be left out"
                          + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
                          + f". Modules that can host an adapter: {_describe_names(_linear_names(model))}")


def _no_match_message(model: nn.Module, targets: Targets, config: AdapterConfig) -> str:
    hostable = _linear_names(model)
    wanted = [targets] if isinstance(targets, str) else list(targets)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in hostable})
    near: list[str] = []
    for entry in wanted:
        near += difflib.get_close_matches(entry.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.5)
        near += difflib.get_close_matches(entry, hostable, n=3, cutoff=0.6)
    parts = [f"targets {targets!r} matched no module"]
    if config.layers is not None:
        parts.append(f"in layers {config.layers}")
    if config.exclude is not None:
        parts.append(f"(after exclude={config.exclude!r})")
    message = " ".join(parts) + "."
    if isinstance(targets, str) and targets != ALL_LINEAR:
        message += (f" A string is a regex that must match a module's whole dotted name: for modules named "
                    f"{targets.rsplit('.', 1)[-1]!r} give the list [{targets!r}] or the regex "
                    f"'.*\\.{targets}'.")
    if config.layers is not None:
        targeted = hostable if targets == ALL_LINEAR else \
            [n for n, _ in named_base_modules(model) if n and matches(targets, n)]
        indices = sorted({i for n in targeted if (i := layer_index(n, config.layers_pattern)) is not None})
        message += (f" The targeted modules are in layers {indices}." if indices else
                    " No layer index was found in the module names"
                    + (f" after layers_pattern {config.layers_pattern!r}." if config.layers_pattern else "."))
    if near:
        message += f" Similar names that exist: {', '.join(dict.fromkeys(near))}."
    message += f" Modules that can host an adapter: {_describe_names(hostable)}"
    if hostable:
        message += f"; e.g. {hostable[0]!r}"
    return message
