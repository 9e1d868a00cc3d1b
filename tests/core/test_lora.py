"""LoRA on every host type: the math, zero-init identity, merge exactness, bf16 merging, PiSSA."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FACTORIES, assert_close, assert_differs, logits, randomize
from torch import nn

import splice
from splice.core.host import host_of, hosts
from splice.methods.lora import LoRAAdapter, pattern_value

# model -> (targets, which host kinds they cover)
HOST_CASES = {
    "bert": ["query", "value", "intermediate.dense"],  # Linear
    "llama": ["q_proj", "v_proj", "down_proj"],  # Linear, GQA shapes
    "gpt2": ["c_attn", "c_fc", "c_proj"],  # transformers Conv1D (fan-in/fan-out)
    "convnet": ["embed", "conv1", "conv2", "head"],  # Embedding, Conv1d, Conv2d, Linear
}


def run(model_name: str, model: nn.Module, ids: torch.Tensor, image: torch.Tensor | None = None):
    if model_name == "convnet":
        return logits(model, ids, image)
    return logits(model, input_ids=ids)


@pytest.fixture
def inputs(conv_inputs):
    return conv_inputs


def attached(model_name: str, **lora) -> nn.Module:
    model = FACTORIES[model_name]()
    splice.attach(model, splice.LoRA(r=4, alpha=8, targets=HOST_CASES[model_name], **lora))
    return model


# -- the math ------------------------------------------------------------------------------


def test_linear_delta_is_scaled_B_A_x():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    splice.attach(model, splice.LoRA(r=3, alpha=4.5, targets=["0"]))
    randomize(model)
    adapter = model[0].splice["default"]
    x = torch.randn(4, 6)
    expected = x @ model[0].weight.T + model[0].bias + 1.5 * (x @ adapter.lora_A.T @ adapter.lora_B.T)
    assert_close(logits(model, x), expected, rel=1e-6)
    assert torch.allclose(adapter.delta_weight(), 1.5 * adapter.lora_B @ adapter.lora_A)


@pytest.mark.parametrize(("rslora", "scaling"), [(False, 16 / 4), (True, 16 / 2)])
def test_scaling_is_alpha_over_r_or_sqrt_r(rslora, scaling):
    config = splice.LoRA(r=4, alpha=16, rslora=rslora)
    assert config.scaling_for("x.q") == pytest.approx(scaling)


def test_rank_and_alpha_patterns_per_module(llama):
    config = splice.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"],
                         rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                         alpha_pattern={"q_proj": 3})
    splice.attach(llama, config)
    shapes = {n: (h["default"].r, h["default"].scaling, tuple(h["default"].lora_A.shape))
              for n, _, h in hosts(llama)}
    assert shapes == {
        "model.layers.0.self_attn.q_proj": (4, 3 / 4, (4, 32)),
        "model.layers.0.self_attn.v_proj": (2, 8 / 2, (2, 32)),
        "model.layers.1.self_attn.q_proj": (6, 3 / 6, (6, 32)),
        "model.layers.1.self_attn.v_proj": (2, 8 / 2, (2, 32)),
    }


@pytest.mark.parametrize("name", [
    "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.xv_proj", "v_proj",
    "model.layers.10.mlp.up_proj", "model.layers.1.mlp.up_proj", "encoder.layer.1.output.dense",
])
def test_pattern_rule_is_peft_rule(name):
    get_pattern_key = getattr(pytest.importorskip("peft.utils.other"), "get_pattern_key", None)
    if get_pattern_key is None:
        pytest.skip("peft < 0.14 has no get_pattern_key (its rank_pattern rule was inline in LoraModel)")
    pattern = {"v_proj": 1, r"layers\.1\.mlp\.up_proj": 2, "output.dense": 3}
    key = get_pattern_key(list(pattern), name)
    assert pattern_value(pattern, name, 99) == pattern.get(key, 99)


@pytest.mark.parametrize("model_name", list(HOST_CASES))
def test_factor_shapes_are_peft_shapes(model_name):
    model = attached(model_name)
    for name, base, host in hosts(model):
        adapter = host["default"]
        if isinstance(base, nn.Embedding):
            assert adapter.lora_A.shape == (4, base.num_embeddings)
            assert adapter.lora_B.shape == (base.embedding_dim, 4)
        elif isinstance(base, (nn.Conv1d, nn.Conv2d)):
            assert adapter.lora_A.shape == (4, base.in_channels, *base.kernel_size)
            assert adapter.lora_B.shape == (base.out_channels, 4, *(1,) * len(base.kernel_size))
        elif isinstance(base, nn.Linear):
            assert adapter.lora_A.shape == (4, base.in_features)
            assert adapter.lora_B.shape == (base.out_features, 4)
        else:  # Conv1D stores [in, out]
            assert adapter.lora_A.shape == (4, base.weight.shape[0]), name
            assert adapter.lora_B.shape == (base.weight.shape[1], 4), name


def test_invalid_hyperparameters_are_refused():
    with pytest.raises(splice.SpliceError, match="rank"):
        splice.LoRA(r=0)
    with pytest.raises(splice.SpliceError, match="dropout"):
        splice.LoRA(dropout=1.0)
    with pytest.raises(splice.SpliceError, match="init"):
        splice.LoRA(init="olora")
    with pytest.raises(splice.SpliceError, match="rank_pattern"):
        splice.LoRA(rank_pattern={"q": 0})


# -- initialisation ------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["default", "gaussian"])
@pytest.mark.parametrize("model_name", list(HOST_CASES))
def test_fresh_adapter_leaves_outputs_bit_identical(model_name, init, inputs):
    model = FACTORIES[model_name]()
    before = run(model_name, model, *inputs)
    splice.attach(model, splice.LoRA(r=4, targets=HOST_CASES[model_name], init=init))
    assert torch.equal(run(model_name, model, *inputs), before)
    # ...and the adapter can learn: one factor is nonzero, so gradients reach both.
    for _, _, host in hosts(model):
        adapter = host["default"]
        assert adapter.lora_A.abs().sum() + adapter.lora_B.abs().sum() > 0


def test_default_init_is_kaiming_A_zero_B_and_embedding_is_the_reverse(convnet):
    splice.attach(convnet, splice.LoRA(r=4, targets=["conv2", "embed"]))
    conv, embed = convnet.conv2.splice["default"], convnet.embed.splice["default"]
    assert conv.lora_A.abs().sum() > 0 and not conv.lora_B.any()
    assert not embed.lora_A.any() and embed.lora_B.abs().sum() > 0


def test_zeros_init_makes_both_factors_zero(bert):
    splice.attach(bert, splice.LoRA(r=4, targets=["query"], init="zeros"))
    for _, _, host in hosts(bert):
        assert not host["default"].lora_A.any() and not host["default"].lora_B.any()


# -- merging -------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", list(HOST_CASES))
def test_merged_equals_unmerged(model_name, inputs):
    model = attached(model_name)
    base_out = run(model_name, FACTORIES[model_name](), *inputs)
    randomize(model)
    unmerged = run(model_name, model, *inputs)
    assert_differs(unmerged, base_out)
    splice.merge(model)
    assert all(host.merged == ["default"] for _, _, host in hosts(model))
    assert_close(run(model_name, model, *inputs), unmerged, rel=1e-5)


@pytest.mark.parametrize("model_name", list(HOST_CASES))
def test_merge_then_unmerge_restores_base_weights(model_name):
    model = attached(model_name)
    randomize(model)
    weights = {n: b.weight.detach().clone() for n, b, _ in hosts(model)}
    splice.merge(model)
    for name, base, _ in hosts(model):
        assert not torch.allclose(base.weight, weights[name]), name
    splice.unmerge(model)
    for name, base, host in hosts(model):
        assert host.merged == []
        torch.testing.assert_close(base.weight, weights[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_name", list(HOST_CASES))
def test_merging_twice_changes_nothing(model_name, inputs):
    model = attached(model_name)
    randomize(model)
    splice.merge(model)
    weights = {n: b.weight.detach().clone() for n, b, _ in hosts(model)}
    out = run(model_name, model, *inputs)
    splice.merge(model)
    splice.merge(model, "default")
    assert all(torch.equal(b.weight, weights[n]) for n, b, _ in hosts(model))
    assert torch.equal(run(model_name, model, *inputs), out)


def test_bf16_merge_accumulates_in_fp32_and_rounds_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48)).to(torch.bfloat16)
    splice.attach(model, splice.LoRA(r=8, alpha=8, targets=["0"]))
    adapter = model[0].splice["default"]
    assert adapter.lora_A.dtype == torch.float32  # adapters train in fp32 on a bf16 base
    randomize(model, scale=0.5)
    before = model[0].weight.detach().clone()
    delta = adapter.delta_weight().detach()
    assert delta.abs().mean() > before.float().abs().mean()  # a step as large as the weight
    splice.merge(model)
    merged = model[0].weight.detach()
    assert merged.dtype == torch.bfloat16
    reference = before.double() + delta.double()
    # One rounding to bf16 (8 significant bits): at most half a unit in the last place.
    ulp = torch.exp2(torch.floor(torch.log2(reference.abs())) - 7)
    error = (merged.double() - reference).abs()
    assert (error <= 0.5 * ulp + 1e-6 * reference.abs()).all(), (error / ulp).max()


def test_bf16_base_runs_with_fp32_adapter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).to(torch.bfloat16)
    splice.attach(model, splice.LoRA(r=2, targets=["0"]))
    randomize(model)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = logits(model, x)
    assert out.dtype == torch.bfloat16
    adapter = model[0].splice["default"]
    expected = model[0].weight.float() @ x.float().T
    expected = expected.T + model[0].bias.float() + adapter.delta(x.float())
    assert_close(out.float(), expected, rel=2e-2)


def test_dropout_only_touches_the_adapter_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    splice.attach(model, splice.LoRA(r=4, targets=["0"], dropout=0.5))
    x = torch.randn(8, 32)
    base = x @ model[0].weight.T + model[0].bias
    model.train()
    assert torch.equal(logits(model, x), base)  # B = 0: dropout does not reach the base output
    randomize(model)
    train_out = logits(model, x)
    model.eval()
    eval_out = logits(model, x)
    assert_differs(train_out, eval_out)
    assert_close(eval_out, base + model[0].splice["default"].delta(x).detach(), rel=1e-6)


# -- PiSSA ---------------------------------------------------------------------------------


def test_pissa_keeps_outputs_and_moves_principal_directions(bert, ids):
    original = {n: bert.get_submodule(n).weight.detach().clone()
                for n in ["bert.encoder.layer.0.attention.self.query"]}
    before = logits(bert, input_ids=ids)
    splice.attach(bert, splice.LoRA(r=4, alpha=4, targets=["query", "value"], init="pissa"))
    assert_close(logits(bert, input_ids=ids), before, rel=1e-5)
    name = "bert.encoder.layer.0.attention.self.query"
    base = bert.get_submodule(name)
    adapter: LoRAAdapter = base.splice["default"]
    # The base now holds W minus its top-4 singular part; BA holds that part.
    singular = torch.linalg.svdvals(original[name])
    residual = torch.linalg.svdvals(base.weight.detach())
    assert residual[0] == pytest.approx(singular[4].item(), rel=1e-4)
    torch.testing.assert_close(torch.linalg.svdvals(adapter.delta_weight())[:4], singular[:4])
    torch.testing.assert_close(base.weight + adapter.delta_weight(), original[name], atol=1e-5, rtol=0)


def test_pissa_on_conv1d_host_keeps_outputs(gpt2, ids):
    before = logits(gpt2, input_ids=ids)
    splice.attach(gpt2, splice.LoRA(r=4, targets=["c_attn"], init="pissa"))
    assert_close(logits(gpt2, input_ids=ids), before, rel=1e-5)


def test_pissa_detach_restores_the_original_weights(bert, ids):
    weights = {k: v.clone() for k, v in bert.state_dict().items()}
    splice.attach(bert, splice.LoRA(r=4, targets=["query", "value"], init="pissa"))
    randomize(bert)  # training moved A and B
    splice.detach(bert, "default")
    for key, value in bert.state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-5, rtol=0)


def test_pissa_export_is_a_rank_2r_lora_exact_on_the_original_base(bert):
    original = bert.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    splice.attach(bert, splice.LoRA(r=4, alpha=8, targets=["query"], init="pissa"))
    randomize(bert, scale=0.1)
    base = bert.bert.encoder.layer[0].attention.self.query
    adapter: LoRAAdapter = base.splice["default"]
    A, B = adapter.exported_factors()
    assert A.shape == (8, 32) and B.shape == (32, 8)  # rank 2r
    # What the adapted model computes == original W + s * B A with the exported factors.
    torch.testing.assert_close(original + adapter.scaling * B @ A,
                               base.weight + adapter.delta_weight(), atol=1e-5, rtol=0)


def test_pissa_needs_a_linear_host(convnet):
    with pytest.raises(splice.SpliceError, match="PiSSA"):
        splice.attach(convnet, splice.LoRA(r=2, targets=["conv2"], init="pissa"))
    assert host_of(convnet.conv2) is None  # nothing left behind


def test_pissa_rank_uses_singular_values_of_scaled_factors(bert):
    splice.attach(bert, splice.LoRA(r=2, alpha=8, targets=["query"], init="pissa"))
    adapter = bert.bert.encoder.layer[0].attention.self.query.splice["default"]
    # A and B share sqrt(S / scaling): their row/column norms agree.
    torch.testing.assert_close(adapter.lora_A.norm(dim=1), adapter.lora_B.norm(dim=0))
    assert adapter.scaling == 4 and math.isfinite(adapter.lora_A.sum().item())
