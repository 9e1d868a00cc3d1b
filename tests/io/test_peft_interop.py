"""HF PEFT's directory format, both ways: same logits, same tensor names, a minimal config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import (
    FACTORIES,
    assert_close,
    assert_differs,
    fresh,
    logits,
    make_bert,
    make_llama,
    randomize,
    randomize_module,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn

import splice
from splice.core.host import hosts

# Every key splice's PEFT writer may emit; anything else is a regression (old PEFT crashes on it).
ALLOWED_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout",
    "use_rslora", "use_dora", "bias", "fan_in_fan_out", "init_lora_weights", "inference_mode",
    "target_modules", "modules_to_save", "rank_pattern", "alpha_pattern", "lora_bias",
}
REQUIRED_KEYS = {"peft_type", "r", "lora_alpha", "target_modules"}


def run(model_name: str, model: nn.Module, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    if model_name == "convnet":
        return logits(model, ids, image)
    return logits(model, input_ids=ids)


def read_json(path: Path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


def tensor_names(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def peft_saved(model: nn.Module, path: Path, head: str | None = None, **lora) -> PeftModel:
    """A PEFT LoRA with nonzero factors (and a changed head), saved to `path`."""
    torch.manual_seed(7)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    if head is not None:
        wrapper = peft_model.base_model.model.get_submodule(head)
        randomize_module(wrapper.modules_to_save["default"], seed=11)
    peft_model.save_pretrained(str(path))
    return peft_model.eval()


# -- PEFT -> splice ------------------------------------------------------------------------

PEFT_TO_SPLICE = {
    "llama-qv": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-rslora": ("llama", dict(r=4, lora_alpha=8, use_rslora=True,
                                   target_modules=["q_proj", "v_proj", "o_proj"])),
    "llama-patterns": ("llama", dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"v_proj": 2, r"model\.layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"up_proj": 3, "q_proj": 20})),
    "llama-regex": ("llama", dict(r=4, lora_alpha=4, target_modules=r".*\.mlp\.(gate|down)_proj")),
    "llama-all-linear": ("llama", dict(r=2, lora_alpha=4, target_modules="all-linear")),
    "llama-layers": ("llama", dict(r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"],
                                   layers_to_transform=[1])),
    "llama-exclude": ("llama", dict(r=2, lora_alpha=4, target_modules="all-linear",
                                    exclude_modules=["o_proj", "gate_proj"])),
    "llama-embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                 fan_in_fan_out=True)),
    "bert-embedding": ("bert", dict(r=4, lora_alpha=8, target_modules=["word_embeddings", "value"])),
    "bert-rslora-patterns": ("bert", dict(r=4, lora_alpha=8, use_rslora=True,
                                          target_modules=["query", "value"],
                                          rank_pattern={"value": 8}, alpha_pattern={"query": 2})),
    "convnet": ("convnet", dict(r=3, lora_alpha=6, target_modules=["embed", "conv1", "conv2", "head"])),
    "bert-lora-bias": ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], lora_bias=True)),
    "gpt2-lora-bias": ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                    lora_bias=True)),
}


@pytest.mark.parametrize("case", list(PEFT_TO_SPLICE))
def test_peft_adapter_loads_in_splice_with_identical_logits(case, tmp_path, conv_inputs):
    model_name, lora = PEFT_TO_SPLICE[case]
    base = FACTORIES[model_name]()
    base_out = run(model_name, base, *conv_inputs)
    peft_model = peft_saved(fresh(base), tmp_path, **lora)
    expected = run(model_name, peft_model, *conv_inputs)
    assert_differs(expected, base_out)

    model = fresh(base)
    assert splice.load(model, tmp_path) is model
    assert_close(run(model_name, model, *conv_inputs), expected, rel=1e-5)
    # Exactly the modules PEFT adapted, with PEFT's ranks and scalings.
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
                   if hasattr(m, "lora_A") and hasattr(m, "scaling")}
    ours = {name: host["default"] for name, _, host in hosts(model)}
    assert set(ours) == set(peft_layers)
    for name, adapter in ours.items():
        assert adapter.r == peft_layers[name].r["default"], name
        assert adapter.scaling == pytest.approx(peft_layers[name].scaling["default"]), name
    assert splice.trainable_parameters(model) == {}  # loaded frozen by default


def test_peft_modules_to_save_loads_as_a_trained_head(tmp_path, ids):
    base = make_bert()
    peft_model = peft_saved(fresh(base), tmp_path, head="classifier", r=4, lora_alpha=8,
                            target_modules=["query", "value"], task_type="SEQ_CLS")
    # PEFT lists every head name it knows for the task (0.22 adds DistilBERT's "pre_classifier"),
    # whether the model has it or not: the ones the model lacks are not an error
    assert {"classifier", "score"} <= set(read_json(tmp_path)["modules_to_save"])
    expected = logits(peft_model, input_ids=ids)
    model = fresh(base)
    splice.load(model, tmp_path, trainable=True)
    assert_close(logits(model, input_ids=ids), expected, rel=1e-5)
    trained_head = peft_model.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(model.classifier.weight, trained_head.weight)
    names = set(splice.trainable_parameters(model))
    assert {"classifier.weight", "classifier.bias"} <= names
    splice.detach(model, "default")  # the head goes back to its original weights
    assert torch.equal(model.classifier.weight, base.classifier.weight)


def test_peft_adapter_under_a_custom_name_and_next_to_another(tmp_path, ids):
    base = make_llama()
    peft_model = peft_saved(fresh(base), tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    expected = logits(peft_model, input_ids=ids)
    model = fresh(base)
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj", "v_proj"]), "mine")
    randomize(model, "mine")
    splice.load(model, tmp_path, name="theirs")
    assert splice.active_adapters(model) == ["theirs"]
    assert_close(logits(model, input_ids=ids), expected, rel=1e-5)


# -- splice -> PEFT ------------------------------------------------------------------------

SPLICE_TO_PEFT = {
    "bert-head": ("bert", dict(r=4, alpha=8, targets=["query", "value"], train_also=["classifier"])),
    "bert-layers": ("bert", dict(r=4, alpha=8, targets=["query", "dense"], layers=[1])),
    "llama-all-linear": ("llama", dict(r=4, alpha=8, targets="all-linear")),
    "llama-rslora-patterns": ("llama", dict(
        r=4, alpha=8, rslora=True, targets=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.0\.mlp\.down_proj": 3})),
    "llama-regex": ("llama", dict(r=2, alpha=2, targets=r"model\.layers\.0\.self_attn\.[qk]_proj")),
    "llama-embedding": ("llama", dict(r=4, alpha=8, targets=["embed_tokens", "v_proj"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, alpha=8, targets=["c_attn", "c_proj"])),
    "convnet": ("convnet", dict(r=3, alpha=6, targets=["embed", "conv1", "conv2", "head"])),
    "bert-lora-bias": ("bert", dict(r=4, alpha=8, targets=["query", "value"], lora_bias=True)),
    "convnet-lora-bias": ("convnet", dict(r=3, alpha=6, targets=["conv1", "conv2"], lora_bias=True)),
}


@pytest.mark.parametrize("case", list(SPLICE_TO_PEFT))
def test_splice_adapter_loads_in_peft_with_identical_logits(case, tmp_path, conv_inputs):
    model_name, lora = SPLICE_TO_PEFT[case]
    base = FACTORIES[model_name]()
    base_out = run(model_name, base, *conv_inputs)
    model = fresh(base)
    splice.attach(model, splice.LoRA(**lora))
    randomize(model, scale=0.2)
    for head in lora.get("train_also", []):
        randomize_module(model.get_submodule(head), seed=5)
    expected = run(model_name, model, *conv_inputs)
    assert_differs(expected, base_out)
    assert splice.save(model, tmp_path) == tmp_path

    peft_model = PeftModel.from_pretrained(fresh(base), str(tmp_path)).eval()
    assert_close(run(model_name, peft_model, *conv_inputs), expected, rel=1e-5)
    peft_layers = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                   if hasattr(m, "lora_A") and hasattr(m, "scaling")}
    assert peft_layers == {name for name, _, _ in hosts(model)}


def test_splice_peft_format_round_trip(tmp_path, conv_inputs):
    base = FACTORIES["convnet"]()
    model = fresh(base)
    splice.attach(model, splice.LoRA(r=3, alpha=5, rslora=True,
                                     targets=["embed", "conv1", "conv2", "head"]))
    randomize(model)
    expected = run("convnet", model, *conv_inputs)
    splice.save(model, tmp_path, format="peft")
    loaded = fresh(base)
    splice.load(loaded, tmp_path)
    assert torch.equal(run("convnet", loaded, *conv_inputs), expected)
    for name, _, host in hosts(loaded):
        for param, value in host["default"].state_dict().items():
            assert torch.equal(value, model.get_submodule(name).splice["default"].state_dict()[param])


def test_pissa_export_loads_in_peft_on_the_unmodified_base(tmp_path, ids):
    base = make_llama()
    model = fresh(base)
    splice.attach(model, splice.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"], init="pissa"))
    assert_close(logits(model, input_ids=ids), logits(base, input_ids=ids), rel=1e-5)
    randomize(model, scale=0.1)  # "training" changed A and B
    expected = logits(model, input_ids=ids)
    splice.save(model, tmp_path)
    config = read_json(tmp_path)
    assert config["r"] == 8 and config["lora_alpha"] == 16  # rank 2r, same scaling
    assert config["init_lora_weights"] is True  # a plain LoRA now: no base mutation on load
    assert all(shape[0] == 8 for k, shape in tensor_names(tmp_path).items() if "lora_A" in k)
    peft_model = PeftModel.from_pretrained(fresh(base), str(tmp_path)).eval()
    assert_close(logits(peft_model, input_ids=ids), expected, rel=1e-5)
    # ...and splice reads it back onto the unmodified base just as well.
    again = fresh(base)
    splice.load(again, tmp_path)
    assert_close(logits(again, input_ids=ids), expected, rel=1e-5)


def test_pissa_export_with_rslora_keeps_the_scaling(tmp_path, ids):
    base = make_llama()
    model = fresh(base)
    splice.attach(model, splice.LoRA(r=4, alpha=8, rslora=True, targets=["q_proj"], init="pissa"))
    randomize(model, scale=0.1)
    expected = logits(model, input_ids=ids)
    splice.save(model, tmp_path)
    assert read_json(tmp_path)["r"] == 8
    peft_model = PeftModel.from_pretrained(fresh(base), str(tmp_path)).eval()
    assert_close(logits(peft_model, input_ids=ids), expected, rel=1e-5)


# -- the files themselves ------------------------------------------------------------------

SAME_FILES = {
    "bert-head": ("bert", ["query", "value"], ["classifier"]),
    "bert-embedding": ("bert", ["word_embeddings", "key"], []),
    "llama-all-linear": ("llama", "all-linear", []),
    "gpt2": ("gpt2", ["c_attn", "c_fc"], []),
    "convnet": ("convnet", ["embed", "conv1", "conv2"], []),
}


@pytest.mark.parametrize("case", list(SAME_FILES))
def test_tensor_names_and_shapes_match_peft(case, tmp_path):
    model_name, targets, heads = SAME_FILES[case]
    base = FACTORIES[model_name]()
    peft_saved(fresh(base), tmp_path / "peft", r=4, lora_alpha=8, target_modules=targets,
               modules_to_save=heads or None)
    model = fresh(base)
    splice.attach(model, splice.LoRA(r=4, alpha=8, targets=targets, train_also=heads))
    splice.save(model, tmp_path / "splice")
    assert tensor_names(tmp_path / "splice") == tensor_names(tmp_path / "peft")


@pytest.mark.parametrize("case", list(SPLICE_TO_PEFT))
def test_written_config_is_minimal_and_complete(case, tmp_path):
    model_name, lora = SPLICE_TO_PEFT[case]
    model = FACTORIES[model_name]()
    splice.attach(model, splice.LoRA(**lora))
    splice.save(model, tmp_path)
    config = read_json(tmp_path)
    assert REQUIRED_KEYS <= set(config)
    assert set(config) <= ALLOWED_KEYS
    assert set(config) <= {f.name for f in dataclasses.fields(LoraConfig)}
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert config["use_dora"] is False
    assert config["modules_to_save"] == (lora.get("train_also") or None)
    assert config["fan_in_fan_out"] is (model_name == "gpt2")
    assert config["use_rslora"] is lora.get("rslora", False)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "splice_manifest.json"]


def test_config_values(tmp_path):
    model = make_llama()
    splice.attach(model, splice.LoRA(r=4, alpha=6, dropout=0.1, targets=["q_proj", "v_proj"],
                                     rank_pattern={"v_proj": 2}))
    splice.save(model, tmp_path)
    config = read_json(tmp_path)
    assert config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 6, 0.1)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["rank_pattern"] == {"model.layers.0.self_attn.v_proj": 2,
                                      "model.layers.1.self_attn.v_proj": 2}
    # alpha is per module, so rank 2 with alpha 6 keeps its scaling of 6 / 2.
    assert config["alpha_pattern"] == {}
    assert config["inference_mode"] is True


def test_task_type_is_written_only_when_peft_finds_the_heads_it_expects(tmp_path):
    """PEFT's SEQ_CLS wrapper trains `classifier` in full and fails on a file without it."""
    cases = [(make_bert(), [], None), (make_bert(), ["classifier"], "SEQ_CLS"),
             (make_llama(), [], "CAUSAL_LM")]
    for i, (model, heads, task) in enumerate(cases):
        targets = ["q_proj"] if heads == [] and task else ["query"]
        splice.attach(model, splice.LoRA(r=2, targets=targets, train_also=heads))
        splice.save(model, tmp_path / str(i))
        assert read_json(tmp_path / str(i))["task_type"] == task


