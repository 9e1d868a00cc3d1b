"""DiaBlo: the block-diagonal math, exact merging, gradients against a dense twin, files, errors,
and training on real weights and data (arXiv 2506.03230, checks of volume-2 section 12 (d))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_differs, logits, make_bert, make_gpt2, randomize
from review_fit import review_loss
from rich.console import Console
from torch import nn

import splice
from splice.core.errors import SpliceError
from splice.core.host import hosts
from splice.methods.diablo import DiaBlo, DiaBloAdapter
from splice.train import TrainConfig, run

# model -> targets: Linear layers of both shapes (BERT) and transformers' Conv1D (GPT-2)
TARGETS = {"bert": ["query", "value", "intermediate.dense"], "gpt2": ["c_attn", "c_fc", "c_proj"]}
MAKERS = {"bert": make_bert, "gpt2": make_gpt2}


def linear_with_diablo(n: int, m: int, blocks: int, seed: int = 0) -> tuple[nn.Sequential, DiaBloAdapter]:
    """Linear(n -> m) with a DiaBlo adapter whose D holds random values."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, m))
    splice.attach(model, DiaBlo(blocks=blocks, targets=["0"]))
    randomize(model, seed=seed)
    return model, model[0].splice["default"]


# -- the math ------------------------------------------------------------------------------


def test_delta_is_each_input_block_times_its_D():
    """The forward written out by hand: output block k = input block k @ D_k."""
    model, adapter = linear_with_diablo(12, 8, blocks=4)  # d1 = 3, d2 = 2
    x = torch.randn(5, 12)
    expected = torch.cat([x[:, 3 * k: 3 * k + 3] @ adapter.D[k] for k in range(4)], dim=1)
    assert torch.allclose(adapter.delta(x), expected, atol=1e-6)
    assert_close(logits(model, x), F.linear(x, model[0].weight, model[0].bias) + expected, rel=1e-6)


@pytest.mark.parametrize(("n", "m", "blocks"), [(12, 8, 4), (10, 7, 3)])
def test_delta_weight_is_block_diagonal_with_exactly_zero_off_diagonal_blocks(n, m, blocks):
    _, adapter = linear_with_diablo(n, m, blocks)
    d1, d2 = adapter.d1, adapter.d2
    weight = adapter.delta_weight()
    assert weight.shape == (m, n)
    for j in range(blocks):
        rows = slice(j * d2, min((j + 1) * d2, m))
        for k in range(blocks):
            cols = slice(k * d1, min((k + 1) * d1, n))
            block = weight[rows, cols]
            if j == k:  # D_k^T, cropped where the block runs past the layer
                assert torch.equal(block, adapter.D[k].T[: block.shape[0], : block.shape[1]])
            else:
                assert torch.count_nonzero(block) == 0
    x = torch.randn(3, n)
    assert torch.allclose(adapter.delta(x), x @ weight.T, atol=1e-6)


@pytest.mark.parametrize(("n", "m", "blocks"), [(12, 8, 4), (10, 7, 3)])
def test_gradient_of_each_block_is_the_diagonal_block_of_the_dense_gradient(n, m, blocks):
    """∂L/∂D_k equals the transposed k-th diagonal block of ∂L/∂W for a dense twin W = W0 + ΔW;
    the padded rows and columns of D, which touch no real input or output, get exactly zero."""
    model, adapter = linear_with_diablo(n, m, blocks)
    base = model[0]
    x, target = torch.randn(6, n), torch.randn(6, m)
    F.mse_loss(model(x), target).backward()

    dense = (base.weight + adapter.delta_weight()).detach().requires_grad_()
    F.mse_loss(F.linear(x, dense, base.bias), target).backward()

    d1, d2 = adapter.d1, adapter.d2
    for k in range(blocks):
        block = dense.grad[k * d2: (k + 1) * d2, k * d1: (k + 1) * d1].T  # [in rows, out cols], cropped
        rows, cols = block.shape
        assert torch.allclose(adapter.D.grad[k, :rows, :cols], block, atol=1e-6)
        assert torch.count_nonzero(adapter.D.grad[k, rows:]) == 0
        assert torch.count_nonzero(adapter.D.grad[k, :, cols:]) == 0
    assert torch.count_nonzero(adapter.D.grad) > 0


