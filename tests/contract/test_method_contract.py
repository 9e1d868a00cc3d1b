"""The contract every registered adapter method keeps (issue 14), one parametrised suite.

Every method the library registers (`splice.core.registry.method_names()`) is run through the
same checks on tiny models, on every host kind it supports:

    attach      selects the expected modules, freezes the base, trains the adapter (and heads)
    init        a zero delta at init leaves every output bit-identical, where the form
                promises it (and a form that does not promise it really starts non-zero)
    randomised  non-zero adapter parameters change the output (so the equalities below bite)
    save/load   into a fresh model: the same outputs (atol 1e-6) and the same config
    merge       merged == unmerged (atol 1e-5), unmerge gives the base weights back, detach of a
                merged adapter too; a form without a weight change is refused with MergeError
    route       each row of a mixed batch (two adapters of the method and the base) equals that
                row run alone, on the grouped and the reference path; where the form cannot
                share a batch, a SpliceError that says so
    detach      the base outputs and state dict exactly, and no splice module left (and
                `splice.disabled` gives the base outputs while attached)
    gradients   reach the adapter and the `train_also` head only

What each method supports and promises is written down once, in `METHODS` below. A newly
registered method is picked up automatically and fails until its row is added there; its own
file then only needs what is special about it. Methods registered by test modules (a custom
method in tests/io) are not the library's and are left out.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from helpers import VOCAB, assert_differs, logits, make_bert, make_convnet, make_gpt2, make_llama, randomize
from torch import nn
from transformers import PreTrainedModel

import splice
from splice.core.config import AdapterConfig
from splice.core.errors import MergeError, SpliceError
from splice.core.host import hosts
from splice.core.registry import config_class, method_names
from splice.placement import page

ROWS = 3  # the mixed batch routes ["b", None, "a"]

# -- models and their inputs ----------------------------------------------------------------


def token_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (ROWS, 11), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids}


def masked_token_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    ids = token_inputs(seed)["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def conv_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (ROWS, 11), generator=generator)
    ids[0, -2:] = 0  # the embedding's padding_idx
    return {"ids": ids, "image": torch.randn(ROWS, 3, 7, 9, generator=generator)}


# model name -> (factory, batch of ROWS rows as keyword arguments, every tensor batch-first)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, torch.Tensor]]]] = {
    "bert": (make_bert, token_inputs),            # nn.Linear hosts, a sequence-classification head
    "gpt2": (make_gpt2, token_inputs),            # transformers' Conv1D hosts
    "llama": (make_llama, masked_token_inputs),   # transformer blocks
    "convnet": (make_convnet, conv_inputs),       # Embedding, Conv1d, Conv2d
}


@dataclass(frozen=True)
class Site:
    """A host kind on one tiny model: what the config targets and the modules that selects."""

    model: str
    targets: list[str] | None
    expected: tuple[str, ...]
    train_also: tuple[str, ...] = ()


SITES: dict[str, Site] = {
    # square and non-square layers (32 -> 32, 32 -> 40; Conv1D 32 -> 96, 32 -> 128, 128 -> 32)
    "linear": Site("bert", ["query", "value", "intermediate.dense"], tuple(
        f"bert.encoder.layer.{i}.{n}" for i in (0, 1)
        for n in ("attention.self.query", "attention.self.value", "intermediate.dense")),
        train_also=("classifier",)),
    "conv1d": Site("gpt2", ["c_attn", "c_fc", "c_proj"], tuple(
        f"transformer.h.{i}.{n}" for i in (0, 1) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))),
    "conv2d": Site("convnet", ["conv2"], ("conv2",)),
    "conv+embedding": Site("convnet", ["embed", "conv1", "conv2"], ("embed", "conv1", "conv2")),
    "block": Site("llama", None, ("model.layers.0", "model.layers.1")),  # site="block": targets=None
}


def probe_batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    """Labelled BERT batches for DomLoRA's placement probe."""
    generator = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(1, VOCAB, (4, 11), generator=generator),
             "labels": torch.randint(0, 2, (4,), generator=generator)} for _ in range(n)]


def domlora_top(model: nn.Module, site: Site) -> tuple[str, ...]:
    """What DomLoRA must choose: the top modules of PAGE on the same probe."""
    return tuple(page(model, probe_batches(), "all-linear", r=2).top(2))


