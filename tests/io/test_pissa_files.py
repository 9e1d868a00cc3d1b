"""PiSSA adapters that HF PEFT saved without conversion (issue 12, defect 5).

Such a file holds the trained factors for the *residual* base W - s·B0A0, where B0A0 is the
top-r singular part of W. PEFT rebuilds that residual on load; so does splice, and gets PEFT's
outputs. Inits whose base change cannot be rebuilt exactly are refused.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_close, assert_differs, make_llama
from peft import LoraConfig, PeftModel, get_peft_model

import splice
from splice.core.errors import AdapterFileError


def trained_pissa(path, init: str = "pissa") -> torch.Tensor:
    """A PEFT PiSSA adapter on a tiny Llama whose factors moved away from their init, saved as
    PEFT saves it without conversion; returns its logits on fixed ids."""
    model = get_peft_model(make_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                    init_lora_weights=init))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(path)
    return model.eval()(input_ids=IDS).logits


IDS = torch.tensor([[3, 7, 1, 9, 4, 2], [5, 5, 8, 2, 6, 1]])


def test_unconverted_pissa_loads_with_peft_outputs_and_saves_as_plain_lora(tmp_path):
    expected = trained_pissa(tmp_path / "pissa")
    assert json.loads((tmp_path / "pissa" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    reloaded = PeftModel.from_pretrained(make_llama(), tmp_path / "pissa").eval()
    assert_close(reloaded(input_ids=IDS).logits, expected, rel=1e-5)  # PEFT's own reload, the reference
    base = make_llama()(input_ids=IDS).logits
    model = splice.load(make_llama(), tmp_path / "pissa")
    ours = model(input_ids=IDS).logits
    assert_differs(ours, base)
    assert_close(ours, expected, rel=1e-5)
    splice.save(model, tmp_path / "converted")  # a plain rank-2r LoRA for the unmodified base
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8
    plain = PeftModel.from_pretrained(make_llama(), tmp_path / "converted").eval()
    assert_close(plain(input_ids=IDS).logits, expected, rel=1e-5)
    splice.detach(model, "default")
    assert_close(model(input_ids=IDS).logits, base, rel=1e-5)


def test_unconverted_pissa_is_refused_where_no_base_model_is_given(tmp_path):
    trained_pissa(tmp_path / "pissa")
    with pytest.raises(AdapterFileError, match="saved without conversion"):
        splice.io.adapter_state(tmp_path / "pissa")


def test_randomised_pissa_is_refused_with_the_conversion_to_use(tmp_path):
    trained_pissa(tmp_path / "fast", init="pissa_niter_2")
    model = make_llama()
    with pytest.raises(AdapterFileError, match="path_initial_model_for_weight_conversion"):
        splice.load(model, tmp_path / "fast")
    assert splice.adapters(model) == {}
