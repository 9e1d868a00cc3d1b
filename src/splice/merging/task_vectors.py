"""Merging rules on task vectors: plain tensors τ_i of equal shape, one per task, no model.

A task vector is what fine-tuning changed, τ = θ_task − θ_0; for an adapter it is the module's
weight change ΔW (with its bias change appended, see `splice.merging.merge`). Every rule here
takes a stack `taus` [n, ...] and returns one merged tensor of the same shape:

    linear          Σ_i w_i τ_i                                  (task arithmetic; Ilharco et al., 2023)
    magnitude       Σ_i w_i prune_k(τ_i): keep the top `density` fraction of |τ_i| in each
    dare            Σ_i w_i m_i ⊙ τ_i / density, m_i ~ Bernoulli(density)  (Yu et al., 2024)
    ties            trim each τ_i to its top `density` of |τ_i|, elect a sign per entry, average
                    the weighted entries w_i τ_i whose sign agrees  (Yadav et al., 2023)

As in HF PEFT's `merge_utils`, trimming and sign election see the unweighted task vectors and
the weights enter the disjoint mean, so splice's TIES and DARE-TIES give PEFT's numbers on the
same dense changes; `ties` with one task and weight 1 returns the trimmed task vector.
"""

from __future__ import annotations

from typing import Literal

import torch

from splice.core.errors import SpliceError
from splice.core.validation import tensor_problem

SignRule = Literal["total", "frequency"]


def linear(taus: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i τ_i."""
    _check_inputs(taus, weights)
    return torch.einsum("i,i...->...", weights.to(taus.dtype), taus)


def prune_magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """τ with all but the `density` fraction of largest-magnitude entries set to zero."""
    _check_density(density)
    keep = int(density * tau.numel())  # floor, as PEFT's magnitude_based_pruning
    if keep >= tau.numel():
        return tau.clone()
    if keep == 0:
        return torch.zeros_like(tau)
    flat = tau.abs().flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(keep).indices] = True
    return tau * mask.view_as(tau)


def prune_random(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop-and-rescale: keep each entry with probability `density`, divide by it."""
    _check_density(density)
    mask = torch.rand(tau.shape, generator=generator, dtype=torch.float64, device=tau.device) < density
    return tau * mask / density


def elect_sign(taus: torch.Tensor, rule: SignRule = "total") -> torch.Tensor:
    """+1/−1 per entry: the sign of Σ_i τ_i ("total", TIES) or of the majority count ("frequency")."""
    if rule == "total":
        signs = taus.sum(dim=0).sign()
    elif rule == "frequency":
        signs = taus.sign().sum(dim=0).sign()
    else:
        raise SpliceError(f"majority sign rule must be 'total' or 'frequency', got {rule!r}")
    return torch.where(signs >= 0, 1.0, -1.0).to(taus.dtype)


def disjoint_mean(taus: torch.Tensor, signs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of w_i τ_i over the tasks whose entry is non-zero with the elected sign (0 where none)."""
    agree = (taus * signs) > 0
    count = agree.sum(dim=0).clamp_min(1)
    weighted = taus * weights.to(taus.dtype).view(-1, *(1,) * (taus.dim() - 1))
    return (weighted * agree).sum(dim=0) / count


def magnitude(taus: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    _check_inputs(taus, weights)
    return linear(torch.stack([prune_magnitude(t, density) for t in taus]), weights)


def dare_linear(taus: torch.Tensor, weights: torch.Tensor, density: float,
                generator: torch.Generator) -> torch.Tensor:
    _check_inputs(taus, weights)
    return linear(torch.stack([prune_random(t, density, generator) for t in taus]), weights)


def ties(taus: torch.Tensor, weights: torch.Tensor, density: float, rule: SignRule = "total") -> torch.Tensor:
    _check_inputs(taus, weights)
    trimmed = torch.stack([prune_magnitude(t, density) for t in taus])
    return disjoint_mean(trimmed, elect_sign(trimmed, rule), weights)


def dare_ties(taus: torch.Tensor, weights: torch.Tensor, density: float, generator: torch.Generator,
              rule: SignRule = "total") -> torch.Tensor:
    _check_inputs(taus, weights)
    dropped = torch.stack([prune_random(t, density, generator) for t in taus])
    return disjoint_mean(dropped, elect_sign(dropped, rule), weights)


def _check_density(density: float) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise SpliceError(f"density must be a number in (0, 1], got {density!r}")


def _check_inputs(taus: torch.Tensor, weights: torch.Tensor) -> None:
    """One finite weight per task vector, and finite floating-point task vectors (NaN or infinity
    would spread through the sign election and the mean, and break the SVD that follows)."""
    if weights.dim() != 1 or weights.shape[0] != taus.shape[0]:
        raise SpliceError(f"{tuple(weights.shape)} weights for {taus.shape[0]} task vectors; give one weight each")
    for what, tensor in (("task vectors", taus), ("weights", weights)):
        problem = tensor_problem(tensor)
        if problem:
            raise SpliceError(f"the {what} {problem.replace('weights must', 'they must')}")
