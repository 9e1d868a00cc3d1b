"""Low-rank factors of a weight change: exact where the change is low-rank, truncated
(Eckart–Young optimal) to a target rank otherwise. Merging, compression and the export of
non-LoRA forms as LoRA all re-factor with these.

`factor_product(B, A)` re-factors a product B A given by (possibly many, redundant) factors
without forming it: thin QR of B and Aᵀ, then the SVD of the small R_B R_Aᵀ, so the cost is
O((out + in) k²) for k stacked columns. `factor_dense(M)` is the plain SVD for a dense change
(what TIES, DARE and masks produce). Both return balanced factors B' = U √S, A' = √S Vᵀ, and
drop directions below `RELATIVE_TOLERANCE` · σ₁ unless a rank is given, which keeps an exact
result exact: the dropped directions are float64 round-off, not part of the change.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from splice.core.errors import SpliceError

RELATIVE_TOLERANCE = 1e-10


class Factors(NamedTuple):
    """B' [out, k] and A' [k, in] with B' A' ≈ the change; `singular_values` are all of them."""

    B: torch.Tensor
    A: torch.Tensor
    singular_values: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def relative_error(self) -> float:
        """‖change − B'A'‖_F / ‖change‖_F from the discarded singular values (Eckart–Young)."""
        s = self.singular_values.double()
        total = s.square().sum()
        return float((s[self.rank:].square().sum() / total).sqrt()) if total > 0 else 0.0


def product_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD U, S, Vh (float64) of B A [out, in] from thin QRs of B [out, k] and Aᵀ [in, k]
    and the SVD of the small R_B R_Aᵀ, never forming B A."""
    Q_B, R_B = torch.linalg.qr(B.double())
    Q_A, R_A = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)
    return Q_B @ U, S, Vh @ Q_A.T


def factor_product(B: torch.Tensor, A: torch.Tensor, rank: int | None = None) -> Factors:
    """Factors of B A [out, in] (B: [out, k], A: [k, in]) at `rank`, or at its numerical rank."""
    return _balanced(*product_svd(B, A), rank)


def factor_dense(matrix: torch.Tensor, rank: int | None = None) -> Factors:
    """Factors of a dense [out, in] change at `rank`, or at its numerical rank."""
    return _balanced(*torch.linalg.svd(matrix.double(), full_matrices=False), rank)


def _balanced(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int | None) -> Factors:
    keep = _rank(S, rank)
    root = S[:keep].sqrt()
    return Factors(U[:, :keep] * root, root[:, None] * Vh[:keep], S)


def _rank(s: torch.Tensor, rank: int | None) -> int:
    if rank is not None:
        if rank < 1:
            raise SpliceError(f"target rank must be >= 1, got {rank}")
        return min(rank, s.numel())
    if s.numel() == 0 or s[0] <= 0:
        return 1  # a zero change: one zero direction keeps the module (and the file) well-formed
    return max(1, int((s > s[0] * RELATIVE_TOLERANCE).sum()))
