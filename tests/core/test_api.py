"""The verbs: attach, activate/deactivate, disabled, merge, detach, unload, summary, trainability."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_differs, logits, make_bert, randomize, randomize_module
from torch import nn
from transformers.pytorch_utils import Conv1D

import splice
from splice.core.host import Host, host_of, hosts

QV = ["query", "value"]


def no_splice_children(model: nn.Module) -> bool:
    return not any(isinstance(m, Host) or n.endswith(".splice") or n.split(".")[-1] == "splice_heads"
                   for n, m in model.named_modules())


# -- attach --------------------------------------------------------------------------------


def test_attach_adds_hosts_without_replacing_modules(bert):
    types = {n: type(m) for n, m in bert.named_modules()}
    keys = set(bert.state_dict())
    out = splice.attach(bert, splice.LoRA(r=4, targets=QV))
    assert out is bert
    for name, module_type in types.items():
        assert type(bert.get_submodule(name)) is module_type  # nothing was swapped
    query = bert.bert.encoder.layer[0].attention.self.query
    assert isinstance(query.splice, Host) and list(query.splice) == ["default"]
    assert host_of(bert.bert.encoder.layer[0].attention.self.key) is None
    new_keys = set(bert.state_dict()) - keys
    assert keys <= set(bert.state_dict())  # the base model's own keys are untouched
    assert len(new_keys) == 8 and all(".splice.default.lora_" in k for k in new_keys)
    assert splice.adapters(bert) == {"default": splice.LoRA(r=4, targets=QV)}
    assert splice.active_adapters(bert) == ["default"]


def test_attach_freezes_everything_but_the_adapter_and_train_also(bert):
    splice.attach(bert, splice.LoRA(r=4, targets=QV, train_also=["classifier"]))
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    assert trainable == set(splice.trainable_parameters(bert))
    assert trainable == {
        f"bert.encoder.layer.{i}.attention.self.{m}.splice.default.lora_{ab}"
        for i in range(2) for m in QV for ab in "AB"
    } | {"classifier.weight", "classifier.bias"}


def test_attach_not_trainable(bert):
    splice.attach(bert, splice.LoRA(r=4, targets=QV), trainable=False)
    assert splice.trainable_parameters(bert) == {}
    assert splice.active_adapters(bert) == ["default"]


def test_gradients_reach_the_adapter_only(bert, ids):
    splice.attach(bert, splice.LoRA(r=4, targets=QV))
    randomize(bert)
    bert(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    for name, param in bert.named_parameters():
        if ".splice." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_frozen_base_is_bit_identical_after_an_optimizer_step(bert, ids):
    splice.attach(bert, splice.LoRA(r=4, targets=QV, train_also=["classifier"]))
    before = {n: p.detach().clone() for n, p in bert.named_parameters()}
    # All parameters go to the optimizer, with weight decay: freezing alone must protect the base.
    optimizer = torch.optim.AdamW(bert.parameters(), lr=1e-2, weight_decay=0.1)
    bert.train()
    bert(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    for name, param in bert.named_parameters():  # the original classifier is kept, frozen, beside the adapter's copy
        if ".splice." in name or (name.startswith("classifier.") and ".original." not in name):
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"{name} changed"


# -- several adapters ----------------------------------------------------------------------


def test_two_active_adapters_add_their_deltas():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    x = torch.randn(5, 16)
    base = logits(model, x)
    splice.attach(model, splice.LoRA(r=2, alpha=3, targets=["0"]), "a")
    splice.attach(model, splice.LoRA(r=3, alpha=5, targets=["0"]), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    assert splice.active_adapters(model) == ["b"]  # attaching activates the new one only
    only_b = logits(model, x)
    splice.activate(model, "a")
    only_a = logits(model, x)
    splice.activate(model, ["a", "b"])
    both = logits(model, x)
    assert_differs(only_a, base)
    assert_differs(only_b, base)
    assert_close(both - base, (only_a - base) + (only_b - base), rel=1e-5)


def test_two_adapters_equal_one_with_concatenated_factors(ids):
    model, reference = make_bert(), make_bert()
    splice.attach(model, splice.LoRA(r=2, alpha=4, targets=QV), "a")
    splice.attach(model, splice.LoRA(r=3, alpha=9, targets=["query"]), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    splice.activate(model, ["a", "b"])
    splice.attach(reference, splice.LoRA(r=5, alpha=5, targets=QV, rank_pattern={"value": 2},
                                         alpha_pattern={"value": 2}))
    with torch.no_grad():
        for name, _, host in hosts(reference):
            a = model.get_submodule(name).splice["a"]
            c = host["default"]
            if "value" in name:
                c.lora_A.copy_(a.lora_A)
                c.lora_B.copy_(a.lora_B * a.scaling)
                continue
            b = model.get_submodule(name).splice["b"]
            c.lora_A.copy_(torch.cat([a.lora_A, b.lora_A]))
            c.lora_B.copy_(torch.cat([a.lora_B * a.scaling, b.lora_B * b.scaling], dim=1))
    both = logits(model, input_ids=ids)
    assert_close(both, logits(reference, input_ids=ids), rel=1e-5)
    splice.merge(model)  # both active adapters fold in
    assert_close(logits(model, input_ids=ids), both, rel=1e-5)
    assert all(set(h.merged) == set(h) for _, _, h in hosts(model))


def test_only_active_adapters_train(bert):
    splice.attach(bert, splice.LoRA(r=2, targets=QV), "a")
    splice.attach(bert, splice.LoRA(r=2, targets=["key"]), "b")
    assert all(".splice.b." in n for n in splice.trainable_parameters(bert))
    splice.activate(bert, ["a", "b"])
    names = splice.trainable_parameters(bert)
    assert any(".splice.a." in n for n in names) and any(".splice.b." in n for n in names)
    splice.deactivate(bert)
    assert splice.trainable_parameters(bert) == {}


def test_activate_unknown_name(bert):
    splice.attach(bert, splice.LoRA(r=2, targets=QV), "a")
    with pytest.raises(splice.SpliceError, match="no adapter named") as err:
        splice.activate(bert, ["a", "nope"])
    assert "'a'" in str(err.value)  # lists what is attached
    assert splice.active_adapters(bert) == ["a"]


# -- switching the adapter off -------------------------------------------------------------


def test_deactivate_and_disabled_give_base_outputs(bert, ids):
    base = logits(bert, input_ids=ids)
    splice.attach(bert, splice.LoRA(r=4, targets=QV))
    randomize(bert)
    adapted = logits(bert, input_ids=ids)
    assert_differs(adapted, base)
    with splice.disabled(bert) as same:
        assert same is bert
        assert torch.equal(logits(bert, input_ids=ids), base)
        with splice.disabled(bert):  # blocks nest: leaving the inner one keeps the outer one's base
            pass
        assert torch.equal(logits(bert, input_ids=ids), base)
    assert torch.equal(logits(bert, input_ids=ids), adapted)
    splice.deactivate(bert)
    assert splice.active_adapters(bert) == []
    assert torch.equal(logits(bert, input_ids=ids), base)
    splice.activate(bert, "default")
    assert torch.equal(logits(bert, input_ids=ids), adapted)


def test_switching_a_pissa_adapter_off_gives_the_base_outputs(bert, ids):
    """PiSSA moved part of W into the adapter; "off" must still mean the base model."""
    base = logits(bert, input_ids=ids)
    splice.attach(bert, splice.LoRA(r=4, targets=QV, init="pissa"))
    randomize(bert, scale=0.1)
    adapted = logits(bert, input_ids=ids)
    assert_differs(adapted, base)
    with splice.disabled(bert):
        assert_close(logits(bert, input_ids=ids), base, rel=1e-5)
    splice.deactivate(bert)
    assert_close(logits(bert, input_ids=ids), base, rel=1e-5)
    splice.activate(bert, "default")
    assert torch.equal(logits(bert, input_ids=ids), adapted)


def test_disabled_restores_hosts_after_an_exception(bert, ids):
    splice.attach(bert, splice.LoRA(r=4, targets=QV))
    randomize(bert)
    adapted = logits(bert, input_ids=ids)
    with pytest.raises(RuntimeError), splice.disabled(bert):
        raise RuntimeError
    assert torch.equal(logits(bert, input_ids=ids), adapted)


def test_disabled_refuses_merged_adapters(bert):
    splice.attach(bert, splice.LoRA(r=4, targets=QV))
    splice.merge(bert)
    with pytest.raises(splice.MergeError, match="unmerge"), splice.disabled(bert):
        pass


def test_merge_one_named_adapter(bert, ids):
    splice.attach(bert, splice.LoRA(r=2, targets=QV), "a")
    splice.attach(bert, splice.LoRA(r=2, targets=QV), "b")
    randomize(bert, "a", seed=1)
    randomize(bert, "b", seed=2)
    splice.activate(bert, ["a", "b"])
    both = logits(bert, input_ids=ids)
    splice.merge(bert, "a")
    assert all(h.merged == ["a"] for _, _, h in hosts(bert))
    assert_close(logits(bert, input_ids=ids), both)
    splice.unmerge(bert, "a")
    assert all(h.merged == [] for _, _, h in hosts(bert))
    assert_close(logits(bert, input_ids=ids), both)
    with pytest.raises(splice.SpliceError, match="no adapter named"):
        splice.merge(bert, "c")


def test_merge_refuses_non_finite_results(bert):
    splice.attach(bert, splice.LoRA(r=2, targets=QV))
    randomize(bert)
    before = {n: b.weight.detach().clone() for n, b, _ in hosts(bert)}
    with torch.no_grad():
        bert.bert.encoder.layer[1].attention.self.value.splice["default"].lora_B.fill_(float("inf"))
        bert.bert.encoder.layer[1].attention.self.value.splice["default"].lora_A.fill_(1.0)
    with pytest.raises(splice.MergeError, match="inf/nan"):
        splice.merge(bert)
    for name, base, host in hosts(bert):  # the modules merged before it are taken out again
        assert host.merged == []
        torch.testing.assert_close(base.weight, before[name], atol=1e-6, rtol=0)
    assert torch.equal(bert.bert.encoder.layer[1].attention.self.value.weight,
                       before["bert.encoder.layer.1.attention.self.value"])


# -- removing adapters ---------------------------------------------------------------------


def test_detach_restores_base_outputs_and_heads(bert, ids):
    base = logits(bert, input_ids=ids)
    state = {k: v.clone() for k, v in bert.state_dict().items()}
    splice.attach(bert, splice.LoRA(r=4, targets=QV, train_also=["classifier"]))
    randomize(bert)
    randomize_module(bert.classifier)
    splice.merge(bert)  # detaching a merged adapter takes it out of the weights too
    assert_differs(logits(bert, input_ids=ids), base)
    assert splice.detach(bert, "default") is bert
    assert splice.adapters(bert) == {}
    assert no_splice_children(bert)
    assert_close(logits(bert, input_ids=ids), base, rel=1e-6)
    assert state.keys() == bert.state_dict().keys()
    for key, value in bert.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=1e-6, rtol=0)


def test_detach_unmerged_is_bit_exact(bert, ids):
    base = logits(bert, input_ids=ids)
    splice.attach(bert, splice.LoRA(r=4, targets=QV, train_also=["classifier"]))
    randomize(bert)
    randomize_module(bert.classifier)
    splice.detach(bert, "default")
    assert torch.equal(logits(bert, input_ids=ids), base)
    assert all(not m._forward_hooks for m in bert.modules())


def test_detach_one_of_two_keeps_the_other(bert, ids):
    splice.attach(bert, splice.LoRA(r=2, targets=QV, train_also=["classifier"]), "a")
    randomize(bert, "a")
    only_a = logits(bert, input_ids=ids)
    splice.attach(bert, splice.LoRA(r=2, targets=["query", "key"]), "b")
    randomize(bert, "b", seed=3)
    splice.detach(bert, "b")
    assert list(splice.adapters(bert)) == ["a"]
    assert host_of(bert.bert.encoder.layer[0].attention.self.key) is None
    splice.activate(bert, "a")
    assert torch.equal(logits(bert, input_ids=ids), only_a)
    with pytest.raises(splice.SpliceError, match="no adapter named"):
        splice.detach(bert, "b")


def test_unload_returns_the_plain_model_with_merged_outputs(bert, ids):
    keys = set(bert.state_dict())
    splice.attach(bert, splice.LoRA(r=4, targets=QV, train_also=["classifier"]))
    randomize(bert)
    randomize_module(bert.classifier, seed=5)
    head = bert.classifier.weight.detach().clone()
    adapted = logits(bert, input_ids=ids)
    plain = splice.unload(bert)
    assert plain is bert
    assert no_splice_children(plain)
    assert set(plain.state_dict()) == keys
    assert all(not m._forward_hooks for m in plain.modules())
    assert "_splice" not in plain.__dict__
    assert splice.adapters(plain) == {}
    assert torch.equal(plain.classifier.weight, head)  # trained heads stay trained
    assert_close(logits(plain, input_ids=ids), adapted, rel=1e-5)


def test_unload_drops_inactive_adapters_without_merging_them(bert, ids):
    splice.attach(bert, splice.LoRA(r=2, targets=QV), "a")
    randomize(bert, "a")
    only_a = logits(bert, input_ids=ids)
    splice.attach(bert, splice.LoRA(r=2, targets=QV), "b")
    randomize(bert, "b", seed=3)
    splice.activate(bert, "a")
    splice.unload(bert)
    assert no_splice_children(bert)
    assert_close(logits(bert, input_ids=ids), only_a, rel=1e-5)


def test_unload_restores_an_inactive_pissa_adapters_weights(bert, ids):
    base = logits(bert, input_ids=ids)
    splice.attach(bert, splice.LoRA(r=4, targets=QV, init="pissa"))
    randomize(bert)
    splice.deactivate(bert)
    splice.unload(bert)
    assert no_splice_children(bert)
    assert_close(logits(bert, input_ids=ids), base, rel=1e-5)


# -- names ---------------------------------------------------------------------------------


def test_duplicate_and_malformed_names(bert):
    splice.attach(bert, splice.LoRA(r=2, targets=QV), "task-1")
    with pytest.raises(splice.SpliceError, match="already attached"):
        splice.attach(bert, splice.LoRA(r=2, targets=["key"]), "task-1")
    assert host_of(bert.bert.encoder.layer[0].attention.self.key) is None
    for bad in ["a.b", "", "1st", "has space"]:
        with pytest.raises(splice.SpliceError, match="identifier"):
            splice.attach(bert, splice.LoRA(r=2, targets=["key"]), bad)
    assert list(splice.adapters(bert)) == ["task-1"]


# -- counting ------------------------------------------------------------------------------


def test_summary_counts_are_exact(bert):
    base_total = sum(p.numel() for p in bert.parameters())
    splice.attach(bert, splice.LoRA(r=4, targets=["query", "intermediate.dense"],
                                    rank_pattern={"intermediate.dense": 2},
                                    train_also=["classifier"]))
    # per layer: query 4 * (32 + 32) + intermediate 2 * (32 + 40); head 32 * 2 + 2
    adapter, head = 2 * (4 * (32 + 32) + 2 * (32 + 40)), 32 * 2 + 2
    s = splice.summary(bert)
    # the adapter trains its own copy of the classifier; the original stays with the frozen base
    assert (s.total, s.trainable, s.base) == (base_total + adapter + head, adapter + head, base_total)
    assert s.heads == {"classifier": head}
    [a] = s.adapters
    assert (a.name, a.method, a.parameters, a.trainable, a.active, a.modules) == (
        "default", "lora", adapter, adapter, True, 4)
    assert a.by_module_type == {"Linear": adapter}
    assert s.trainable_percent == pytest.approx(100 * (adapter + head) / (base_total + adapter + head))
    assert sum(p.numel() for p in splice.trainable_parameters(bert).values()) == adapter + head
    text = str(s)
    assert "adapter default (lora, active)" in text and "head classifier" in text
    assert f"{adapter:,}" in text and f"{base_total + adapter + head:,}" in text

    splice.attach(bert, splice.LoRA(r=1, targets=["key"]), "b")  # now the only active one
    s = splice.summary(bert)
    first, second = s.adapters
    assert (first.active, first.trainable, first.parameters) == (False, 0, adapter)
    assert (second.active, second.trainable, second.parameters) == (True, 2 * 64, 2 * 64)
    assert s.trainable == 2 * 64 and s.total == base_total + adapter + head + 2 * 64
    assert s.heads == {"classifier": head} and s.heads_trainable == {"classifier": 0}


def test_summary_by_module_type_for_conv1d(gpt2):
    splice.attach(gpt2, splice.LoRA(r=2, targets=["c_attn"]))
    s = splice.summary(gpt2)
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, Conv1D)
    assert s.adapters[0].by_module_type == {"Conv1D": 2 * 2 * (32 + 96)}
    assert s.heads == {} and s.trainable == 2 * 2 * (32 + 96)


def test_summary_shows_a_frozen_head_as_frozen(tmp_path):
    """A head loaded with a non-trainable adapter is counted but not as trainable."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    splice.attach(model, splice.LoRA(r=2, targets=["0"], train_also=["1"]))
    splice.save(model, tmp_path / "adapter")
    fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    splice.load(fresh, tmp_path / "adapter")
    s = splice.summary(fresh)
    assert s.heads == {"1": 10} and s.heads_trainable == {"1": 0} and s.trainable == 0
    assert [r[2] for r in s.rows() if r[0] == "head 1"] == ["0"]


