"""Target selection: the same module set as HF PEFT for the same config, and the documented extras."""

from __future__ import annotations

import pytest
import torch
from helpers import FACTORIES
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

import splice
from splice.core.targets import layer_index, output_head_names, resolve_targets

# (model, targets, exclude, layers, train_also, PEFT task_type)
CASES = [
    ("bert", ["query", "value"], None, None, [], None),
    ("bert", ["dense"], None, None, [], None),
    ("bert", ["encoder.layer.0.attention.self.query", "key"], None, None, [], None),
    ("bert", ["self.query", "output.dense"], None, None, [], None),
    ("bert", r".*\.attention\.self\.(query|key)", None, None, [], None),
    ("bert", r".*layer\.1\..*dense", None, None, [], None),
    ("bert", ["dense"], ["output.dense"], None, [], None),
    ("bert", ["dense", "query"], r".*layer\.0\..*", None, [], None),
    ("bert", ["query", "value"], None, [1], [], None),
    ("bert", ["query", "classifier"], None, None, ["classifier"], None),
    ("bert", "all-linear", None, None, [], "SEQ_CLS"),
    ("bert", "all-linear", ["key", "pooler.dense"], None, [], "SEQ_CLS"),
    ("bert", ["word_embeddings", "query"], None, None, [], None),
    ("llama", ["q_proj", "v_proj"], None, None, [], None),
    ("llama", ["self_attn.q_proj", "mlp.up_proj"], None, None, [], None),
    ("llama", r"model\.layers\.\d+\.mlp\..*_proj", None, None, [], None),
    ("llama", "all-linear", None, None, [], None),
    ("llama", "all-linear", ["down_proj"], None, [], None),
    ("llama", ["q_proj", "k_proj", "gate_proj"], None, [0], [], None),
    ("llama", ["q_proj", "lm_head", "embed_tokens"], None, None, [], None),
    ("gpt2", ["c_attn"], None, None, [], None),
    ("gpt2", ["c_attn", "c_proj"], None, None, [], None),
    ("gpt2", ["attn.c_proj", "c_fc"], ["h.0.attn.c_proj"], None, [], None),
    ("gpt2", "all-linear", None, None, [], None),
    ("gpt2", ["c_attn", "c_fc"], None, [1], [], None),
    ("gpt2", r"transformer\.h\.0\.(attn|mlp)\.c_proj", None, None, [], None),
]


def peft_selection(model: nn.Module, targets, exclude, layers, train_also, task_type) -> set[str]:
    config = LoraConfig(
        r=2, target_modules=targets, exclude_modules=exclude, layers_to_transform=layers,
        modules_to_save=train_also or None, task_type=task_type,
    )
    peft_model = get_peft_model(model, config)
    prefix = "base_model.model."
    return {
        name[len(prefix):] for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


@pytest.mark.parametrize(("model_name", "targets", "exclude", "layers", "train_also", "task"), CASES)
def test_selection_equals_peft(model_name, targets, exclude, layers, train_also, task):
    model = FACTORIES[model_name]()
    config = splice.LoRA(r=2, targets=targets, exclude=exclude, layers=layers, train_also=train_also)
    ours = {name for name, _ in resolve_targets(model, config)}
    theirs = peft_selection(model, targets, exclude, layers, train_also, task)
    assert ours, "a case must select something"
    assert ours == theirs


def test_resolve_returns_the_modules_in_model_order(bert):
    selected = resolve_targets(bert, splice.LoRA(targets=["value", "query"]))
    names = [name for name, _ in selected]
    assert names == [
        "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value",
    ]
    assert all(module is bert.get_submodule(name) for name, module in selected)


def test_layers_also_restrict_regex_targets(bert):
    """splice's documented difference from PEFT: `layers` applies to regex targets too."""
    config = splice.LoRA(targets=r".*\.(query|value)", layers=[1])
    names = {name for name, _ in resolve_targets(bert, config)}
    assert names == {"bert.encoder.layer.1.attention.self.query",
                     "bert.encoder.layer.1.attention.self.value"}


def test_layers_accepts_int_and_range(llama):
    one = {n for n, _ in resolve_targets(llama, splice.LoRA(targets=["q_proj"], layers=1))}
    both = {n for n, _ in resolve_targets(llama, splice.LoRA(targets=["q_proj"], layers=range(2)))}
    assert one == {"model.layers.1.self_attn.q_proj"}
    assert both == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}


