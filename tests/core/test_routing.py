"""Mixed-adapter batches (`splice.route`): every row equals that row run alone with its adapter.

Both the grouped path (stacked low-rank factors, gathered per row, two bmm's) and the reference
path (one delta per adapter on its rows) are checked against one-row-at-a-time forwards, against
each other, for gradients, for generation (greedy, beam search, several return sequences), and
for the errors a user can make.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from helpers import VOCAB, assert_differs, logits, make_bert, make_convnet, make_gpt2, make_llama, randomize
from torch import nn

import splice
from splice.core import routing as routing_module
from splice.core.config import Adapter, AdapterConfig
from splice.core.host import host_of, hosts
from splice.core.layers import LayerInfo
from splice.core.lowrank import LowRank
from splice.core.route_context import routing_of
from splice.core.routing import Routing

LoRA = splice.LoRA

# Three adapters per model: different ranks and alphas, one rsLoRA, one PiSSA, and different
# module sets, so that on some hosts a routed adapter is absent.
SPECS = {
    "llama": (make_llama, {
        "a": LoRA(r=2, alpha=4, targets=["q_proj", "v_proj"]),
        "b": LoRA(r=4, alpha=3, rslora=True, targets=["q_proj", "k_proj", "o_proj", "down_proj"], layers=[1]),
        "c": LoRA(r=3, alpha=6, init="pissa", targets=["v_proj", "up_proj", "gate_proj"]),
    }),
    "gpt2": (make_gpt2, {  # transformers Conv1D hosts: weights stored transposed
        "a": LoRA(r=2, alpha=4, targets=["c_attn"]),
        "b": LoRA(r=4, alpha=3, rslora=True, targets=["c_fc", "c_proj"]),
        "c": LoRA(r=3, alpha=6, init="pissa", targets=["c_attn", "c_proj"], layers=[0]),
    }),
    "bert": (make_bert, {
        "a": LoRA(r=2, alpha=4, targets=["query", "value"]),
        "b": LoRA(r=4, alpha=3, rslora=True, targets=["key", "intermediate.dense"]),
        "c": LoRA(r=3, alpha=6, init="pissa", targets=["value", "output.dense"]),
    }),
}
ROWS = ["a", None, "c", "b", "c", "a", None]


def with_adapters(model_name: str) -> nn.Module:
    factory, configs = SPECS[model_name]
    model = factory()
    for seed, (name, config) in enumerate(configs.items()):
        splice.attach(model, config, name)
        randomize(model, name, scale=0.2, seed=seed + 1)
    return model


def batch(rows: int, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per row: the last hidden state and the logits, flattened."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return torch.cat([out.hidden_states[-1].flatten(1), out.logits.flatten(1)], dim=1)


def use(model: nn.Module, name: str | None) -> None:
    """Make `name` the only active adapter (None: none)."""
    if name is None:
        splice.deactivate(model)
    else:
        splice.activate(model, name)


def one_by_one(model: nn.Module, ids: torch.Tensor, rows: list[str | None], run=outputs) -> torch.Tensor:
    """Each row alone, with its adapter the only active one."""
    found = []
    for i, name in enumerate(rows):
        use(model, name)
        found.append(run(model, ids[i : i + 1]))
    return torch.cat(found)


@pytest.fixture
def grouped_calls(monkeypatch) -> list[tuple[str, ...]]:
    """The adapter names of every call of the grouped path."""
    calls: list[tuple[str, ...]] = []
    original = Routing._grouped

    def spy(self, host, used, *args, **kwargs):
        calls.append(tuple(used))
        return original(self, host, used, *args, **kwargs)

    monkeypatch.setattr(Routing, "_grouped", spy)
    original_apply = routing_module._Plan.apply

    def spy_apply(self, host, *args, **kwargs):  # the cached no-grad form of the grouped path
        calls.append(tuple(self.used))
        return original_apply(self, host, *args, **kwargs)

    monkeypatch.setattr(routing_module._Plan, "apply", spy_apply)
    return calls


# -- a mixed batch equals each row alone ---------------------------------------------------


@pytest.mark.parametrize("model_name", SPECS)
def test_mixed_batch_equals_each_row_alone(model_name, grouped_calls):
    model = with_adapters(model_name)
    on_hosts = [set(host) for _, _, host in hosts(model)]
    assert any(len(names) == 1 for names in on_hosts) and any(len(names) > 1 for names in on_hosts)
    ids = batch(len(ROWS))
    expected = one_by_one(model, ids, ROWS)
    base = outputs(splice.deactivate(model), ids)
    for i, name in enumerate(ROWS):  # every adapter really changes its rows
        if name is not None:
            assert_differs(expected[i], base[i])
    assert_differs(expected[0], expected[3])
    for grouped in (True, False):
        grouped_calls.clear()
        with splice.route(model, ROWS, grouped=grouped):
            routed = outputs(model, ids)
        assert torch.allclose(routed, expected, rtol=0, atol=1e-5), (grouped, (routed - expected).abs().max())
        assert bool(grouped_calls) == grouped  # the path under test really ran
        if grouped:
            assert {"a", "b", "c"} <= {n for used in grouped_calls for n in used}


def test_grouped_path_equals_reference_path():
    model = with_adapters("llama")
    ids = batch(len(ROWS), length=9, seed=4)
    with splice.route(model, ROWS, grouped=True):
        grouped = outputs(model, ids)
    with splice.route(model, ROWS, grouped=False):
        reference = outputs(model, ids)
    assert torch.allclose(grouped, reference, rtol=0, atol=2e-6), (grouped - reference).abs().max()


def test_rows_of_one_adapter_and_all_none():
    model = with_adapters("gpt2")
    ids = batch(3)
    for rows in (["b", "b", "b"], [None, None, None]):
        for grouped in (True, False):
            with splice.route(model, rows, grouped=grouped):
                routed = outputs(model, ids)
            use(model, rows[0])
            assert torch.allclose(routed, outputs(model, ids), rtol=0, atol=1e-5)


def test_route_restores_the_active_adapters_afterwards():
    model = with_adapters("llama")
    splice.activate(model, ["a", "c"])
    ids = batch(3)
    before = outputs(model, ids)
    with splice.route(model, ["b", None, "b"]):
        assert not torch.allclose(outputs(model, ids), before, atol=1e-3)
    assert torch.equal(outputs(model, ids), before)
    with pytest.raises(RuntimeError), splice.route(model, ["b", None, "b"]):
        raise RuntimeError
    assert all(routing_of(host) is None for _, _, host in hosts(model))
    assert torch.equal(outputs(model, ids), before)
    assert splice.active_adapters(model) == ["a", "c"]


def test_half_precision_base_with_fp32_adapters():
    """The grouped sum is cast to the base output's dtype (the adapter factors stay fp32)."""
    model = make_llama().to(torch.bfloat16)
    for seed, (name, config) in enumerate(SPECS["llama"][1].items()):
        splice.attach(model, config, name)
        randomize(model, name, scale=0.2, seed=seed + 1)
    assert next(iter(host_of(model.model.layers[0].self_attn.q_proj).values())).lora_A.dtype == torch.float32
    ids = batch(len(ROWS))
    expected = one_by_one(model, ids, ROWS).float()
    scale = expected.abs().max()
    for grouped in (True, False):
        with splice.route(model, ROWS, grouped=grouped):
            routed = outputs(model, ids)
        assert routed.dtype == torch.bfloat16
        assert ((routed.float() - expected).abs().max() / scale) < 0.02


