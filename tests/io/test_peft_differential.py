"""Differential tests against HF PEFT 0.21.2: the same adapter, in splice and in PEFT, computes the same thing.

Every case is a tiny seeded model plus a `LoraConfig`; splice's side uses the config meaning the
same (`splice_config`). The adapters get random non-zero factors (B too) and heads, so any
difference shows. Directions, one test each, named `test_<direction>[<case>]`:

- `test_peft_saves_splice_loads`: PEFT `save_pretrained`, `splice.load`, same outputs.
- `test_splice_saves_peft_loads`: `splice.save`, `PeftModel.from_pretrained`, same outputs.
- `test_splice_selects_what_peft_selects`: `splice.attach` with the config selects PEFT's modules
  with PEFT's ranks, and splice's tensors under PEFT's *own* adapter_config.json give the same
  outputs (so target selection, layers, patterns and scalings mean the same in both).
- `test_merge_matches_merge_and_unload`: `splice.merge` / `splice.unload` vs `merge_and_unload`.
- `test_route_matches_adapter_names`: `splice.route` mixed batch vs PEFT's `adapter_names=`
  (a per-adapter PEFT reference where PEFT has no mixed batches: DoRA).

Then the cases that need more than one config: two adapters that each own a head
(`modules_to_save`) and one without, rank/alpha patterns that must not leak to nested modules
and failed loads that must not leave anything attached, PiSSA saved without conversion, and the
targets splice refuses (grouped Conv2d, nn.MultiheadAttention).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft_diff_helpers import (
    assert_changes,
    assert_same,
    base,
    file_modules,
    inputs,
    peft_modules,
    randomize_peft,
    randomize_splice,
    read_config,
    run,
    splice_config,
    with_peft_config,
)
from safetensors.torch import load_file, save_file
from torch import nn

import splice
from splice.core.errors import SpliceError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@dataclass(frozen=True)
class Case:
    model: str
    lora: dict[str, Any] = field(default_factory=dict)
    mixed: bool = True  # PEFT runs mixed batches (adapter_names=) for it; DoRA: no
    same_selection: bool = True  # False where splice's config deliberately selects otherwise


CASES: dict[str, Case] = {
    # plain MLP: lin0, block.lin0, block2.lin0 (same leaf), lin1
    "mlp-lin0": Case("mlp", dict(r=4, lora_alpha=8, target_modules=["lin0"])),
    "mlp-nested-name": Case("mlp", dict(r=4, lora_alpha=8, target_modules=["block.lin0", "lin1"])),
    "mlp-regex": Case("mlp", dict(r=4, lora_alpha=8, target_modules=r"block\d?\.lin0")),
    # Keys that overlap ({"lin0": 2, "block2.lin0": 6}) are avoided: PEFT takes the first key that
    # matches, but writes adapter_config.json with sorted keys, so its own reload resolves them otherwise.
    "mlp-patterns": Case("mlp", dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"],
                                     rank_pattern={"lin1": 2, "block2.lin0": 6}, alpha_pattern={"lin0": 5})),
    "mlp-anchored-rank-pattern": Case("mlp", dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"],
                                                  rank_pattern={"^lin0": 2})),
    "mlp-anchored-alpha-pattern": Case("mlp", dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"],
                                                   alpha_pattern={"^lin0": 3})),
    "mlp-rslora": Case("mlp", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["lin0", "lin1"])),
    "mlp-dora": Case("mlp", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["lin0", "lin1"]), mixed=False),
    "mlp-lora-bias": Case("mlp", dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["lin0", "lin1"])),
    "mlp-head": Case("mlp", dict(r=4, lora_alpha=8, target_modules=["lin0"], modules_to_save=["lin1"])),
    "mlp-all-linear": Case("mlp", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "mlp-classifier-all-linear": Case("mlp_cls", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "conv2d": Case("conv", dict(r=3, lora_alpha=6, target_modules=["conv2d", "lin0"])),
    "conv2d-rslora-bias": Case("conv", dict(r=3, lora_alpha=6, use_rslora=True, lora_bias=True,
                                            target_modules=["conv2d"])),
    "embedding": Case("emb", dict(r=4, lora_alpha=8, target_modules=["emb", "lin0"])),
    # transformers
    "bert-qv": Case("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
    "bert-seqcls-head": Case("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")),
    "bert-all-linear-seqcls": Case("bert", dict(r=2, lora_alpha=4, target_modules="all-linear", task_type="SEQ_CLS")),
    # PEFT without a task type adapts `classifier` of a *ForSequenceClassification model; splice
    # leaves the head out there (as PEFT does with SEQ_CLS), so only loading is compared.
    "bert-all-linear-notask": Case("bert", dict(r=2, lora_alpha=4, target_modules="all-linear"),
                                   same_selection=False),
    "bert-layers": Case("bert", dict(r=4, lora_alpha=8, target_modules=["query", "dense"], layers_to_transform=[1])),
    "gpt2-conv1d": Case("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "gpt2-layers-pattern": Case("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                             fan_in_fan_out=True, layers_to_transform=[0], layers_pattern="h")),
    "llama-qv": Case("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    "llama-all-linear": Case("llama", dict(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM")),
    "llama-patterns": Case("llama", dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"v_proj": 2, r"model\.layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"up_proj": 3})),
    "llama-rslora-embedding": Case("llama", dict(r=4, lora_alpha=8, use_rslora=True,
                                                 target_modules=["embed_tokens", "o_proj"])),
    "llama-dora": Case("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
                       mixed=False),
    "llama-layers-pattern": Case("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                               layers_to_transform=[1], layers_pattern="layers")),
    "t5-qv": Case("t5", dict(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")),
    "t5-all-linear": Case("t5", dict(r=2, lora_alpha=4, target_modules="all-linear")),
    "t5-layers": Case("t5", dict(r=4, lora_alpha=8, target_modules=["q", "v", "wi"], layers_to_transform=[1])),
    "t5-layers-pattern": Case("t5", dict(r=4, lora_alpha=8, target_modules=["q", "o", "wo"],
                                         layers_to_transform=[0], layers_pattern="block")),
}

SELECTION_CASES = [name for name, case in CASES.items() if case.same_selection]


def peft_adapter(model_name: str, lora: dict[str, Any], adapter: str = "default", seed: int = 1):
    """A PEFT model with adapter `adapter` of random non-zero factors (and heads), eval mode."""
    peft_model = get_peft_model(base(model_name), LoraConfig(**lora), adapter_name=adapter)
    randomize_peft(peft_model, adapter, seed)
    return peft_model.eval()


# -- the five directions, per case -------------------------------------------------------------


@pytest.mark.parametrize("case_name", list(CASES))
def test_peft_saves_splice_loads(case_name: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    x = inputs(case.model)
    peft_model = peft_adapter(case.model, case.lora)
    expected = run(peft_model, x)
    assert_changes(expected, run(base(case.model), x), case_name)
    peft_model.save_pretrained(str(tmp_path))

    model = base(case.model)
    splice.load(model, tmp_path, "default")
    assert_same(run(model, x), expected, f"{case_name}: PEFT saved, splice loaded")


@pytest.mark.parametrize("case_name", list(CASES))
def test_splice_saves_peft_loads(case_name: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    x = inputs(case.model)
    model = base(case.model)
    splice.attach(model, splice_config(case.lora))
    randomize_splice(model, seed=1)
    expected = run(model, x)
    assert_changes(expected, run(base(case.model), x), case_name)
    splice.save(model, tmp_path)

    peft_model = PeftModel.from_pretrained(base(case.model), str(tmp_path)).eval()
    assert_same(run(peft_model, x), expected, f"{case_name}: splice saved, PEFT loaded")
    # What PEFT built from splice's file is exactly what splice adapted, with the same ranks.
    assert {n: r for n, (r, _) in peft_modules(peft_model).items()} == file_modules(tmp_path)


@pytest.mark.parametrize("case_name", SELECTION_CASES)
def test_splice_selects_what_peft_selects(case_name: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    x = inputs(case.model)
    reference = get_peft_model(base(case.model), LoraConfig(**case.lora))
    wanted = {n: r for n, (r, _) in peft_modules(reference).items()}

    model = base(case.model)
    splice.attach(model, splice_config(case.lora))
    randomize_splice(model, seed=1)
    expected = run(model, x)
    splice.save(model, tmp_path / "splice")
    got = file_modules(tmp_path / "splice")
    assert got == wanted, (
        f"{case_name}: splice adapted {sorted(set(got) - set(wanted))} that PEFT does not, missed "
        f"{sorted(set(wanted) - set(got))}; ranks differ at "
        f"{ {n: (got[n], wanted[n]) for n in set(got) & set(wanted) if got[n] != wanted[n]} }"
    )
    # PEFT's own config (init_lora_weights=False: a module splice missed would get random
    # factors) with splice's tensors: same scalings, same outputs.
    LoraConfig(**case.lora, init_lora_weights=False).save_pretrained(str(tmp_path / "config"))
    mixed = with_peft_config(tmp_path / "splice", tmp_path / "config", tmp_path / "mixed")
    peft_model = PeftModel.from_pretrained(base(case.model), str(mixed)).eval()
    assert_same(run(peft_model, x), expected, f"{case_name}: PEFT's config with splice's tensors")


@pytest.mark.parametrize("case_name", list(CASES))
def test_merge_matches_merge_and_unload(case_name: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    x = inputs(case.model)
    peft_model = peft_adapter(case.model, case.lora)
    peft_model.save_pretrained(str(tmp_path))
    expected = run(peft_model.merge_and_unload(), x)

    model = base(case.model)
    splice.load(model, tmp_path, "default")
    splice.merge(model)
    assert_same(run(model, x), expected, f"{case_name}: splice.merge vs merge_and_unload")
    plain = splice.unload(model)
    assert splice.adapters(plain) == {}
    assert_same(run(plain, x), expected, f"{case_name}: splice.unload vs merge_and_unload")


ROUTE = ["a", "b", None, "b"]


def peft_mixed(peft_model: Any, model_name: str, ids: list[str | None], mixed: bool) -> torch.Tensor:
    """PEFT's output for a batch whose row i goes through adapter ids[i] (None: the base model):
    `adapter_names=` where PEFT supports it, else each adapter run on the whole batch."""
    x = inputs(model_name)
    if mixed:
        return run(peft_model, x, adapter_names=[i or "__base__" for i in ids])
    outs = {None: run(base(model_name), x)}
    for name in {i for i in ids if i is not None}:
        peft_model.set_adapter(name)
        outs[name] = run(peft_model, x)
    return torch.stack([outs[name][row] for row, name in enumerate(ids)])


@pytest.mark.parametrize("case_name", list(CASES))
def test_route_matches_adapter_names(case_name: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    x = inputs(case.model)
    peft_model = get_peft_model(base(case.model), LoraConfig(**case.lora), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(**case.lora))
    randomize_peft(peft_model, "a", seed=1)
    randomize_peft(peft_model, "b", seed=2)
    peft_model.eval()
    peft_model.set_adapter("a")
    peft_model.save_pretrained(str(tmp_path))
    expected = peft_mixed(peft_model, case.model, ROUTE, case.mixed)

    model = base(case.model)
    splice.load(model, tmp_path / "a", "a")
    splice.load(model, tmp_path / "b", "b")
    with splice.route(model, ROUTE):
        got = run(model, x)
    assert_same(got, expected, f"{case_name}: splice.route {ROUTE} vs PEFT mixed batch")


# -- two adapters, each with its own head (defect 1) -----------------------------------------

HEAD_LORA = dict(r=4, lora_alpha=8, target_modules=["lin0"], modules_to_save=["lin1"])
NO_HEAD_LORA = dict(r=4, lora_alpha=8, target_modules=["lin0"])


def peft_heads(tmp_path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """PEFT MLP with adapters a and b (each its own `lin1`) and c (no head), saved to
    tmp_path/{a,b,c}; and each adapter's output under `set_adapter`."""
    peft_model = get_peft_model(base("mlp"), LoraConfig(**HEAD_LORA), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(**HEAD_LORA))
    peft_model.add_adapter("c", LoraConfig(**NO_HEAD_LORA))
    for seed, name in enumerate("abc", start=1):
        randomize_peft(peft_model, name, seed)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path), selected_adapters=["a", "b", "c"])
    outputs = {}
    for name in "abc":
        peft_model.set_adapter(name)
        outputs[name] = run(peft_model, inputs("mlp"))
    assert_changes(outputs["a"], outputs["b"], "heads a vs b")
    assert_changes(outputs["b"], outputs["c"], "heads b vs c")
    peft_model.set_adapter("a")
    return peft_model, outputs


