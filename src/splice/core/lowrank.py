"""The low-rank form `s * B A dropout(x)` on a Linear host, computed lean.

Most adapter forms are, on a Linear layer, a scaled product of two thin factors. Naming that
shape once lets the core compute it better than plain autograd does:

- Training (`low_rank_delta` with gradients): a custom backward that keeps the input (in its
  own dtype, usually shared with the base layer's saved input), the factors, the rank-r hidden
  (r/in of the input's size) and, with dropout, a one-byte-per-element keep mask instead of a
  dropped fp32 copy of the input and its float mask as plain autograd does. The mask is drawn
  once, by a uniform draw compared with p (0.9 ms where `bernoulli_` takes 1.6 ms for 8 x 64 x
  384 entries on one CPU thread), and kept: on CPU, drawing it again in backward costs more
  than the memory is worth (profile of a MiniLM step: random numbers took 20% of it when the
  mask was regenerated from a seed twice in backward, 1.07x PEFT's step time). It is applied by
  a multiplication with uint8 (0.06 ms; `masked_fill` with a bool mask took 0.37 ms). The
  scalings go on the rank-r products, never on a full-size tensor.
- Inference (`add_low_rank_`, no gradients): the delta is accumulated into the base output in
  place, `out += s (x Aᵀ) Bᵀ` as one GEMM and one `addmm_` with alpha = s: no full-size
  temporaries, no separate scaling pass, no out-of-place add. What is left is memory traffic:
  the two thin GEMMs read the layer input once more and read and write its output once more,
  which on CPU costs 2-3x their share of the FLOPs (see bench/bench_speed.py's per-layer table).

Without dropout the training forward runs the same operations as
`F.linear(F.linear(x, A), B) * s`, so its output is bit-identical to the plain formulation;
the in-place inference form rounds differently (the scale is applied inside the GEMM, the sum
into the output is fused, and from TRANSPOSED_FROM_ROWS rows the first GEMM runs transposed):
it agrees with the plain formula to float rounding (a few ulps a layer), not bit for bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

TRANSPOSED_FROM_ROWS = 64  # see add_low_rank_


class LowRank(NamedTuple):
    """An adapter as `scaling * B @ A @ dropout(x)`: A is [r, in], B is [out, r]."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    dropout: float = 0.0


class LowRankForward:
    """Mixin for an adapter whose forward is its low-rank form: wherever `low_rank_factors()`
    exists, `delta(x)` computes `low_rank_delta(x, low_rank_factors(), training) + initial_delta(x)`.

    Only for such adapters may the host replace `delta` by the fused in-place inference path
    (`add_low_rank_`); any other adapter keeps its own `delta` there, and its
    `low_rank_factors()` is used in mixed batches (`route`) only.
    """


