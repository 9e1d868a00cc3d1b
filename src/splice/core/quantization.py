"""QLoRA's base: a model's frozen Linear weights in 4-bit NF4, and the way back to full precision.

`quantize(model, "nf4")` replaces the base model's Linear layers in place by 4-bit layers of
torchao or bitsandbytes (`core.nf4_layers`), before adapters are attached. Adapters then attach to
them as to any layer: the host calls the 4-bit layer's own forward and adds the adapter's delta,
which trains in fp32. A 4-bit weight cannot take a merged delta exactly, so `merge` refuses it;
`dequantize` (and `unload(dequantize=True)`) turns the layers back into dense fp32 Linears, where
merging is exact, and `requantize` quantizes them again on request, measuring what that rounding
costs the merged change.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from splice.core import progress
from splice.core.errors import SpliceError, TargetError
from splice.core.host import host_of
from splice.core.nf4_layers import (
    BACKENDS,
    FROM_CONV1D,
    NF4Settings,
    QuantizationSkip,
    conv1d_layer,
    dense_4bit,
    dense_dtype,
    dense_linear,
    is_4bit_layer,
    is_4bit_tensor,
    quantize_layer,
    settings_of,
    storage_bytes,
    weight_count,
)
from splice.core.targets import Targets, matches, named_base_modules, output_head_names, tied_parameters

SCHEMES = ("nf4",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quantize(model: nn.Module, scheme: str = "nf4", *, double_quant: bool = True,
             compute_dtype: torch.dtype | str | None = None, skip: Targets = None, keep_heads: bool = True,
             backend: str = "auto", block_size: int = 64) -> nn.Module:
    """Replace the base model's Linear (and transformers Conv1D) layers by frozen 4-bit NF4 layers,
    in place, and return the model. Call it before attaching adapters.

    Args:
        scheme: "nf4" (4-bit NormalFloat, QLoRA's).
        double_quant: quantize the per-block absmax constants to 8 bits as well (QLoRA's double
            quantization: ~0.127 instead of 0.5 bits of overhead per weight). torchao always does.
        compute_dtype: the dtype a 4-bit weight is dequantized to for its matrix product (a dtype
            or its name); None: the dtype the weight has now. bf16 halves the dequantized
            temporaries, but on a CPU without bf16 instructions its products are slower than
            fp32's (9x for a 512 x 576 x 1536 product on this repository's 2-core AMD EPYC).
        skip: module names or suffixes (a list) or a regex, as `targets` takes them, kept dense.
        keep_heads: keep the output layer dense (the LM head, a sequence classifier's
            `classifier`/`score`), as transformers' bitsandbytes integration does.
        backend: "torchao" (any device), "bitsandbytes" (CUDA; CPU through its CPU backend) or
            "auto": bitsandbytes for a model on CUDA when it is installed, torchao otherwise.
        block_size: weights that share one absmax (64 in QLoRA).

    Embeddings, norms and every other module stay as they are; so does a Linear whose weight
    another module shares (a tied LM head). A layer the library cannot take (torchao needs a
    weight count that is a multiple of `block_size`) stays dense with a warning naming it.
    """
    quantize_options({"scheme": scheme, "double_quant": double_quant, "compute_dtype": compute_dtype, "skip": skip,
                      "keep_heads": keep_heads, "backend": backend, "block_size": block_size})
    attached = [name for name, module in named_base_modules(model) if host_of(module) is not None]
    if attached:
        raise SpliceError(f"quantize the base model before attaching adapters: {len(attached)} layer(s) already "
                          f"host adapters ({', '.join(attached[:3])}{' ...' if len(attached) > 3 else ''})")
    chosen = _pick(model, skip, keep_heads)
    if not chosen:
        raise SpliceError("quantize: no Linear layer left to quantize (after skip and keep_heads); layers "
                          f"here: {', '.join(_linear_layer_names(model)[:12]) or 'none'}")
    device = next(iter(chosen.values())).weight.device
    settings = {name: NF4Settings(resolve_backend(backend, device), block_size, double_quant,
                                  _compute_dtype(compute_dtype, module.weight.dtype))
                for name, module in chosen.items()}
    left_dense = _replace(model, settings)
    if len(left_dense) == len(settings):
        reasons = "; ".join(f"{name} ({why})" for name, why in list(left_dense.items())[:4])
        raise SpliceError(f"quantize: the {next(iter(settings.values())).backend} backend took none of the "
                          f"{len(settings)} layers: {reasons}")
    if left_dense:
        warnings.warn(f"quantize: {len(left_dense)} layer(s) stay dense: "
                      + "; ".join(f"{name} ({why})" for name, why in list(left_dense.items())[:6]), stacklevel=2)
    _own_storage(model)
    return model


def _own_storage(model: nn.Module) -> None:
    """Copy the dense tensors left on the CPU into memory of their own. transformers maps a
    safetensors file into memory and its tensors read from that map; quantizing touches every
    page of it, and the map (all of the file, the replaced fp32 weights included) stays resident
    while any tensor from it lives, the embeddings say. Measured here on SmolLM2-135M (fp32 file,
    torchao NF4): 869 MB resident after quantizing without this copy, 572 MB with it."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and not is_4bit_tensor(tensor):
                tensor.data = tensor.data.clone()