def splice_with_heads(tmp_path: Path) -> nn.Module:
    """The MLP with a, b and c loaded by splice from PEFT's files (c last, so active)."""
    model = base("mlp")
    for name in "abc":
        splice.load(model, tmp_path / name, name)
    return model


@pytest.mark.parametrize("order", [["a", "b", "a"], ["b", "a", "b"]])
def test_heads_activate_switches_to_each_adapters_own_head(order: list[str], tmp_path: Path) -> None:
    _, expected = peft_heads(tmp_path)
    model = splice_with_heads(tmp_path)
    for name in order:
        splice.activate(model, name)
        assert_same(run(model, inputs("mlp")), expected[name], f"activate({name!r}) after loading a, b, c")


def test_heads_adapter_without_head_runs_with_the_original_head(tmp_path: Path) -> None:
    _, expected = peft_heads(tmp_path)
    model = splice_with_heads(tmp_path)
    splice.activate(model, "a")
    splice.activate(model, "c")
    assert_same(run(model, inputs("mlp")), expected["c"], "activate('c'), an adapter without a head")


def test_heads_route_gives_each_row_its_adapters_head(tmp_path: Path) -> None:
    peft_model, _ = peft_heads(tmp_path)
    ids = ["a", "b", None, "a"]
    expected = peft_mixed(peft_model, "mlp", ids, mixed=True)  # PEFT routes modules_to_save per row
    model = splice_with_heads(tmp_path)
    with splice.route(model, ids):
        got = run(model, inputs("mlp"))
    assert_same(got, expected, f"route {ids} with a head per adapter")