def test_peft_copy_of_an_embedding_weight_must_match_the_model(tmp_path, ids):
    """PEFT saves `embed_tokens.base_layer.weight` next to an embedding LoRA."""
    base = make_llama()
    peft_saved(fresh(base), tmp_path, r=2, lora_alpha=4, target_modules=["embed_tokens"])
    assert "base_model.model.model.embed_tokens.base_layer.weight" in tensor_names(tmp_path)
    other = make_llama(seed=1)  # same shapes, other weights
    before = logits(other, input_ids=ids)
    with pytest.raises(splice.AdapterFileError, match="embed_tokens.weight"):
        splice.load(other, tmp_path)
    assert splice.adapters(other) == {}
    assert torch.equal(logits(other, input_ids=ids), before)


def test_target_modules_fall_back_to_full_names_when_leaves_would_select_more(tmp_path):
    model = make_bert()
    splice.attach(model, splice.LoRA(r=2, targets=["query"], layers=[0]))
    splice.save(model, tmp_path)
    assert read_json(tmp_path)["target_modules"] == ["bert.encoder.layer.0.attention.self.query"]


def test_portable_refuses_what_vllm_cannot_serve(tmp_path):
    model = make_bert()
    splice.attach(model, splice.LoRA(r=4, targets=["query", "value"], rank_pattern={"value": 2},
                                     train_also=["classifier"]))
    with pytest.raises(splice.SpliceError, match="modules_to_save") as err:
        splice.save(model, tmp_path, portable=True)
    assert "rank" in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing written
    plain = make_llama()
    splice.attach(plain, splice.LoRA(r=4, targets=["q_proj"]))
    splice.save(plain, tmp_path / "ok", portable=True)
    assert read_json(tmp_path / "ok")["modules_to_save"] is None


