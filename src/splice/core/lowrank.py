"""The low-rank form `s * B A dropout(x)` on a Linear host, computed lean.

Most adapter forms are, on a Linear layer, a scaled product of two thin factors. Naming that
shape once lets the core compute it better than plain autograd does: the training path keeps
only what the backward needs (the input, in its own dtype, and the factors; the rank-r
intermediate is recomputed and a dropout mask is regenerated from a seed instead of being
stored beside a dropped copy of the input), as Unsloth's hand-written LoRA backward does.
The forward runs the same operations as `F.linear(F.linear(dropout(x), A), B) * s`, so outputs
are bit-identical to the plain formulation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


class LowRank(NamedTuple):
    """An adapter as `scaling * B @ A @ dropout(x)`: A is [r, in], B is [out, r]."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    dropout: float = 0.0


def low_rank_delta(x: torch.Tensor, factors: LowRank, training: bool) -> torch.Tensor:
    """`scaling * B A dropout(x)` for x of shape [..., in]; dropout only when `training`.

    With gradients on, this goes through a custom backward that stores no intermediate of
    the adapter; without, it is three plain kernels.
    """
    A, B, scaling, p = factors
    p = p if training else 0.0
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        return _LeanLowRank.apply(x, A, B, scaling, p, seed)
    x = x.to(A.dtype)
    if p > 0:
        x = F.dropout(x, p, training=True)
    return F.linear(F.linear(x, A), B) * scaling


def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x with inverted dropout whose mask is a pure function of `seed` (so backward can redo it)."""
    if p == 0:
        return x
    generator = torch.Generator(device=x.device).manual_seed(seed)
    keep = torch.empty(x.shape, device=x.device).bernoulli_(1 - p, generator=generator)
    return x * (keep / (1 - p)).to(x.dtype)


class _LeanLowRank(torch.autograd.Function):
    """Saves x (as given, no cast copy), A and B; recomputes the rank-r hidden and the mask."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float,
                seed: int) -> torch.Tensor:
        ctx.save_for_backward(x, A, B)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        ctx.autocast = torch.is_autocast_enabled(x.device.type)
        ctx.autocast_dtype = torch.get_autocast_dtype(x.device.type)
        xd = _dropped(x.to(A.dtype), p, seed)
        return F.linear(F.linear(xd, A), B) * scaling

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, A, B = ctx.saved_tensors
        with torch.autocast(x.device.type, dtype=ctx.autocast_dtype, enabled=ctx.autocast):
            flat = _dropped(x.to(A.dtype), ctx.p, ctx.seed).reshape(-1, x.shape[-1])  # a 1-D x is one row
            g = grad.reshape(-1, grad.shape[-1])  # [N, out]
            # the scaling goes on the rank-r products, not on the full-size output gradient
            grad_B = (g.T @ F.linear(flat, A)) * ctx.scaling if ctx.needs_input_grad[2] else None
            grad_hidden = (g @ B) * ctx.scaling  # [N, r]
            grad_A = grad_hidden.T @ flat if ctx.needs_input_grad[1] else None
            grad_x = None
            if ctx.needs_input_grad[0]:
                # a fresh tensor, not a view, so autograd can accumulate into it in place
                grad_x = grad_hidden.view(*x.shape[:-1], -1) @ A
                if ctx.p > 0:
                    grad_x = _dropped(grad_x, ctx.p, ctx.seed)
                grad_x = grad_x.to(x.dtype)
        return (grad_x, _cast(grad_A, A), _cast(grad_B, B), None, None, None)


def _cast(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)