def test_heads_route_with_an_adapter_without_head(tmp_path: Path) -> None:
    # PEFT's adapter_names cannot mix adapters with and without a head: per-adapter reference.
    peft_model, _ = peft_heads(tmp_path)
    ids = ["c", "a", None, "b"]
    expected = peft_mixed(peft_model, "mlp", ids, mixed=False)
    model = splice_with_heads(tmp_path)
    with splice.route(model, ids):
        got = run(model, inputs("mlp"))
    assert_same(got, expected, f"route {ids}, c without a head")


def test_heads_splice_saves_each_adapters_own_head_peft_loads(tmp_path: Path) -> None:
    x = inputs("mlp")
    model = base("mlp")
    expected = {}
    for seed, (name, lora) in enumerate([("a", HEAD_LORA), ("b", HEAD_LORA), ("c", NO_HEAD_LORA)], start=1):
        splice.attach(model, splice_config(lora), name)
        randomize_splice(model, seed)  # the new adapter's factors and its own head
        expected[name] = run(model, x)
    for name in "abc":
        splice.save(model, tmp_path / name, name)
    peft_model = PeftModel.from_pretrained(base("mlp"), str(tmp_path / "a"), adapter_name="a")
    peft_model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    peft_model.load_adapter(str(tmp_path / "c"), adapter_name="c")
    peft_model.eval()
    for name in "abc":
        peft_model.set_adapter(name)
        assert_same(run(peft_model, x), expected[name], f"adapter {name!r} saved by splice, set_adapter in PEFT")
    for name in "abca":
        splice.activate(model, name)
        assert_same(run(model, x), expected[name], f"splice.activate({name!r}) after attaching a, b, c")


