"""4-bit NormalFloat (NF4) base layers from the two libraries QLoRA users have.

- **torchao**'s NF4 tensor (what torchtune's QLoRA uses) runs anywhere torch runs, CPU included.
  `NF4Linear` holds one as its frozen weight.
- **bitsandbytes**' `Linear4bit` (what HF PEFT users load with `BitsAndBytesConfig`) on CUDA; on CPU
  through its CPU backend (bitsandbytes 0.50 with torch 2.13 here).

Both implement Dettmers et al.'s NF4 code: 16 levels at quantiles of a standard normal, one absmax
per block of 64 weights, and with double quantization those absmax constants quantized again to 8
bits. splice does not quantize by hand: this module builds the libraries' layers from a dense
Linear, reads them back dense and counts their bytes, so that the rest of splice deals with one
interface whichever library holds the weight.
"""

from __future__ import annotations

import copy
import importlib
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from splice.core.errors import SpliceError

Backend = Literal["torchao", "bitsandbytes"]
BACKENDS: tuple[Backend, ...] = ("torchao", "bitsandbytes")
# Set on a 4-bit layer (and on its dequantized copy): the dtype its dense weight had, and whether
# it was a transformers Conv1D ([in, out] weight), so that going back to full precision restores both.
DENSE_DTYPE = "splice_dense_dtype"
FROM_CONV1D = "splice_from_conv1d"
SCALER_BLOCK = 256  # absmax constants per second-level block (QLoRA's double quantization)
INSTALL_HINT = "pip install 'splice[quantize]'"
# torchao moved its NF4 tensor in 0.17; the old path is kept for older releases.
TORCHAO_NF4_MODULES = ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor")


@dataclass(frozen=True)
class NF4Settings:
    """How one layer is (or is to be) quantized: the library, the block of weights sharing one
    absmax, whether those absmax constants are quantized again (double quantization), and the
    dtype the weight is dequantized to for the matrix product (bitsandbytes' `compute_dtype`)."""

    backend: Backend
    block_size: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.float32


class QuantizationSkip(SpliceError):
    """One layer the chosen library cannot quantize (its shape), with the reason."""


def torchao_nf4() -> ModuleType:
    """torchao's NF4 tensor module, or a SpliceError saying how to install it (the harmless messages
    its import logs are filtered by `splice._library_logs`)."""
    for name in TORCHAO_NF4_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise SpliceError(f"NF4 on the torchao backend needs torchao (>= 0.18): {INSTALL_HINT}")


def bitsandbytes() -> ModuleType:
    """bitsandbytes, or a SpliceError saying how to install it."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError:
        raise SpliceError(f"NF4 on the bitsandbytes backend needs bitsandbytes (>= 0.49): {INSTALL_HINT}") from None


class NF4Linear(nn.Linear):
    """A frozen Linear whose weight is a torchao NF4 tensor.

    The forward dequantizes the weight to its dtype (the compute dtype), multiplies in that dtype
    and returns the input's dtype, as bitsandbytes' `Linear4bit` does, so a fp32 model keeps fp32
    activations on a bf16-compute base. `model.to(dtype)` changes the compute dtype (torchao keeps
    the 4-bit codes and rescales on the fly). Gradients reach the input, never the weight.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.weight.dtype
        out = torchao_nf4().linear_nf4(x.to(compute), self.weight)
        if self.bias is not None:
            out = out + self.bias.to(compute)
        return out.to(x.dtype)

    def __deepcopy__(self, memo: dict[int, Any]) -> NF4Linear:
        """A copy with the very same 4-bit codes and scales: torchao's `clone` quantizes the
        dequantized weight again with its default block sizes, which is lossy and fails for
        weights whose block count is not a multiple of 256."""
        weight = self.weight
        names, context = weight.__tensor_flatten__()
        copied = type(weight).__tensor_unflatten__({n: getattr(weight, n).clone() for n in names}, context,
                                                   weight.shape, weight.stride())
        memo[id(weight)] = nn.Parameter(copied, requires_grad=False)
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy.deepcopy(value, memo)
        return clone

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block={self.weight.block_size}, compute_dtype={self.weight.dtype}")


def is_nf4_tensor(weight: torch.Tensor) -> bool:
    return callable(getattr(weight, "get_original_weight", None)) and hasattr(weight, "quantized_scalers")


def is_4bit_tensor(tensor: torch.Tensor) -> bool:
    """True for a torchao NF4 tensor or a bitsandbytes Params4bit (with its quant state)."""
    return is_nf4_tensor(tensor) or getattr(tensor, "quant_state", None) is not None


def is_4bit_layer(module: nn.Module) -> bool:
    """True for a layer whose weight is 4-bit."""
    weight = getattr(module, "weight", None)
    return weight is not None and is_4bit_tensor(weight)


