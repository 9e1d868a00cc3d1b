"""The fast paths of the low-rank core against their reference paths.

- Inference (no autograd): a Linear host adds LoRA-shaped adapters into the base output in place
  (`Host.add_in_place` -> `add_low_rank_`); the reference is the same forward with autograd on
  (the lean autograd function, which computes the plain formula's operations). They agree to
  float rounding (few ulps a layer), bit for bit where the output dtype differs from the
  factors' (the delta is cast and added as the reference does).
- Training dropout: the keep mask is drawn once and kept (one byte an entry), at the rate p,
  and drawn again identically under activation checkpointing (whose recomputation replays
  the RNG).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_differs, make_bert, make_gpt2, make_llama, randomize
from torch import nn
from torch.utils.checkpoint import checkpoint

import splice
from splice.core import host as host_module
from splice.core.lowrank import TRANSPOSED_FROM_ROWS, LowRank, add_low_rank_, dropout_mask, low_rank_delta

LoRA = splice.LoRA


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """One entry per adapter the host adds through the fused in-place path."""
    calls: list[int] = []
    original = host_module.add_low_rank_

    def spy(output, x, factors):
        calls.append(1)
        return original(output, x, factors)

    monkeypatch.setattr(host_module, "add_low_rank_", spy)
    return calls


def llama_with_adapters() -> nn.Module:
    model = make_llama()
    configs = {"a": LoRA(r=2, alpha=4, targets=["q_proj", "v_proj", "down_proj"]),
               "b": LoRA(r=4, alpha=3, rslora=True, targets=["q_proj", "o_proj"]),
               "c": LoRA(r=3, alpha=6, init="pissa", targets=["v_proj", "up_proj"])}
    for seed, (name, config) in enumerate(configs.items()):
        splice.attach(model, config, name)
        randomize(model, name, scale=0.2, seed=seed + 1)
    return model


def ids(rows: int = 3, length: int = 7) -> torch.Tensor:
    return torch.randint(1, 90, (rows, length), generator=torch.Generator().manual_seed(0))


def fused_and_reference(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits without autograd (fast path) and with it (the reference: nothing in place)."""
    with torch.no_grad():
        fused = model(input_ids=inputs).logits
    with torch.enable_grad():
        reference = model(input_ids=inputs).logits.detach()
    return fused, reference


# -- the host's in-place path --------------------------------------------------------------


@pytest.mark.parametrize("active", [["a"], ["a", "b"], ["c"], ["b", "c"], []], ids=str)
def test_in_place_path_equals_the_reference_path(active, fused_calls):
    """Plain LoRA, rsLoRA, PiSSA active (its rank-2r form plus its part given back) and inactive
    (only its part given back), alone and summed on one host."""
    model = llama_with_adapters()
    splice.activate(model, active)
    for _, _, host in splice.core.host.hosts(model):
        for adapter in host.values():
            adapter.requires_grad_(True)  # the reference path needs autograd to run
    fused, reference = fused_and_reference(model, ids())
    assert bool(fused_calls) == bool(active)
    assert_close(fused, reference, rel=1e-5)
    if active:
        with splice.disabled(model):
            assert_differs(fused, logits_no_grad(model))


