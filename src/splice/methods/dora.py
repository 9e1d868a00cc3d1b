"""DoRA: LoRA with the weight split into a trained magnitude and a direction (Liu et al., 2024,
arXiv 2402.09353).

    W' = m * (W + s B A) / ||W + s B A||_row,     m: [out], initialised to ||W||_row

The direction is updated by an ordinary LoRA, the per-output-row magnitude m trains on its
own; the paper finds this decomposition closer to full fine-tuning's learning pattern than
LoRA's. As in the paper (section 4.3) and HF PEFT, the norm is a constant for the backward.
On the layer's output this is an edit of what the base computed:

    delta(x) = (g - 1) * (W x) + g * s B A x,      g = m / ||W + s B A||_row

so the base output is reused (never a second base matmul, except for dropout > 0 in training,
where PEFT's semantics drop the input of both terms), and the row norms come from

    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s <(W A^T)_i, B_i> + s^2 <(B (A A^T))_i, B_i>

which costs one [out, r] product with W instead of PEFT's dense [out, in] B A, its sum with W
and a norm over it; ||W_i||^2 is kept while the base weight is unchanged, and in eval mode the
whole ratio g is kept until a factor or the magnitude changes. Files are HF PEFT's LoRA files
with `use_dora: true` and `lora_magnitude_vector` (see splice.io.peft_format).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from splice.core.errors import SpliceError
from splice.core.layers import LayerInfo, dense_weight
from splice.core.lowrank import LowRank, low_rank_delta
from splice.core.registry import register_method
from splice.methods.lora import LoRA, LoRAAdapter


@register_method
@dataclass
class DoRA(LoRA):
    """Hyperparameters of a DoRA adapter: those of `splice.LoRA` (r, alpha, dropout, rslora,
    rank/alpha patterns), on Linear and transformers Conv1D layers. PiSSA init is refused: its
    residual base weight would change the magnitudes DoRA starts from."""

    method: ClassVar[str] = "dora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init == "pissa":
            raise SpliceError("DoRA with init='pissa' is not supported; use init='default' or 'gaussian'")
        if self.lora_bias:
            raise SpliceError("DoRA with lora_bias=True is not supported (nor in HF PEFT)")

    def build(self, info: LayerInfo, module_name: str, base: nn.Module) -> DoRAAdapter:
        if info.kind != "linear":
            raise SpliceError(f"DoRA needs a Linear (or Conv1D) layer; {module_name!r} is a {info.kind} layer")
        adapter = DoRAAdapter(info, base, self.rank_for(module_name), self.scaling_for(module_name), self.dropout)
        adapter.reset(self.init)
        return adapter


class DoRAAdapter(LoRAAdapter):
    """LoRA factors plus `lora_magnitude_vector` [out]; edits the base output (see module doc)."""

    uses_base_output: ClassVar[bool] = True
    delta_weight_reads_base: ClassVar[bool] = True

    def __init__(self, info: LayerInfo, base: nn.Module, r: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__(info, r, scaling, dropout)
        self._base = (base,)  # a tuple, so the base layer is not registered as a submodule
        self._row_norms_sq: tuple[tuple, torch.Tensor] | None = None
        self._eval_ratio: tuple[tuple, torch.Tensor] | None = None
        self.lora_magnitude_vector = nn.Parameter(self._base_row_norms_sq().sqrt())

    def reset(self, init: str = "default") -> None:
        super().reset(init)
        if hasattr(self, "lora_magnitude_vector"):  # m = ||W + s B A||: the output starts unchanged
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.row_norms())

    def rebase(self, base: nn.Module) -> None:
        self._base = (base,)
        self._row_norms_sq = None
        self._eval_ratio = None

    # -- the norms ---------------------------------------------------------------------------

    def _base_weight(self) -> torch.Tensor:
        return dense_weight(self._base[0], self.info)

    def _base_row_norms_sq(self) -> torch.Tensor:
        """||W_i||^2 in fp32, recomputed only when the base weight changes (e.g. a merge)."""
        weight = self._base[0].weight
        key = (weight.data_ptr(), weight._version, weight.device)
        if self._row_norms_sq is None or self._row_norms_sq[0] != key:
            self._row_norms_sq = (key, self._base_weight().float().pow(2).sum(dim=1))
        return self._row_norms_sq[1]

    @torch.no_grad()
    def row_norms(self) -> torch.Tensor:
        """||W + s B A|| per output row, without forming B A (see module doc), in fp32."""
        A, B, s = self.lora_A.float(), self.lora_B.float(), self.scaling
        weight_a = self._base_weight().to(A.dtype) @ A.T  # [out, r]
        cross = (weight_a * B).sum(dim=1)
        square = ((B @ (A @ A.T)) * B).sum(dim=1)
        return (self._base_row_norms_sq() + 2 * s * cross + s * s * square).clamp_min(0).sqrt()

    def magnitude_ratio(self) -> torch.Tensor:
        """g = m / ||W + s B A||, the norm a constant for autograd; kept in eval mode."""
        if self.training or torch.is_grad_enabled() and self.lora_magnitude_vector.requires_grad:
            return self.lora_magnitude_vector / self.row_norms().to(self.lora_magnitude_vector.dtype)
        weight = self._base[0].weight
        key = tuple((t.data_ptr(), t._version) for t in (self.lora_A, self.lora_B, self.lora_magnitude_vector, weight))
        if self._eval_ratio is None or self._eval_ratio[0] != key:
            self._eval_ratio = (key, self.lora_magnitude_vector / self.row_norms().to(self.lora_magnitude_vector.dtype))
        return self._eval_ratio[1]

    # -- the adapter protocol ----------------------------------------------------------------

    def delta(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        g = self.magnitude_ratio()
        base = self._base[0]
        if self.p > 0 and self.training:  # PEFT's semantics: both terms see the same dropped input
            dropped = F.dropout(x.to(self.lora_A.dtype), self.p, training=True)
            base_part = F.linear(dropped, self._base_weight().to(dropped.dtype))
            lora_part = low_rank_delta(dropped, LowRank(self.lora_A, self.lora_B, self.scaling), self.training)
        else:
            bias = getattr(base, "bias", None)
            base_part = base_output - bias if bias is not None else base_output
            lora_part = low_rank_delta(x, LowRank(self.lora_A, self.lora_B, self.scaling), self.training)
        base_part = base_part.to(g.dtype)
        # = (g - 1) W x + g s B A x, written so that autograd keeps one [tokens, out] tensor, not two
        return g * (base_part + lora_part) - base_part

    def delta_weight(self) -> torch.Tensor:
        """g * (W + s B A) - W for the base weight as it is now (merging reads it first)."""
        weight = self._base_weight().to(self.lora_A.dtype)
        g = self.magnitude_ratio()[:, None]
        return (g - 1) * weight + g * self._product(self.lora_A, self.lora_B)

    def low_rank_factors(self) -> LowRank | None:
        return None  # rescales the base output: not of LoRA's shape
