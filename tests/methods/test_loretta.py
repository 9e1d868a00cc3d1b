"""LoRETTA_rep as released (a LoRA whose A and B are tensor trains): parameter count, contraction,
both inits, gradients, files, mixed batches, errors, and training on real weights and data
(volume 2, §4 (d) 1-4, on the released form)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, logits, make_bert, randomize
from review_fit import fit_reviews
from torch import nn

import splice
from splice.core.errors import SpliceError
from splice.core.tensor_train import train_matrix
from splice.methods.loretta import LoRETTA, LoRETTAAdapter


def linear_with_loretta(n: int, m: int, dtype: torch.dtype = torch.float32, **config) -> tuple[nn.Sequential,
                                                                                              LoRETTAAdapter]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, m)).to(dtype)
    splice.attach(model, LoRETTA(targets=["0"], **config))
    return model, model[0].splice["default"]


def full_tensor(cores) -> torch.Tensor:
    """The train contracted over its bonds with tensordot (the released code's way)."""
    out = cores[0]
    for core in cores[1:]:
        out = torch.tensordot(out, core, dims=([-1], [0]))
    return out.squeeze(0).squeeze(-1)


def test_parameter_count_is_the_sum_over_both_trains_of_r_k_r():
    _, adapter = linear_with_loretta(384, 384, r=8, tensor_rank=5)
    assert adapter.a_modes == [8, 8, 6, 8] and adapter.b_modes == [8, 8, 8, 6]
    expected = sum(r0 * k * r1 for modes in (adapter.a_modes, adapter.b_modes)
                   for r0, k, r1 in zip([1, 5, 5, 5], modes, [5, 5, 5, 1], strict=True))
    assert sum(p.numel() for p in adapter.parameters()) == expected == 900
    assert math.prod(adapter.a_modes) == 384 * 8 and math.prod(adapter.b_modes) == 8 * 384


def test_contracted_trains_are_the_dense_delta_the_forward_applies():
    model, adapter = linear_with_loretta(24, 12, r=4, alpha=6, tensor_rank=3)
    A, B = adapter.matrices()
    assert torch.allclose(A, full_tensor(adapter.a_cores).reshape(24, 4), atol=1e-6)
    assert torch.allclose(B, full_tensor(adapter.b_cores).reshape(4, 12), atol=1e-6)
    weight = adapter.delta_weight()
    assert torch.allclose(weight, (A @ B).T * 1.5, atol=1e-6)
    x = torch.randn(2, 5, 24)
    assert torch.allclose(adapter.delta(x), x @ weight.T, atol=1e-5)
    assert_close(logits(model, x), F.linear(x, model[0].weight, model[0].bias) + x @ weight.T)


def test_released_init_gives_each_matrix_entry_the_target_scale_and_zero_init_starts_at_the_base():
    _, adapter = linear_with_loretta(384, 384, r=8, tensor_rank=5)
    A, B = adapter.matrices()
    assert 0.5 < A.std().item() / (384 + 8) ** -0.5 < 2.0
    assert 0.5 < B.std().item() / (8 + 384) ** -0.5 < 2.0
    assert adapter.delta_weight().abs().max() > 0  # as released: the model moves before training
    model, zero = linear_with_loretta(384, 384, r=8, init="zero")
    x = torch.randn(16, 384)
    assert torch.count_nonzero(zero.delta_weight()) == 0
    assert torch.equal(model(x), F.linear(x, model[0].weight, model[0].bias))
    model(x).square().sum().backward()
    grads = [c.grad for c in zero.b_cores]
    assert torch.count_nonzero(grads[-1]) > 0  # the zero core trains at once
    assert all(torch.count_nonzero(g) == 0 for g in [*grads[:-1], *[c.grad for c in zero.a_cores]])


def test_gradcheck_in_float64_on_a_12x12_layer():
    _, adapter = linear_with_loretta(12, 12, dtype=torch.float64, r=2, tensor_rank=2)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    cores = (*adapter.a_cores, *adapter.b_cores)
    assert all(c.dtype == torch.float64 and c.requires_grad for c in cores)
    assert torch.autograd.gradcheck(lambda x, *_: adapter.delta(x), (x, *cores))


def test_train_matrix_reads_the_train_row_major():
    cores = [torch.randn(1, 2, 3), torch.randn(3, 3, 2), torch.randn(2, 4, 1)]
    assert torch.allclose(train_matrix(cores, 6), full_tensor(cores).reshape(6, 4), atol=1e-6)


def test_merge_save_load_and_mixed_batches(ids, tmp_path):
    model = make_bert()
    splice.attach(model, LoRETTA(r=4, tensor_rank=3, targets=["query", "value"]), "a")
    splice.attach(model, LoRETTA(r=2, tensor_rank=2, targets=["query", "value"]), "b")
    randomize(model, scale=0.5)
    splice.activate(model, "a")
    expected = logits(model, input_ids=ids)
    splice.save(model, tmp_path / "adapter", "a")
    loaded = splice.load(make_bert(), tmp_path / "adapter")
    assert isinstance(splice.adapters(loaded)["default"], LoRETTA)
    assert torch.equal(logits(loaded, input_ids=ids), expected)
    splice.merge(loaded)
    assert torch.allclose(logits(loaded, input_ids=ids), expected, atol=1e-5)
    rows = ["a", "b"] * (ids.shape[0] // 2)
    with splice.route(model, rows):
        routed = logits(model, input_ids=ids)
    for i, name in enumerate(rows):
        splice.activate(model, name)
        assert torch.allclose(routed[i], logits(model, input_ids=ids[i : i + 1])[0], atol=1e-5)


def test_bad_settings_and_non_linear_hosts_are_refused():
    for bad in ({"r": 0}, {"tensor_rank": 0}, {"dropout": 1.0}, {"init": "gaussian"}):
        with pytest.raises(SpliceError):
            LoRETTA(**bad)
    with pytest.raises(SpliceError, match="needs a Linear host"):
        splice.attach(nn.Sequential(nn.Conv2d(2, 2, 3)), LoRETTA(targets=["0"]))


def test_loretta_on_minilm_fits_rotten_tomatoes_reviews(tmp_path, minilm):
    fit_reviews(tmp_path, minilm, {"method": "loretta", "r": 8, "alpha": 16, "init": "zero"}, LoRETTA)