# -- the table: one row per registered method -------------------------------------------------

Route = Literal["grouped", "reference", "refused"]


@dataclass(frozen=True)
class Contract:
    """What one method supports and promises.

    sites: the host kinds it adapts (keys of SITES).
    options: its hyperparameters in the suite (small, fast, dropout off).
    zero_init: attaching it leaves every output unchanged (False: it starts with a non-zero edit).
    mergeable: it has an exact weight change (`Adapter.has_weight_form()`), so `merge` works.
    route: in a mixed batch, "grouped" (LoRA-shaped factors, `low_rank_factors()`, applied in one
        grouped matmul on Linear hosts, the reference path elsewhere), "reference" (one `delta`
        per adapter on its rows) or "refused" (a SpliceError naming `route`).
    config: builds the config for a site (default: the method's class with the site's targets).
    expected: the modules it must select on a model (default: the site's).
    """

    sites: tuple[str, ...]
    zero_init: bool
    mergeable: bool
    route: Route
    options: dict[str, Any] = field(default_factory=dict)
    config: Callable[[Site], AdapterConfig] | None = None
    expected: Callable[[nn.Module, Site], tuple[str, ...]] | None = None
    scale: float = 0.3  # std of a randomised adapter's values (a train multiplies many cores: larger)


METHODS: dict[str, Contract] = {
    "lora": Contract(("linear", "conv1d", "conv+embedding"), zero_init=True, mergeable=True, route="grouped",
                     options={"r": 2, "alpha": 4}),
    "dora": Contract(("linear", "conv1d"), zero_init=True, mergeable=True, route="reference",
                     options={"r": 2, "alpha": 4}),
    "diablo": Contract(("linear", "conv1d"), zero_init=True, mergeable=True, route="reference",
                       options={"blocks": 4}),
    "ttlora": Contract(("linear", "conv1d"), zero_init=True, mergeable=True, route="grouped",
                       options={"r": 2, "alpha": 4}),
    # Frozen singular slice and random basis; only v trains (starts at zero).
    "tinylora": Contract(("linear", "conv1d"), zero_init=True, mergeable=True, route="grouped",
                         options={"r": 2, "u": 3}),
    # As released, every core starts Gaussian: a small non-zero edit at init (`init="zero"` starts at 0).
    "loretta": Contract(("linear", "conv1d"), zero_init=False, mergeable=True, route="grouped",
                        options={"r": 2, "tensor_rank": 2, "alpha": 4}, scale=0.6),
    # README: merges only at one rank (`delta_weight_at`); needs the whole batch to pick ranks.
    "flexilora": Contract(("linear", "conv1d"), zero_init=True, mergeable=False, route="refused",
                          options={"ranks": [2, 4]}),
    # README: the router makes it input-dependent (no merge); it routes tokens of any subset of rows.
    "moelora": Contract(("linear", "conv1d"), zero_init=True, mergeable=False, route="reference",
                        options={"experts": 3, "top_k": 2, "r": 6, "shared_experts": 1}),
    # README: not a weight change; no mixed batches; pyreft's init is a non-zero edit.
    "loreft": Contract(("block",), zero_init=False, mergeable=False, route="refused",
                       options={"r": 2, "positions": "f1+l1"}),
    # README: non-linear, cannot be merged.
    "conv_adapter": Contract(("conv2d",), zero_init=True, mergeable=False, route="reference",
                             options={"reduction": 2}),
    "rep_conv_adapter": Contract(("conv2d",), zero_init=True, mergeable=True, route="reference"),
    # Attaches its form (LoRA here) at the top-2 modules by PAGE on the probe.
    "domlora": Contract(("linear",), zero_init=True, mergeable=True, route="grouped",
                        config=lambda site: splice.DomLoRA(r=2, top_k=2, probe=probe_batches(),
                                                           train_also=list(site.train_also)),
                        expected=domlora_top),
}


# Contract checks a method fails today because of a bug (not a documented limitation): strict
# xfails, so the suite stays green and turns red the moment the bug is fixed (delete the entry).
# Key: (test function, method).
KNOWN_BUGS: dict[tuple[str, str], str] = {}  # (test, method) -> why it fails; strict xfail


