"""GPM's projection primitives (`splice.continual.projection`), and PRISM's spec tests 1 and 3:
a FedAvg mean of updates projected with one shared basis stays orthogonal to it (with
client-specific bases it does not: the negative control), and bases stay orthonormal as they grow."""

from __future__ import annotations

import pytest
import torch

from splice.continual.projection import extend_basis, orthonormal, project_out, sketch
from splice.core.errors import SpliceError
from splice.federated import aggregation


def random_basis(d: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fedavg_of_updates_projected_with_a_shared_basis_stays_orthogonal_to_it(dtype):
    M = random_basis(64, 12, 0).to(dtype)
    gradients = [torch.randn(8, 64, generator=torch.Generator().manual_seed(10 + k)).to(dtype) for k in range(4)]
    updates = [{"A": project_out(g, M)} for g in gradients]
    mean = aggregation.fedavg(updates, [30.0, 10.0, 25.0, 35.0])["A"]
    assert mean.norm() > 1.0  # a real update, not a vanishing one
    # the spec's bound in exact-enough arithmetic; float32 round-off is ~1e-7 of the update's norm
    assert (mean @ M).norm() / (1.0 if dtype == torch.float64 else mean.norm()) < 1e-6


def test_negative_control_client_specific_bases_break_orthogonality_after_fedavg():
    bases = [random_basis(64, 12, k) for k in range(4)]
    gradients = [torch.randn(8, 64, generator=torch.Generator().manual_seed(10 + k)) for k in range(4)]
    updates = [{"A": project_out(g, M)} for g, M in zip(gradients, bases, strict=True)]
    for update, M in zip(updates, bases, strict=True):
        assert (update["A"] @ M).norm() < 1e-5  # each client is orthogonal to its own basis ...
    mean = aggregation.fedavg(updates, [1.0] * 4)["A"]
    for M in bases:  # ... but the average is orthogonal to none of them
        assert (mean @ M).norm() / mean.norm() > 0.1


def test_extend_basis_keeps_the_basis_orthonormal_and_holds_the_threshold_of_each_tasks_energy():
    generator = torch.Generator().manual_seed(1)
    basis = None
    for task in range(4):  # each task's inputs: a random 6-dim subspace with decaying energies, and noise
        directions = random_basis(48, 6, 100 + task)
        R = directions @ torch.diag(torch.tensor([8.0, 6, 4, 2, 1, 0.5])) @ torch.randn(6, 200, generator=generator)
        R = R + 0.01 * torch.randn(48, 200, generator=generator)
        basis = extend_basis(basis, R, threshold=0.95)
        eye = torch.eye(basis.shape[1])
        assert torch.allclose(basis.T @ basis, eye, atol=1e-5)
        held = (basis.T @ R).pow(2).sum() / R.pow(2).sum()
        assert held >= 0.95 - 1e-6
    assert 4 < basis.shape[1] < 48  # the threshold picks the leading directions, not everything


def test_extend_basis_adds_the_fewest_directions_that_reach_the_threshold():
    R = torch.diag(torch.tensor([10.0, 5.0, 2.0, 1.0])) @ random_basis(4, 4, 3).T  # energies 100, 25, 4, 1
    total = 130.0
    assert extend_basis(None, R, threshold=100 / total - 1e-3).shape[1] == 1
    assert extend_basis(None, R, threshold=125 / total - 1e-3).shape[1] == 2
    assert extend_basis(None, R, threshold=125 / total + 1e-3).shape[1] == 3
    # a representation already held adds nothing
    first = extend_basis(None, R, threshold=0.5)
    assert extend_basis(first, first[:, :1] * 3, threshold=0.99).shape[1] == first.shape[1]


def test_sketches_with_their_energies_extend_like_the_full_representation():
    generator = torch.Generator().manual_seed(2)
    old = random_basis(32, 4, 5)
    clients = [random_basis(32, 5, 20 + k) @ torch.randn(5, 50, generator=generator) for k in range(3)]
    full = torch.cat(clients, 1)
    expected = extend_basis(old, full, threshold=0.9)
    sketches, totals, residuals = [], 0.0, 0.0
    for R in clients:  # what each client sends: its residual's exact sketch and the two energies
        covariance = R @ R.T
        residual_part = project_out(R.T, old).T
        residual = residual_part @ residual_part.T
        sketches.append(sketch(residual, energy=1.0))
        totals += float(covariance.trace())
        residuals += float(residual.trace())
    merged = extend_basis(old, torch.cat(sketches, 1), threshold=0.9, total_energy=totals, residual_energy=residuals)
    assert merged.shape == expected.shape
    # the same subspace (the directions' signs and order within ties may differ)
    assert torch.allclose(merged @ merged.T, expected @ expected.T, atol=1e-4)


def test_sketch_reproduces_the_covariance_at_full_energy_and_keeps_its_share_when_cut():
    R = random_basis(20, 6, 7) @ torch.diag(torch.tensor([5.0, 4, 3, 2, 1, 0.1])) @ random_basis(30, 6, 8).T
    covariance = R @ R.T
    full = sketch(covariance, energy=1.0)
    assert torch.allclose(full @ full.T, covariance, atol=1e-4)
    cut = sketch(covariance, energy=0.9)
    assert cut.shape[1] < full.shape[1]
    assert (cut @ cut.T).trace() >= 0.9 * covariance.trace() - 1e-4
    assert sketch(covariance, energy=1.0, max_rank=2).shape[1] == 2


def test_orthonormal_drops_dependent_columns_and_project_out_leaves_the_complement():
    basis = random_basis(10, 3, 9)
    columns = torch.cat([basis, basis[:, :1] + basis[:, 1:2]], 1)  # 4 columns, rank 3
    found = orthonormal(columns)
    assert found.shape == (10, 3)
    x = torch.randn(5, 10)
    residual = project_out(x, found)
    assert (residual @ basis).abs().max() < 1e-5
    assert torch.allclose(project_out(residual, found), residual, atol=1e-6)  # a projection: idempotent
    assert project_out(x, None) is x


def test_extend_basis_refuses_a_threshold_outside_0_1():
    with pytest.raises(SpliceError, match="threshold"):
        extend_basis(None, torch.randn(4, 4), threshold=1.5)