def test_stacked_factors_follow_in_place_updates():
    """Without grad the grouped stacks are cached; an optimizer step in place must invalidate them."""
    model = with_adapters("llama")
    ids = batch(3)
    rows = ["a", "b", None]
    with splice.route(model, rows), torch.no_grad():
        first = outputs(model, ids)
        for _, _, host in hosts(model):
            if "a" in host:
                host["a"].lora_B.mul_(-2.0)
        second = outputs(model, ids)
    assert_differs(second[0], first[0])
    assert torch.equal(second[1:], first[1:])
    assert torch.allclose(second, one_by_one(model, ids, rows), rtol=0, atol=1e-5)


def test_stacked_factors_follow_a_dtype_change_of_the_model():
    """The cached stacks are rebuilt when the factors' storage changes (`model.to` swaps `.data`)."""
    model = with_adapters("llama")
    ids = batch(3)
    rows = ["a", "b", None]
    with splice.route(model, rows), torch.no_grad():
        outputs(model, ids)
        model.double()
        routed = outputs(model, ids)
    expected = one_by_one(model, ids, rows)
    assert routed.dtype == expected.dtype == torch.float64
    assert torch.allclose(routed, expected, rtol=0, atol=1e-12), (routed - expected).abs().max()


# -- gradients -----------------------------------------------------------------------------


