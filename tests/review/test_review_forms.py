"""Review of the adapter forms against the equivalences an HF PEFT user relies on.

Failing tests show bugs (each docstring names the file and line and what is expected);
passing ones pin behaviour the contract suite (tests/contract) and tests/io do not cover.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_close, assert_differs, logits, make_gpt2, make_llama, randomize, text_batch
from torch import nn

import splice


def _ids() -> torch.Tensor:
    return text_batch()["input_ids"]


# -- bug: merging under an active, unmerged DoRA adapter changes the output ------------------


def lora_and_dora(order: list[str]):
    """A tiny Llama with LoRA "a" and DoRA "b" (random factors) on q_proj, active in `order`."""
    model = make_llama()
    splice.attach(model, splice.LoRA(r=4, targets=["q_proj"]), "a")
    randomize(model, "a", scale=0.3)
    splice.attach(model, splice.DoRA(r=4, targets=["q_proj"]), "b")
    randomize(model, "b", scale=0.3, seed=1)
    splice.activate(model, order)
    return model


@pytest.mark.parametrize("merge_only", [None, "a"], ids=["merge-all-active", "merge-the-lora-only"])
def test_merge_equals_unmerged_with_lora_and_dora_active_on_one_layer(merge_only):
    """merged == unmerged when a LoRA adapter shares a layer with an active DoRA adapter (it was not).

    DoRA's norms ||W + sBA|| read the layer's *current* weight (src/splice/methods/dora.py:91,
    `_base_weight()` -> `dense_weight(self._base[0], ...)`, used by `row_norms`/`delta_weight`
    at dora.py:105 and :139). `splice.merge` (src/splice/core/api.py:242-253) folds the adapters in
    `activate` order, so with ["a" (LoRA), "b" (DoRA)] active, LoRA's delta goes into W first and
    DoRA's g = m / ||W + Δa + sBA|| then differs from the g it computed unmerged (m / ||W + sBA||):
    the merged model's logits move by ~20% of their scale. `splice.merge(model, "a")` alone has
    the same effect on the still-unmerged DoRA. Expected: merging is output-preserving whatever
    else is attached (as `merge`'s docstring promises, "outputs do not change"): DoRA's norms
    should come from the weight without other adapters' merged deltas (the host knows them:
    `Host.merged` / `_merged_deltas`), or merge should fold DoRA-type adapters
    (`delta_weight_reads_base`) first and refuse to merge another adapter under an unmerged one.
    """
    model = lora_and_dora(["a", "b"])
    ids = _ids()
    unmerged = logits(model, input_ids=ids)
    if merge_only == "a":  # the chosen fix: refused (DoRA would read a changed weight), nothing changed
        with pytest.raises(splice.MergeError, match="'b'"):
            splice.merge(model, merge_only)
        assert torch.equal(logits(model, input_ids=ids), unmerged)
        return
    splice.merge(model, merge_only)  # every active adapter: DoRA's first
    assert_close(logits(model, input_ids=ids), unmerged, rel=1e-5)
    splice.unmerge(model)
    assert_close(logits(model, input_ids=ids), unmerged, rel=1e-5)


def test_merge_of_dora_before_lora_is_output_preserving():
    """Passing companion of the test above: with DoRA first in the active order its norms are
    taken before LoRA's delta lands in the weight, and merge/unmerge preserve the output."""
    model = lora_and_dora(["b", "a"])
    ids = _ids()
    unmerged = logits(model, input_ids=ids)
    splice.merge(model)
    assert_close(logits(model, input_ids=ids), unmerged, rel=1e-5)
    splice.unmerge(model)
    assert_close(logits(model, input_ids=ids), unmerged, rel=1e-5)


