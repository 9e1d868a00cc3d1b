"""HF PEFT's LoRA directory layout, both ways.

Writing: `adapter_config.json` (`io.peft_config`) and `adapter_model.safetensors` with PEFT's
tensor names (`io.peft_keys`). Reading: the same files as written by PEFT (LoRA, rsLoRA, DoRA on
Linear layers, rank/alpha patterns, lora_bias, modules_to_save, Conv and Embedding LoRA).
Everything is validated against the model before anything changes. Both directions go through
`AdapterState`, the model-free form that merging and compression work on: `from_peft`/`to_peft`
convert files, `lora_state` reads an attached adapter, `attach_state` attaches one, and
`state_pairs` pairs an attached adapter's tensors with a state's (to copy one into the other).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.core.adapter_state import AdapterState, ModuleUpdate
from splice.core.api import attaching, model_state
from splice.core.errors import AdapterFileError, ShapeMismatchError, SpliceError
from splice.core.heads import head_tensors
from splice.core.host import hosts
from splice.core.layers import describe
from splice.core.targets import exact_targets, named_base_modules
from splice.core.validation import located
from splice.io.adapter_files import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, paired_tensors
from splice.io.base_names import base_model_name
from splice.io.files import write_config, write_weights
from splice.io.peft_config import (  # noqa: F401  (check_peft_config, portability_problems re-exported)
    check_peft_config,
    check_readable,
    peft_config,
    portability_problems,
    ranks_and_alphas,
    residual_init,
    target_modules,
    task_type,
    tidy,
)
from splice.io.peft_keys import (  # noqa: F401  (PREFIX, check_peft_tensors re-exported)
    PREFIX,
    Tensors,
    check_base_copies,
    check_peft_tensors,
    check_supported,
    is_head_key,
    peft_tensors,
    split_keys,
)
from splice.methods.dora import DoRA, DoRAAdapter
from splice.methods.lora import LoRA, LoRAAdapter, exact_pattern, pattern_value


def can_write(model: nn.Module, name: str) -> bool:
    """PEFT's format holds LoRA adapters only."""
    return all(isinstance(host[name], LoRAAdapter) for _, _, host in hosts(model) if name in host)


def write(model: nn.Module, path: Path, name: str, portable: bool = False) -> tuple[dict[str, Any], Tensors]:
    """Write adapter `name` of the model as a PEFT LoRA directory; the config and tensors written."""
    return write_state(lora_state(model, name), path, portable=portable)


def write_state(state: AdapterState, path: Path, portable: bool = False) -> tuple[dict[str, Any], Tensors]:
    """Write an adapter state as a PEFT LoRA directory (into an existing, prepared `path`); the
    config and tensors written."""
    if portable:
        problems = portability_problems([u.rank for u in state.modules.values()],
                                        [tidy(state.alpha(u)) for u in state.modules.values()], state.heads)
        if problems:
            raise SpliceError("adapter is not portable to vLLM: " + "; ".join(problems))
    config, tensors = to_peft(state)
    write_config(path, config)
    write_weights(path, tensors)
    return config, tensors


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
    # SFed-LoRA's scale alpha*sqrt(N/r) is PEFT's rsLoRA scale of lora_alpha = alpha*sqrt(N): the
    # state's alphas are read off the scales with sqrt(r), so PEFT computes the same scale
    return AdapterState(
        modules, head_tensors(model, record.heads, name), list(record.heads),
        rslora=config.scaling_rule != "standard", dropout=config.dropout,
        base_model=base_model_name(model), task_type=task_type(model, record.heads),
        target_modules=target_modules(model, list(modules), record.heads), fan_in_fan_out=transposed,
    )


def to_peft(state: AdapterState) -> tuple[dict[str, Any], Tensors]:
    """(adapter_config.json contents, tensors) of a PEFT LoRA directory holding `state`."""
    return peft_config(state), peft_tensors(state)


# -- reading ---------------------------------------------------------------------------------


def read(model: nn.Module, config: dict[str, Any], tensors: Tensors, name: str, trainable: bool, *,
         source: str | Path | None = None, allow_nonfinite: bool = False, heads: bool = True) -> None:
    """Attach the PEFT directory's contents as adapter `name`; `source` (the directory) is named
    in every error about the files. `heads=False` leaves out the modules it trained in full."""
    check_supported(model, tensors)
    state = from_peft(config, tensors, source=source, allow_nonfinite=allow_nonfinite)
    check_base_copies(model, tensors)
    if not heads:
        state = dataclasses.replace(state, head_tensors={}, heads=[])
    attach_state(model, state, name, trainable=trainable)