def library_methods() -> list[str]:
    """Registered methods defined by splice itself (not test-only registrations)."""
    return [m for m in method_names() if config_class(m).__module__.startswith("splice.")]


def cases() -> list[Any]:
    params = []
    for method in library_methods():
        contract = METHODS.get(method)
        if contract is None:  # fails in every check, telling the author what to add
            params.append(pytest.param((method, None), id=f"{method}-NOT-IN-TABLE"))
            continue
        params += [pytest.param((method, site), id=f"{method}-{site}") for site in contract.sites]
    return params


def missing_row(method: str) -> str:
    return (f"method {method!r} is registered but has no row in METHODS of {Path(__file__).name}: add "
            f"{method!r}: Contract(sites=..., zero_init=..., mergeable=..., route=...) saying which hosts "
            f"it adapts (one of {sorted(SITES)}) and what it promises, so the contract suite checks it")


# -- a method on one site ---------------------------------------------------------------------


@dataclass
class Case:
    method: str
    contract: Contract
    site: Site

    def model(self) -> nn.Module:
        return MODELS[self.site.model][0]()

    def inputs(self) -> dict[str, torch.Tensor]:
        return MODELS[self.site.model][1]()

    def config(self) -> AdapterConfig:
        if self.contract.config is not None:
            return self.contract.config(self.site)
        cls = config_class(self.method)
        return cls(targets=self.site.targets, train_also=list(self.site.train_also), **self.contract.options)

    def attached(self, name: str = "default", model: nn.Module | None = None) -> nn.Module:
        model = self.model() if model is None else model
        return splice.attach(model, self.config(), name)

    def expected(self, model: nn.Module) -> tuple[str, ...]:
        return self.contract.expected(model, self.site) if self.contract.expected else self.site.expected

    def randomize(self, model: nn.Module, name: str = "default", seed: int = 0) -> None:
        randomize(model, name, scale=self.contract.scale, seed=seed)


@pytest.fixture(params=cases())
def case(request) -> Case:
    method, site = request.param
    if site is None:
        pytest.fail(missing_row(method))
    bug = KNOWN_BUGS.get((request.node.originalname, method))
    if bug is not None:
        request.applymarker(pytest.mark.xfail(reason=bug, strict=True))
    return Case(method, METHODS[method], SITES[site])


def out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[rows, ...] of what the checks compare: a transformers model's logits and its last hidden
    states side by side (the tiny models' logits are ~1e-2, the hidden states ~1, so an error in
    an adapter shows in the hidden states long before it reaches the head), else the output."""
    if not isinstance(model, PreTrainedModel):
        return logits(model, **inputs)
    with torch.no_grad():
        result = model(**inputs, output_hidden_states=True)
    return torch.cat([result.logits.flatten(1), result.hidden_states[-1].flatten(1)], dim=1)


def assert_near(actual: torch.Tensor, expected: torch.Tensor, atol: float, msg: Any = None) -> None:
    """|actual - expected| <= atol for outputs of unit scale, atol * max|expected| above it (fp32
    rounding grows with the values: GPT-2's last hidden states reach ~3)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=0, msg=msg)


def row(inputs: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i:i + 1] for k, v in inputs.items()}


def adapter_modules(model: nn.Module, name: str = "default") -> dict[str, nn.Module]:
    return {module_name: host[name] for module_name, _, host in hosts(model) if name in host}


def adapter_parameters(model: nn.Module, name: str = "default") -> list[nn.Parameter]:
    return [p for adapter in adapter_modules(model, name).values() for p in adapter.parameters()]


def head_parameters(model: nn.Module, site: Site) -> list[nn.Parameter]:
    """The tensors the `train_also` modules compute with now (the active adapter's copies)."""
    return [p for head in site.train_also for p in model.get_submodule(head).parameters()]


def splice_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if "splice" in n.split(".") or "splice_heads" in n.split(".") or type(m).__module__.startswith("splice.")]


# -- the table itself -------------------------------------------------------------------------


