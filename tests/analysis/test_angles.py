"""Principal angles: the spec's edge cases exactly, and agreement with a direct construction."""

from __future__ import annotations

import math

import pytest
import torch

from splice.analysis import min_principal_angle, orthonormal_basis, principal_angles


def test_identical_subspaces_have_zero_angles():
    U = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(principal_angles(U, U), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    mixed = U @ torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert principal_angles(U, mixed).max() < 1e-7  # the same column space, another basis


def test_orthogonal_subspaces_are_at_right_angles():
    eye = torch.eye(6, dtype=torch.float64)
    assert torch.equal(principal_angles(eye[:, :2], eye[:, 2:5]), torch.full((2,), math.pi / 2, dtype=torch.float64))


@pytest.mark.parametrize("phi", [0.0, 1e-7, 0.3, 1.0, math.pi / 2 - 1e-3, math.pi / 2])
def test_a_known_angle_is_reproduced(phi):
    e1 = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    v = torch.tensor([[math.cos(phi)], [math.sin(phi)], [0.0]], dtype=torch.float64)
    assert abs(min_principal_angle(e1, v) - phi) < 1e-9  # small angles from sines, not lost to cosines


def test_angles_are_ascending_and_as_many_as_the_smaller_rank():
    generator = torch.Generator().manual_seed(2)
    U, V = torch.randn(20, 4, generator=generator), torch.randn(20, 6, generator=generator)
    V[:, 5] = V[:, 0] + V[:, 1]  # rank 5
    angles = principal_angles(U, V)
    assert angles.shape == (4,) and torch.all(angles[1:] >= angles[:-1])
    assert orthonormal_basis(V).shape == (20, 5)
    # cosines are the singular values of Q_u^T Q_v
    cosines = torch.linalg.svdvals(orthonormal_basis(U).T @ orthonormal_basis(V))
    assert torch.allclose(torch.cos(angles), cosines, atol=1e-9)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="different sizes"):
        principal_angles(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="matrix"):
        orthonormal_basis(torch.randn(5))
    assert min_principal_angle(torch.zeros(4, 2), torch.randn(4, 2)) == math.pi / 2  # empty space