def per_row_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(out.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def adapter_parameters(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {f"{module}.{p}": param for module, _, host in hosts(model) if name in host
            for p, param in host[name].named_parameters()}


@pytest.mark.parametrize("grouped", [True, False])
def test_each_adapter_gets_the_gradient_of_training_it_alone(grouped):
    model = with_adapters("llama")
    splice.attach(model, LoRA(r=2, targets=["q_proj", "up_proj"]), "unused")
    randomize(model, "unused", seed=9)
    names = ["a", "b", "c"]
    rows = ["a", "c", None, "b", "a", "c", "a"]
    ids = batch(len(rows), length=7, seed=2)

    splice.activate(model, [*names, "unused"])  # all trainable at once
    params = {n: adapter_parameters(model, n) for n in [*names, "unused"]}
    assert all(p.requires_grad for group in params.values() for p in group.values())
    with splice.route(model, rows, grouped=grouped):
        losses = per_row_loss(model, ids)
    index = {n: torch.tensor([i for i, r in enumerate(rows) if r == n]) for n in names}
    loss = sum(losses[index[n]].mean() for n in names)
    flat = [p for group in params.values() for p in group.values()]
    grads = dict(zip(map(id, flat), torch.autograd.grad(loss, flat, allow_unused=True), strict=True))

    assert all(grads[id(p)] is None for p in params["unused"].values())  # not in the batch: no grad
    for name in names:
        splice.activate(model, name)
        alone = per_row_loss(model, ids[index[name]]).mean()
        expected = torch.autograd.grad(alone, list(params[name].values()))
        assert any(key.endswith("lora_A") for key in params[name])
        assert any(key.endswith("lora_B") for key in params[name])
        for (key, param), want in zip(params[name].items(), expected, strict=True):
            got = grads[id(param)]
            assert want.abs().max() > 0, key
            assert torch.allclose(got, want, rtol=0, atol=1e-5), (name, key, (got - want).abs().max())


@pytest.mark.parametrize("grouped", [True, False])
def test_gradient_checkpointing_with_backward_inside_the_block(grouped):
    """The recompute runs during backward, so backward must run while the routing is on; then
    the gradients (dropout masks included, from the checkpoint's saved RNG state) are unchanged."""
    grads = []
    for checkpointing in (False, True):
        model = dropout_llama(grouped_ok=True).train()
        splice.activate(model, ["a", "b"])
        if checkpointing and hasattr(model, "activation_checkpointing_enable"):  # transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = batch(4)
        torch.manual_seed(3)
        with splice.route(model, ["b", None, "a", "a"], grouped=grouped):
            per_row_loss(model, ids).sum().backward()
        grads.append({n: p.grad for n, p in splice.trainable_parameters(model).items()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, grad in grads[0].items():
        assert grad.abs().max() > 0
        assert torch.allclose(grads[1][name], grad, rtol=0, atol=1e-6), name


def test_base_weights_are_not_copied_or_changed():
    """Spec 10 (d)(3): one backbone for every adapter: same data_ptr, same values, no grad."""
    model = with_adapters("llama")
    splice.activate(model, ["a", "b", "c"])
    base = {n: p for n, p in model.named_parameters() if ".splice." not in n}
    assert base and not any(p.requires_grad for p in base.values())
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in base.items()}
    ids = batch(len(ROWS))
    for grouped in (True, False):
        with splice.route(model, ROWS, grouped=grouped):
            per_row_loss(model, ids).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".splice." in n and "lora_" in n)
    for name, param in model.named_parameters():
        if ".splice." not in name:
            ptr, values = before[name]
            assert param.data_ptr() == ptr, name
            assert torch.equal(param, values), name
            assert param.grad is None, name


# -- generation ----------------------------------------------------------------------------


GENERATE = {
    "greedy": {},
    "beam": {"num_beams": 3},
    "beam-2-returned": {"num_beams": 3, "num_return_sequences": 2},
}


@pytest.mark.parametrize("grouped", [True, False])
def test_generate_gives_each_row_its_own_tokens(grouped):
    model = with_adapters("llama")
    model.generation_config.eos_token_id = None  # every sequence runs to max_new_tokens
    rows = ["a", None, "c", "b"]
    ids = batch(len(rows), length=5, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # one left-padded prompt
    common = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}

    for kind, options in GENERATE.items():
        per_row = options.get("num_return_sequences", 1)
        with splice.route(model, rows, grouped=grouped):
            routed = model.generate(input_ids=ids, attention_mask=mask, **common, **options)
        assert routed.shape == (len(rows) * per_row, ids.shape[1] + 6)
        alone = []
        for i, name in enumerate(rows):
            use(model, name)
            alone.append(model.generate(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1],
                                        **common, **options))
        alone = torch.cat(alone)
        assert torch.equal(routed, alone), kind
        splice.deactivate(model)
        base = model.generate(input_ids=ids, attention_mask=mask, **common, **options)
        assert not torch.equal(routed, base)  # the adapters change what is generated


# -- non-Linear hosts take the reference path ----------------------------------------------


def test_conv_and_embedding_hosts_on_the_convnet(grouped_calls):
    model = make_convnet()
    splice.attach(model, LoRA(r=2, alpha=3, targets=["embed", "conv1", "conv2", "head"]), "a")
    splice.attach(model, LoRA(r=3, alpha=2, targets=["conv1", "conv2"]), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    rows = ["a", "b", None, "a"]
    ids = batch(4, length=11, seed=5)
    ids[0, -2:] = 0  # padding_idx
    image = torch.randn(4, 3, 7, 9, generator=torch.Generator().manual_seed(6))

    def run(model, ids_row, image_row):
        return logits(model, ids_row, image_row)

    expected = []
    for i, name in enumerate(rows):
        use(model, name)
        expected.append(run(model, ids[i : i + 1], image[i : i + 1]))
    expected = torch.cat(expected)
    base = run(splice.deactivate(model), ids, image)
    assert_differs(expected[0], base[0])
    assert_differs(expected[1], base[1])
    for grouped in (True, False):
        grouped_calls.clear()
        with splice.route(model, rows, grouped=grouped):
            routed = run(model, ids, image)
        assert torch.allclose(routed, expected, rtol=0, atol=1e-5), (routed - expected).abs().max()
        assert grouped_calls == ([("a",)] if grouped else [])  # only the Linear head is grouped


def test_embedding_lora_on_llama():
    model = make_llama()
    splice.attach(model, LoRA(r=2, alpha=4, targets=["embed_tokens", "q_proj"]), "e")
    splice.attach(model, LoRA(r=3, alpha=3, targets=["embed_tokens"]), "f")
    randomize(model, "e", seed=1)
    randomize(model, "f", seed=2)
    assert host_of(model.model.embed_tokens).info.kind == "embedding"
    rows = ["e", None, "f", "f", "e"]
    ids = batch(len(rows))
    expected = one_by_one(model, ids, rows)
    assert_differs(expected[2], outputs(splice.deactivate(model), ids)[2])
    for grouped in (True, False):
        with splice.route(model, rows, grouped=grouped):
            routed = outputs(model, ids)
        assert torch.allclose(routed, expected, rtol=0, atol=1e-5), (routed - expected).abs().max()


# -- the protocol, not LoRA: a custom low-rank adapter is grouped with LoRA ------------------


class Factored(Adapter):
    """delta(x) = c * (x P) Q with P: [in, r], Q: [r, out]: low-rank, stored unlike LoRA."""

    def __init__(self, info: LayerInfo, r: int, c: float) -> None:
        super().__init__()
        self.P = nn.Parameter(torch.randn(info.in_features, r) * 0.3)
        self.Q = nn.Parameter(torch.randn(r, info.out_features) * 0.3)
        self.c = c
        self.calls = 0

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (x @ self.P) @ self.Q * self.c

    def delta_weight(self) -> torch.Tensor:
        return (self.P @ self.Q).T * self.c

    def low_rank_factors(self) -> LowRank:
        return LowRank(self.P.T, self.Q.T, self.c)


@dataclass(kw_only=True)
class FactoredConfig(AdapterConfig):
    method: ClassVar[str] = "test-factored"
    r: int = 2
    c: float = 0.5

    def build(self, info: LayerInfo, module_name: str, base: nn.Module) -> Factored:
        return Factored(info, self.r, self.c)


def test_a_custom_low_rank_adapter_is_grouped_with_lora(grouped_calls):
    model = make_llama()
    splice.attach(model, LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]), "lora")
    randomize(model, "lora", seed=1)
    torch.manual_seed(5)
    splice.attach(model, FactoredConfig(r=3, c=0.7, targets=["v_proj", "o_proj"]), "custom")
    customs = [host["custom"] for _, _, host in hosts(model) if "custom" in host]
    rows = ["custom", "lora", None, "custom", "lora"]
    ids = batch(len(rows))
    expected = one_by_one(model, ids, rows)
    assert sum(a.calls for a in customs) > 0  # run alone, the adapter's own delta() is used
    assert_differs(expected[0], outputs(splice.deactivate(model), ids)[0])

    for a in customs:
        a.calls = 0
    with splice.route(model, rows):
        routed = outputs(model, ids)
    assert torch.allclose(routed, expected, rtol=0, atol=1e-5), (routed - expected).abs().max()
    assert sum(a.calls for a in customs) == 0  # ... and routed, only its low_rank_factors()
    assert {"lora", "custom"} in [set(used) for used in grouped_calls]  # one grouped op on v_proj

    with splice.route(model, rows, grouped=False):
        assert torch.allclose(outputs(model, ids), expected, rtol=0, atol=1e-5)
    assert sum(a.calls for a in customs) > 0

    splice.activate(model, "custom")  # the test adapter is self-consistent: merged == unmerged
    splice.merge(model, "custom")
    assert torch.allclose(outputs(model, ids[:1]), expected[:1], rtol=0, atol=1e-5)