def test_every_registered_method_has_a_row_and_every_row_a_method():
    registered = library_methods()
    missing = [m for m in registered if m not in METHODS]
    assert not missing, "\n".join(missing_row(m) for m in missing)
    stale = sorted(set(METHODS) - set(registered))
    assert not stale, f"METHODS has rows for methods that are not registered: {stale}; remove them"
    for method, contract in METHODS.items():
        assert contract.sites and set(contract.sites) <= set(SITES), (method, contract.sites)


def test_every_method_config_class_is_exported_from_splice():
    """`splice.<Class>` for every registered method (re-exported from `splice.methods.__all__`)."""
    for method in library_methods():
        cls = config_class(method)
        assert getattr(splice, cls.__name__, None) is cls, f"splice.{cls.__name__} is not exported"
        assert cls.__name__ in splice.__all__


# -- the contract -----------------------------------------------------------------------------


def test_attach_selects_the_expected_modules_and_freezes_the_base(case):
    model = case.model()
    base_params = list(model.parameters())
    expected = case.expected(model)
    case.attached(model=model)
    assert sorted(adapter_modules(model)) == sorted(expected)
    assert splice.active_adapters(model) == ["default"]
    assert all(not p.requires_grad for p in base_params), "attach left base parameters trainable"
    adapters = adapter_parameters(model)
    assert adapters and all(p.requires_grad for p in adapters)
    heads = head_parameters(model, case.site)
    assert all(p.requires_grad for p in heads)
    assert not {id(p) for p in heads} & {id(p) for p in base_params}, "train_also trains the original head"
    trainable = {id(p) for p in splice.trainable_parameters(model).values()}
    assert trainable == {id(p) for p in adapters + heads}


def test_zero_delta_at_init_where_promised(case):
    model = case.model()
    inputs = case.inputs()
    base = out(model, inputs)
    case.attached(model=model)
    if case.contract.zero_init:
        assert torch.equal(out(model, inputs), base), f"{case.method} promises a zero delta at init"
    else:
        assert_differs(out(model, inputs), base)  # the table says this form starts non-zero


def test_randomised_adapter_changes_the_output(case):
    model = case.model()
    inputs = case.inputs()
    base = out(model, inputs)
    case.attached(model=model)
    case.randomize(model)
    assert all(p.abs().sum() > 0 for p in adapter_parameters(model))
    assert_differs(out(model, inputs), base)


def saved_and_loaded(case: Case, tmp_path: Path) -> tuple[nn.Module, nn.Module]:
    """A randomised adapter, saved, and loaded into a fresh copy of the base model."""
    model = case.attached()
    case.randomize(model)
    splice.save(model, tmp_path / "adapter")
    return model, splice.load(case.model(), tmp_path / "adapter")


def test_save_then_load_into_a_fresh_model_gives_the_same_outputs(case, tmp_path):
    model, loaded = saved_and_loaded(case, tmp_path)
    inputs = case.inputs()
    assert sorted(adapter_modules(loaded)) == sorted(adapter_modules(model))
    assert_near(out(loaded, inputs), out(model, inputs), atol=1e-6)


def test_save_then_load_gives_the_same_config(case, tmp_path):
    model, loaded = saved_and_loaded(case, tmp_path)
    original, reloaded = splice.adapters(model)["default"], splice.adapters(loaded)["default"]
    assert type(reloaded) is type(original)
    where = ("targets", "exclude", "layers", "layers_pattern")  # a file names its modules explicitly
    assert ({k: v for k, v in reloaded.to_dict().items() if k not in where}
            == {k: v for k, v in original.to_dict().items() if k not in where})