def low_rank_delta(x: torch.Tensor, factors: LowRank, training: bool) -> torch.Tensor:
    """`scaling * B A dropout(x)` for x of shape [..., in]; dropout only when `training`.

    With gradients on, this goes through a custom backward that stores no full-size
    intermediate of the adapter but a one-byte dropout mask (`dropout_mask`); without, it is
    plain kernels and `F.dropout`. Both draw their masks from the global RNG (so activation
    checkpointing replays them), but not the same mask for the same RNG state: the mask of the
    training path is drawn the faster way (`dropout_mask`), 2% of a MiniLM LoRA step. Inside a
    `torch.func` transform (vmap, grad) the plain kernels run: torch.func differentiates them.
    """
    A, B, scaling, p = factors
    p = p if training else 0.0
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad) \
            and not torch._C._are_functorch_transforms_active():
        return _LeanLowRank.apply(x, A, B, scaling, p, dropout_mask(x, p) if p > 0 else None)
    # Plain ops: no gradients, or inside a torch.func transform (per-sample gradients with
    # vmap(grad(...)), as GAST takes them), which differentiates these itself; the custom
    # backward above is written for autograd only (no setup_context / vmap rule).
    x = x.to(A.dtype)
    if p > 0:
        x = F.dropout(x, p, training=True)
    return F.linear(F.linear(x, A), B) * scaling


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Which entries of x inverted dropout with probability p keeps: 1 (kept) or 0, uint8, x's shape.

    One uniform float per entry, compared with p: P(drop) = p to 2^-24, the resolution of
    torch's own Bernoulli draws. uint8 rather than bool because multiplying by it is the fast
    way to apply it on CPU (the bool result is reinterpreted, not converted).
    """
    return (torch.rand(x.shape, device=x.device, dtype=torch.float32) >= p).view(torch.uint8)


def add_low_rank_(output: torch.Tensor, x: torch.Tensor, factors: LowRank) -> torch.Tensor:
    """`output + scaling * B A x`, accumulated into `output` in place (no dropout; no autograd).

    For inference: x Aᵀ is one thin GEMM, and `addmm_` adds its product with Bᵀ, times the
    scaling, straight into the base output. An output of another dtype than the factors (a
    bf16 base with fp32 adapters, or a 4-bit layer that returns fp32 under bf16 autocast, where
    the thin product comes out in bf16) gets the delta cast to its dtype and added in place.
    """
    A, B, scaling, _ = factors
    flat = x.reshape(-1, x.shape[-1])
    flat = flat if flat.dtype == A.dtype else flat.to(A.dtype)
    # x Aᵀ as (A xᵀ)ᵀ from TRANSPOSED_FROM_ROWS rows on: MKL runs that orientation of the thin
    # GEMM faster there (the pair of GEMMs in 0.74-0.84x the time at 128-1536 rows of 384-1536
    # features, one thread) and slower below (1.2x at 8 rows). It rounds differently from
    # `F.linear`, which small batches keep: a tiny GPT-2's outputs were further from the merge
    # tests' tolerance with it (1.7e-5 vs 2.1e-6 relative after a merge/unmerge round trip).
    hidden = torch.mm(A, flat.t()).t() if flat.shape[0] >= TRANSPOSED_FROM_ROWS else F.linear(flat, A)
    target = output.view(-1, output.shape[-1])
    if target.dtype == B.dtype == hidden.dtype:  # under autocast `hidden` may come out in bf16
        target.addmm_(hidden, B.t(), alpha=scaling)
    else:
        target.add_((F.linear(hidden, B) * scaling).to(target.dtype))
    return output


class _LeanLowRank(torch.autograd.Function):
    """Saves x (as given, no cast copy), A, B, the rank-r hidden and the keep mask (if any)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float,
                keep: torch.Tensor | None) -> torch.Tensor:
        ctx.scaling, ctx.p = scaling, p
        ctx.autocast = torch.is_autocast_enabled(x.device.type)
        ctx.autocast_dtype = torch.get_autocast_dtype(x.device.type)
        x_in = x.to(A.dtype)
        # the rank-r hidden A dropout(x): the dropout scale 1/(1-p) goes on it, not on the input
        hidden = F.linear(x_in, A) if keep is None else F.linear(x_in * keep, A) * (1 / (1 - p))
        ctx.save_for_backward(x, A, B, hidden, keep)
        return F.linear(hidden, B) * scaling

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, A, B, hidden, keep = ctx.saved_tensors
        with torch.autocast(x.device.type, dtype=ctx.autocast_dtype, enabled=ctx.autocast):
            g = grad.reshape(-1, grad.shape[-1])  # [N, out]; a 1-D x is one row
            grad_B = torch.mm(g.t(), hidden.reshape(-1, hidden.shape[-1])) * ctx.scaling \
                if ctx.needs_input_grad[2] else None
            # d/d(A dropout(x)): the output gradient through B and both scalings, all rank-r
            grad_hidden = (g @ B) * (ctx.scaling / (1 - ctx.p))  # [N, r]
            grad_A = None
            if ctx.needs_input_grad[1]:
                flat = x.to(A.dtype).reshape(-1, x.shape[-1])
                flat = flat if keep is None else flat * keep.reshape(flat.shape)
                grad_A = grad_hidden.t() @ flat
            grad_x = None
            if ctx.needs_input_grad[0]:
                # a fresh tensor, not a view, so autograd can accumulate into it in place
                grad_x = grad_hidden.view(*x.shape[:-1], -1) @ A
                if keep is not None:
                    grad_x = grad_x.mul_(keep)
                grad_x = grad_x.to(x.dtype)
        return (grad_x, _cast(grad_A, A), _cast(grad_B, B), None, None, None)


def _cast(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)