# -- errors and interplay with the other verbs ---------------------------------------------


def test_unknown_adapter_name_lists_the_attached_ones():
    model = with_adapters("llama")
    with pytest.raises(splice.SpliceError, match="no adapter named") as err, splice.route(model, ["a", "zz", None]):
        pass
    message = str(err.value)
    assert "zz" in message and all(repr(n) in message for n in ("a", "b", "c"))
    assert all(routing_of(host) is None for _, _, host in hosts(model))


def test_row_count_that_does_not_fit_the_batch():
    model = with_adapters("llama")
    ids = batch(2)
    with pytest.raises(splice.SpliceError, match=r"3 adapter ids.*batch of 2 rows"), \
            splice.route(model, ["a", "b", None]):
        outputs(model, ids)
    assert all(routing_of(host) is None for _, _, host in hosts(model))
    with splice.route(model, ["a", "a"]):  # the failed block left nothing behind
        routed = outputs(model, ids)
    assert torch.allclose(routed, one_by_one(model, ids, ["a", "a"]), rtol=0, atol=1e-5)


def test_merged_adapters_are_refused():
    model = with_adapters("llama")
    splice.merge(model, "a")
    with pytest.raises(splice.MergeError, match="unmerge"), splice.route(model, ["b", None]):
        pass
    splice.unmerge(model)
    with splice.route(model, ["a", None]):
        pass


