"""Comparing two adapters: identical, orthogonal and partly shared changes, one-sided modules."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import randomize

import splice
from splice.analysis import compare_adapter_dirs, compare_adapters, compare_deltas
from splice.core.host import hosts


def orthonormal(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]


def test_a_delta_against_itself_and_against_a_scaled_negation():
    delta = orthonormal(16, 3) @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ orthonormal(8, 3, 1).T
    same = compare_deltas(delta, delta, k=3)
    assert same.angles.abs().max() < 1e-7 and same.overlap == pytest.approx(1.0, abs=1e-12)
    assert same.norm_ratio == pytest.approx(1.0) and same.cosine == pytest.approx(1.0)
    flipped = compare_deltas(delta, -2 * delta, k=3)  # same subspace, opposite direction
    assert flipped.overlap == pytest.approx(1.0) and flipped.norm_ratio == pytest.approx(2.0)
    assert flipped.cosine == pytest.approx(-1.0)


def test_one_shared_direction_of_two_gives_angles_0_and_pi_over_2():
    U, V, W = orthonormal(16, 3), orthonormal(8, 2, 1), orthonormal(8, 2, 2)
    a = 3 * torch.outer(U[:, 0], V[:, 0]) + torch.outer(U[:, 1], V[:, 1])
    b = torch.outer(U[:, 0], W[:, 0]) + torch.outer(U[:, 2], W[:, 1])
    result = compare_deltas(a, b, k=2)
    torch.testing.assert_close(result.angles, torch.tensor([0.0, math.pi / 2], dtype=torch.float64),
                               atol=1e-7, rtol=0)
    assert result.overlap == pytest.approx(0.5) and result.min_angle < 1e-7
    assert result.norm_ratio == pytest.approx(math.sqrt(2 / 10))
    # by default the 90%-energy directions: a's first holds 9/10 of its energy, b needs both;
    # a's dominant direction lies in b's subspace
    default = compare_deltas(a, b)
    assert (default.k_a, default.k_b) == (1, 2) and default.overlap == pytest.approx(1.0)


def test_an_adapter_against_a_copy_writing_to_orthogonal_outputs(bert):
    for name in ("a", "b"):
        splice.attach(bert, splice.LoRA(r=2), name=name)
    randomize(bert, "a")
    with torch.no_grad():
        for _, _, host in hosts(bert):
            B_a = host["a"].lora_B
            host["b"].lora_A.copy_(host["a"].lora_A)
            basis = torch.linalg.qr(B_a.double())[0]
            other = torch.randn(B_a.shape, dtype=torch.float64)
            host["b"].lora_B.copy_(other - basis @ (basis.T @ other))  # columns orthogonal to B_a's
    itself = compare_adapters(bert, "a", "a")
    assert len(itself.modules) == 4 and not itself.only_a and not itself.only_b
    for m in itself.modules:
        assert m.min_angle < 1e-6 and m.overlap == pytest.approx(1.0)
        assert m.norm_ratio == pytest.approx(1.0) and m.cosine == pytest.approx(1.0)
    for m in compare_adapters(bert, "a", "b").modules:
        assert m.k_a >= 1 and m.k_b >= 1
        torch.testing.assert_close(m.angles, torch.full_like(m.angles, math.pi / 2), atol=1e-6, rtol=0)
        assert m.overlap == pytest.approx(0.0, abs=1e-10) and m.cosine == pytest.approx(0.0, abs=1e-6)


def test_modules_only_in_one_adapter_and_forms_without_a_weight_are_listed(bert):
    splice.attach(bert, splice.LoRA(r=2, targets=["query", "value"]), name="a")
    splice.attach(bert, splice.LoRA(r=2, targets=["query", "key"], layers=[1]), name="b")
    randomize(bert, "a")
    randomize(bert, "b", seed=1)
    result = compare_adapters(bert, "a", "b", k=1)
    prefix = "bert.encoder.layer."
    assert [m.name for m in result.modules] == [f"{prefix}1.attention.self.query"]
    assert result.only_a == [f"{prefix}{i}.attention.self.{m}" for i, m in ((0, "query"), (0, "value"), (1, "value"))]
    assert result.only_b == [f"{prefix}1.attention.self.key"]
    assert result.modules[0].k_a == result.modules[0].k_b == 1
    assert result.summary()["shared"] == 1 and result.to_dict()["only_b"] == result.only_b
    splice.attach(bert, splice.LoReFT(r=2), name="reft")
    splice.attach(bert, splice.LoReFT(r=2), name="reft2")
    skipped = compare_adapters(bert, "reft", "reft2")
    assert not skipped.modules and all("LoReFT" in reason for reason in skipped.skipped.values())


def test_two_saved_adapters_are_loaded_compared_and_detached(bert, tmp_path):
    splice.attach(bert, splice.LoRA(r=2))
    randomize(bert)
    path = splice.save(bert, tmp_path / "adapter")
    result = compare_adapter_dirs(bert, path, path)
    assert (result.a, result.b) == (str(path), str(path))
    assert list(splice.adapters(bert)) == ["default"]  # only the model's own adapter is left, active
    assert splice.active_adapters(bert) == ["default"]
    assert all(m.overlap == pytest.approx(1.0) and m.norm_ratio == pytest.approx(1.0) for m in result.modules)
    summary = result.summary()
    assert summary["shared"] == 4 and summary["mean_min_angle_deg"] < 1e-4
