"""`base_model_name_or_path` is portable: a bundled model's folder is recorded by its Hub id
(which resolves back to the bundled copy offline), a folder whose config.json names a Hub id by
that id, anything else as it is."""

from __future__ import annotations

import json

import pytest
from torch import nn

import splice
from splice import assets
from splice.io.base_names import base_model_name, portable_name
from splice.train.tasks import model_path


def minilm() -> str:
    try:
        return str(assets.minilm_path())
    except assets.AssetMissingError as err:
        pytest.skip(str(err))


def named(name_or_path: str) -> nn.Module:
    model = nn.Linear(2, 2)
    model.name_or_path = name_or_path
    return model


def test_the_bundled_minilm_is_recorded_by_its_hub_id_and_resolves_back():
    folder = minilm()
    assert base_model_name(named(folder)) == "sentence-transformers/all-MiniLM-L6-v2"
    assert str(model_path("sentence-transformers/all-MiniLM-L6-v2")) == folder
    assert assets.bundled_model("minilm") == assets.bundled_model("sentence-transformers/all-MiniLM-L6-v2")


def test_the_converted_smollm2_folder_is_recognised_without_converting(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path))
    (tmp_path / "smollm2-135m-instruct").mkdir()
    assert portable_name(str(tmp_path / "smollm2-135m-instruct")) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not (tmp_path / "smollm2-135m-instruct" / "model.safetensors").exists()


def test_a_folder_recording_a_hub_id_is_named_by_it(tmp_path):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"_name_or_path": "org/model"}))
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/model"}))
    assert portable_name(str(tmp_path / "hub")) == "org/model"
    assert portable_name(str(tmp_path / "local")) == str(tmp_path / "local")  # nothing better to say
    assert portable_name("org/elsewhere") == "org/elsewhere"
    assert base_model_name(nn.Linear(2, 2)) is None


def test_a_saved_adapter_records_the_portable_name(tmp_path):
    from helpers import make_bert

    model = make_bert()
    model.name_or_path = minilm()
    splice.attach(model, splice.LoRA(r=2, targets=["query"]))
    splice.save(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
