"""Tensor-train LoRA (LoRETTA_rep): parameter count, contraction, zero init, gradients, merging,
files, errors, and training on real weights and data (checks of volume-2 section 4 (d))."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_differs, logits, make_bert, make_gpt2, randomize
from review_fit import fit_reviews
from torch import nn

import splice
from splice.core.errors import SpliceError
from splice.core.host import hosts
from splice.core.tensor_train import factorize
from splice.methods.ttlora import TTLoRA, TTLoRAAdapter

TARGETS = {"bert": ["query", "value", "intermediate.dense"], "gpt2": ["c_attn", "c_fc", "c_proj"]}
MAKERS = {"bert": make_bert, "gpt2": make_gpt2}


def linear_with_tt(n: int, m: int, seed: int = 0, dtype: torch.dtype = torch.float32,
                   **config) -> tuple[nn.Sequential, TTLoRAAdapter]:
    """Linear(n -> m) with a TT adapter whose cores all hold random values (none zero)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, m)).to(dtype)
    splice.attach(model, TTLoRA(targets=["0"], **config))
    randomize(model, scale=0.5, seed=seed)
    return model, model[0].splice["default"]


def dense_from_cores(adapter: TTLoRAAdapter) -> torch.Tensor:
    """The full TT tensor, contracted core by core over its bonds, reshaped to [out, in]."""
    full = adapter.cores[0]
    for core in adapter.cores[1:]:
        full = torch.tensordot(full, core, dims=([-1], [0]))
    return full.reshape(math.prod(adapter.out_modes), math.prod(adapter.in_modes)) * adapter.scaling


# -- modes and parameters ------------------------------------------------------------------


def test_default_modes_are_near_equal_factors_of_each_side():
    assert factorize(384, 3) == [8, 8, 6]
    assert factorize(1536, 3) == [16, 12, 8]
    assert factorize(40, 3) == [5, 4, 2]
    assert factorize(7, 3) == [7]  # a prime stays whole; size-1 modes are dropped
    assert factorize(1, 3) == [1]
    for n in range(1, 200):
        factors = factorize(n, 3)
        assert math.prod(factors) == n and 1 <= len(factors) <= 3


def test_parameter_count_is_the_sum_over_cores_of_r_k_r():
    _, adapter = linear_with_tt(32, 40, r=3)  # out 40 -> (5, 4, 2), in 32 -> (4, 4, 2)
    assert (adapter.out_modes, adapter.in_modes) == ([5, 4, 2], [4, 4, 2])
    ranks = [1, 3, 3, 3, 3, 3, 1]
    modes = adapter.out_modes + adapter.in_modes
    assert [tuple(c.shape) for c in adapter.cores] == [(ranks[i], k, ranks[i + 1]) for i, k in enumerate(modes)]
    formula = sum(ranks[i] * k * ranks[i + 1] for i, k in enumerate(modes))
    assert formula == 15 + 36 + 18 + 36 + 36 + 6
    assert sum(p.numel() for p in adapter.parameters()) == formula

    model = make_bert()  # two layers; query 32 -> 32 and intermediate 32 -> 40
    splice.attach(model, TTLoRA(r=3, targets=["query", "intermediate.dense"]))
    assert splice.summary(model).trainable == 2 * ((12 + 36 + 18 + 36 + 36 + 6) + formula)


def test_explicit_modes_split_where_the_output_factors_end():
    _, adapter = linear_with_tt(12, 12, r=2, modes=[2, 6, 3, 4])
    assert (adapter.out_modes, adapter.in_modes) == ([2, 6], [3, 4])
    assert [tuple(c.shape) for c in adapter.cores] == [(1, 2, 2), (2, 6, 2), (2, 3, 2), (2, 4, 1)]


# -- the math ------------------------------------------------------------------------------


@pytest.mark.parametrize("modes", [None, [12, 2, 6], [2, 2, 3, 3, 2, 2]])
def test_contracted_cores_are_the_dense_delta_the_forward_applies(modes):
    model, adapter = linear_with_tt(12, 12, r=3, alpha=6, modes=modes)
    assert adapter.scaling == 2.0  # alpha / r
    weight = adapter.delta_weight()
    assert torch.allclose(weight, dense_from_cores(adapter), atol=1e-5)
    assert_differs(weight, torch.zeros_like(weight))
    x = torch.randn(2, 5, 12)
    assert torch.allclose(adapter.delta(x), x @ weight.T, atol=1e-5)
    expected = F.linear(x, model[0].weight, model[0].bias) + x @ weight.T
    assert_close(logits(model, x), expected)