def test_merge_equals_unmerged_and_unmerge_restores_the_base_or_is_refused(case):
    model = case.model()
    inputs = case.inputs()
    base = out(model, inputs)
    weights = copy.deepcopy(model.state_dict())  # the base's own tensors, by their names
    case.attached(model=model)
    case.randomize(model)
    unmerged = out(model, inputs)
    forms = {a.has_weight_form() for a in adapter_modules(model).values()}
    assert forms == {case.contract.mergeable}, f"table says mergeable={case.contract.mergeable}"

    if not case.contract.mergeable:
        with pytest.raises(MergeError, match="cannot be merged"):
            splice.merge(model)
        assert all(not host.merged for _, _, host in hosts(model))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
        assert torch.equal(out(model, inputs), unmerged)
        return

    splice.merge(model)
    assert all(host.merged == ["default"] for _, _, host in hosts(model))
    merged = out(model, inputs)
    # fp32 rounding of the merged weight, amplified by GPT-2's layers: 2.6e-5 of the output's scale on an
    # AVX-512 CPU (1e-5 elsewhere); in float64 merged and unmerged agree to 3e-14
    assert_near(merged, unmerged, atol=5e-5)
    changed = [k for k, v in weights.items() if not torch.equal(model.state_dict()[k], v)]
    assert changed, "merge changed no weight"
    splice.unmerge(model)
    for key, value in weights.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)
    assert_near(out(model, inputs), unmerged, atol=5e-5)  # the weights are back to 1e-6: the same rounding
    with splice.disabled(model):
        assert_near(out(model, inputs), base, atol=5e-5)

    splice.merge(model)
    splice.detach(model, "default")  # a merged adapter gives its weights back on detach
    for key, value in weights.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


def test_mixed_batch_rows_equal_each_row_alone_or_routing_is_refused(case):
    model = case.model()
    base_model = copy.deepcopy(model)
    case.attached("a", model)
    case.attached("b", model)
    case.randomize(model, "a", seed=1)
    case.randomize(model, "b", seed=2)
    inputs = case.inputs()
    ids = ["b", None, "a"]

    on_linear = [a for _, _, host in hosts(model) if host.info.kind == "linear" for a in [host["a"]]]
    if case.contract.route == "grouped":  # LoRA-shaped on Linear/Conv1D hosts (elsewhere: reference path)
        assert all(a.low_rank_factors() is not None for a in on_linear), "table: route='grouped'"
    else:
        assert all(a.low_rank_factors() is None for a in adapter_modules(model, "a").values()), \
            f"the form has low_rank_factors(), so the table should say route='grouped', not {case.contract.route!r}"

    if case.contract.route == "refused":
        with pytest.raises(SpliceError, match=r"route"), splice.route(model, ids):
            out(model, inputs)
        return

    alone = []
    for i, name in enumerate(ids):
        if name is None:
            alone.append(out(base_model, row(inputs, i)))
        else:
            splice.activate(model, name)
            alone.append(out(model, row(inputs, i)))
    assert_differs(alone[0], out(base_model, row(inputs, 0)))
    for grouped in (True, False):
        with splice.route(model, ids, grouped=grouped):
            routed = out(model, inputs)
        for i, expected in enumerate(alone):
            assert_near(routed[i:i + 1], expected, atol=1e-5,
                        msg=lambda m, i=i, g=grouped: f"row {i} ({ids[i]}), grouped={g}: {m}")


def test_detach_restores_the_base_exactly(case):
    model = case.model()
    inputs = case.inputs()
    base = out(model, inputs)
    state = copy.deepcopy(model.state_dict())
    names = sorted(n for n, _ in model.named_modules())
    case.attached(model=model)
    case.randomize(model)
    assert_differs(out(model, inputs), base)
    with splice.disabled(model):
        assert torch.equal(out(model, inputs), base), "splice.disabled must give the base output"
    splice.detach(model, "default")
    assert splice.adapters(model) == {}
    assert not list(hosts(model)) and not splice_modules(model)
    assert sorted(n for n, _ in model.named_modules()) == names
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(out(model, inputs), base)


def test_gradients_reach_only_the_adapter_and_its_heads(case):
    model = case.model()
    base_params = list(model.parameters())
    case.attached(model=model)
    case.randomize(model)
    model.train()
    result = model(**case.inputs())
    output = result.logits if hasattr(result, "logits") else result
    output.float().square().mean().backward()
    for param in base_params:
        assert param.grad is None, "a frozen base parameter got a gradient"
    adapters = adapter_parameters(model)
    assert all(p.grad is not None for p in adapters), "an adapter parameter got no gradient"
    assert any(p.grad.abs().sum() > 0 for p in adapters)
    heads = head_parameters(model, case.site)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
    allowed = {id(p) for p in adapters + heads}
    stray = [n for n, p in model.named_parameters() if p.grad is not None and id(p) not in allowed]
    assert not stray, f"gradients reached {stray}"
