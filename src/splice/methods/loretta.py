"""LoRETTA_rep (Yang et al., NAACL 2024): a LoRA whose two factors are each stored as a tensor
train, as the released code (github.com/yifanycc/loretta, `loretta/tuners/loretta_rep.py`) builds it.

    delta(x) = s * dropout(x) A B,   A [in, r] and B [r, out] each a tensor train,   s = alpha / r

A's train has the modes of `in` (split into near-equal factors) followed by those of `r`, B's
the modes of `r` followed by those of `out`, and every inner bond has size `tensor_rank`
(the released default is 5); the matrix is the train read in row-major order. For 768 -> 768
at r = 8 the released table gives A the modes (8, 8, 12 | 8); here 768 is split the same way.
The parameters are Σ r_i-1 k_i r_i over both trains: 900 per 384 x 384 layer at r = 8, tensor
rank 5, against LoRA's 6,144.

This is not splice's `ttlora` (one train for the whole ΔW, the spec's reading of LoRETTA): a
claim about LoRETTA should be tested on this form. What the released code does and this form
keeps: both factors are tensor trains with their own bond size; every core starts Gaussian,
std target^(1/d) / sqrt(r_i) with target = 1/sqrt(rows + cols) of its matrix, so each matrix
entry has about the target's std (`init="released"`). Then ΔW is not zero at the start: the
adapted model differs from the base before any training. `init="zero"` zeroes the last core of
B instead, so ΔW = 0 and training starts from the base, as LoRA does; that core's gradient is
non-zero at step 0. What the released scripts add around the adapter and this form leaves to
the config: LayerNorm weights trained too (`train_also`), and a tensorised classifier for
sequence classification. The released trains are TensorTrain objects (a train over the reshaped
matrix), not TensorTrainMatrix ones, and so is this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from splice.core.config import Adapter, AdapterConfig
from splice.core.errors import SpliceError
from splice.core.layers import LayerInfo
from splice.core.lowrank import LowRank, low_rank_delta
from splice.core.registry import register_method
from splice.core.tensor_train import factorize, train_matrix

Init = Literal["released", "zero"]
INITS = ("released", "zero")


@register_method
@dataclass
class LoRETTA(AdapterConfig):
    """Hyperparameters of a LoRETTA_rep adapter.

    Attributes:
        r: LoRA's rank: A is [in, r], B [r, out]; ΔW has rank at most r.
        tensor_rank: size of every inner bond of both trains (LoRETTA's "tensor rank"); the
            parameters grow with its square.
        alpha: scale numerator; the update is scaled by alpha / r, as LoRA's.
        dropout: dropout on the adapter's input only.
        init: "released" (every core Gaussian, as the released code: ΔW starts small, not
            zero) or "zero" (B's last core zero: ΔW = 0 at the start).
    """

    method: ClassVar[str] = "loretta"
    r: int = 8
    tensor_rank: int = 5
    alpha: float = 16
    dropout: float = 0.0
    init: Init = "released"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1 or self.tensor_rank < 1:
            raise SpliceError(f"LoRETTA r and tensor_rank must be >= 1, got r={self.r}, "
                              f"tensor_rank={self.tensor_rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpliceError(f"LoRETTA dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise SpliceError(f"LoRETTA init must be one of {', '.join(INITS)}, got {self.init!r}")

    def build(self, info: LayerInfo, module_name: str, base: nn.Module) -> LoRETTAAdapter:
        if info.kind != "linear":
            raise SpliceError(f"LoRETTA needs a Linear host; {module_name!r} is {info.kind}")
        adapter = LoRETTAAdapter(info, self.r, self.tensor_rank, self.alpha / self.r, self.dropout)
        adapter.reset(self.init)
        return adapter


def train_cores(modes: list[int], bond: int) -> nn.ParameterList:
    ranks = [1, *[bond] * (len(modes) - 1), 1]
    return nn.ParameterList(nn.Parameter(torch.zeros(ranks[i], k, ranks[i + 1])) for i, k in enumerate(modes))


class LoRETTAAdapter(Adapter):
    """delta(x) = s * dropout(x) A B, with A and B contracted from their trains."""

    def __init__(self, info: LayerInfo, r: int, tensor_rank: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.info, self.r, self.scaling, self.p = info, r, scaling, dropout
        self.a_modes = factorize(info.in_features, 3) + factorize(r, 1)
        self.b_modes = factorize(r, 1) + factorize(info.out_features, 3)
        self.a_cores = train_cores(self.a_modes, tensor_rank)
        self.b_cores = train_cores(self.b_modes, tensor_rank)

    def reset(self, init: Init = "released") -> None:
        """The released code's Gaussian cores; with "zero", B's last core zero (ΔW = 0)."""
        with torch.no_grad():
            for cores, (rows, cols) in ((self.a_cores, (self.info.in_features, self.r)),
                                        (self.b_cores, (self.r, self.info.out_features))):
                target = (rows + cols) ** -0.5
                for core in cores:
                    nn.init.normal_(core, std=target ** (1 / len(cores)) / math.sqrt(core.shape[2]))
            if init == "zero":
                self.b_cores[-1].zero_()

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [in, r], B [r, out]) contracted from the cores."""
        return train_matrix(self.a_cores, self.info.in_features), train_matrix(self.b_cores, self.r)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return low_rank_delta(x, self.low_rank_factors(), self.training)

    def low_rank_factors(self) -> LowRank:
        A, B = self.matrices()
        return LowRank(A.T, B.T, self.scaling, self.p)

    def delta_weight(self) -> torch.Tensor:
        A, B = self.matrices()
        return (A @ B).T * self.scaling