def test_at_init_the_zero_first_core_gets_a_gradient_and_the_input_map_keeps_the_scale():
    """The init the docstring claims: only G_1 is zero, so training starts at once through it,
    and the contracted input cores V map x to r numbers of about x's own variance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 384))
    splice.attach(model, TTLoRA(r=8, targets=["0"]))
    adapter = model[0].splice["default"]
    x = torch.randn(64, 384)
    model(x).square().sum().backward()
    grads = [core.grad for core in adapter.cores]
    assert torch.count_nonzero(adapter.cores[0]) == 0 and torch.count_nonzero(grads[0]) > 0
    assert all(torch.count_nonzero(g) == 0 for g in grads[1:])  # they wait for G_1 to move, as LoRA's A for B
    _, V = adapter._halves()
    assert 0.5 < (x @ V.T).var().item() < 2.0


def test_gradcheck_in_float64_on_a_12x12_layer():
    _, adapter = linear_with_tt(12, 12, r=3, dtype=torch.float64, modes=[3, 4, 2, 6])
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    cores = tuple(adapter.cores)  # gradcheck perturbs the parameters in place, so delta sees the change
    assert all(c.dtype == torch.float64 and c.requires_grad for c in cores)
    assert torch.autograd.gradcheck(lambda x, *_: adapter.delta(x), (x, *cores))


def test_dropout_acts_on_the_adapter_input_in_training_only():
    _, adapter = linear_with_tt(16, 8, r=2, dropout=0.5)
    x = torch.randn(4, 16)
    weight = adapter.delta_weight().detach()
    assert torch.allclose(adapter.eval().delta(x), x @ weight.T, atol=1e-5)
    train = adapter.train().delta(x)
    assert not torch.allclose(train, x @ weight.T, atol=1e-3)
    with torch.no_grad():  # the no-grad path draws the same mask from the same seed
        torch.manual_seed(1)
        dropped = adapter.delta(x)
    torch.manual_seed(1)
    assert torch.allclose(dropped, F.dropout(x, 0.5) @ weight.T, atol=1e-5)


# -- merging, files, mixed batches ---------------------------------------------------------


@pytest.mark.parametrize(("name", "config"), [
    ("bert", {"r": 3, "alpha": 5.0, "dropout": 0.1}),
    ("bert", {"r": 2, "modes": [4, 8, 2, 16], "targets": ["query", "value"]}),  # 32 x 32 layers only
    ("gpt2", {"r": 3}),
])
def test_save_and_load_round_trip(name, config, ids, tmp_path):
    model = MAKERS[name]()
    splice.attach(model, TTLoRA(**{"targets": TARGETS[name], **config}))
    randomize(model, scale=0.6)
    expected = logits(model, input_ids=ids)
    splice.save(model, tmp_path / "adapter")

    loaded = splice.load(MAKERS[name](), tmp_path / "adapter")
    loaded_config = splice.adapters(loaded)["default"]
    assert isinstance(loaded_config, TTLoRA)
    assert {k: getattr(loaded_config, k) for k in config if k != "targets"} == \
        {k: v for k, v in config.items() if k != "targets"}
    assert torch.equal(logits(loaded, input_ids=ids), expected)


def test_rows_of_a_mixed_batch_equal_each_row_alone(ids):
    """TT adapters expose their U, V factors, so `route` applies them in its grouped path."""
    model = make_bert()
    splice.attach(model, TTLoRA(r=2, targets=TARGETS["bert"]), "a")
    splice.attach(model, TTLoRA(r=4, targets=TARGETS["bert"]), "b")
    randomize(model, "a", scale=0.6, seed=1)
    randomize(model, "b", scale=0.6, seed=2)
    alone = {}
    for name in ("a", "b"):
        splice.activate(model, name)
        alone[name] = logits(model, input_ids=ids)
    assert_differs(alone["a"], alone["b"])
    for grouped in (True, False):
        with splice.route(model, ["b", "a"], grouped=grouped):
            routed = logits(model, input_ids=ids)
        assert_close(routed[0], alone["b"][0])
        assert_close(routed[1], alone["a"][1])


# -- errors --------------------------------------------------------------------------------


def test_modes_that_do_not_fit_the_layer_are_refused_naming_it_and_its_sizes():
    model = nn.Sequential(nn.Linear(32, 40))
    with pytest.raises(SpliceError, match=r"modes \[4, 8, 4, 8\] do not fit '0' \(out=40, in=32\)"):
        splice.attach(model, TTLoRA(modes=[4, 8, 4, 8], targets=["0"]))
    # the right product (40 * 32), but no prefix multiplies to out = 40
    with pytest.raises(SpliceError, match=r"do not fit '0' \(out=40, in=32\)"):
        splice.attach(model, TTLoRA(modes=[20, 8, 8], targets=["0"]))
    assert not list(hosts(model))  # nothing was attached


def test_bad_settings_and_non_linear_hosts_are_refused():
    with pytest.raises(SpliceError, match="at least two positive integers"):
        TTLoRA(modes=[1280])
    with pytest.raises(SpliceError, match="at least two positive integers"):
        TTLoRA(modes=[40, 0, 32])
    with pytest.raises(SpliceError, match="rank r must be >= 1"):
        TTLoRA(r=0)
    with pytest.raises(SpliceError, match="dropout"):
        TTLoRA(dropout=-0.1)
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.Linear(8, 8))
    with pytest.raises(SpliceError, match="TTLoRA needs a Linear host; '0' is conv"):
        splice.attach(model, TTLoRA(targets=["0", "1"]))


# -- real weights and data -----------------------------------------------------------------


@pytest.mark.slow
def test_ttlora_on_minilm_fits_rotten_tomatoes_reviews(tmp_path, minilm):
    """Default modes: 384 = 8 x 8 x 6 per side."""
    fit_reviews(tmp_path, minilm, {"method": "ttlora", "r": 8, "alpha": 16}, TTLoRA)
