"""splice's own format: exact round trips, and a method PEFT cannot hold."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from helpers import (
    assert_close,
    assert_differs,
    fresh,
    logits,
    make_bert,
    make_convnet,
    randomize,
    randomize_module,
)
from peft import PeftModel
from safetensors import safe_open
from torch import nn

import splice
from splice.core.host import hosts
from splice.core.registry import config_class


@splice.register_method
@dataclass
class BiasShift(splice.AdapterConfig):
    """A test-only method: a learned vector added to the host's output (no weight form)."""

    method: ClassVar[str] = "BiasShift"  # mixed case on purpose: lookups are case-insensitive
    start: float = 0.0

    def build(self, info, module_name, base) -> BiasShiftAdapter:
        return BiasShiftAdapter(info.out_features, self.start)


class BiasShiftAdapter(splice.Adapter):
    def __init__(self, features: int, start: float) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.full((features,), float(start)))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift


def read_json(path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


# -- LoRA in the native format -------------------------------------------------------------


def test_lora_native_round_trip_is_exact(tmp_path, ids):
    base = make_bert()
    model = fresh(base)
    config = splice.LoRA(r=3, alpha=5, rslora=True, targets=["query", "intermediate.dense"],
                         rank_pattern={"intermediate.dense": 2}, train_also=["classifier"])
    splice.attach(model, config)
    randomize(model)
    randomize_module(model.classifier, seed=3)
    expected = logits(model, input_ids=ids)
    assert_differs(expected, logits(base, input_ids=ids))
    splice.save(model, tmp_path, format="splice")

    saved = read_json(tmp_path)
    assert saved["format"] == "splice" and saved["format_version"] == 1
    assert saved["method"] == "lora" and saved["config"] == config.to_dict()
    assert saved["modules"] == [name for name, _, _ in hosts(model)]
    assert saved["train_also"] == ["classifier"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert "bert.encoder.layer.0.attention.self.query.lora_A" in keys
    assert {"train_also.classifier.weight", "train_also.classifier.bias"} <= keys

    loaded = fresh(base)
    splice.load(loaded, tmp_path, name="again", trainable=True)
    assert torch.equal(logits(loaded, input_ids=ids), expected)
    assert splice.adapters(loaded)["again"] == config.replace(
        targets=saved["modules"], exclude=None, layers=None)
    assert set(splice.trainable_parameters(loaded)) == {
        n.replace(".default.", ".again.") for n in splice.trainable_parameters(model)}


def test_conv_and_embedding_lora_native_round_trip(tmp_path, conv_inputs):
    base = make_convnet()
    model = fresh(base)
    splice.attach(model, splice.LoRA(r=2, targets=["embed", "conv1", "conv2", "head"]))
    randomize(model)
    expected = logits(model, *conv_inputs)
    splice.save(model, tmp_path, format="splice")
    loaded = fresh(base)
    splice.load(loaded, tmp_path)
    assert torch.equal(logits(loaded, *conv_inputs), expected)


def test_pissa_native_round_trip(tmp_path, ids):
    base = make_bert()
    model = fresh(base)
    splice.attach(model, splice.LoRA(r=4, targets=["query", "value"], init="pissa"))
    randomize(model, scale=0.1)
    expected = logits(model, input_ids=ids)
    splice.save(model, tmp_path, format="splice")
    loaded = fresh(base)
    splice.load(loaded, tmp_path)
    assert_close(logits(loaded, input_ids=ids), expected, rel=1e-5)
    splice.detach(loaded, "default")  # the original weights come back on the loading model too
    assert_close(logits(loaded, input_ids=ids), logits(base, input_ids=ids), rel=1e-5)


def test_config_dict_round_trip():
    config = splice.LoRA(r=4, alpha=2, rslora=True, targets=r".*\.q", exclude=["x"], layers=range(3),
                         rank_pattern={"a": 2}, alpha_pattern={"b": 3.5}, train_also="head")
    data = config.to_dict()
    assert data["method"] == "lora" and data["layers"] == [0, 1, 2] and data["train_also"] == ["head"]
    assert "dropout" not in data and "init" not in data  # defaults are left out
    assert splice.config_from_dict(data) == config
    assert splice.config_from_dict({"method": "LoRA", "r": 2}) == splice.LoRA(r=2)
    assert json.loads(json.dumps(data)) == data


# -- a method PEFT lacks -------------------------------------------------------------------


def test_registry_knows_the_custom_method():
    assert "biasshift" in [m.lower() for m in splice.method_names()]
    assert config_class("BiasShift") is BiasShift
    assert config_class("biasshift") is BiasShift
    assert splice.config_from_dict({"method": "BiasShift", "start": 2.0}) == BiasShift(start=2.0)


def test_register_method_refuses_nameless_and_clashing_classes():
    with pytest.raises(TypeError, match="method"):
        @splice.register_method
        @dataclass
        class Nameless(splice.AdapterConfig):
            pass

    with pytest.raises(TypeError, match="already registered"):
        @splice.register_method
        @dataclass
        class Impostor(splice.AdapterConfig):
            method: ClassVar[str] = "lora"

    assert config_class("lora") is splice.LoRA


def test_custom_method_saves_natively_and_round_trips(tmp_path, ids):
    base = make_bert()
    model = fresh(base)
    splice.attach(model, BiasShift(targets=["query", "output.dense"], start=0.5),
                  "shift")
    randomize(model, "shift")
    expected = logits(model, input_ids=ids)
    assert_differs(expected, logits(base, input_ids=ids))

    splice.save(model, tmp_path)  # format="auto" must pick the native format
    saved = read_json(tmp_path)
    assert saved["format"] == "splice" and saved["method"] == "BiasShift"
    assert "peft_type" not in saved
    loaded = fresh(base)
    splice.load(loaded, tmp_path, name="shift")
    assert torch.equal(logits(loaded, input_ids=ids), expected)
    assert splice.adapters(loaded)["shift"].start == 0.5
    assert isinstance(loaded.bert.encoder.layer[0].attention.self.query.splice["shift"],
                      BiasShiftAdapter)


def test_custom_method_cannot_merge_or_go_to_peft(tmp_path, ids):
    base = make_bert()
    model = fresh(base)
    splice.attach(model, BiasShift(targets=["query"], start=0.5))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    out = logits(model, input_ids=ids)
    with pytest.raises(splice.MergeError, match="BiasShiftAdapter"):
        splice.merge(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(h.merged == [] for _, _, h in hosts(model))
    assert torch.equal(logits(model, input_ids=ids), out)
    with pytest.raises(splice.SpliceError, match="format='splice'"):
        splice.save(model, tmp_path / "peft", format="peft")
    with pytest.raises(splice.SpliceError, match="portable"):
        splice.save(model, tmp_path / "portable", portable=True)
    splice.save(model, tmp_path / "native")
    with pytest.raises(Exception) as err:  # noqa: B017 - PEFT's own error type is not ours to fix
        PeftModel.from_pretrained(fresh(base), str(tmp_path / "native"))
    assert "peft_type" in str(err.value)


def test_merge_with_a_lora_and_a_custom_adapter_rolls_back(ids):
    model = make_bert()
    splice.attach(model, splice.LoRA(r=2, targets=["query"]), "lora")
    splice.attach(model, BiasShift(targets=["value"], start=0.1), "shift")
    randomize(model, "lora")
    splice.activate(model, ["lora", "shift"])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(splice.MergeError):
        splice.merge(model)
    assert all(h.merged == [] for _, _, h in hosts(model))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


# -- which adapter gets saved --------------------------------------------------------------


def test_save_picks_the_adapter(tmp_path):
    model = make_bert()
    with pytest.raises(splice.SpliceError, match="no adapter"):
        splice.save(model, tmp_path / "none")
    splice.attach(model, splice.LoRA(r=2, targets=["query"]), "a")
    splice.attach(model, splice.LoRA(r=3, targets=["value"]), "b")
    splice.activate(model, ["a", "b"])
    with pytest.raises(splice.SpliceError, match="pass name="):
        splice.save(model, tmp_path / "two")
    with pytest.raises(splice.SpliceError, match="no adapter named"):
        splice.save(model, tmp_path / "c", "c")
    splice.activate(model, "b")
    splice.save(model, tmp_path / "active")  # the only active one
    assert json.loads((tmp_path / "active" / "adapter_config.json").read_text())["r"] == 3
    splice.save(model, tmp_path / "named", "a")
    assert json.loads((tmp_path / "named" / "adapter_config.json").read_text())["r"] == 2