def from_peft(config: dict[str, Any], tensors: Tensors, *, source: str | Path | None = None,
              allow_nonfinite: bool = False) -> AdapterState:
    """A PEFT LoRA directory's contents as an adapter state, checked for consistency (no model).

    Every key splice reads is type-checked (`check_peft_config`) and every tensor checked for its
    dtype, shape and finite values (`check_peft_tensors`; `allow_nonfinite=True` lets NaN and
    infinite values through, for inspecting a diverged run). `source`, the directory, is named
    in the errors.
    """
    check_readable(config, Path(source) / CONFIG_NAME if source is not None else CONFIG_NAME)
    residual = residual_init(config.get("init_lora_weights", True))
    saved = config.get("modules_to_save") or []
    factors, saved_heads, embeddings = split_keys(tensors, saved, where=_weights_file(source))
    check_peft_tensors(tensors, _weights_file(source), finite=not allow_nonfinite)
    modules = {module_name: _module_update(config, module_name, pair, module_name in embeddings, source)
               for module_name, pair in factors.items()}
    held = [m for m in saved if any(is_head_key(k, [m]) for k in saved_heads)]
    return AdapterState(
        modules, saved_heads, held, rslora=config.get("use_rslora", False),
        dropout=float(config.get("lora_dropout", 0.0)),
        base_model=config.get("base_model_name_or_path"), task_type=config.get("task_type"),
        target_modules=config.get("target_modules"), fan_in_fan_out=config.get("fan_in_fan_out", False),
        residual_init=residual,
    )


def _module_update(config: dict[str, Any], module_name: str, pair: Tensors, embedding: bool,
                   source: str | Path | None) -> ModuleUpdate:
    """One module's tensors as an update, checked against what the config says of it (rank, DoRA,
    lora_bias); the scaling from its alpha and rank."""
    dora, lora_bias = config.get("use_dora", False), config.get("lora_bias", False)
    if dora != ("M" in pair):
        raise AdapterFileError(located(source, f"{module_name}: use_dora={dora} but the file "
                                               f"{'lacks' if dora else 'has'} its lora_magnitude_vector"))
    if ("b" in pair) != lora_bias:
        raise AdapterFileError(located(source, f"{module_name}: lora_bias={lora_bias} in the config but the "
                                               f"file {'has' if 'b' in pair else 'lacks'} its lora_B.bias"))
    rank = pair["A"].shape[0]
    declared = pattern_value(config.get("rank_pattern") or {}, module_name, config.get("r", 8))
    if declared != rank:
        raise AdapterFileError(located(source, f"{module_name}: config says r={declared} but the tensors "
                                               f"have rank {rank}"))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module_name, config.get("lora_alpha", 8))
    kind = "embedding" if embedding else "conv" if pair["A"].dim() > 2 else "linear"
    try:
        return ModuleUpdate(pair["A"], pair["B"], alpha / (math.sqrt(rank) if config.get("use_rslora") else rank),
                            kind, pair.get("b"), pair.get("M"))
    except ShapeMismatchError as err:
        raise AdapterFileError(located(source, f"{module_name}: {err}")) from None


def _weights_file(source: str | Path | None) -> Path | str:
    """The weights file of directory `source` (safetensors, or PEFT's legacy .bin), for messages."""
    if source is None:
        return WEIGHTS_NAME
    legacy = Path(source) / LEGACY_WEIGHTS_NAME
    return legacy if legacy.is_file() and not (Path(source) / WEIGHTS_NAME).is_file() else Path(source) / WEIGHTS_NAME


# -- attaching -------------------------------------------------------------------------------


def attach_state(model: nn.Module, state: AdapterState, name: str = "default", trainable: bool = False) -> nn.Module:
    """Attach an adapter state as LoRA (DoRA if it has magnitudes) adapter `name`, after checking
    every module, kind, shape and head against the model; nothing changes when one does not fit."""
    lora_config = _lora_config(model, state)
    try:
        with attaching(model, lora_config, name, trainable=trainable):
            with torch.no_grad():
                for target, value in state_pairs(model, name, state, "the adapter state"):
                    target.copy_(value)
    except (KeyError, RuntimeError) as err:
        raise AdapterFileError(f"the adapter does not fit the model; nothing was attached ({err})") from err
    # Built from zeros and then filled; the recorded config says how a fresh one would start, so
    # that attaching it again to another model gives an adapter that trains.
    record = model_state(model).adapters[name]
    record.config = record.config.replace(init=state.residual_init or "default")
    return model