# -- passing pins ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def test_dora_on_gpt2_conv1d_round_trips_with_peft_both_ways(peft, tmp_path):
    """DoRA on transformers' Conv1D ([in, out] weights, fan_in_fan_out): splice's file gives
    PEFT the same logits, PEFT's file gives splice the same logits, and both train the same
    number of parameters (r*(in+out) + out per module). tests/io covers DoRA on Linear only."""
    ids = _ids()
    model = make_gpt2()
    splice.attach(model, splice.DoRA(r=4, alpha=8, targets=["c_attn", "c_fc"]))
    randomize(model, scale=0.2)
    ours = logits(model, input_ids=ids)
    splice.save(model, tmp_path / "splice")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_gpt2(), str(tmp_path / "splice")).eval()
    assert_close(logits(theirs, input_ids=ids), ours, rel=1e-5)

    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(make_gpt2(), peft.LoraConfig(
            r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
            init_lora_weights=False)).eval()
    expected = logits(peft_model, input_ids=ids)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    loaded = make_gpt2()
    splice.load(loaded, tmp_path / "peft", provenance="off")
    assert_close(logits(loaded, input_ids=ids), expected, rel=1e-5)

    peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    ours_trainable = sum(p.numel() for p in splice.trainable_parameters(model).values())
    # per layer: c_attn 32 -> 96, c_fc 32 -> 128; two layers
    assert ours_trainable == peft_trainable == 2 * ((4 * (32 + 96) + 96) + (4 * (32 + 128) + 128))


class _Conv(nn.Module):
    def __init__(self, **geometry) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, **geometry)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("geometry", [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 1), padding="same"),
    dict(kernel_size=(1, 3), stride=(2, 1), padding=(0, 2)),
], ids=["stride2", "same-nonsquare", "asymmetric-stride-and-padding"])
def test_conv2d_lora_bias_merge_route_and_count_for_unusual_geometry(geometry):
    """LoRA with lora_bias on Conv2d hosts of stride 2, "same" padding with a non-square kernel,
    and asymmetric stride/padding: merged == unmerged, unmerge gives the output back, each row of
    a mixed batch equals that row alone, and the adapter trains r*in*kh*kw + out*r + out numbers.
    The contract suite only has a 3x3, stride-1, padding-1 Conv2d."""
    torch.manual_seed(0)
    model = _Conv(**geometry).eval()
    x = torch.randn(3, 3, 9, 8, generator=torch.Generator().manual_seed(1))
    base = logits(model, x)
    splice.attach(model, splice.LoRA(r=2, targets=["conv"], lora_bias=True), "a")
    kh, kw = model.conv.kernel_size
    assert sum(p.numel() for p in splice.trainable_parameters(model).values()) == 2 * 3 * kh * kw + 6 * 2 + 6
    randomize(model, "a", scale=0.3)
    alone_a = logits(model, x)
    assert_differs(alone_a, base)
    splice.attach(model, splice.LoRA(r=3, targets=["conv"], lora_bias=True), "b")
    randomize(model, "b", scale=0.3, seed=2)
    alone_b = logits(model, x)
    with splice.route(model, ["b", None, "a"]):
        mixed = logits(model, x)
    assert_close(mixed, torch.stack([alone_b[0], base[1], alone_a[2]]), rel=1e-5)
    splice.activate(model, "a")
    splice.merge(model, "a")
    assert_close(logits(model, x), alone_a, rel=1e-5)
    splice.unmerge(model)
    assert_close(logits(model, x), alone_a, rel=1e-5)


def test_lora_dropout_is_off_in_eval_even_with_autograd_on():
    """In eval mode the adapter's dropout is off on every path: the training kernel (autograd
    on), the fused inference path (no grad) and the merged weight all give the same logits."""
    model = make_llama()
    splice.attach(model, splice.LoRA(r=4, dropout=0.5, targets="all-linear"))
    randomize(model, scale=0.2)
    model.train()
    model.eval()
    ids = _ids()
    with torch.enable_grad():
        with_grad = model(input_ids=ids).logits.detach()
    no_grad = logits(model, input_ids=ids)
    assert_close(no_grad, with_grad, rel=1e-5)
    splice.merge(model)
    assert_close(logits(model, input_ids=ids), with_grad, rel=1e-5)


def test_two_dora_adapters_active_on_one_layer_are_not_merged_inexactly():
    """Two adapters that read the weight (DoRA) on one layer: merged one after the other, the
    second would take its norm from a weight holding the first's change. Refused, nothing changed."""
    model = make_llama()
    for seed, name in enumerate(("b1", "b2")):
        splice.attach(model, splice.DoRA(r=4, targets=["q_proj"]), name)
        randomize(model, name, scale=0.3, seed=seed)
    splice.activate(model, ["b1", "b2"])
    ids = _ids()
    unmerged = logits(model, input_ids=ids)
    with pytest.raises(splice.MergeError, match="read the weight"):
        splice.merge(model)
    assert torch.equal(logits(model, input_ids=ids), unmerged)
