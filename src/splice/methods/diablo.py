"""DiaBlo: train only the diagonal blocks of the weight update (Gurses, Zhang et al., arXiv 2506.03230).

    h = W x + z,    z_k = x_k D_k  (k = 1..N),    D: [N, d1, d2],  d1 = ceil(in/N),  d2 = ceil(out/N)

The input is zero-padded to N*d1 and cut into N chunks x_k; chunk k of the output is x_k D_k,
and the concatenated output is cropped to `out`. As a weight change this is
ΔW = blockdiag(D_1ᵀ, ..., D_Nᵀ) cropped to [out, in]: no low-rank product, so D can start at
zero (the model is unchanged at step 0) and every block still receives a gradient at once,
unlike LoRA, whose zero B holds A still for a step. It costs in*out/N parameters and
multiply-adds per token; for 4096x4096 with N = 64 that is LoRA r = 32's budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from splice.core.config import Adapter, AdapterConfig
from splice.core.errors import SpliceError
from splice.core.layers import LayerInfo
from splice.core.registry import register_method


@register_method
@dataclass
class DiaBlo(AdapterConfig):
    """Hyperparameters of a DiaBlo adapter.

    Attributes:
        blocks: N, the number of diagonal blocks; the paper uses 64 on Llama-2-7B. Fewer blocks
            are larger, so more parameters (in*out/N). N must leave every block at least one
            real input and output (so N <= min(in, out)); a layer where it does not is refused,
            never silently given fewer blocks.
        dropout: dropout on the adapter's input only (the paper uses 0.05).
    """

    method: ClassVar[str] = "diablo"
    blocks: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocks < 1:
            raise SpliceError(f"DiaBlo blocks must be >= 1, got {self.blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpliceError(f"DiaBlo dropout must be in [0, 1), got {self.dropout}")

    def build(self, info: LayerInfo, module_name: str, base: nn.Module) -> DiaBloAdapter:
        if info.kind != "linear":
            raise SpliceError(f"DiaBlo needs a Linear host; {module_name!r} is {info.kind}")
        n, m, N = info.in_features, info.out_features, self.blocks
        if N > min(n, m):
            raise SpliceError(f"DiaBlo blocks={N} exceeds min(in, out) of {module_name!r} "
                              f"(in={n}, out={m}); use at most {min(n, m)} blocks")
        for size, side in ((n, "in"), (m, "out")):
            if (N - 1) * math.ceil(size / N) >= size:
                raise SpliceError(
                    f"DiaBlo blocks={N} on {module_name!r} ({side}={size}): blocks of ceil({size}/{N}) = "
                    f"{math.ceil(size / N)} leave the last block with no real {side}put, whose parameters "
                    f"would never train; use a number of blocks that divides {size} or is smaller")
        return DiaBloAdapter(info, N, self.dropout)


class DiaBloAdapter(Adapter):
    """delta(x) = crop(flatten(pad(dropout(x)) chunked into N blocks, block k times D_k))."""

    def __init__(self, info: LayerInfo, blocks: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.info, self.blocks, self.p = info, blocks, dropout
        self.d1 = math.ceil(info.in_features / blocks)
        self.d2 = math.ceil(info.out_features / blocks)
        self.D = nn.Parameter(torch.zeros(blocks, self.d1, self.d2))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x.to(self.D.dtype), self.p, training=self.training)
        pad = self.blocks * self.d1 - self.info.in_features
        if pad:
            x = F.pad(x, (0, pad))
        z = torch.einsum("...ki,kio->...ko", x.unflatten(-1, (self.blocks, self.d1)), self.D)
        return z.flatten(-2)[..., : self.info.out_features]

    def delta_weight(self) -> torch.Tensor:
        """blockdiag(D_1ᵀ, ..., D_Nᵀ) cropped to [out, in]."""
        full = torch.block_diag(*self.D.transpose(1, 2))
        return full[: self.info.out_features, : self.info.in_features]