def test_empty_id_list_is_refused():
    model = with_adapters("llama")
    with pytest.raises(splice.SpliceError, match="empty"), splice.route(model, []):
        pass


def test_nested_route_restores_the_outer_routing():
    model = with_adapters("llama")
    ids = batch(3)
    outer_rows, inner_rows = ["a", "b", None], ["c", None, "a"]
    outer, inner = one_by_one(model, ids, outer_rows), one_by_one(model, ids, inner_rows)
    assert_differs(outer, inner)
    with splice.route(model, outer_rows):
        assert torch.allclose(outputs(model, ids), outer, rtol=0, atol=1e-5)
        with splice.route(model, inner_rows):
            assert torch.allclose(outputs(model, ids), inner, rtol=0, atol=1e-5)
        assert torch.allclose(outputs(model, ids), outer, rtol=0, atol=1e-5)


def test_disabled_gives_the_base_output_inside_route():
    model = with_adapters("llama")  # PiSSA adapter "c": the base output needs its part given back
    ids = batch(4)
    rows = ["a", "b", "c", None]
    base = outputs(splice.deactivate(model), ids)
    with splice.route(model, rows):
        assert_differs(outputs(model, ids), base)
        with splice.disabled(model):
            assert torch.equal(outputs(model, ids), base)
    with splice.disabled(model), splice.route(model, rows):
        assert torch.equal(outputs(model, ids), base)