# -- rank/alpha patterns on nested modules with the same leaf name (defect 2) ----------------

ANCHORED = dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], rank_pattern={"^lin0": 2},
                alpha_pattern={"^lin0": 3})


def test_patterns_splice_writes_keys_peft_resolves_to_the_intended_modules(tmp_path: Path) -> None:
    model = base("mlp")
    splice.attach(model, splice.LoRA(r=4, alpha=8, targets=["lin0", "lin1"], rank_pattern={"^lin0": 2},
                                     alpha_pattern={"^lin0": 3}))
    randomize_splice(model, seed=1)
    expected = run(model, inputs("mlp"))
    splice.save(model, tmp_path)
    wanted = peft_modules(get_peft_model(base("mlp"), LoraConfig(**ANCHORED)))
    assert wanted["lin0"][0] == 2 and wanted["block.lin0"][0] == 4  # PEFT's rule: "^lin0" is the top one only
    config = read_config(tmp_path)
    resolved = peft_modules(get_peft_model(base("mlp"), LoraConfig(
        r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"],
        rank_pattern=config["rank_pattern"], alpha_pattern=config["alpha_pattern"])))
    assert set(resolved) == set(wanted) and all(
        resolved[n][0] == wanted[n][0] and resolved[n][1] == pytest.approx(wanted[n][1]) for n in wanted
    ), (f"splice wrote rank_pattern={config['rank_pattern']}, alpha_pattern={config['alpha_pattern']}: "
        f"PEFT resolves them to (rank, scaling) {resolved}, intended {wanted}")
    peft_model = PeftModel.from_pretrained(base("mlp"), str(tmp_path)).eval()
    assert_same(run(peft_model, inputs("mlp")), expected, "anchored patterns, splice saved, PEFT loaded")


