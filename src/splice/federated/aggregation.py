"""Aggregation rules for federated adapters: the server's step, on clients' tensors, with no model.

A client sends its trainable tensors, {name: tensor}. LoRA factors are named `<prefix>.lora_A` and
`<prefix>.lora_B` (prefix `<module>.splice.<adapter>`), in HF PEFT's layouts A: [r, in, *kernel],
B: [out, r, *1] (embedding: A [r, num], B [dim, r]); flattened, Â = A [r, in·kernel] and B̂ = B [out, r].
Every other tensor (a classifier head, a LoRA bias) is averaged plainly. Client weights w_i (sample
counts) are normalised to sum 1.

    fedavg    every tensor averaged, each factor on its own:  Ā = Σ_i w_i A_i,  B̄ = Σ_i w_i B_i
              (McMahan et al., 2017; the common practice for LoRA)
    exact     the averaged weight change M = Σ_i w_i B̂_i Â_i, re-factored by truncated SVD,
              M ≈ U_k S_k V_kᵀ, as B̂' = U_k √S_k and Â' = √S_k V_kᵀ

Averaging the factors separately is biased: B̄Ā ≠ Σ_i w_i B_i A_i, the model the clients' updates
average to (the point of FedEx-LoRA, Singhal et al., 2024); `separation_error` measures the gap,
‖B̄Ā − M‖_F / ‖M‖_F. `exact` keeps M up to the rank-k truncation, whose relative error is by
Eckart–Young ‖B̂'Â' − M‖_F / ‖M‖_F = √(Σ_{j>k} s_j²) / √(Σ_j s_j²); at k = Σ_i r_i (capped at
min(out, in·kernel)) nothing is lost, as when FLoRA (Wang et al., 2024) stacks the clients' factors.

The LoRA scale s is the same on every client (one config), so Σ_i w_i s B_i A_i = s M and it factors
out of both rules. A model that receives factors of another rank (k ≠ r) must keep that s, not
recompute it from k (PEFT's alpha / r would change it). DoRA magnitudes are averaged plainly, which
is not exact, since DoRA's change depends on them through a normalisation.

Sums are accumulated in float64 and cast back to the clients' dtype; for one client with any weight
the normalised weight is exactly 1.0, so every rule gives back its tensors bit for bit (fedavg) or
its product up to float error (exact).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch

from splice.core.errors import IncompatibleAdaptersError, ShapeMismatchError, SpliceError
from splice.core.validation import tensor_problem

State = Mapping[str, torch.Tensor]
Rank = int | Literal["sum"] | None

A_SUFFIX, B_SUFFIX = ".lora_A", ".lora_B"


def fedavg(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ_i w_i T_i for every tensor T (LoRA factors too, each on its own), in the clients' dtype.

    Every client must have the same keys and shapes."""
    w = _normalised(states, weights)
    _check_states(states)
    return {key: _weighted_sum([state[key] for state in states], w).to(states[0][key].dtype) for key in states[0]}


def lora_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Module prefix -> (its lora_A key, its lora_B key), for every LoRA factor among `keys`."""
    keys = list(keys)
    a = {key.removesuffix(A_SUFFIX): key for key in keys if key.endswith(A_SUFFIX)}
    b = {key.removesuffix(B_SUFFIX): key for key in keys if key.endswith(B_SUFFIX)}
    lonely = [f"{p + A_SUFFIX!r} has no {p + B_SUFFIX!r}" for p in a if p not in b]
    lonely += [f"{p + B_SUFFIX!r} has no {p + A_SUFFIX!r}" for p in b if p not in a]
    if lonely:
        raise SpliceError(f"LoRA factors come in pairs, but {'; '.join(lonely[:3])}"
                          + (f" (and {len(lonely) - 3} more)" if len(lonely) > 3 else ""))
    return {prefix: (key, b[prefix]) for prefix, key in a.items()}


def exact(states: Sequence[State], weights: Sequence[float],
          rank: Rank = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The aggregated tensors and, per LoRA module prefix, the relative error of its re-factoring.

    Each LoRA pair becomes M = Σ_i w_i B̂_i Â_i re-factored at rank k (see the module docstring):
    `rank` None keeps the clients' rank r (which must agree), "sum" takes Σ_i r_i capped at
    min(out, in·kernel), exact up to float error; an int k above that cap (or above M's rank) is
    padded with unused components (B's column zero, A's row a unit direction, so that training can
    still move them), so the result still loads into a rank-k model. Clients may differ in rank, never in
    the other dimensions; every other tensor is FedAvg'ed. Computed in float64 (the SVD too),
    returned in the clients' dtype; the error (0 when M = 0) does not count that last rounding.
    """
    w = _normalised(states, weights)
    pairs = lora_pairs(states[0])
    rank_dims = {key: dim for a_key, b_key in pairs.values() for key, dim in ((a_key, 0), (b_key, 1))}
    _check_states(states, rank_dims)
    _check_rank(rank)
    merged: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for prefix, (a_key, b_key) in pairs.items():
        merged[a_key], merged[b_key], errors[prefix] = _refactor(prefix, *_factors(states, a_key, b_key), w, rank)
    for key in states[0]:
        if key not in merged:
            merged[key] = _weighted_sum([state[key] for state in states], w).to(states[0][key].dtype)
    return {key: merged[key] for key in states[0]}, errors