def dropout_llama(grouped_ok: bool) -> nn.Module:
    """Two LoRAs with dropout (grouped), and optionally a PiSSA one with dropout (reference path)."""
    model = make_llama()
    splice.attach(model, LoRA(r=2, alpha=4, dropout=0.5, targets=["q_proj", "v_proj"]), "a")
    splice.attach(model, LoRA(r=3, alpha=3, dropout=0.3, targets=["v_proj", "down_proj"]), "b")
    if not grouped_ok:
        splice.attach(model, LoRA(r=2, alpha=2, dropout=0.2, init="pissa", targets=["v_proj"]), "c")
    for seed, name in enumerate(splice.adapters(model)):
        randomize(model, name, scale=0.3, seed=seed + 1)
    return model


def test_eval_mode_turns_dropout_off_in_the_grouped_path(grouped_calls):
    model = dropout_llama(grouped_ok=True).eval()
    rows = ["a", None, "b", "a"]
    ids = batch(len(rows))
    expected = one_by_one(model, ids, rows)
    with splice.route(model, rows):
        first, second = outputs(model, ids), outputs(model, ids)
    assert grouped_calls
    assert torch.equal(first, second)
    assert torch.allclose(first, expected, rtol=0, atol=1e-5)
    model.train()
    with splice.route(model, rows):
        assert not torch.allclose(outputs(model, ids), outputs(model, ids), atol=1e-4)  # dropout on


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("with_pissa", [False, True])
def test_rows_without_an_adapter_are_exactly_base_under_dropout(grouped, with_pissa):
    model = dropout_llama(grouped_ok=not with_pissa).train()
    rows = [None, "a", "b", None] + (["c"] if with_pissa else [])
    ids = batch(len(rows))
    with splice.disabled(model):
        base = outputs(model, ids)
    splice.activate(model, list(splice.adapters(model)))
    none_rows = [i for i, r in enumerate(rows) if r is None]
    runs = []
    for _ in range(2):
        with splice.route(model, rows, grouped=grouped):
            runs.append(outputs(model, ids))
        assert torch.equal(runs[-1][none_rows], base[none_rows])
        assert_differs(runs[-1][1], base[1])
    for i, name in enumerate(rows):  # every adapter's rows see its dropout (PiSSA's included)
        if name is not None:
            assert not torch.allclose(runs[0][i], runs[1][i], atol=1e-4), name
