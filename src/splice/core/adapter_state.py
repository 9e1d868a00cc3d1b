"""An adapter as plain tensors: what merging and compression work on, with no model needed.

A LoRA-shaped adapter is, per adapted module, a weight change

    ΔW = s · B A          A: [r, in, *kernel],  B: [out, r, *1]      (HF PEFT's layouts)

plus, optionally, a change of the module's bias s · b (PEFT's `lora_bias`) and, for DoRA, a
magnitude m that makes the change depend on the base weight W:

    W' = diag(m / ‖W + s B A‖_row) (W + s B A)

Everything here is exact bookkeeping on those tensors: `matrix()` is s·B̂Â with the factors
flattened to matrices ([out, in·kernel]; for an embedding [dim, num], the transpose of its
weight), `from_matrix_factors` puts flattened factors back into the layout, and
`effective_matrix(W)` is the true change of W, DoRA included. Ranks, scales, biases and
magnitudes are per module, so rsLoRA, per-module ranks and DoRA are never approximated by a
config-wide r and alpha (the cases HF PEFT's `add_weighted_adapter` gets wrong, PEFT issues
#3737 and #3761).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from splice.core.errors import ShapeMismatchError, SpliceError
from splice.core.validation import tensor_problem

UpdateKind = Literal["linear", "conv", "embedding"]


@dataclass
class ModuleUpdate:
    """One module's change: s · B A (+ s · b on the output), DoRA's magnitude if any."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    kind: UpdateKind = "linear"
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.A.shape[0] != self.B.shape[1]:
            raise ShapeMismatchError(
                f"lora_A has {self.A.shape[0]} rows but lora_B has {self.B.shape[1]} columns ("
                f"A {tuple(self.A.shape)}, B {tuple(self.B.shape)})")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def parameters(self) -> int:
        """Stored numbers: the factors, the bias and the magnitude."""
        return sum(t.numel() for t in (self.A, self.B, self.bias, self.magnitude) if t is not None)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """s · B̂ Â as a matrix [out, in·kernel] (embedding: [dim, num])."""
        return self.B.flatten(1).to(dtype) @ self.A.flatten(1).to(dtype) * self.scaling

    def scaled_bias(self, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
        """s · b: the change of the module's output bias."""
        return None if self.bias is None else self.bias.to(dtype) * self.scaling

    def effective_matrix(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The true change of the weight as a float64 matrix; DoRA needs the base weight W
        (canonical layout, [out, in, ...]) since its change is diag(m/‖W+sBA‖)(W+sBA) - W."""
        delta = self.matrix()
        if self.magnitude is None:
            return delta
        if base_weight is None:
            raise SpliceError("a DoRA update's weight change depends on the base weight; pass the base model")
        weight = base_weight.detach().to(torch.float64).flatten(1)
        if weight.shape != delta.shape:
            raise ShapeMismatchError(f"base weight has shape {tuple(weight.shape)}, the update {tuple(delta.shape)}")
        combined = weight + delta
        g = self.magnitude.to(torch.float64) / combined.norm(dim=1)
        return g[:, None] * combined - weight

    def like(self, **changes: object) -> ModuleUpdate:
        return dataclasses.replace(self, **changes)

    def from_matrix_factors(self, B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0,
                            bias: torch.Tensor | None = None, magnitude: torch.Tensor | None = None,
                            dtype: torch.dtype | None = None) -> ModuleUpdate:
        """A new update of this module's layout from flattened factors B̂ [out, k], Â [k, in·kernel]."""
        dtype = dtype or self.A.dtype
        rank = A.shape[0]
        return ModuleUpdate(
            A=A.to(dtype).reshape(rank, *self.A.shape[1:]).contiguous(),
            B=B.to(dtype).reshape(self.B.shape[0], rank, *self.B.shape[2:]).contiguous(),
            scaling=scaling, kind=self.kind,
            bias=None if bias is None else bias.to(dtype),
            magnitude=None if magnitude is None else magnitude.to(dtype),
        )


@dataclass
class AdapterState:
    """A LoRA-shaped adapter as tensors plus the facts a PEFT directory records about it.

    `heads` are the modules trained in full (`train_also`, PEFT's `modules_to_save`) by name,
    as configured; `head_tensors` their tensors, keyed by parameter path ("classifier.weight").
    `target_modules` is what the config names (leaf names or full paths); None means the
    module names themselves.
    """

    modules: dict[str, ModuleUpdate]
    head_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: list[str] = field(default_factory=list)
    rslora: bool = False
    dropout: float = 0.0
    base_model: str | None = None
    task_type: str | None = None
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    # "pissa": the factors are for the base weight minus its top-r singular part (a PEFT PiSSA
    # adapter saved without conversion), so they mean nothing without that base
    residual_init: str | None = None

    @property
    def dora(self) -> bool:
        return any(u.magnitude is not None for u in self.modules.values())

    def nonfinite_problem(self) -> str | None:
        """'<module>.lora_B holds 1 NaN values' for the first tensor or scaling that is not
        finite (a diverged training), else None: what an SVD or a merge must not be given."""
        for name, update in self.modules.items():
            for role, tensor in (("lora_A", update.A), ("lora_B", update.B), ("lora_B.bias", update.bias),
                                 ("lora_magnitude_vector", update.magnitude)):
                problem = None if tensor is None else tensor_problem(tensor)
                if problem:
                    return f"{name}.{role} {problem}"
            if not _is_finite(update.scaling):
                return f"{name} has scaling {update.scaling!r}; the scaling alpha/r must be finite"
        for key, tensor in self.head_tensors.items():
            problem = tensor_problem(tensor, floating=False)
            if problem:
                return f"head tensor {key} {problem}"
        return None

    @property
    def parameters(self) -> int:
        """Adapter numbers, heads not counted (as PEFT users compare adapter sizes)."""
        return sum(u.parameters for u in self.modules.values())

    def alpha(self, update: ModuleUpdate) -> float:
        """The PEFT `lora_alpha` that gives this update's scaling at its rank."""
        return update.scaling * (math.sqrt(update.rank) if self.rslora else update.rank)

    def like(self, **changes: object) -> AdapterState:
        return dataclasses.replace(self, **changes)


def _is_finite(value: object) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