def separation_error(states: Sequence[State], weights: Sequence[float]) -> dict[str, float]:
    """Per LoRA module prefix, ‖B̄Ā − M‖_F / ‖M‖_F with Ā, B̄ the averaged factors and M = Σ_i w_i B̂_i Â_i:
    how far the product of FedAvg'ed factors is from the averaged change (0 when both are 0, inf
    when only M is)."""
    w = _normalised(states, weights)
    _check_states(states)
    errors = {}
    for prefix, (a_key, b_key) in lora_pairs(states[0]).items():
        As, Bs = _factors(states, a_key, b_key)
        As, Bs = [A.flatten(1) for A in As], [B.flatten(1) for B in Bs]
        product = _weighted_sum(Bs, w) @ _weighted_sum(As, w)
        target = _weighted_sum([B.double() @ A.double() for A, B in zip(As, Bs, strict=True)], w)
        gap, norm = float((product - target).norm()), float(target.norm())
        errors[prefix] = gap / norm if norm > 0 else (0.0 if gap == 0 else math.inf)
    return errors


def _refactor(prefix: str, As: list[torch.Tensor], Bs: list[torch.Tensor], w: list[float],
              rank: Rank) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A', B') in the layouts of client 0's factors with k rows / columns, and the relative error."""
    ranks = [A.shape[0] for A in As]
    M = _weighted_sum([B.flatten(1).double() @ A.flatten(1).double() for A, B in zip(As, Bs, strict=True)], w)
    if rank is None:
        if len(set(ranks)) > 1:
            raise SpliceError(f"module {prefix!r} has ranks {ranks} on the clients; pass rank=<int> or rank='sum'")
        k = ranks[0]
    else:
        k = min(sum(ranks), *M.shape) if rank == "sum" else rank
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    kept = min(k, S.numel())
    root = S[:kept].sqrt()
    B = M.new_zeros(M.shape[0], k)
    A = M.new_zeros(k, M.shape[1])
    B[:, :kept] = U[:, :kept] * root
    A[:kept] = root[:, None] * Vh[:kept]
    # a component the mean does not use keeps a unit direction in A (its column of B is zero, so
    # B'A' = M still): with both factors zero it would sit at a saddle no gradient leaves
    spare = torch.eye(M.shape[1], dtype=M.dtype)
    for j in range(k):
        if j >= kept or root[j] == 0:
            A[j] = Vh[j] if j < Vh.shape[0] else spare[j % M.shape[1]]
    total = float(S.square().sum())
    error = math.sqrt(float(S[kept:].square().sum()) / total) if total > 0 else 0.0
    A0, B0 = As[0], Bs[0]
    return (A.reshape(k, *A0.shape[1:]).to(A0.dtype), B.reshape(B0.shape[0], k, *B0.shape[2:]).to(B0.dtype),
            error)


def _factors(states: Sequence[State], a_key: str, b_key: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every client's (A, B) of one module, checked to share the rank r (A's rows, B's columns)."""
    As, Bs = [state[a_key] for state in states], [state[b_key] for state in states]
    for i, (A, B) in enumerate(zip(As, Bs, strict=True)):
        if A.dim() < 2 or B.dim() < 2 or A.shape[0] != B.shape[1]:
            raise ShapeMismatchError(f"client {i}'s {a_key!r} has shape {tuple(A.shape)} and {b_key!r} "
                                     f"{tuple(B.shape)}; expected A [r, in, ...] and B [out, r, ...]")
    return As, Bs


def _weighted_sum(tensors: Sequence[torch.Tensor], w: Sequence[float]) -> torch.Tensor:
    """Σ_i w_i T_i in float64 on the first tensor's device, started from the first term (not from 0,
    which would turn a −0.0 into 0.0 and break one client's bit-identity)."""
    device = tensors[0].device
    total = w[0] * tensors[0].to(device=device, dtype=torch.float64)
    for wi, tensor in zip(w[1:], tensors[1:], strict=True):
        total += wi * tensor.to(device=device, dtype=torch.float64)
    return total


def _normalised(states: Sequence[State], weights: Sequence[float]) -> list[float]:
    """w_i / Σ_j w_j, after checking there is one finite non-negative weight per client."""
    if not states:
        raise SpliceError("no client states to aggregate")
    weights = [float(x) for x in weights]
    if len(weights) != len(states):
        raise SpliceError(f"{len(weights)} weights for {len(states)} clients; give one weight (sample count) each")
    if not all(math.isfinite(x) and x >= 0 for x in weights) or sum(weights) <= 0:
        raise SpliceError(f"client weights must be finite and non-negative, not all zero; got {weights}")
    total = sum(weights)
    return [x / total for x in weights]


def _check_states(states: Sequence[State], rank_dims: Mapping[str, int] | None = None) -> None:
    """Every client has client 0's keys, floating finite tensors, and client 0's shapes, except in
    the rank dimension `rank_dims[key]` of a LoRA factor (where `exact` allows clients to differ)."""
    rank_dims = rank_dims or {}
    keys = list(states[0])
    for i, state in enumerate(states):
        missing = [key for key in keys if key not in state]
        extra = [key for key in state if key not in states[0]]
        if missing or extra:
            raise IncompatibleAdaptersError(
                f"client {i}'s tensors differ from client 0's: missing {missing[:3]}, extra {extra[:3]}"
                + (f" ({len(missing) + len(extra)} keys in all)" if len(missing) + len(extra) > 6 else ""))
        for key in keys:
            problem = tensor_problem(state[key])
            if problem:
                raise SpliceError(f"client {i}'s {key!r} {problem}")
            shape, first = list(state[key].shape), list(states[0][key].shape)
            if key in rank_dims and len(shape) == len(first) > rank_dims[key]:
                shape[rank_dims[key]] = first[rank_dims[key]]
            if shape != first:
                raise IncompatibleAdaptersError(f"client {i}'s {key!r} has shape {tuple(state[key].shape)}, "
                                                f"client 0's {tuple(states[0][key].shape)}")


def _check_rank(rank: Rank) -> None:
    if rank is None or rank == "sum":
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SpliceError(f"rank must be a positive integer, 'sum' or None (the clients' rank), got {rank!r}")
