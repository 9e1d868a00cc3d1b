"""TinyLoRA: a handful of trainable numbers per layer in a slice of the weight's own singular basis
(Morris et al., arXiv 2602.04118, on LoRA-XS, Bałazy et al., arXiv 2405.17604).

    W = U Σ Vᵀ (the frozen base weight's SVD),  J = [offset, offset + r)
    ΔW = U_J Σ_J R V_Jᵀ,    R = Σ_{i=1..u} v_i P_i    (P_i fixed random r x r, v ∈ R^u trained)

LoRA-XS trains the whole r x r matrix R between frozen singular vectors; TinyLoRA trains only
the u coefficients of R in a fixed random basis, so a layer costs u numbers whatever its size.
v starts at zero (the model is unchanged at step 0) and still receives a gradient at once
(dL/dv_i = <U_J Σ_J P_i V_Jᵀ, dL/dW>), unlike LoRA's zero B.

`offset` picks the slice: 0 adapts the top-r singular directions; BoostLoRA's rounds take the
disjoint slices [k r, (k+1) r), so the merged change's rank grows by r per round
(`splice.boost`). The singular vectors, values and the P_i are kept as buffers (saved with the
adapter): an SVD's signs are not reproducible across libraries, and a merged model no longer has
the weight they came from.
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from splice.core.config import Adapter, AdapterConfig, will_be_filled
from splice.core.errors import SpliceError
from splice.core.layers import LayerInfo, dense_weight
from splice.core.lowrank import LowRank, LowRankForward, low_rank_delta
from splice.core.registry import register_method


@register_method
@dataclass
class TinyLoRA(AdapterConfig):
    """Hyperparameters of a TinyLoRA adapter.

    Attributes:
        r: width of the singular slice (TinyLoRA uses 1-4): ΔW has rank at most r.
        u: trainable numbers per layer, the coefficients of R in the fixed random basis P_1..P_u
            (TinyLoRA uses 1-16); u > r² adds no expressiveness (R has r² entries).
        offset: the first singular index of the slice: 0 is the top-r directions of the base
            weight; BoostLoRA's round k uses k r.
        seed: seeds the fixed random P_i (with the layer's name, so layers differ).
    """

    method: ClassVar[str] = "tinylora"
    r: int = 2
    u: int = 4
    offset: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, least in (("r", self.r, 1), ("u", self.u, 1), ("offset", self.offset, 0)):
            if value < least:
                raise SpliceError(f"TinyLoRA {name} must be >= {least}, got {value}")
        if self.u > self.r * self.r:
            warnings.warn(f"TinyLoRA u={self.u} > r²={self.r * self.r}: R = Σ v_i P_i has only {self.r * self.r} "
                          f"independent entries, so {self.u - self.r * self.r} of the u numbers per layer add nothing; "
                          f"use u <= r² (or r >= {math.ceil(math.sqrt(self.u))})", stacklevel=3)

    def build(self, info: LayerInfo, module_name: str, base: nn.Module) -> TinyLoRAAdapter:
        if info.kind != "linear":
            raise SpliceError(f"TinyLoRA needs a Linear host; {module_name!r} is {info.kind}")
        end, rank = self.offset + self.r, min(info.in_features, info.out_features)
        if end > rank:
            raise SpliceError(f"TinyLoRA slice [{self.offset}, {end}) exceeds the {rank} singular directions of "
                              f"{module_name!r} (in={info.in_features}, out={info.out_features}); use offset + r "
                              f"<= {rank}")
        adapter = TinyLoRAAdapter(info, self.r, random_basis(self.u, self.r, self.seed, module_name))
        if not will_be_filled():  # a file (or BoostLoRA's cached basis) fills the slice otherwise
            U, S, Vh = torch.linalg.svd(dense_weight(base, info).double(), full_matrices=False)
            adapter.set_basis(U[:, self.offset:end], S[self.offset:end], Vh[self.offset:end])
        return adapter


def random_basis(u: int, r: int, seed: int, module_name: str) -> torch.Tensor:
    """The fixed P_1..P_u [u, r, r] of a layer: Gaussian with ‖P_i‖_F ≈ 1, drawn from `seed` and
    the layer's name."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module_name.encode()))
    return torch.randn(u, r, r, generator=generator, dtype=torch.float64).float() / r


class TinyLoRAAdapter(Adapter, LowRankForward):
    """delta(x) = x V_J Rᵀ Σ_J U_Jᵀ with R = Σ v_i P_i: LoRA's shape with A = V_Jᵀ (frozen) and
    B = U_J Σ_J R (a function of v)."""

    def __init__(self, info: LayerInfo, r: int, P: torch.Tensor) -> None:
        super().__init__()
        self.info, self.r = info, r
        self.register_buffer("U", torch.zeros(info.out_features, r))
        self.register_buffer("S", torch.zeros(r))
        self.register_buffer("Vh", torch.zeros(r, info.in_features))
        self.register_buffer("P", P)
        self.v = nn.Parameter(torch.zeros(P.shape[0]))

    def set_basis(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> None:
        """The singular slice the adapter works in: U [out, r], S [r], Vh [r, in]."""
        expected = (self.U.shape, self.S.shape, self.Vh.shape)
        if (U.shape, S.shape, Vh.shape) != expected:
            raise SpliceError(f"TinyLoRA basis of shapes {[tuple(t.shape) for t in (U, S, Vh)]}, expected "
                              f"{[tuple(s) for s in expected]}")
        with torch.no_grad():
            self.U.copy_(U)
            self.S.copy_(S)
            self.Vh.copy_(Vh)

    def mixing(self) -> torch.Tensor:
        """R = Σ v_i P_i [r, r]."""
        return torch.einsum("i,ijk->jk", self.v, self.P)

    def low_rank_factors(self) -> LowRank:
        return LowRank(self.Vh, (self.U * self.S) @ self.mixing(), 1.0)

    def trained_factors(self) -> None:
        """v, not A and B, is trained: there is no factor pair for LoFT (which refuses a model
        whose adapters have none)."""
        return None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return low_rank_delta(x, self.low_rank_factors(), self.training)

    def delta_weight(self) -> torch.Tensor:
        """U_J Σ_J R V_Jᵀ [out, in]."""
        A, B, _, _ = self.low_rank_factors()
        return B @ A