def logits_no_grad(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def test_conv1d_hosts_of_gpt2(fused_calls):
    model = make_gpt2()
    splice.attach(model, LoRA(r=3, alpha=5, targets=["c_attn", "c_fc", "c_proj"]))
    randomize(model, scale=0.2)
    fused, reference = fused_and_reference(model, ids())
    assert fused_calls
    assert_close(fused, reference, rel=1e-5)


def test_half_precision_base_with_fp32_adapters_is_bit_identical(fused_calls):
    """The delta is cast to the output's dtype and added in place: the reference's sum exactly."""
    model = make_llama().to(torch.bfloat16)
    splice.attach(model, LoRA(r=2, targets=["q_proj", "v_proj"]))
    randomize(model, scale=0.2)
    fused, reference = fused_and_reference(model, ids())
    assert fused_calls and fused.dtype == torch.bfloat16
    assert torch.equal(fused, reference)


def test_forms_without_the_low_rank_forward_keep_their_own_delta(fused_calls):
    """lora_bias (no low-rank form) and DoRA (rescales the base output) are never fused, nor is
    a LoRA on a host where a DoRA is active too (the DoRA needs the untouched base output)."""
    model = make_bert()
    splice.attach(model, LoRA(r=2, targets=["query"], lora_bias=True), "biased")
    splice.attach(model, splice.DoRA(r=2, targets=["value"]), "dora")
    splice.attach(model, LoRA(r=2, targets=["value"]), "plain")
    for name in ("biased", "dora", "plain"):
        randomize(model, name, scale=0.2, seed=len(name))
    splice.activate(model, ["biased", "dora", "plain"])
    fused, reference = fused_and_reference(model, ids())
    assert not fused_calls
    assert_close(fused, reference, rel=1e-6)


def test_dropout_in_training_mode_is_not_skipped_without_grad(fused_calls):
    model = make_llama()
    splice.attach(model, LoRA(r=2, dropout=0.5, targets=["q_proj", "v_proj"]))
    randomize(model, scale=0.5)
    model.train()
    with torch.no_grad():
        first, second = model(input_ids=ids()).logits, model(input_ids=ids()).logits
    assert not fused_calls
    assert_differs(first, second)  # dropout applied
    model.eval()  # identity dropout: fused
    fused, reference = fused_and_reference(model, ids())
    assert fused_calls
    assert_close(fused, reference, rel=1e-5)


class StridedLinear(nn.Linear):
    """A Linear whose output is a non-contiguous tensor (same values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias).t().contiguous().t()


@pytest.mark.parametrize("layer", [nn.Linear, StridedLinear])
def test_single_vectors_and_non_contiguous_outputs(layer, fused_calls):
    torch.manual_seed(0)
    model = nn.Sequential(layer(6, 5))
    splice.attach(model, LoRA(r=2, targets=["0"]))
    randomize(model, scale=0.4)
    x = torch.randn(4, 6)
    with torch.no_grad():
        fused = model(x)
        vector = model(x[0])
    adapter = model[0].splice["default"]
    expected = F.linear(x, model[0].weight, model[0].bias) + low_rank_delta(x, adapter.low_rank_factors(), False)
    assert_close(fused, expected.detach(), rel=1e-6)
    assert_close(vector, expected[0].detach(), rel=1e-6)
    assert len(fused_calls) == (2 if layer is nn.Linear else 1)  # 2-D strided output: reference path


# -- add_low_rank_ -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(9,), (4, 9), (2, 3, 9), (2, TRANSPOSED_FROM_ROWS // 2 + 3, 9)],
                         ids=["1d", "2d", "3d", "3d-transposed-gemm"])
def test_add_low_rank_accumulates_in_place(shape):
    """Both orientations of the first GEMM (below and from TRANSPOSED_FROM_ROWS rows)."""
    g = torch.Generator().manual_seed(2)
    x, out = torch.randn(shape, generator=g), torch.randn(*shape[:-1], 7, generator=g)
    factors = LowRank(torch.randn(3, 9, generator=g), torch.randn(7, 3, generator=g), 0.6)
    expected = out + low_rank_delta(x, factors, training=False)
    result = add_low_rank_(out, x, factors)
    assert result is out
    assert_close(result, expected, rel=1e-6)


# -- dropout ---------------------------------------------------------------------------------


def test_dropout_mask_drops_at_rate_p_and_is_the_one_the_training_path_uses():
    x = torch.randn(64, 256)
    torch.manual_seed(4)
    keep = dropout_mask(x, 0.1)
    assert keep.dtype == torch.uint8 and set(keep.unique().tolist()) == {0, 1}
    rate, n = 1 - keep.float().mean().item(), keep.numel()
    assert abs(rate - 0.1) < 4 * (0.1 * 0.9 / n) ** 0.5
    A = torch.randn(3, 256, requires_grad=True)
    B = torch.randn(5, 3, requires_grad=True)
    torch.manual_seed(4)
    lean = low_rank_delta(x, LowRank(A, B, 0.5, 0.1), training=True)
    assert "LeanLowRank" in type(lean.grad_fn).__name__
    assert_close(lean.detach(), (F.linear(F.linear(x * keep / 0.9, A), B) * 0.5).detach(), rel=1e-5)
    torch.manual_seed(4)  # without autograd: torch's own dropout, the same rate
    with torch.no_grad():
        plain = low_rank_delta(x, LowRank(A, B, 0.5, 0.1), training=True)
    torch.manual_seed(4)
    assert_close(plain, F.linear(F.linear(F.dropout(x, 0.1), A), B).detach() * 0.5, rel=1e-5)


def test_checkpointed_recomputation_draws_the_same_mask():
    """Non-reentrant checkpointing replays the RNG, so the recomputed forward keeps the mask and
    the gradients equal those of the run without checkpointing."""
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        splice.attach(model, LoRA(r=2, dropout=0.4, targets=["0", "1"]))
        randomize(model, scale=0.5)
        model.train()
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(7)
        out = checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
        out.square().sum().backward()
        grads.append([x.grad, *(p.grad for p in splice.trainable_parameters(model).values())])
    for plain, checkpointed in zip(*grads, strict=True):
        assert plain.abs().max() > 0
        assert torch.equal(plain, checkpointed)
