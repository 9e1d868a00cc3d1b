"""Review of `splice.continual.projection` (GPM primitives used by PRISM): failing tests that
show defects. Each test says what is wrong and what the correct behaviour is."""

from __future__ import annotations

import torch

from splice.continual.projection import extend_basis, project_out


def random_basis(d: int, k: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))[0].to(dtype)


# DEFECT: `extend_basis` on a basis that already spans the whole input space (d columns) still
# adds directions when the reported residual energy is a round-off value > 0 (what a client sends
# when its float32 basis leaves ~1e-12 of the energy off it, and always at threshold 1.0). The
# residual is pure noise, and `orthonormal` normalises it because its tolerance is relative to the
# noise's own largest singular value. The result has more than d columns, is not orthonormal
# (the spec's test 3: "basis updates keep MᵀM = I"), and projecting off it no longer removes
# anything: duplicated directions are subtracted twice (the component flips). PRISM's
# `prism_full_experts` (basis.shape[1] == d) also stops counting such an expert.
# Correct: a basis never has more than d columns and stays orthonormal; a full basis is returned
# as is (cap k at d - k_old, and drop residual directions whose energy is round-off, e.g. an
# absolute tolerance relative to the representation's norm).
def test_extend_basis_of_a_full_basis_stays_orthonormal_and_at_most_d_columns():
    d = 16
    full = random_basis(d, d, 0, torch.float32)  # as PRISM stores and broadcasts its bases
    representation = torch.randn(d, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = extend_basis(full, representation, 1.0, total_energy=100.0, residual_energy=1e-9).double()
    assert out.shape[1] <= d
    assert torch.allclose(out.T @ out, torch.eye(out.shape[1], dtype=torch.float64), atol=1e-5)
    x = torch.randn(3, d, dtype=torch.float64)
    assert project_out(x, out).norm() < 1e-5 * x.norm()  # the whole space is protected


# DEFECT: at threshold 1.0 (allowed: `0 < threshold <= 1`, and what PRISM's own tests use to
# "hold every input"), a representation that lies entirely inside a float32 basis still grows the
# basis: the residual computed against the float32 basis is round-off (~1e-7 of R), its energy is
# > 0, so `held < threshold * total` and SVD noise directions are appended. Each such task eats
# input dimensions that no task uses, until the expert's basis is full and A_e (and the router)
# are frozen at zero. Correct: inputs already in span(M) add nothing (GPM: nothing to hold), i.e.
# round-off residual energy is treated as zero.
def test_extend_basis_does_not_grow_with_a_representation_already_in_the_basis():
    d, k = 16, 5
    basis = random_basis(d, k, 2, torch.float32)
    coefficients = torch.randn(k, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    representation = basis.double() @ coefficients  # every column in span(basis)
    out = extend_basis(basis, representation, 1.0)
    assert out.shape[1] == k
