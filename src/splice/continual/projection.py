"""Gradient-subspace projection (GPM, Saha et al., ICLR 2021): orthonormal bases of the inputs
earlier tasks fed a linear map, and the projection that keeps a new update off them.

A linear map's update ΔW changes its output on an input x by ΔW x; if every row of ΔW is
orthogonal to span(M) (ΔW M = 0), the outputs on inputs in span(M) do not change. Bases grow
task by task: the new task's input representation R (d x n) is projected off the basis, and
the leading directions of the residual are added until the basis holds a fraction ε of R's
energy (the energy threshold):

    ‖M Mᵀ R‖² + Σ_{i<=k} σ_i(R - M Mᵀ R)² >= ε ‖R‖²

The projection is linear, so a weighted mean of updates projected with one shared basis is
projected too; with different bases per client it is not (PRISM's point for federated runs).
"""

from __future__ import annotations

import torch

from splice.core.errors import SpliceError

# Energy below this share of a representation's is round-off (of float32 bases, say), not a direction.
NOISE = 1e-10


def project_out(rows: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """`rows` [..., d] with their components in span(basis) removed (basis: [d, k], orthonormal)."""
    if basis is None or basis.shape[1] == 0:
        return rows
    basis = basis.to(rows.dtype)
    return rows - (rows @ basis) @ basis.T


def orthonormal(columns: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis [d, m] of span(columns) (columns [d, n]); directions whose singular
    value is below `tolerance` times the largest are dropped."""
    if columns.shape[1] == 0:
        return columns
    U, S, _ = torch.linalg.svd(columns.double(), full_matrices=False)
    keep = S > tolerance * S.max() if S.numel() and S.max() > 0 else torch.zeros_like(S, dtype=torch.bool)
    return U[:, keep].to(columns.dtype)


def sketch(covariance: torch.Tensor, energy: float = 0.999, max_rank: int | None = None,
           floor: float = 0.0) -> torch.Tensor:
    """[d, k]: V_k √λ_k, the leading eigenpairs of a PSD `covariance` holding `energy` of its
    trace (at most `max_rank` of them, none at or below `floor`, round-off): a low-rank R with
    R Rᵀ ≈ covariance, to send instead."""
    values, vectors = torch.linalg.eigh(covariance.double())
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    total = float(values.sum())
    significant = int((values > max(floor, NOISE * total)).sum())
    if total <= 0 or significant == 0:
        return covariance.new_zeros(covariance.shape[0], 0)
    k = int((values.cumsum(0) < energy * total).sum()) + 1
    k = min(k, max_rank or k, significant)
    return (vectors[:, :k] * values[:k].sqrt()).to(covariance.dtype)


def extend_basis(basis: torch.Tensor | None, representation: torch.Tensor, threshold: float,
                 total_energy: float | None = None, residual_energy: float | None = None) -> torch.Tensor:
    """GPM's basis update: `basis` [d, k] (None: empty) with the fewest leading directions of the
    residual of `representation` [d, n] added so that the basis holds `threshold` of the
    representation's energy. Where `representation` only sketches R (the clients' low-rank
    sketches of their residuals, stacked), `total_energy` = ‖R‖² and `residual_energy` =
    ‖R - M Mᵀ R‖² give the energies (what a sketch leaves out counts as not held). The result
    is orthonormal (the new directions re-orthogonalised against the old basis)."""
    if not 0.0 < threshold <= 1.0:
        raise SpliceError(f"the energy threshold must be in (0, 1], got {threshold}")
    d = representation.shape[0]
    old = representation.new_zeros(d, 0) if basis is None else basis.to(representation.dtype)
    R = representation.double()
    residual = project_out(R.T, old.double()).T
    total = float(R.pow(2).sum()) if total_energy is None else float(total_energy)
    if total <= 0:
        return old
    unheld = float(residual.pow(2).sum()) if residual_energy is None else float(residual_energy)
    if unheld <= NOISE * total:  # round-off, not an unheld direction
        unheld = 0.0
    if total - unheld >= threshold * total or old.shape[1] >= d:
        return old
    U, S, _ = torch.linalg.svd(residual, full_matrices=False)
    gained = total - unheld + (S**2).cumsum(0)
    significant = int((S**2 > NOISE * total).sum())
    k = min(int((gained < threshold * total).sum()) + 1, significant, d - old.shape[1])
    if k <= 0:
        return old
    new = project_out(U[:, :k].T, old.double()).T  # once more against the old basis: round-off
    new = orthonormal(new)[:, : d - old.shape[1]]
    return torch.cat([old.double(), new], 1).to(representation.dtype)