OPTION_KEYS = ("scheme", "double_quant", "compute_dtype", "skip", "keep_heads", "backend", "block_size")


def quantize_options(spec: str | dict[str, Any]) -> dict[str, Any]:
    """`quantize`'s keyword arguments from a config's `quantize` value: a scheme name ("nf4") or a
    mapping of those arguments; a SpliceError naming the key and value that cannot work."""
    if not isinstance(spec, (str, dict)):
        raise SpliceError(f"quantize: give a scheme name (nf4) or a mapping of options, got {spec!r}")
    options = {"scheme": spec} if isinstance(spec, str) else dict(spec)
    unknown = [k for k in options if k not in OPTION_KEYS]
    if unknown:
        close = {k: difflib.get_close_matches(k, OPTION_KEYS, n=1) for k in unknown}
        raise SpliceError(f"quantize: unknown key(s) {unknown} (close: {close}); keys: {', '.join(OPTION_KEYS)}")
    if options.get("scheme", "nf4") not in SCHEMES:
        raise SpliceError(f"quantize: scheme {options['scheme']!r} is not supported; choose {', '.join(SCHEMES)}")
    if options.get("backend", "auto") not in ("auto", *BACKENDS):
        raise SpliceError(f"quantize: backend {options['backend']!r} is not one of auto, {', '.join(BACKENDS)}")
    if options.get("compute_dtype") is not None:
        _compute_dtype(options["compute_dtype"], torch.float32)
    skip = options.get("skip")
    names = isinstance(skip, list) and all(isinstance(entry, str) for entry in skip)
    if not (skip is None or isinstance(skip, str) or names):
        raise SpliceError(f"quantize: skip must be a list of module names or suffixes, or a regex string; got {skip!r}")
    for key in ("double_quant", "keep_heads"):
        if not isinstance(options.get(key, True), bool):
            raise SpliceError(f"quantize: {key} must be true or false, got {options[key]!r}")
    size = options.get("block_size", 64)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise SpliceError(f"quantize: block_size must be a positive integer, got {size!r}")
    return options


def resolve_backend(backend: str, device: torch.device) -> str:
    """The library a backend name means for a model on `device`."""
    if backend != "auto":
        return backend
    if device.type == "cuda":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "torchao"
        return "bitsandbytes"
    return "torchao"


def _compute_dtype(value: torch.dtype | str | None, weight_dtype: torch.dtype) -> torch.dtype:
    if value is None:
        return weight_dtype if weight_dtype in DTYPES.values() else torch.float32
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    raise SpliceError(f"quantize: compute_dtype must be one of {', '.join(DTYPES)}, got {value!r}")


def _linear_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in named_base_modules(model) if isinstance(module, (nn.Linear, Conv1D))]