def state_pairs(model: nn.Module, name: str, state: AdapterState, where: object) -> list[tuple[torch.Tensor,
                                                                                               torch.Tensor]]:
    """(the model's tensor, the state's value) for every tensor of LoRA adapter `name` (factors,
    lora_B bias, DoRA magnitude, heads): the modules the state targets must be exactly the ones
    the adapter is attached to, and every shape must agree; else refused naming `where`."""
    attached = {module_name: host[name] for module_name, _, host in hosts(model) if name in host}
    targets: Tensors = {}
    values: Tensors = {}
    for module_name, adapter in attached.items():
        targets |= _named(module_name, adapter.lora_A, adapter.lora_B, adapter.lora_bias,
                          getattr(adapter, "lora_magnitude_vector", None))
    for module_name, u in state.modules.items():
        bias = u.bias
        # lora_bias is on every module once one has it; a module the state gives none changes no bias
        if bias is None and module_name in attached and attached[module_name].lora_bias is not None:
            bias = torch.zeros_like(attached[module_name].lora_bias)
        values |= _named(module_name, u.A, u.B, bias, u.magnitude)
    targets |= head_tensors(model, model_state(model).adapters[name].heads, name, keep_vars=True)
    values |= state.head_tensors
    return paired_tensors(targets, values, where)


def _named(module_name: str, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None,
           magnitude: torch.Tensor | None) -> Tensors:
    """A LoRA module's tensors under the names `state_pairs` matches them by."""
    named = {f"{module_name}.lora_A": A, f"{module_name}.lora_B": B, f"{module_name}.lora_B.bias": bias,
             f"{module_name}.lora_magnitude_vector": magnitude}
    return {key: value for key, value in named.items() if value is not None}


def _lora_config(model: nn.Module, state: AdapterState) -> LoRA:
    """A splice LoRA config selecting exactly the state's modules, with their ranks and alphas,
    after checking each module and head against the model."""
    modules = dict(named_base_modules(model))
    for module_name, update in state.modules.items():
        _check_fits(module_name, modules.get(module_name), update)
    # where saved heads are copied; tied weights (GPT-2's lm_head and wte) under every name they have
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for key, value in state.head_tensors.items():
        if key not in params:
            raise ShapeMismatchError(f"adapter holds {key!r} (modules_to_save) but the model has no such tensor")
        if params[key].shape != value.shape:
            raise ShapeMismatchError(
                f"{key}: adapter has shape {tuple(value.shape)}, model has {tuple(params[key].shape)}"
            )
    ranks, alphas, r, alpha = ranks_and_alphas(state)
    return (DoRA if state.dora else LoRA)(
        r=r, alpha=alpha, rslora=state.rslora, dropout=state.dropout, init=state.residual_init or "zeros",
        targets=exact_targets(model, list(state.modules)), train_also=list(state.heads),
        lora_bias=any(u.bias is not None for u in state.modules.values()),
        rank_pattern=exact_pattern({n: v for n, v in ranks.items() if v != r}, state.modules),
        alpha_pattern=exact_pattern({n: v for n, v in alphas.items() if v != alpha}, state.modules),
    )


_TENSOR_NAMES = {"A": "lora_A", "B": "lora_B", "M": "lora_magnitude_vector", "b": "lora_B.bias"}


def _check_fits(module_name: str, module: nn.Module | None, update: ModuleUpdate) -> None:
    """Refuse an update that does not fit the model's module: missing, another kind of layer,
    DoRA off Linear layers, lora_bias without a bias, any tensor of the wrong shape."""
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


def _expected_shapes(info: Any, rank: int) -> dict[str, tuple[int, ...]]:
    if info.kind == "conv":
        return {"A": (rank, info.in_features, *info.kernel_size),
                "B": (info.out_features, rank, *(1,) * info.conv_dims), "b": (info.out_features,)}
    return {"A": (rank, info.in_features), "B": (info.out_features, rank), "M": (info.out_features,),
            "b": (info.out_features,)}
