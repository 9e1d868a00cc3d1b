"""Tensor-train LoRA: the weight change as a tensor train (LoRETTA_rep, Yang et al., NAACL 2024).

ΔW [out, in] is reshaped into a d-way tensor with modes (k_1..k_p | k_p+1..k_d), the factors of
`out` followed by the factors of `in`, and stored as a train of cores G_i [r_i-1, k_i, r_i] with
r_0 = r_d = 1 and every inner bond of size r:

    ΔW[(o_1..o_p), (i_1..i_q)] = s * G_1[:, o_1, :] G_2[:, o_2, :] ... G_d[:, i_q, :],   s = alpha / r

That is Σ r_i-1 k_i r_i parameters, far fewer than LoRA's r (in + out) when the modes are small
(the paper reports up to ~100x fewer on LLaMA-2-7B). The bond between the last output core
and the first input core has size r, so ΔW = s U V is a rank-r product of U [out, r] (the output
cores contracted) and V [r, in] (the input cores contracted); scaling by alpha / r is LoRA's
rule for the same reason: it keeps one learning rate roughly valid as r changes.

The forward never forms the dense [out, in] matrix: it contracts the input cores into V
(O(r^2 in) work, independent of the batch), applies x -> x Vᵀ, then the output cores through U
(O(r^2 out) to build): r (in + out) multiply-adds per token, as LoRA rank r, and the lean
low-rank kernel of `splice.core.lowrank` (no stored intermediates). `delta_weight()` contracts
everything into the dense matrix for merging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from splice.core.config import Adapter, AdapterConfig
from splice.core.errors import SpliceError
from splice.core.layers import LayerInfo
from splice.core.lowrank import LowRank, low_rank_delta
from splice.core.registry import register_method
from splice.core.tensor_train import factorize


@register_method
@dataclass
class TTLoRA(AdapterConfig):
    """Hyperparameters of a tensor-train LoRA adapter.

    Attributes:
        r: size of every inner bond of the train (the TT rank); ΔW has rank at most r.
        alpha: scale numerator; the update is scaled by alpha / r, as LoRA's.
        modes: the mode sizes k_1..k_d, factors of `out` followed by factors of `in` (the first
            modes whose product is `out` are the output side). One list fits one layer shape,
            so give it only when every targeted layer has that shape. None: `out` and `in` are
            each split into 3 near-equal factors from their prime factors (`factorize`), size-1
            factors dropped; e.g. 384 -> (8, 8, 6).
        dropout: dropout on the adapter's input only.
    """

    method: ClassVar[str] = "ttlora"
    r: int = 4
    alpha: float = 8
    modes: list[int] | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise SpliceError(f"TTLoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpliceError(f"TTLoRA dropout must be in [0, 1), got {self.dropout}")
        if self.modes is not None:
            self.modes = list(self.modes)
            if len(self.modes) < 2 or any(not isinstance(k, int) or k < 1 for k in self.modes):
                raise SpliceError(f"TTLoRA modes must be at least two positive integers "
                                  f"(output factors, then input factors), got {self.modes}")

    def build(self, info: LayerInfo, module_name: str, base: nn.Module) -> TTLoRAAdapter:
        if info.kind != "linear":
            raise SpliceError(f"TTLoRA needs a Linear host; {module_name!r} is {info.kind}")
        out, n = info.out_features, info.in_features
        if self.modes is None:
            out_modes, in_modes = factorize(out, 3), factorize(n, 3)
        else:
            out_modes, in_modes = split_modes(self.modes, out, n, module_name)
        adapter = TTLoRAAdapter(info, out_modes, in_modes, self.r, self.alpha / self.r, self.dropout)
        adapter.reset()
        return adapter


def split_modes(modes: list[int], out: int, n: int, module_name: str) -> tuple[list[int], list[int]]:
    """(output modes, input modes): the shortest prefix whose product is `out`, and the rest,
    which must multiply to `in`; a SpliceError naming the layer otherwise."""
    product = 1
    for split, k in enumerate(modes[:-1], start=1):
        product *= k
        if product == out:
            if math.prod(modes[split:]) == n:
                return modes[:split], modes[split:]
            break
    raise SpliceError(
        f"TTLoRA modes {modes} do not fit {module_name!r} (out={out}, in={n}): the modes must be "
        f"factors of out followed by factors of in, product {out * n}; their product is {math.prod(modes)}. "
        "Give modes=None to factor each layer's own sizes")


class TTLoRAAdapter(Adapter):
    """delta(x) = s * U V dropout(x), with U and V contracted from the tensor-train cores."""

    def __init__(self, info: LayerInfo, out_modes: list[int], in_modes: list[int], r: int, scaling: float,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.info, self.r, self.scaling, self.p = info, r, scaling, dropout
        self.out_modes, self.in_modes = list(out_modes), list(in_modes)
        modes = self.out_modes + self.in_modes
        ranks = [1, *[r] * (len(modes) - 1), 1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(ranks[i], k, ranks[i + 1])) for i, k in enumerate(modes))

    def reset(self) -> None:
        """ΔW = 0 at init, with a useful first gradient, as LoRA's zero B with a random A.

        The first core (output side) is zero, so ΔW = 0 and the model starts unchanged; its
        gradient involves only the other cores, so it is non-zero at step 0 (a single zero
        core leaves the train trainable, two would not). Every other core is normal with
        variance 1 / (the indices it sums as x flows from input to output): k_i r_i for input
        cores, so x -> x Vᵀ keeps the variance of x (as LeCun init of a dense A would), and r_i
        for output cores, so the output side passes the signal on at unit scale once G_1 moves.
        """
        n_out = len(self.out_modes)
        with torch.no_grad():
            for i, core in enumerate(self.cores):
                if i == 0:
                    core.zero_()
                else:
                    fan_in = core.shape[2] * (core.shape[1] if i >= n_out else 1)
                    nn.init.normal_(core, std=fan_in**-0.5)

    def _halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [out, r], V [r, in]): the output cores and the input cores, each contracted."""
        n_out = len(self.out_modes)
        U = self.cores[0].flatten(0, 1)  # [k_1, r_1]
        for core in self.cores[1:n_out]:
            U = (U @ core.flatten(1)).view(-1, core.shape[2])
        V = self.cores[-1].flatten(1)  # [r_d-1, k_d]
        for core in reversed(self.cores[n_out:-1]):
            V = (core.flatten(0, 1) @ V).view(core.shape[0], -1)
        return U, V

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return low_rank_delta(x, self.low_rank_factors(), self.training)

    def low_rank_factors(self) -> LowRank:
        U, V = self._halves()
        return LowRank(V, U, self.scaling, self.p)

    def delta_weight(self) -> torch.Tensor:
        U, V = self._halves()
        return U @ V * self.scaling