def test_non_divisible_sizes_run_and_merge():
    model, adapter = linear_with_diablo(10, 7, blocks=3)  # d1 = 4 (2 padded inputs), d2 = 3 (2 cropped outputs)
    assert adapter.D.shape == (3, 4, 3)
    x = torch.randn(2, 5, 10)
    base = F.linear(x, model[0].weight, model[0].bias)
    unmerged = logits(model, x)
    assert unmerged.shape == (2, 5, 7)
    assert_differs(unmerged, base)
    splice.merge(model)
    assert_close(logits(model, x), unmerged, rel=1e-6)
    splice.unmerge(model)
    assert_close(F.linear(x, model[0].weight, model[0].bias), base, rel=1e-6)


def test_parameter_count_is_blocks_times_d1_times_d2():
    model = make_bert()  # hidden 32, intermediate 40
    splice.attach(model, DiaBlo(blocks=3, targets=["query", "intermediate.dense"]))
    # query 32 -> 32: d1 = d2 = 11; intermediate 32 -> 40: d1 = 11, d2 = 14; two layers each
    assert splice.summary(model).trainable == 2 * (3 * 11 * 11 + 3 * 11 * 14)
    for name, _, host in hosts(model):
        assert host["default"].D.numel() == 3 * 11 * (14 if "intermediate" in name else 11)


def test_dropout_acts_on_the_adapter_input_in_training_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    splice.attach(model, DiaBlo(blocks=4, dropout=0.5, targets=["0"]))
    randomize(model)
    adapter = model[0].splice["default"]
    x = torch.randn(4, 16)
    assert torch.allclose(adapter.eval().delta(x), x @ adapter.delta_weight().T, atol=1e-6)  # no dropout in eval
    adapter.train()
    torch.manual_seed(1)
    dropped = adapter.delta(x)
    torch.manual_seed(1)
    assert torch.allclose(dropped, F.dropout(x, 0.5) @ adapter.delta_weight().T, atol=1e-6)


# -- merging and files ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_save_and_load_round_trip(name, ids, tmp_path):
    model = MAKERS[name]()
    splice.attach(model, DiaBlo(blocks=4, dropout=0.1, targets=TARGETS[name]))
    randomize(model)
    expected = logits(model, input_ids=ids)
    splice.save(model, tmp_path / "adapter")

    loaded = splice.load(MAKERS[name](), tmp_path / "adapter")
    config = splice.adapters(loaded)["default"]
    assert isinstance(config, DiaBlo) and (config.blocks, config.dropout) == (4, 0.1)
    assert torch.equal(logits(loaded, input_ids=ids), expected)


# -- errors --------------------------------------------------------------------------------


def test_too_many_blocks_are_refused_naming_the_layer_and_sizes():
    model = nn.Sequential(nn.Linear(10, 7))
    with pytest.raises(SpliceError, match=r"blocks=8 exceeds min\(in, out\) of '0' \(in=10, out=7\)"):
        splice.attach(model, DiaBlo(blocks=8, targets=["0"]))
    assert not list(hosts(model))  # nothing was attached


def test_blocks_that_leave_a_block_without_inputs_are_refused():
    # 10 inputs in 6 blocks of ceil(10/6) = 2: block 6 would see only padding
    with pytest.raises(SpliceError, match=r"blocks=6 on '0' \(in=10\).*no real input"):
        splice.attach(nn.Sequential(nn.Linear(10, 12)), DiaBlo(blocks=6, targets=["0"]))


def test_bad_settings_and_non_linear_hosts_are_refused():
    with pytest.raises(SpliceError, match="blocks must be >= 1"):
        DiaBlo(blocks=0)
    with pytest.raises(SpliceError, match="dropout"):
        DiaBlo(dropout=1.0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8))
    with pytest.raises(SpliceError, match="DiaBlo needs a Linear host; '0' is embedding"):
        splice.attach(model, DiaBlo(blocks=2, targets=["0", "1"]))


# -- real weights and data -----------------------------------------------------------------


@pytest.mark.slow
def test_diablo_on_minilm_learns_rotten_tomatoes(tmp_path, minilm):
    """30 steps on real MiniLM weights. The head trains too, so besides a falling loss the test
    asks that the saved adapter itself matters: reloaded onto fresh weights, switching it off
    must cost validation loss."""
    config = TrainConfig(
        adapter={"method": "diablo", "blocks": 8, "layers": [3, 4, 5],
                 "targets": ["query", "value", "attention.output.dense"]},
        max_steps=30, eval_every=30, max_eval_examples=64, max_length=32, lr=5e-3,
        output_dir=str(tmp_path / "run"))
    result = run(config, console=Console(quiet=True))
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.02

    splice.load(minilm, result.paths["adapter"])
    assert isinstance(splice.adapters(minilm)["default"], DiaBlo)
    on, off = review_loss(minilm, splice.assets.rotten_tomatoes().validation[:64])
    assert on < off - 0.02, (on, off)
