"""LoReFT, NoReFT, DiReFT: learned edits of hidden states at chosen layers and prompt positions
(Wu et al., 2024, arXiv 2404.03592; `pyreft`).

Instead of changing weights, ReFT edits what a transformer layer outputs, at a few tokens only:

    LoReFT   Φ(h) = h + Rᵀ(act(W h + b) − R h),   R: [r, d] with orthonormal rows (R Rᵀ = I_r)
    NoReFT   the same, R unconstrained
    DiReFT   Φ(h) = h + W2ᵀ act(W1 h + b)          (W2 unconstrained, no projection subtracted)

NoReFT and DiReFT are the paper's ablations (appendix); pyreft's `DireftIntervention` keeps W2
orthonormal, here it is free as the paper and spec define it.

LoReFT replaces the coordinates of h inside the r-dimensional subspace span(R) by the learned
affine target W h + b and leaves the orthogonal complement alone. One intervention costs
2rd + r parameters (rank 4 at one layer of a 4096-wide model: 32,772). R stays orthonormal
under any optimizer through a parametrization (`torch.nn.utils.parametrize`): Rᵀ is the product
of r Householder reflections whose vectors are the free [d, r] parameter, as in pyreft's
`parametrizations.orthogonal(..., "householder")` minus one trap: torch's map reads column signs
from the parameter's diagonal through `.int()`, so AdamW's weight decay (1.0 -> 0.9999 -> 0)
silently turns R into zero and stops training. Here the diagonal is not used at all.

Where: `targets=None` edits the output of every transformer layer; `layers` picks among them.
Which tokens: pyreft's `positions` syntax, "f<N>" the first N prompt tokens of each row, "l<N>"
the last N, "f<N>+l<N>" both. The prompt is what `BatchInputs.prompt_mask()` says: attended
tokens and, in causal-LM training with per-token labels, those labelled -100; left and right
padding give the same edits. With `share_weights=False` (pyreft's default) the first-N and
last-N positions have separate interventions. A prompt shorter than f + l is edited at the
union of its first f and last l tokens, each position once, the prefix intervention winning
where they overlap (pyreft instead cuts f and l to half the prompt each).

Generated tokens are never edited: a cached decoding step gets a zero edit, so decoding costs
nothing extra. (Generation without a KV cache re-reads the whole sequence as a prompt, so "l1"
would follow the newest token there.) The edit depends on the position, so there is no
equivalent weight change: a ReFT adapter cannot be merged.

Init, as pyreft: R (NoReFT's R, DiReFT's W2) has orthonormal rows spanning a random subspace,
W and b start as `nn.Linear`'s. The model therefore changes at step 0, unlike with LoRA;
W := R, b := 0 is the exact identity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers.activations import ACT2FN

from splice.core.config import Adapter, AdapterConfig
from splice.core.errors import SpliceError
from splice.core.inputs import BatchInputs
from splice.core.layers import LayerInfo
from splice.core.registry import register_method

Variant = Literal["loreft", "noreft", "direft"]
VARIANTS = ("loreft", "noreft", "direft")
_POSITIONS = re.compile(r"f(\d+)\+l(\d+)|f(\d+)|l(\d+)")


@register_method
@dataclass
class LoReFT(AdapterConfig):
    """Hyperparameters of a ReFT intervention (LoReFT, NoReFT or DiReFT).

    Attributes:
        r: dimension of the edited subspace. pyreft uses 4-8 for instruction tuning and
            commonsense reasoning on 7B models, and 1 for GLUE on RoBERTa.
        variant: "loreft" (orthonormal R), "noreft" (the same formula, R free) or "direft"
            (h + W2ᵀ(W1 h + b): cheaper, no orthogonality and no projection subtracted).
        positions: which prompt tokens of each row are edited: "f<N>" the first N, "l<N>" the
            last N, "f<N>+l<N>" both (pyreft's "f7+l7"); "l1" is the last prompt token.
        share_weights: one intervention for the first and last positions instead of two.
        dropout: dropout on the edit Φ(h) − h.
        activation: a transformers activation name (e.g. "relu", "gelu") applied to W h + b;
            None is the identity, as in the paper.
    """

    method: ClassVar[str] = "loreft"
    site: ClassVar[Literal["layer", "block"]] = "block"
    reads_inputs: ClassVar[bool] = True
    r: int = 4
    variant: Variant = "loreft"
    positions: str = "l1"
    share_weights: bool = False
    dropout: float = 0.0
    activation: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise SpliceError(f"ReFT rank r must be >= 1, got {self.r}")
        if self.variant not in VARIANTS:
            raise SpliceError(f"ReFT variant must be one of {', '.join(VARIANTS)}; got {self.variant!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpliceError(f"ReFT dropout must be in [0, 1), got {self.dropout}")
        if self.activation is not None and self.activation not in ACT2FN:
            raise SpliceError(f"unknown activation {self.activation!r}; known: {', '.join(ACT2FN)}")
        parse_positions(self.positions)

    def build(self, info: LayerInfo, module_name: str, base: nn.Module) -> LoReFTAdapter:
        if self.r > info.out_features:
            raise SpliceError(f"ReFT rank r={self.r} exceeds the hidden size {info.out_features} of {module_name!r}")
        first, last = parse_positions(self.positions)
        return LoReFTAdapter(info.out_features, self.r, self.variant, first, last, self.share_weights,
                             self.dropout, self.activation)


def parse_positions(positions: str) -> tuple[int, int]:
    """pyreft's position syntax as (first, last): "f7+l7" -> (7, 7), "l1" -> (0, 1), "f3" -> (3, 0)."""
    found = _POSITIONS.fullmatch(positions) if isinstance(positions, str) else None
    if found is None:
        raise SpliceError(f"ReFT positions {positions!r} not understood; use 'f<N>' (first N prompt tokens), "
                          "'l<N>' (last N) or 'f<N>+l<N>' (both), e.g. 'l1' or 'f7+l7'")
    both_f, both_l, only_f, only_l = found.groups()
    first, last = int(both_f or only_f or 0), int(both_l or only_l or 0)
    if (both_f is not None and (first == 0 or last == 0)) or first + last == 0:
        raise SpliceError(f"ReFT positions {positions!r} select no token; every count must be >= 1")
    return first, last


class Householder(nn.Module):
    """Parametrization of a [d, r] matrix with orthonormal columns, d >= r: H_1 ⋯ H_r [:, :r],
    H_i = I − 2 v_i v_iᵀ / |v_i|², v_i = e_i + (column i of X below the diagonal).

    Every X maps to orthonormal columns, so no optimizer step can leave the set; the diagonal
    and upper triangle of X are unused (zero gradient, and weight decay on them is harmless).
    """

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        A = X.tril(-1)
        return torch.linalg.householder_product(A, 2.0 / (1.0 + (A * A).sum(dim=0)))


class Intervention(nn.Module):
    """One Φ, applied to hidden states h [n, d]; returns the edit Φ(h) − h.

    `basis.weight` is Rᵀ [d, r] (W2ᵀ for DiReFT), the layout of pyreft's rotate layer; for
    LoReFT it is `Householder`-parametrized, so its columns, the rows of R, stay orthonormal.
    `source` holds W and b (W1 and b for DiReFT).
    """

    def __init__(self, d: int, r: int, variant: Variant, activation: str | None) -> None:
        super().__init__()
        self.variant = variant
        self.source = nn.Linear(d, r)
        self.basis = nn.Linear(r, d, bias=False)
        with torch.no_grad():
            reflectors, _ = torch.geqrf(torch.randn(d, r))  # QR of a Gaussian: a uniformly random subspace
            self.basis.weight.copy_(reflectors.tril(-1))
        parametrize.register_parametrization(self.basis, "weight", Householder())
        if variant != "loreft":  # the same random orthonormal start, then free
            parametrize.remove_parametrizations(self.basis, "weight", leave_parametrized=True)
        self.act = ACT2FN[activation] if activation is not None else None

    @property
    def R(self) -> torch.Tensor:
        """R [r, d] (DiReFT: W2), recomputed from the parametrization on every access."""
        return self.basis.weight.T

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        basis = self.basis.weight  # the parametrization runs once per call
        if self.variant == "direft":
            coords = self.source(h)
            coords = self.act(coords) if self.act is not None else coords
        elif self.act is None:
            # (W − R) h + b: one matmul, and exactly zero when W = R and b = 0.
            coords = F.linear(h, self.source.weight - basis.T, self.source.bias)
        else:
            coords = self.act(self.source(h)) - h @ basis
        return coords @ basis.T


class LoReFTAdapter(Adapter):
    """The interventions of one layer, applied to its output at the selected prompt positions.

    `interventions` holds "prefix" (first-N positions) and/or "suffix" (last-N), or one
    "shared" for both.
    """

    uses_base_output = True

    def __init__(self, d: int, r: int, variant: Variant, first: int, last: int, share_weights: bool,
                 dropout: float, activation: str | None) -> None:
        super().__init__()
        self.d, self.first, self.last = d, first, last
        groups = [g for g, n in (("prefix", first), ("suffix", last)) if n]
        shared = share_weights and len(groups) == 2
        self.uses = {g: "shared" if shared else g for g in groups}  # position group -> intervention
        self.interventions = nn.ModuleDict({
            name: Intervention(d, r, variant, activation) for name in dict.fromkeys(self.uses.values())
        })
        self.dropout = nn.Dropout(dropout)

    def delta(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        inputs = self.batch_inputs()
        if inputs is None:
            raise SpliceError("a ReFT adapter reads the batch's token positions, which it has only inside a "
                              "forward of the model it was attached to; it was called outside one")
        if inputs.decoding:  # generated tokens are never edited
            return base_output.new_zeros(()).expand_as(base_output)
        prompt = inputs.prompt_mask()
        if prompt is None:
            raise SpliceError("a ReFT adapter needs the batch's input_ids or attention_mask ([rows, seq]) to find "
                              "the prompt positions; the model was called with neither")
        self._check_shape(base_output, prompt)
        prefix, suffix = selected_positions(inputs, self.first, self.last)
        indices = {"prefix": prefix, "suffix": suffix}
        groups: dict[str, list[torch.Tensor]] = {}
        for group, name in self.uses.items():
            groups.setdefault(name, []).append(indices[group])
        dtype = next(self.parameters()).dtype
        h = base_output.reshape(-1, self.d)
        rows, edits = [], []
        for name, parts in groups.items():
            index = torch.cat(parts).to(h.device)
            if index.numel():
                rows.append(index)
                edits.append(self.interventions[name](h.index_select(0, index).to(dtype)))
        out = h.new_zeros(h.shape, dtype=dtype)
        if edits:
            out = out.index_copy(0, torch.cat(rows), self.dropout(torch.cat(edits)))
        return out.view(base_output.shape)

    def _check_shape(self, base_output: torch.Tensor, prompt: torch.Tensor) -> None:
        if base_output.dim() != 3 or base_output.shape[-1] != self.d:
            raise SpliceError(f"a ReFT adapter edits hidden states [rows, seq, {self.d}]; its module output "
                              f"{tuple(base_output.shape)}")
        if base_output.shape[0] != prompt.shape[0]:
            raise SpliceError(f"a ReFT adapter got {base_output.shape[0]} rows of a batch of {prompt.shape[0]}: "
                              "ReFT adapters cannot share a mixed batch (splice.route) with other adapters yet; "
                              "route them in batches of their own")
        if base_output.shape[1] != prompt.shape[1]:
            raise SpliceError(f"a ReFT adapter got hidden states of {base_output.shape[1]} positions for a batch of "
                              f"{prompt.shape[1]} tokens; it must edit a layer whose output has one state per token")


def selected_positions(inputs: BatchInputs, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (row * seq + position) of each row's first `first` and last `last` prompt
    tokens, prefix first where they overlap; computed once per forward for every layer."""
    key = ("reft_positions", first, last)
    if key not in inputs.memo:
        prompt = inputs.prompt_mask()
        rank = prompt.long().cumsum(1)  # 1-based rank of each prompt token within its row
        length = rank[:, -1:]
        labels = inputs.labels
        if labels is not None and labels.shape == prompt.shape and bool(((length == 0) & (labels != -100)).any()):
            raise SpliceError("a row of the batch has no prompt token: its labels supervise every token. ReFT "
                              "edits prompt positions only; label the prompt tokens -100")
        prefix = prompt & (rank <= first)
        suffix = prompt & (rank > length - last) & ~prefix
        inputs.memo[key] = (prefix.flatten().nonzero().squeeze(1), suffix.flatten().nonzero().squeeze(1))
    return inputs.memo[key]
