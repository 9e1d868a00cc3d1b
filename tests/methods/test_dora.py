"""DoRA: the magnitude/direction form, its cheap norms, exact merge, and HF PEFT files both ways."""

from __future__ import annotations

import copy
import json

import helpers
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from rich.console import Console

import splice
from splice.core.errors import AdapterFileError, SpliceError
from splice.core.host import hosts
from splice.train import TrainConfig, run

TOKENS = torch.randint(0, helpers.VOCAB - 1, (3, 7), generator=torch.Generator().manual_seed(0))


def randomized(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-zero B and magnitudes off their init, so every term of DoRA matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            elif "magnitude" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=generator))
    return model


def dora_model(make=helpers.make_bert, targets=("query", "value"), **options) -> torch.nn.Module:
    model = make()
    splice.attach(model, splice.DoRA(r=4, alpha=8, targets=list(targets), **options))
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def adapters(model):
    return [(name, host["default"]) for name, _, host in hosts(model) if "default" in host]


def dense_reference(adapter, base) -> tuple[torch.Tensor, torch.Tensor]:
    """(W + s B A, its row norms) from the dense product, as PEFT computes them."""
    weight = base.weight.detach().T if adapter.info.transposed else base.weight.detach()
    combined = weight + adapter.scaling * adapter.lora_B @ adapter.lora_A
    return combined, torch.linalg.norm(combined, dim=1)


# -- the form ----------------------------------------------------------------------------------


def test_attaching_changes_no_output_and_magnitude_is_the_row_norm():
    model = dora_model()
    reference = helpers.make_bert()
    assert torch.equal(logits(model), logits(reference))
    for name, adapter in adapters(model):
        weight = reference.get_submodule(name).weight
        assert torch.allclose(adapter.lora_magnitude_vector, torch.linalg.norm(weight, dim=1), atol=1e-6)


@pytest.mark.parametrize("make", [helpers.make_bert, helpers.make_gpt2], ids=["linear", "conv1d"])
def test_row_norms_without_the_dense_product_equal_the_dense_norms(make):
    targets = ("query", "value") if make is helpers.make_bert else ("c_attn", "c_fc")
    model = randomized(dora_model(make, targets))
    for name, adapter in adapters(model):
        _, want = dense_reference(adapter, model.get_submodule(name))
        assert torch.allclose(adapter.row_norms(), want, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("make", [helpers.make_bert, helpers.make_gpt2], ids=["linear", "conv1d"])
def test_forward_equals_the_rescaled_dense_weight(make):
    targets = ("query",) if make is helpers.make_bert else ("c_attn",)
    model = randomized(dora_model(make, targets)).train()
    name, adapter = adapters(model)[0]
    base = model.get_submodule(name)
    x = torch.randn(2, 5, adapter.info.in_features)
    combined, norms = dense_reference(adapter, base)
    want = x @ (adapter.lora_magnitude_vector[:, None] / norms[:, None] * combined).T + base.bias
    assert torch.allclose(base(x), want, atol=1e-5)


def test_gradients_equal_peft_dora():
    ours = randomized(dora_model())
    theirs = get_peft_model(helpers.make_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                              use_dora=True))
    copy_into_peft(ours, theirs)
    ours.eval()  # the base's own dropout off; gradients still flow
    theirs.eval()
    for model in (ours, theirs):
        model(input_ids=TOKENS).logits.square().sum().backward()
    for name, adapter in adapters(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        pairs = [(adapter.lora_A, peft_layer.lora_A["default"].weight),
                 (adapter.lora_B, peft_layer.lora_B["default"].weight),
                 (adapter.lora_magnitude_vector, peft_layer.lora_magnitude_vector["default"].weight)]
        for mine, peft in pairs:
            assert torch.allclose(mine.grad, peft.grad, rtol=1e-4, atol=1e-6), name


def copy_into_peft(ours, theirs) -> None:
    with torch.no_grad():
        for name, adapter in adapters(ours):
            layer = theirs.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(adapter.lora_A)
            layer.lora_B["default"].weight.copy_(adapter.lora_B)
            layer.lora_magnitude_vector["default"].weight.copy_(adapter.lora_magnitude_vector)


def test_dropout_applies_in_training_only():
    model = randomized(dora_model(dropout=0.5))
    plain = randomized(dora_model())
    assert torch.allclose(logits(model.eval()), logits(plain.eval()), atol=1e-6)
    torch.manual_seed(0)
    assert not torch.allclose(logits(model.train()), logits(plain.train()), atol=1e-4)


def test_eval_cache_follows_in_place_updates():
    model = randomized(dora_model()).eval()
    before = logits(model)
    assert torch.equal(logits(model), before)  # cached scale: same numbers
    with torch.no_grad():
        for _, adapter in adapters(model):
            adapter.lora_magnitude_vector.mul_(1.5)
    after = logits(model)
    assert not torch.equal(after, before)
    fresh = copy.deepcopy(model)
    for _, adapter in adapters(fresh):
        adapter._eval_scale = None
    assert torch.equal(logits(fresh), after)


# -- merging -----------------------------------------------------------------------------------


def test_merge_and_unmerge_are_exact():
    model = randomized(dora_model(targets=("query", "value", "dense"))).eval()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    want = logits(model)
    splice.merge(model)
    assert torch.allclose(logits(model), want, atol=1e-5)
    splice.unmerge(model)
    for name, param in model.named_parameters():
        if name in weights:
            assert torch.allclose(param, weights[name], atol=1e-6), name
    assert torch.allclose(logits(model), want, atol=1e-6)


def test_unload_leaves_the_dora_weights_in_a_plain_model():
    model = randomized(dora_model()).eval()
    want = logits(model)
    plain = splice.unload(model)
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    assert torch.allclose(logits(plain), want, atol=1e-5)


# -- mixed batches -----------------------------------------------------------------------------


def test_dora_rows_in_a_mixed_batch_equal_each_row_alone():
    model = helpers.make_bert()
    splice.attach(model, splice.DoRA(r=4, targets=["query", "value"]), "dora")
    splice.attach(model, splice.LoRA(r=2, targets=["query"]), "lora")
    randomized(model)
    model.eval()
    ids = ["dora", "lora", None]
    with splice.route(model, ids):
        mixed = logits(model)
    for row, name in enumerate(ids):
        if name is None:
            with splice.disabled(model):
                alone = logits(model)[row]
        else:
            splice.activate(model, name)
            alone = logits(model)[row]
        assert torch.allclose(mixed[row], alone, atol=1e-5), name


# -- HF PEFT files -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [helpers.make_bert, helpers.make_gpt2], ids=["bert", "gpt2"])
def test_saved_dora_loads_in_peft_with_the_same_outputs(tmp_path, make):
    targets = ("query", "value") if make is helpers.make_bert else ("c_attn",)
    model = randomized(dora_model(make, targets)).eval()
    splice.save(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(make(), tmp_path / "a").eval()
    assert torch.allclose(logits(peft_model), logits(model), atol=1e-5)
    reloaded = splice.load(make(), tmp_path / "a")
    assert torch.equal(logits(reloaded), logits(model))
    assert isinstance(splice.adapters(reloaded)["default"], splice.DoRA)


def test_peft_dora_file_loads_in_splice(tmp_path):
    peft_model = get_peft_model(helpers.make_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                                 use_dora=True))
    randomized(peft_model).eval()
    peft_model.save_pretrained(tmp_path / "p")
    ours = splice.load(helpers.make_bert(), tmp_path / "p")
    assert torch.allclose(logits(ours), logits(peft_model), atol=1e-5)


def test_a_dora_file_without_magnitudes_is_refused(tmp_path):
    model = randomized(dora_model())
    splice.save(model, tmp_path / "a")
    from safetensors.torch import load_file, save_file

    path = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "magnitude" not in k}, path)
    fresh = helpers.make_bert()
    with pytest.raises(AdapterFileError, match="lora_magnitude_vector"):
        splice.load(fresh, tmp_path / "a")
    assert not splice.adapters(fresh)