def settings_of(module: nn.Module) -> NF4Settings | None:
    """The settings a 4-bit layer was quantized with (to quantize it again after a merge), None for
    any other layer or a bitsandbytes layer not in NF4 (FP4 layers dequantize but stay FP4's)."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    if is_nf4_tensor(weight):
        return NF4Settings("torchao", weight.block_size, True, weight.dtype)
    state = getattr(weight, "quant_state", None)
    if state is None or state.quant_type != "nf4":
        return None
    compute = getattr(module, "compute_dtype", None) or torch.float32
    return NF4Settings("bitsandbytes", state.blocksize, bool(state.nested), compute)


def weight_count(tensor: torch.Tensor) -> int:
    """Weights a parameter stands for: a bitsandbytes 4-bit tensor packs two per byte element."""
    state = getattr(tensor, "quant_state", None)
    return math.prod(state.shape) if state is not None else tensor.numel()


def dense_4bit(weight: torch.Tensor) -> torch.Tensor:
    """A 4-bit weight dequantized, [out, in], in the dtype it was quantized from (torchao: its
    compute dtype)."""
    if is_nf4_tensor(weight):
        return weight.get_original_weight()
    return bitsandbytes().functional.dequantize_4bit(weight.data, weight.quant_state)


def storage_bytes(weight: torch.Tensor) -> int:
    """Bytes that hold a tensor: the 4-bit codes plus every scale and code book of a 4-bit weight
    (double quantization included), or a dense tensor's bytes."""
    if is_nf4_tensor(weight):
        names, _ = weight.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(weight, name)) for name in names)
    state = getattr(weight, "quant_state", None)
    if state is not None:
        parts = [v for v in state.as_dict(packed=False).values() if torch.is_tensor(v)]
        return _tensor_bytes(weight.data) + sum(_tensor_bytes(p) for p in parts)
    return _tensor_bytes(weight)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def quantize_layer(module: nn.Module, settings: NF4Settings) -> nn.Module:
    """A 4-bit copy of a dense Linear (or transformers' Conv1D, stored as a Linear) in `settings`;
    QuantizationSkip when the library cannot take its shape."""
    weight = module.weight.detach()
    conv1d = isinstance(module, Conv1D) or getattr(module, FROM_CONV1D, False)
    weight = weight.T if isinstance(module, Conv1D) else weight
    bias = getattr(module, "bias", None)
    layer = (_torchao_layer if settings.backend == "torchao" else _bitsandbytes_layer)(weight, bias, settings)
    setattr(layer, DENSE_DTYPE, getattr(module, DENSE_DTYPE, weight.dtype))
    setattr(layer, FROM_CONV1D, conv1d)
    return layer


def _torchao_layer(weight: torch.Tensor, bias: torch.Tensor | None, settings: NF4Settings) -> NF4Linear:
    if not settings.double_quant:
        raise SpliceError("torchao's NF4 always quantizes its block scales (double quantization); for "
                          "double_quant=False use backend='bitsandbytes'")
    if weight.numel() % settings.block_size:
        raise QuantizationSkip(f"{weight.numel()} weights are not a multiple of the block size {settings.block_size}")
    blocks = weight.numel() // settings.block_size
    # torchao needs the number of blocks to be a multiple of the second-level block; a divisor
    # just under 256 costs a few bytes more (SmolLM2's 576 x 576: 5,184 blocks, scaler block 216).
    scaler_block = max(d for d in range(1, SCALER_BLOCK + 1) if blocks % d == 0)
    codes = torchao_nf4().to_nf4(weight.to(settings.compute_dtype).contiguous(), settings.block_size, scaler_block)
    return NF4Linear(codes, bias)


def _bitsandbytes_layer(weight: torch.Tensor, bias: torch.Tensor | None, settings: NF4Settings) -> nn.Module:
    bnb = bitsandbytes()
    out_features, in_features = weight.shape
    if weight.device.type == "cpu" and in_features % settings.block_size:
        # bitsandbytes 0.50's CPU kernels (AVX-512 path) dequantize such a layer wrongly: a 32 x 32
        # weight comes back with 37% error where its own generic code gives 9%
        raise QuantizationSkip(f"bitsandbytes on CPU computes a layer whose {in_features} inputs are not a multiple "
                               f"of the block size {settings.block_size} wrongly (use backend torchao)")
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=settings.compute_dtype,
                              compress_statistics=settings.double_quant, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.contiguous().clone(), requires_grad=False, blocksize=settings.block_size,
                                     compress_statistics=settings.double_quant, quant_type="nf4")
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    # On a CPU with AVX512-BF16, bitsandbytes repacks the weight in place at the first no-grad
    # forward in eval mode (block scales to bf16, another layout; it fails outright on a layer
    # narrower than a block): what the layer computes would no longer be the codes splice reads
    # back (dequantize, merge, save). Off: the layer keeps its format and computes the same on every CPU.
    layer.support_avx512bf16_for_cpu = False
    return layer.to(weight.device)  # bitsandbytes quantizes on the move to a device


def dense_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a 4-bit layer's weight had before it was quantized (a layer that bitsandbytes
    quantized while transformers loaded it: the dtype it quantized from)."""
    dtype = getattr(module, DENSE_DTYPE, None)
    if dtype is None:
        state = getattr(module.weight, "quant_state", None)
        dtype = state.dtype if state is not None else module.weight.dtype
    return dtype


def dense_linear(module: nn.Module, dtype: torch.dtype, as_conv1d: bool = False) -> nn.Module:
    """A plain nn.Linear holding a 4-bit layer's weight dequantized into `dtype`, or with
    `as_conv1d` the transformers Conv1D it was quantized from ([in, out] weight)."""
    weight = dense_4bit(module.weight).to(dtype)
    out_features, in_features = weight.shape
    bias = getattr(module, "bias", None)
    if as_conv1d:
        layer = conv1d_layer(weight, bias)
    else:
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=dtype)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
    setattr(layer, DENSE_DTYPE, dtype)
    setattr(layer, FROM_CONV1D, getattr(module, FROM_CONV1D, False))
    return layer


def conv1d_layer(weight: torch.Tensor, bias: torch.Tensor | None) -> Conv1D:
    """A frozen transformers Conv1D computing `x weightᵀ + bias` (`weight` [out, in]), in weight's dtype."""
    out_features, in_features = weight.shape
    with torch.device("meta"):
        layer = Conv1D(out_features, in_features)
    layer.weight = nn.Parameter(weight.detach().T.contiguous(), requires_grad=False)
    layer.bias = nn.Parameter(torch.zeros(out_features, dtype=weight.dtype, device=weight.device)
                              if bias is None else bias.detach().to(weight.dtype).clone(), requires_grad=False)
    return layer