def _pick(model: nn.Module, skip: Targets, keep_heads: bool) -> dict[str, nn.Module]:
    """The dense Linear layers to quantize, by name."""
    names = set(_linear_layer_names(model))
    if isinstance(skip, list):
        unmatched = [entry for entry in skip if not any(matches([entry], n) for n in names)]
        if unmatched:
            near = {e: difflib.get_close_matches(e, {n.rsplit(".", 1)[-1] for n in names}, n=3) for e in unmatched}
            raise TargetError(f"quantize: skip entries {unmatched} match no Linear layer (close: {near}); "
                              f"Linear layers here: {', '.join(_linear_layer_names(model)[:12])}")
    heads = output_head_names(model) if keep_heads else set()
    shared = tied_parameters(model)
    return {name: module for name, module in named_base_modules(model)
            if name in names and not is_4bit_layer(module) and not matches(skip, name) and not _under(heads, name)
            and id(module.weight) not in shared and module.weight.dtype.is_floating_point}


def _under(heads: set[str], name: str) -> bool:
    """Whether module `name` is one of `heads` or inside one (RoBERTa's classifier holds two Linears)."""
    return any(name == head or name.startswith(head + ".") for head in heads)


def _replace(model: nn.Module, settings: dict[str, NF4Settings]) -> dict[str, str]:
    """Swap each named layer for its 4-bit copy; the layers left dense, with why."""
    left: dict[str, str] = {}
    with torch.no_grad():
        for name, layer_settings in progress.track(list(settings.items()), "quantize"):
            module = model.get_submodule(name)
            try:
                new = quantize_layer(module, layer_settings)
            except QuantizationSkip as why:
                left[name] = str(why)
                continue
            _swap(model, name, module, new)
    return left