# -- bad input ---------------------------------------------------------------------------------


def test_non_linear_hosts_and_pissa_are_refused():
    with pytest.raises(SpliceError, match="Linear"):
        splice.attach(helpers.ConvNet(), splice.DoRA(targets=["conv2"]))
    with pytest.raises(SpliceError, match="pissa"):
        splice.DoRA(init="pissa")


# -- real weights and data ---------------------------------------------------------------------


@pytest.mark.slow
def test_dora_on_minilm_learns_rotten_tomatoes(tmp_path):
    config = TrainConfig(adapter={"method": "dora", "r": 8, "alpha": 16}, max_steps=50, eval_every=50,
                         max_eval_examples=96, output_dir=str(tmp_path / "run"))
    result = run(config, console=Console(quiet=True))
    before, after = result.metrics["before"]["validation"], result.metrics["after"]["validation"]
    assert after["loss"] < before["loss"] - 0.02
    assert after["accuracy"] > before["accuracy"] + 0.1
    saved = json.loads((result.paths["adapter"] / "adapter_config.json").read_text())
    assert saved["use_dora"] is True


def test_adapter_info_counts_the_magnitudes(tmp_path):
    from splice.io.info import inspect_adapter

    model = dora_model()
    splice.save(model, tmp_path / "a")
    info = inspect_adapter(tmp_path / "a")
    assert info.method == "dora" and {m.rank for m in info.modules} == {4}
    assert info.adapter_parameters == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_backward_keeps_one_output_sized_tensor_more_than_lora():
    """PEFT's DoRA keeps the base and the LoRA outputs for the magnitude's gradient; this keeps
    their sum only, plus vectors of the output size."""

    def saved_numel(config) -> int:
        layer = torch.nn.Sequential(torch.nn.Linear(16, 24))
        splice.attach(layer, config)
        layer.train()
        x = torch.randn(5, 7, 16, requires_grad=True)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            layer(x)
        return sum(sizes)

    extra = saved_numel(splice.DoRA(r=4, targets=["0"])) - saved_numel(splice.LoRA(r=4, targets=["0"]))
    tokens, out = 5 * 7, 24
    assert tokens * out <= extra <= tokens * out + 4 * out