def test_patterns_load_is_all_or_nothing(tmp_path: Path) -> None:
    """A PEFT file with `rank_pattern={"^lin0": 2}` onto a model that has another adapter: it
    loads with PEFT's outputs; if the load fails, nothing of it may stay attached."""
    x = inputs("mlp")
    peft_model = peft_adapter("mlp", ANCHORED)
    expected = run(peft_model, x)
    peft_model.save_pretrained(str(tmp_path))
    model = base("mlp")
    splice.attach(model, splice.LoRA(r=2, alpha=2, targets=["lin1"]), "other")
    randomize_splice(model, seed=5)
    before, names = run(model, x), set(splice.adapters(model))
    try:
        splice.load(model, tmp_path, "peft")
    except Exception as err:
        assert set(splice.adapters(model)) == names, f"failed load ({err!r}) left {set(splice.adapters(model))}"
        assert_same(run(model, x), before, "outputs after a failed load")
        pytest.fail(f"splice refused a valid PEFT file (rank_pattern={{'^lin0': 2}}): {err!r}")
    splice.activate(model, "peft")
    assert_same(run(model, x), expected, "anchored rank_pattern loaded next to another adapter")


def test_bad_file_is_refused_and_leaves_the_model_unchanged(tmp_path: Path) -> None:
    x = inputs("mlp")
    peft_adapter("mlp", ANCHORED).save_pretrained(str(tmp_path))
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.block2.lin0.lora_B.weight"  # the last adapted module gets a wrong shape
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(weights), metadata={"format": "pt"})
    model = base("mlp")
    splice.attach(model, splice.LoRA(r=2, alpha=2, targets=["lin1"]), "other")
    randomize_splice(model, seed=5)
    before, names = run(model, x), set(splice.adapters(model))
    with pytest.raises(SpliceError, match="block2.lin0"):
        splice.load(model, tmp_path, "peft")
    assert set(splice.adapters(model)) == names
    assert_same(run(model, x), before, "outputs after a refused load")