def test_adapter_names_that_are_host_attributes_are_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    for name in ("merged", "active", "keys"):
        with pytest.raises(splice.SpliceError, match="reserved"):
            splice.attach(model, splice.LoRA(r=1, targets=["0"]), name)
    assert splice.adapters(model) == {}


def test_lora_bias_needs_a_layer_with_a_bias_and_merges_exactly():
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2))
    with pytest.raises(splice.SpliceError, match="has none"):
        splice.attach(model, splice.LoRA(r=1, targets=["0"], lora_bias=True))
    with pytest.raises(splice.SpliceError, match="DoRA"):
        splice.DoRA(r=1, lora_bias=True)
    splice.attach(model, splice.LoRA(r=1, alpha=2, targets=["1"], lora_bias=True))
    with torch.no_grad():
        model[1].splice["default"].lora_bias.fill_(0.5)
        model[1].splice["default"].lora_B.fill_(0.1)
    x = torch.randn(5, 4)
    expected = model(x)
    bias_before = model[1].bias.detach().clone()
    splice.merge(model)
    torch.testing.assert_close(model[1].bias, bias_before + 0.5 * 2.0)  # s * b, s = alpha / r = 2
    torch.testing.assert_close(model(x), expected)
    splice.unmerge(model)
    torch.testing.assert_close(model[1].bias, bias_before)
