"""What an adapter needs to know about the base layer it is attached to.

Adapters are built from a `LayerInfo`, never from the base module itself, so that a method file
only deals with shapes and never with the zoo of layer classes (nn.Linear, transformers' Conv1D,
quantized linears, convolutions, embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from transformers.pytorch_utils import Conv1D

from splice.core.nf4_layers import dense_4bit, is_4bit_layer

LayerKind = Literal["linear", "conv", "embedding", "block"]


@dataclass(frozen=True)
class LayerInfo:
    """Shapes and call parameters of one base layer.

    `in_features`/`out_features` are channels for convolutions, (num_embeddings,
    embedding_dim) for embeddings, and the hidden size (both) for a "block": a whole module,
    typically a transformer layer, whose output hidden states an adapter edits (a
    representation site, as ReFT intervenes on). `transposed` marks transformers' `Conv1D`, which stores its
    weight as [in, out] (PEFT's `fan_in_fan_out`). Adapters express delta weights in the
    canonical layout ([out, in, *kernel] for linear/conv, [num, dim] for embeddings); the host
    transposes for `Conv1D`. `embed_scale` is the factor a scaled embedding (Gemma's, BART's:
    `embedding(x) * embed_scale`) multiplies its output by, so its adapters' outputs too, as
    the merged weight's would be (and as PEFT does).
    """

    kind: LayerKind
    in_features: int
    out_features: int
    transposed: bool = False
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    padding_idx: int | None = None
    embed_scale: float = 1.0

    @property
    def conv_dims(self) -> int:
        return len(self.kernel_size)


def describe(module: nn.Module) -> LayerInfo | None:
    """Return the `LayerInfo` of a module an adapter can host, or None for any other module.

    Subclasses count (bitsandbytes' Linear4bit is an nn.Linear), since the host calls the base
    layer's own forward and only merging needs the weight itself.
    """
    if isinstance(module, nn.Linear):
        return LayerInfo("linear", module.in_features, module.out_features)
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return LayerInfo("linear", in_features, out_features, transposed=True)
    if isinstance(module, nn.Embedding):
        return LayerInfo("embedding", module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                         embed_scale=float(getattr(module, "embed_scale", 1.0)))
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return LayerInfo(
            "conv",
            module.in_channels,
            module.out_channels,
            kernel_size=tuple(module.kernel_size),
            stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
        )
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module of a hostable type still cannot host an adapter, or None if it can."""
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "embeddings with max_norm renormalise their weight in place"
    if isinstance(module, NonDynamicallyQuantizableLinear):
        return ("the out_proj of nn.MultiheadAttention: the attention reads its weight directly and never calls it, "
                "so an adapter there would never act")
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return f"grouped convolutions (groups={module.groups}) are not supported"
        if any(d != 1 for d in module.dilation):
            return f"dilated convolutions (dilation={module.dilation}) are not supported"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported"
    return None


def is_plain_float_weight(weight: torch.Tensor) -> bool:
    """True when a weight can take a delta exactly: a floating tensor, not a packed quantized one."""
    return weight.dtype.is_floating_point and type(weight) in (torch.Tensor, nn.Parameter)


def dense_weight(module: nn.Module, info: LayerInfo) -> torch.Tensor:
    """The base layer's weight as a float tensor in the canonical [out, in, ...] layout.

    4-bit weights (torchao NF4, bitsandbytes `Params4bit`) and bitsandbytes' 8-bit `Int8Params`
    with their scales are dequantized with their libraries' own functions; forms that depend on
    the weight itself (DoRA's column norms) use this instead of `module.weight`.
    """
    weight = module.weight
    if is_plain_float_weight(weight):
        dense = weight.detach()
    elif is_4bit_layer(module):  # torchao NF4 or bitsandbytes 4-bit
        dense = dense_4bit(weight)
    elif getattr(weight, "SCB", None) is not None:  # bitsandbytes 8-bit: int8 rows times their scales / 127
        dense = weight.data.float() * (weight.SCB.float()[:, None] / 127.0)
    else:
        raise TypeError(f"cannot read a dense weight from a {type(weight).__name__} of dtype {weight.dtype}")
    return dense.T if info.transposed else dense
