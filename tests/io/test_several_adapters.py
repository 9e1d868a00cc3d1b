"""Several adapters in one folder, in HF PEFT's layout ("default" at the root, any other in a
subfolder named after it): splice writes what PEFT reads and reads what PEFT writes."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, logits, make_bert, randomize
from peft import LoraConfig, PeftModel, get_peft_model

import splice
from splice.core.errors import AdapterFileError, SpliceError

IDS = torch.tensor([[1, 5, 9, 13, 17, 21], [2, 4, 8, 16, 32, 64]])


def two_adapters(first: str = "default", second: str = "b") -> torch.nn.Module:
    model = make_bert()
    splice.attach(model, splice.LoRA(r=2, targets=["query", "value"]), name=first)
    splice.attach(model, splice.LoRA(r=3, alpha=6, targets=["key"], train_also=["classifier"]), name=second)
    randomize(model, first, seed=1)
    randomize(model, second, seed=2)
    return model


def only(model: torch.nn.Module, name: str) -> torch.Tensor:
    splice.activate(model, name)
    return logits(model, input_ids=IDS)


def test_peft_loads_the_root_and_the_subfolders(tmp_path):
    model = two_adapters()
    splice.save(model, tmp_path, adapters=["default", "b"], overwrite=True)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "b" / "adapter_config.json").is_file()
    peft_model = PeftModel.from_pretrained(make_bert(), str(tmp_path)).eval()
    peft_model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    assert_close(logits(peft_model, input_ids=IDS), only(model, "default"))
    peft_model.set_adapter("b")
    assert_close(logits(peft_model, input_ids=IDS), only(model, "b"))
    by_subfolder = PeftModel.from_pretrained(make_bert(), str(tmp_path), subfolder="b").eval()
    assert_close(logits(by_subfolder, input_ids=IDS), only(model, "b"))


def test_splice_loads_them_back_by_name(tmp_path):
    model = two_adapters("a", "b")
    splice.save(model, tmp_path / "both", adapters="all")
    assert not (tmp_path / "both" / "adapter_config.json").exists()  # no "default": nothing at the root
    assert (tmp_path / "both" / "README.md").is_file()
    loaded = splice.load(make_bert(), tmp_path / "both", adapters="all")
    assert sorted(splice.adapters(loaded)) == ["a", "b"]
    for name in ("a", "b"):
        assert_close(only(loaded, name), only(model, name))
    chosen = splice.load(make_bert(), tmp_path / "both", adapters=["b"])
    assert list(splice.adapters(chosen)) == ["b"]


def test_splice_reads_peft_selected_adapters(tmp_path):
    torch.manual_seed(0)
    peft_model = get_peft_model(make_bert(), LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    peft_model.add_adapter("other", LoraConfig(r=4, target_modules=["value"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path), selected_adapters=["default", "other"])
    loaded = splice.load(make_bert(), tmp_path, adapters="all")
    for name in ("default", "other"):
        peft_model.set_adapter(name)
        assert_close(only(loaded, name), logits(peft_model.eval(), input_ids=IDS))


def test_a_missing_adapter_attaches_none_of_them(tmp_path):
    model = two_adapters()
    splice.save(model, tmp_path / "both", adapters="all")
    fresh = make_bert()
    with pytest.raises(AdapterFileError, match=r"holds no adapter 'c' \(.*both/c\); it holds \['b', 'default'\]"):
        splice.load(fresh, tmp_path / "both", adapters=["default", "c"])
    (tmp_path / "both" / "b" / "adapter_model.safetensors").write_bytes(b"broken")
    with pytest.raises(AdapterFileError, match="corrupt"):
        splice.load(fresh, tmp_path / "both", adapters="all")
    assert splice.adapters(fresh) == {}  # "default", loaded before "b" failed, was detached again


def test_bad_requests_are_refused_before_writing(tmp_path):
    model = two_adapters()
    with pytest.raises(SpliceError, match="not both"):
        splice.save(model, tmp_path / "x", "default", adapters=["b"])
    with pytest.raises(SpliceError, match=r"no adapter named \['zzz'\]"):
        splice.save(model, tmp_path / "x", adapters=["b", "zzz"])
    with pytest.raises(SpliceError, match="cannot name a subfolder"):
        splice.load(make_bert(), tmp_path, adapters=["../up"])
    with pytest.raises(SpliceError, match="with adapters= each keeps its own name"):
        splice.load(make_bert(), tmp_path, "mine", adapters="all")
    assert not (tmp_path / "x").exists()