# -- real weights --------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_peft_to_splice(minilm, minilm_inputs, tmp_path):
    base_out = logits(minilm, **minilm_inputs)
    model = fresh(minilm)
    peft_model = peft_saved(fresh(minilm), tmp_path, head="classifier", r=8, lora_alpha=16,
                            use_rslora=True, target_modules=["query", "value", "dense"],
                            rank_pattern={"intermediate.dense": 4}, task_type="SEQ_CLS")
    expected = logits(peft_model, **minilm_inputs)
    assert_differs(expected, base_out)
    splice.load(model, tmp_path)
    assert_close(logits(model, **minilm_inputs), expected, rel=1e-5)
    assert splice.adapters(model)["default"].train_also == ["classifier"]


@pytest.mark.slow
def test_minilm_splice_to_peft(minilm, minilm_inputs, tmp_path):
    base_out = logits(minilm, **minilm_inputs)
    model = fresh(minilm)
    splice.attach(model, splice.LoRA(r=8, alpha=16, targets=["query", "value"],
                                     train_also=["classifier"]))
    randomize(model, scale=0.05)
    randomize_module(model.classifier, scale=0.1, seed=4)
    expected = logits(model, **minilm_inputs)
    assert_differs(expected, base_out)
    splice.save(model, tmp_path)
    assert read_json(tmp_path)["task_type"] == "SEQ_CLS"
    peft_model = PeftModel.from_pretrained(fresh(minilm), str(tmp_path)).eval()
    assert_close(logits(peft_model, **minilm_inputs), expected, rel=1e-5)


@pytest.mark.slow
def test_minilm_all_linear_merged_export(minilm, minilm_inputs, tmp_path):
    """An adapter saved after training and merged in PEFT gives the same merged model."""
    model = fresh(minilm)
    splice.attach(model, splice.LoRA(r=4, alpha=8, targets="all-linear"))
    randomize(model, scale=0.05)
    expected = logits(model, **minilm_inputs)
    splice.save(model, tmp_path)
    assert read_json(tmp_path)["target_modules"] == ["dense", "key", "query", "value"]
    merged = PeftModel.from_pretrained(fresh(minilm), str(tmp_path)).merge_and_unload().eval()
    assert_close(logits(merged, **minilm_inputs), expected, rel=1e-5)
    assert_close(logits(splice.unload(model), **minilm_inputs), expected, rel=1e-5)
