"""Bad input is refused with an error that says what is wrong, and the model is left untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import fresh, logits, make_bert, make_llama, randomize
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

import splice
from splice.core.host import hosts


def untouched(model: nn.Module, ids: torch.Tensor, before: torch.Tensor) -> bool:
    """No adapter, no host, and the same outputs as before."""
    return (splice.adapters(model) == {} and not list(hosts(model))
            and torch.equal(logits(model, input_ids=ids), before))


def peft_dir(model: nn.Module, path: Path, config) -> Path:
    get_peft_model(model, config).save_pretrained(str(path))
    return path


@pytest.fixture
def lora_dir(tmp_path) -> Path:
    """A valid PEFT LoRA directory for the tiny BERT."""
    return peft_dir(make_bert(), tmp_path / "lora", LoraConfig(
        r=4, target_modules=["query", "value"], init_lora_weights=False))


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


# -- targets -------------------------------------------------------------------------------


def test_target_typo_suggests_existing_names(bert, ids):
    before = logits(bert, input_ids=ids)
    with pytest.raises(splice.TargetError) as err:
        splice.attach(bert, splice.LoRA(targets=["quer", "valeu"]))
    message = str(err.value)
    assert "matched no module" in message and "Similar names that exist" in message
    assert "query" in message and "value" in message
    assert untouched(bert, ids, before)


def test_full_name_typo_suggests_the_full_name(llama):
    with pytest.raises(splice.TargetError) as err:
        splice.attach(llama, splice.LoRA(targets=["model.layers.0.self_attn.q_prj"]))
    assert "model.layers.0.self_attn.q_proj" in str(err.value)


def test_no_match_mentions_layers_and_exclude(llama):
    with pytest.raises(splice.TargetError) as err:
        splice.attach(llama, splice.LoRA(targets=["q_proj"], layers=[5], exclude=["v_proj"]))
    assert "in layers [5]" in str(err.value) and "exclude" in str(err.value)


def test_unsupported_module_type_is_named(bert, ids):
    before = logits(bert, input_ids=ids)
    with pytest.raises(splice.TargetError) as err:
        splice.attach(bert, splice.LoRA(targets=["query", "output.LayerNorm"]))
    assert "LayerNorm" in str(err.value)
    assert "bert.encoder.layer.0.attention.output.LayerNorm" in str(err.value)
    assert untouched(bert, ids, before)


def test_train_also_that_matches_nothing(bert):
    with pytest.raises(splice.TargetError, match="classifer"):
        splice.attach(bert, splice.LoRA(targets=["query"], train_also=["classifer"]))
    assert splice.adapters(bert) == {}


# -- names and merging ---------------------------------------------------------------------


def test_duplicate_adapter_name_keeps_the_first(bert, ids):
    splice.attach(bert, splice.LoRA(r=2, targets=["query"]), "a")
    randomize(bert, "a")
    out = logits(bert, input_ids=ids)
    with pytest.raises(splice.SpliceError, match="already attached"):
        splice.attach(bert, splice.LoRA(r=4, targets=["query", "key"]), "a")
    assert splice.adapters(bert)["a"].r == 2
    assert torch.equal(logits(bert, input_ids=ids), out)


def test_loading_under_a_taken_name(bert, lora_dir):
    splice.attach(bert, splice.LoRA(r=2, targets=["key"]))
    with pytest.raises(splice.SpliceError, match="already attached"):
        splice.load(bert, lora_dir)
    assert splice.adapters(bert)["default"].targets == ["key"]


def test_merge_into_an_int8_weight(bert, ids):
    splice.attach(bert, splice.LoRA(r=2, targets=["query", "value"]))
    randomize(bert)
    value = bert.bert.encoder.layer[1].attention.self.value
    value.weight = nn.Parameter(torch.ones(32, 32, dtype=torch.int8), requires_grad=False)
    weights = {k: v.clone() for k, v in bert.state_dict().items()}
    with pytest.raises(splice.MergeError) as err:
        splice.merge(bert)
    assert "int8" in str(err.value) and "Linear" in str(err.value)
    assert all(h.merged == [] for _, _, h in hosts(bert))
    assert all(torch.equal(v, weights[k]) for k, v in bert.state_dict().items())  # all or nothing


def test_merge_into_a_tied_embedding(gpt2, ids):
    """GPT-2's lm_head shares wte's weight: merging would silently change the head too."""
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    splice.attach(gpt2, splice.LoRA(r=2, targets=["wte", "c_attn"]))
    randomize(gpt2)
    out = logits(gpt2, input_ids=ids)
    weights = {k: v.clone() for k, v in gpt2.state_dict().items()}
    with pytest.raises(splice.MergeError, match="lm_head.weight"):
        splice.merge(gpt2)
    with pytest.raises(splice.MergeError, match="tied"):
        splice.unload(gpt2)
    assert all(torch.equal(v, weights[k]) for k, v in gpt2.state_dict().items())
    assert torch.equal(logits(gpt2, input_ids=ids), out)


# -- files that do not fit the model -------------------------------------------------------


def test_peft_adapter_from_another_hidden_size(tmp_path, ids):
    path = peft_dir(make_bert(hidden=48), tmp_path / "wide", LoraConfig(
        r=4, target_modules=["query", "value"], init_lora_weights=False))
    model = make_bert()
    before = logits(model, input_ids=ids)
    with pytest.raises(splice.ShapeMismatchError) as err:
        splice.load(model, path)
    message = str(err.value)
    assert "bert.encoder.layer.0.attention.self.query" in message
    assert "(4, 48)" in message and "(4, 32)" in message
    assert untouched(model, ids, before)


def test_peft_head_of_another_shape(tmp_path, ids):
    source = make_bert()
    source.classifier = nn.Linear(32, 3)
    path = peft_dir(source, tmp_path / "head", LoraConfig(
        r=2, target_modules=["query"], modules_to_save=["classifier"], init_lora_weights=False))
    model = make_bert()
    before = logits(model, input_ids=ids)
    with pytest.raises(splice.ShapeMismatchError) as err:
        splice.load(model, path)
    message = str(err.value)  # names the tensor and both shapes
    assert ("classifier.weight" in message and "(3, 32)" in message and "(2, 32)" in message) or (
        "classifier.bias" in message and "(3,)" in message and "(2,)" in message)
    assert untouched(model, ids, before)
    assert torch.equal(model.classifier.weight, make_bert().classifier.weight)


def test_peft_adapter_for_another_architecture(tmp_path, ids):
    path = peft_dir(make_llama(), tmp_path / "llama", LoraConfig(
        r=2, target_modules=["q_proj"], init_lora_weights=False))
    model = make_bert()
    before = logits(model, input_ids=ids)
    with pytest.raises(splice.ShapeMismatchError, match="model.layers.0.self_attn.q_proj"):
        splice.load(model, path)
    assert untouched(model, ids, before)


def test_native_adapter_from_another_hidden_size(tmp_path, ids):
    wide = make_bert(hidden=48)
    splice.attach(wide, splice.LoRA(r=2, targets=["query"], train_also=["classifier"]))
    splice.save(wide, tmp_path / "native", format="splice")
    model = make_bert()
    before = logits(model, input_ids=ids)
    with pytest.raises(splice.ShapeMismatchError) as err:
        splice.load(model, tmp_path / "native")
    assert "attention.self.query" in str(err.value) and "48" in str(err.value)
    assert untouched(model, ids, before)
    assert all(p.requires_grad for p in model.parameters())  # trainability as before


def test_native_adapter_for_missing_modules(tmp_path, ids):
    source = make_llama()
    splice.attach(source, splice.LoRA(r=2, targets=["q_proj"]))
    splice.save(source, tmp_path / "native", format="splice")
    model = make_bert()
    before = logits(model, input_ids=ids)
    with pytest.raises(splice.ShapeMismatchError, match="does not have"):
        splice.load(model, tmp_path / "native")
    assert untouched(model, ids, before)


def test_rank_in_config_disagrees_with_tensors(lora_dir, bert, ids):
    before = logits(bert, input_ids=ids)
    edit_config(lora_dir, r=8)
    with pytest.raises(splice.AdapterFileError, match="r=8"):
        splice.load(bert, lora_dir)
    assert untouched(bert, ids, before)


# -- files that are not adapters splice can read -------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(lora_dir, bert, ids, damage):
    weights = lora_dir / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07not a tensor" * 50,
                         "empty": b""}[damage])
    before = logits(bert, input_ids=ids)
    with pytest.raises(splice.AdapterFileError, match="corrupt") as err:
        splice.load(bert, lora_dir)
    assert "adapter_model.safetensors" in str(err.value)
    assert untouched(bert, ids, before)


def test_corrupt_legacy_bin(lora_dir, bert):
    (lora_dir / "adapter_model.safetensors").unlink()
    (lora_dir / "adapter_model.bin").write_bytes(b"\x80garbage")
    with pytest.raises(splice.AdapterFileError, match="corrupt"):
        splice.load(bert, lora_dir)


def test_legacy_bin_is_read(lora_dir, tmp_path, ids):
    from safetensors.torch import load_file

    tensors = load_file(str(lora_dir / "adapter_model.safetensors"))
    reference = make_bert()
    splice.load(reference, lora_dir)
    (lora_dir / "adapter_model.safetensors").unlink()
    torch.save(tensors, lora_dir / "adapter_model.bin")
    model = make_bert()
    splice.load(model, lora_dir)
    assert torch.equal(logits(model, input_ids=ids), logits(reference, input_ids=ids))


def test_missing_files(tmp_path, lora_dir, bert):
    with pytest.raises(splice.AdapterFileError, match="does not exist"):
        splice.load(bert, tmp_path / "nowhere")
    (tmp_path / "outer" / "task_a").mkdir(parents=True)
    (lora_dir / "adapter_config.json").rename(tmp_path / "outer" / "task_a" / "adapter_config.json")
    with pytest.raises(splice.AdapterFileError, match="task_a"):  # PEFT's <dir>/<name>/ layout
        splice.load(bert, tmp_path / "outer")
    (tmp_path / "outer" / "task_a" / "adapter_config.json").rename(lora_dir / "adapter_config.json")
    (lora_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(splice.AdapterFileError, match="adapter_model.safetensors"):
        splice.load(bert, lora_dir)
    assert splice.adapters(bert) == {}


def test_unknown_method_in_native_config(tmp_path, bert, ids):
    source = make_bert()
    splice.attach(source, splice.LoRA(r=2, targets=["query"]))
    path = splice.save(source, tmp_path / "native", format="splice")
    config = json.loads((path / "adapter_config.json").read_text())
    config["method"] = config["config"]["method"] = "hypernetwork-9000"
    (path / "adapter_config.json").write_text(json.dumps(config))
    before = logits(bert, input_ids=ids)
    with pytest.raises(splice.AdapterFileError, match="hypernetwork-9000") as err:
        splice.load(bert, path)
    assert "lora" in str(err.value)  # lists the known ones
    assert untouched(bert, ids, before)


def test_native_format_version_and_tensor_set(tmp_path, bert):
    source = make_bert()
    splice.attach(source, splice.LoRA(r=2, targets=["query"]))
    path = splice.save(source, tmp_path / "native", format="splice")
    edit_config(path, format_version=2)
    with pytest.raises(splice.AdapterFileError, match="version 2"):
        splice.load(bert, path)
    edit_config(path, format_version=1)
    save_file({"bert.encoder.layer.0.attention.self.query.lora_A": torch.zeros(2, 32)},
              str(path / "adapter_model.safetensors"))
    with pytest.raises(splice.AdapterFileError, match="missing tensors"):
        splice.load(bert, path)
    assert splice.adapters(bert) == {} and not list(hosts(bert))


def test_ia3_adapter_is_refused(tmp_path, bert, ids):
    path = peft_dir(make_bert(), tmp_path / "ia3", IA3Config(
        target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]))
    before = logits(bert, input_ids=ids)
    with pytest.raises(splice.AdapterFileError, match="IA3"):
        splice.load(bert, path)
    assert untouched(bert, ids, before)


def test_dora_on_an_embedding_is_refused(tmp_path, bert, ids):
    path = peft_dir(make_bert(), tmp_path / "dora", LoraConfig(
        r=2, target_modules=["word_embeddings"], use_dora=True))
    before = logits(bert, input_ids=ids)
    with pytest.raises(splice.AdapterFileError, match="DoRA on embedding"):
        splice.load(bert, path)
    assert untouched(bert, ids, before)


@pytest.mark.parametrize(("changes", "match"), [
    ({"lora_bias": True}, "lora_bias"),
    ({"bias": "all"}, "bias='all'"),
    ({"peft_type": "LOHA"}, "LOHA"),
])
def test_unsupported_peft_options(lora_dir, bert, changes, match):
    edit_config(lora_dir, **changes)
    with pytest.raises(splice.AdapterFileError, match=match):
        splice.load(bert, lora_dir)
    assert splice.adapters(bert) == {}


@pytest.mark.parametrize(("text", "match"), [
    ('{"model_type": "bert", "hidden_size": 32}', "neither a splice nor an HF PEFT adapter"),
    ("[1, 2, 3]", "JSON object"),
    ("{not json", "not valid JSON"),
])
def test_foreign_config(lora_dir, bert, text, match):
    (lora_dir / "adapter_config.json").write_text(text)
    with pytest.raises(splice.AdapterFileError, match=match):
        splice.load(bert, lora_dir)
    assert splice.adapters(bert) == {}


@pytest.mark.parametrize(("tensors", "match"), [
    ({"encoder.layer.0.query.lora_A.weight": torch.zeros(4, 32)}, "does not start with"),
    ({"base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight": torch.zeros(4, 32)},
     "not both A and B"),
    ({"base_model.model.bert.pooler.dense.weight": torch.zeros(32, 32)}, "unexpected tensor"),
    ({"base_model.model.bert.encoder.layer.0.attention.self.query.lora_magnitude_vector":
      torch.zeros(32)}, "not both A and B"),
    ({"base_model.model.bert.encoder.layer.0.attention.self.query.lora_bias":
      torch.zeros(32)}, "unsupported LoRA tensor"),
    ({}, "no LoRA tensors"),
])
def test_foreign_tensors(lora_dir, bert, tensors, match):
    save_file(tensors, str(lora_dir / "adapter_model.safetensors"))
    with pytest.raises(splice.AdapterFileError, match=match):
        splice.load(bert, lora_dir)
    assert splice.adapters(bert) == {}


# -- writing -------------------------------------------------------------------------------


def test_saving_into_a_non_empty_directory(tmp_path):
    model = make_bert()
    splice.attach(model, splice.LoRA(r=2, targets=["query"]))
    target = tmp_path / "out"
    target.mkdir()
    splice.save(model, target)  # an existing empty directory is fine
    splice.detach(model, "default")
    splice.attach(model, splice.LoRA(r=3, targets=["value"]))
    with pytest.raises(splice.OutputExistsError, match="overwrite=True"):
        splice.save(model, target)
    assert json.loads((target / "adapter_config.json").read_text())["r"] == 2  # not touched
    splice.save(model, target, overwrite=True)
    assert json.loads((target / "adapter_config.json").read_text())["r"] == 3
    loaded = make_bert()
    splice.load(loaded, target)
    assert [n for n, _, _ in hosts(loaded)] == [
        "bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.1.attention.self.value"]


def test_saving_onto_a_file(tmp_path):
    model = make_bert()
    splice.attach(model, splice.LoRA(r=2, targets=["query"]))
    (tmp_path / "file").write_text("mine")
    with pytest.raises(splice.OutputExistsError, match="not a directory"):
        splice.save(model, tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "mine"


def test_loaded_model_matches_after_refused_load_of_another(tmp_path, ids, lora_dir):
    """A refused load next to a working adapter leaves that adapter as it was."""
    model = make_bert()
    splice.load(model, lora_dir, name="good")
    out = logits(model, input_ids=ids)
    wide = peft_dir(make_bert(hidden=48), tmp_path / "wide", LoraConfig(
        r=4, target_modules=["key"], init_lora_weights=False))
    with pytest.raises(splice.ShapeMismatchError):
        splice.load(fresh(model), wide)  # a copy, to check the copy logic too
    with pytest.raises(splice.ShapeMismatchError):
        splice.load(model, wide, name="bad")
    assert list(splice.adapters(model)) == ["good"]
    assert torch.equal(logits(model, input_ids=ids), out)
