"""Principal angles between subspaces: how much two adapters, two deltas or two tasks'
gradients point the same way.

For matrices U [n, p] and V [n, q], the principal angles between their column spaces are the
arccosines of the singular values of Q_Uᵀ Q_V, with Q_U, Q_V orthonormal bases of the column
spaces (Björck & Golub, 1973). Bases come from an SVD rather than a QR, so that rank-deficient
inputs give the rank of their column space, not spurious directions from round-off.
"""

from __future__ import annotations

import math

import torch


def orthonormal_basis(matrix: torch.Tensor, tolerance: float | None = None) -> torch.Tensor:
    """An orthonormal basis [n, k] of the column space of `matrix` [n, p] (k = numerical rank)."""
    if matrix.dim() != 2:
        raise ValueError(f"expected a matrix [n, p], got shape {tuple(matrix.shape)}")
    U, S, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return U[:, :0]
    if tolerance is None:  # numpy's rank rule with √max(shape): max(shape) x bf16's eps passes 1 at 128 rows
        eps = torch.finfo(matrix.dtype if matrix.is_floating_point() else torch.float64).eps
        tolerance = S[0].item() * math.sqrt(max(matrix.shape)) * eps
    return U[:, : int((S > tolerance).sum())]


def principal_angles(U: torch.Tensor, V: torch.Tensor, tolerance: float | None = None) -> torch.Tensor:
    """The principal angles (radians, ascending) between the column spaces of U and V.

    There are min(rank U, rank V) of them: 0 for a shared direction, pi/2 for orthogonal ones.
    Small angles are computed from the sines (the cosines lose them to round-off below ~1e-8).
    `tolerance`: the singular value below which a direction of U or V is round-off
    (`orthonormal_basis`'s; None: σ₁ · √max(shape) · eps of the dtype).
    """
    if U.shape[0] != V.shape[0]:
        raise ValueError(f"the matrices live in spaces of different sizes: {tuple(U.shape)} vs {tuple(V.shape)}")
    Q_u, Q_v = orthonormal_basis(U, tolerance), orthonormal_basis(V, tolerance)
    k = min(Q_u.shape[1], Q_v.shape[1])
    if k == 0:
        return torch.empty(0, dtype=torch.float64)
    cosines = torch.linalg.svdvals(Q_u.T @ Q_v)[:k].clamp(-1.0, 1.0)
    angles = torch.arccos(cosines)
    # sine-based angles for the small ones: the residual of Q_v after projecting on Q_u
    residual = Q_v - Q_u @ (Q_u.T @ Q_v)
    sines = torch.linalg.svdvals(residual).flip(0)[:k].clamp(0.0, 1.0)
    small = cosines > math.cos(math.pi / 4)
    angles[small] = torch.arcsin(sines[small])
    return angles.sort().values


def min_principal_angle(U: torch.Tensor, V: torch.Tensor, tolerance: float | None = None) -> float:
    """The smallest principal angle (radians); pi/2 when either space is empty."""
    angles = principal_angles(U, V, tolerance)
    return angles[0].item() if angles.numel() else math.pi / 2