def test_all_linear_on_a_seqcls_model_leaves_the_head_out(tmp_path: Path) -> None:
    """No train_also: "all-linear" alone must leave `classifier` out on a *ForSequenceClassification
    model, selecting what PEFT selects with task_type SEQ_CLS."""
    reference = get_peft_model(base("bert"), LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    wanted = {n: r for n, (r, _) in peft_modules(reference).items()}
    assert "classifier" not in wanted
    model = base("bert")
    splice.attach(model, splice.LoRA(r=2, alpha=4, targets="all-linear"))
    splice.save(model, tmp_path)
    assert file_modules(tmp_path) == wanted


# -- PiSSA saved by PEFT without conversion (defect 5) -----------------------------------------

PISSA = {
    "mlp": dict(r=2, lora_alpha=4, target_modules=["lin0", "lin1"]),
    "llama": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "gpt2": dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True),
}


@pytest.mark.parametrize("model_name", list(PISSA))
def test_pissa_saved_without_conversion_loads_in_splice(model_name: str, tmp_path: Path) -> None:
    x = inputs(model_name)
    peft_model = get_peft_model(base(model_name), LoraConfig(init_lora_weights="pissa", **PISSA[model_name]))
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):  # "training": a few steps on a random target
        out = peft_model(**x) if isinstance(x, dict) else peft_model(x)
        out = out.logits if hasattr(out, "logits") else out
        loss = (out - torch.ones_like(out)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.eval()
    expected = run(peft_model, x)
    peft_model.save_pretrained(str(tmp_path))  # plainly: no path_initial_model_for_weight_conversion
    assert read_config(tmp_path)["init_lora_weights"] == "pissa"
    reloaded = PeftModel.from_pretrained(base(model_name), str(tmp_path)).eval()
    assert_same(run(reloaded, x), expected, "PEFT's own reload (sanity)")
    assert_changes(expected, run(base(model_name), x), "pissa training")

    model = base(model_name)
    splice.load(model, tmp_path)
    assert_same(run(model, x), expected, f"{model_name}: unconverted PiSSA, PEFT saved, splice loaded")
    merged = run(reloaded.merge_and_unload(), x)
    assert_same(run(splice.unload(model), x), merged, f"{model_name}: unconverted PiSSA, unload vs merge_and_unload")


# -- what splice cannot host: refused with a message that names it -----------------------------


def test_grouped_conv2d_attach_is_refused() -> None:
    model = base("conv_grouped")
    with pytest.raises(SpliceError, match=r"(?i)group") as err:
        splice.attach(model, splice.LoRA(r=2, targets=["conv2d"]))
    assert "conv2d" in str(err.value)
    assert splice.adapters(model) == {}


def test_grouped_conv2d_peft_file_is_refused(tmp_path: Path) -> None:
    x = inputs("conv_grouped")
    peft_adapter("conv_grouped", dict(r=2, lora_alpha=4, target_modules=["conv2d", "lin0"])).save_pretrained(
        str(tmp_path))
    model = base("conv_grouped")
    before = run(model, x)
    with pytest.raises(SpliceError, match=r"(?i)group") as err:
        splice.load(model, tmp_path)
    assert "conv2d" in str(err.value)
    assert splice.adapters(model) == {}
    assert_same(run(model, x), before, "outputs after a refused load")


def test_multihead_attention_attach_is_refused() -> None:
    model = base("mha")
    with pytest.raises(SpliceError, match="MultiheadAttention") as err:
        splice.attach(model, splice.LoRA(r=2, targets=["mha"]))
    assert re.search(r"(?i)support|cannot|can't|only|can be attached", str(err.value)), str(err.value)
    assert splice.adapters(model) == {}


def test_multihead_attention_peft_file_is_refused(tmp_path: Path) -> None:
    x = inputs("mha")
    peft_adapter("mha", dict(r=2, lora_alpha=4, target_modules=["mha", "lin0"])).save_pretrained(str(tmp_path))
    model = base("mha")
    before = run(model, x)
    with pytest.raises(SpliceError, match="MultiheadAttention") as err:
        splice.load(model, tmp_path)
    assert re.search(r"(?i)support|cannot|can't|only|can be attached", str(err.value)), str(err.value)
    assert splice.adapters(model) == {}
    assert_same(run(model, x), before, "outputs after a refused load")