def _swap(model: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    """Put `new` where `old` was, its adapters' host (if any) moved along."""
    host = host_of(old)
    if host is not None:
        host.move_to(old, new)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def quantized_layers(model: nn.Module) -> dict[str, NF4Settings | None]:
    """Every 4-bit layer of the model by name, with the settings it was quantized with (None for
    a bitsandbytes layer that is not NF4)."""
    return {name: settings_of(module) for name, module in named_base_modules(model) if is_4bit_layer(module)}


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every 4-bit layer by a dense layer holding its weight dequantized, in place, and
    return the model: in `dtype`, by default the dtype the weight had before it was quantized
    (so a bf16 model stays bf16 throughout). The dense weight is exactly what the 4-bit layer
    computed with, so outputs change only by the compute dtype's rounding.

    A layer quantized from a transformers Conv1D (GPT-2) becomes a Conv1D again, unless it hosts
    adapters: those were built for the 4-bit layer's [out, in] layout, so it stays an nn.Linear
    until `unload` has merged them (which then restores the Conv1D)."""
    with torch.no_grad():
        for name, module in list(named_base_modules(model)):
            if is_4bit_layer(module):
                as_conv1d = getattr(module, FROM_CONV1D, False) and host_of(module) is None
                _swap(model, name, module, dense_linear(module, dtype or dense_dtype(module), as_conv1d))
    return model


def restore_conv1d(model: nn.Module) -> None:
    """Give back their Conv1D form to the dense layers `dequantize` left as nn.Linear because they
    hosted adapters, once they host none."""
    with torch.no_grad():
        for name, module in list(named_base_modules(model)):
            if type(module) is nn.Linear and getattr(module, FROM_CONV1D, False) and host_of(module) is None:
                conv = conv1d_layer(module.weight, module.bias)
                setattr(conv, FROM_CONV1D, True)
                _swap(model, name, module, conv)


@contextmanager
def dequantized(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[dict[str, nn.Module]]:
    """Within the block the 4-bit layers are dense (`dequantize`); the block gets the 4-bit layers
    by name. When the block raises, the very 4-bit layers are put back, so a refused merge leaves
    the model as it was."""
    old = {name: module for name, module in named_base_modules(model) if is_4bit_layer(module)}
    dequantize(model, dtype)
    try:
        yield old
    except BaseException:
        put_back(model, old)
        raise


def put_back(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Put earlier layers (4-bit ones a `dequantized` block replaced) back at their names."""
    for name, module in layers.items():
        _swap(model, name, model.get_submodule(name), module)


def describe_requantize(errors: dict[str, RequantizeError | None]) -> str:
    """One sentence on what quantizing merged layers again cost (None: a layer left dense)."""
    dense = [name for name, error in errors.items() if error is None]
    kept = f"; {len(dense)} merged layer(s) not in NF4 (bitsandbytes FP4) stay dense: {dense[:3]}" if dense else ""
    errors = {name: error for name, error in errors.items() if error is not None}
    if not errors:
        return "requantize: no merged layer changed, every 4-bit layer is the one it was" + kept
    of_change = sorted(e.of_change for e in errors.values())
    of_weight = max(e.of_weight for e in errors.values())
    return (f"requantize: {len(errors)} merged layer(s) back in 4-bit; the rounding moves the weights by up to "
            f"{of_weight:.1%} of their norm, which is {of_change[len(of_change) // 2]:.0%} (median; worst "
            f"{of_change[-1]:.0%}) of the merged adapter's change: keep the dequantized model, or the adapter "
            f"unmerged, where that matters{kept}")


@dataclass(frozen=True)
class RequantizeError:
    """What quantizing a merged layer again costs: ‖Q(W) − W‖ relative to ‖W‖ and to the merged
    change ‖W − W₀‖ (the share of the adapter's effect that rounding moves)."""

    of_weight: float
    of_change: float


def requantize(model: nn.Module, old: dict[str, nn.Module]) -> dict[str, RequantizeError | None]:
    """Quantize again, with the settings of their 4-bit layers in `old`, the named dense layers whose
    weight changed since they were dequantized from those layers, and measure the error against their
    dense weights now and against that change (None: a changed layer not in NF4, left dense); the
    unchanged ones get their very 4-bit layers back (NF4 does not reproduce itself exactly from its
    dequantized weights)."""
    errors: dict[str, RequantizeError | None] = {}
    with torch.no_grad():
        for name, layer in old.items():
            module = model.get_submodule(name)
            dense = canonical_weight(module)
            before = dense_4bit(layer.weight).to(dense.dtype)
            if torch.equal(dense, before):
                put_back(model, {name: layer})
                continue
            layer_settings = settings_of(layer)
            if layer_settings is None:
                errors[name] = None
                continue
            new = quantize_layer(module, layer_settings)
            dense, before = dense.float(), before.float()
            rounded = dense_4bit(new.weight).float() - dense
            errors[name] = RequantizeError(_ratio(rounded, dense), _ratio(rounded, dense - before))
            _swap(model, name, module, new)
    return errors


def canonical_weight(module: nn.Module) -> torch.Tensor:
    """A dense layer's weight in the [out, in] layout (a Conv1D's transposed)."""
    return module.weight.detach().T if isinstance(module, Conv1D) else module.weight.detach()


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    below = denominator.norm().item()
    return numerator.norm().item() / below if below > 0 else math.inf if numerator.norm().item() > 0 else 0.0


def base_bytes(model: nn.Module) -> dict[str, Any]:
    """Bytes of the base: its 4-bit layers' weights as stored (codes with every scale), the bf16 and
    fp32 bytes the same weights would take, the dense Linear weights left, and the whole model's
    parameters and buffers (shared tensors once)."""
    quantized = weights = dense_weights = dense_bytes = 0
    counted: set[int] = set()
    for _, module in named_base_modules(model):
        if not isinstance(module, (nn.Linear, Conv1D)) or id(module.weight) in counted:
            continue
        counted.add(id(module.weight))
        if is_4bit_layer(module):
            quantized += storage_bytes(module.weight)
            weights += weight_count(module.weight)
        else:
            dense_weights += module.weight.numel()
            dense_bytes += storage_bytes(module.weight)
    total = 0
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += storage_bytes(tensor)
    return {"quantized_weights": weights, "quantized_bytes": quantized, "quantized_as_bf16_bytes": 2 * weights,
            "quantized_as_fp32_bytes": 4 * weights, "bits_per_weight": 8 * quantized / weights if weights else 0.0,
            "dense_linear_weights": dense_weights, "dense_linear_bytes": dense_bytes, "model_bytes": total}