@pytest.mark.parametrize(("model_name", "expected"), [
    ("bert", {"query", "value"}), ("llama", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"}),
])
def test_default_targets_per_architecture(model_name, expected):
    model = FACTORIES[model_name]()
    names = [name for name, _ in resolve_targets(model, splice.LoRA())]
    assert {name.rsplit(".", 1)[-1] for name in names} == expected
    assert len(names) == 2 * len(expected)  # every layer


def test_no_default_targets_for_a_plain_module(convnet):
    with pytest.raises(splice.TargetError, match="no default targets") as err:
        resolve_targets(convnet, splice.LoRA())
    assert "conv1" in str(err.value)  # names what could be targeted


def test_all_linear_leaves_the_output_head_alone(gpt2, bert):
    assert output_head_names(gpt2) == {"lm_head"}
    assert output_head_names(bert) == {"classifier"}
    names = {n for n, _ in resolve_targets(gpt2, splice.LoRA(targets="all-linear"))}
    assert "lm_head" not in names and len(names) == 8  # 4 Conv1D per block


def test_train_also_modules_are_never_targets(bert):
    config = splice.LoRA(targets=r".*(query|classifier)", train_also=["classifier"])
    names = {n for n, _ in resolve_targets(bert, config)}
    assert names == {"bert.encoder.layer.0.attention.self.query",
                     "bert.encoder.layer.1.attention.self.query"}


def test_attached_hosts_are_not_targets(bert):
    """A second adapter selects the same base modules, never splice's own adapter layers."""
    splice.attach(bert, splice.LoRA(r=2, targets=["query", "value"]), "a")
    second = {n for n, _ in resolve_targets(bert, splice.LoRA(targets=r".*query.*"))}
    assert second == {"bert.encoder.layer.0.attention.self.query",
                      "bert.encoder.layer.1.attention.self.query"}


@pytest.mark.parametrize(("name", "pattern", "index"), [
    ("bert.encoder.layer.3.attention.self.query", None, 3),
    ("model.layers.12.mlp.up_proj", None, 12),
    ("transformer.h.7.attn.c_attn", None, 7),
    ("model.layers.2.mlp.experts.5.up_proj", None, 2),  # the layer, not the expert
    ("model.layers.2.mlp.experts.5.up_proj", "experts", 5),
    ("encoder.block.3.layer.1.SelfAttention.q", None, 3),  # T5: the block, as PEFT reads it
    ("encoder.block.3.layer.1.SelfAttention.q", "layer", 1),
    ("encoder.block.3.layer.1.SelfAttention.q", ["h", "block"], 3),
    ("blocks.4.conv", None, None),  # PEFT reads no number right after the first segment
    ("blocks.4.conv", "blocks", 4),
    ("classifier", None, None),
])
def test_layer_index_is_peft_rule(name, pattern, index):
    assert layer_index(name, pattern) == index


def make_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=3, num_decoder_layers=2, num_heads=2)
    return T5ForConditionalGeneration(config)


class PlainClassifier(nn.Module):
    """A model that is no transformers model and has a `classifier`: PEFT adapts it with all-linear."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.classifier = nn.Linear(8, 2)


@pytest.mark.parametrize(("factory", "targets", "layers", "pattern"), [
    (make_t5, ["q", "v"], [1], None),
    (make_t5, ["q", "v"], [1], "layer"),
    (make_t5, ["q", "wo"], [0, 2], ["block"]),
    (make_t5, "all-linear", None, None),
    (lambda: FACTORIES["llama"](), ["q_proj"], [1], "layers"),
    (PlainClassifier, "all-linear", None, None),
])
def test_layers_pattern_and_plain_models_equal_peft(factory, targets, layers, pattern):
    model = factory()
    config = splice.LoRA(r=2, targets=targets, layers=layers, layers_pattern=pattern)
    ours = {name for name, _ in resolve_targets(model, config)}
    theirs = {name.removeprefix("base_model.model.") for name, module in get_peft_model(model, LoraConfig(
        r=2, target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)).named_modules()
        if isinstance(module, LoraLayer)}
    assert ours and ours == theirs


def test_all_linear_leaves_out_a_classification_head_as_peft_seq_cls_does(bert):
    selected = {n for n, _ in resolve_targets(bert, splice.LoRA(targets="all-linear"))}
    assert "classifier" not in selected and "bert.pooler.dense" in selected
    assert output_head_names(PlainClassifier()) == set()


def test_unsupported_module_types_are_named(bert):
    with pytest.raises(splice.TargetError, match="LayerNorm"):
        resolve_targets(bert, splice.LoRA(targets=["attention.output.LayerNorm"]))


@pytest.mark.parametrize(("module", "reason"), [
    (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
    (nn.Conv1d(4, 4, 3, dilation=2), "dilation"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
    (nn.Embedding(10, 4, max_norm=1.0), "max_norm"),
])
def test_hostable_types_with_unsupported_options_are_refused(module, reason):
    model = nn.Sequential(module)
    with pytest.raises(splice.TargetError, match=reason):
        resolve_targets(model, splice.LoRA(targets=["0"]))


def test_empty_target_list_is_refused():
    with pytest.raises(splice.SpliceError, match="empty"):
        splice.LoRA(targets=[])


def test_selection_does_not_change_the_model(bert):
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    resolve_targets(bert, splice.LoRA(targets="all-linear"))
    after = bert.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_target_list_entry_that_matches_nothing_is_refused_with_the_close_names():
    # HF PEFT adapts `value` alone here and says nothing; the typo is the user's to fix
    peft = peft_selection(FACTORIES["bert"](), ["quary", "value"], None, None, [], None)
    assert {n.rsplit(".", 1)[-1] for n in peft} == {"value"}
    model = FACTORIES["bert"]()
    with pytest.raises(splice.TargetError, match=r"'quary' \(did you mean 'query'\?\) match no module"):
        resolve_targets(model, splice.LoRA(targets=["quary", "value"]))
    with pytest.raises(splice.TargetError, match="quary"):
        splice.attach(model, splice.LoRA(targets=["quary", "value"]))
    assert splice.adapters(model) == {}
