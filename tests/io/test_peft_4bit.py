"""HF PEFT and splice on 4-bit bases: an adapter trained on a bitsandbytes NF4 base moves between
them (on CPU, through bitsandbytes' CPU backend), and loads into a full-precision base."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, llama_for, randomize
from peft import LoraConfig, PeftModel, get_peft_model

import splice

pytest.importorskip("bitsandbytes")


def bnb_llama() -> torch.nn.Module:
    return splice.quantize(llama_for("bitsandbytes"), "nf4", backend="bitsandbytes")


def test_splice_adapter_on_a_bitsandbytes_base_loads_in_peft_on_the_same_base(ids, tmp_path):
    model = bnb_llama()
    splice.attach(model, splice.LoRA(r=4, alpha=8, targets="all-linear"))
    randomize(model)
    splice.save(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = model(ids).logits
    peft_model = PeftModel.from_pretrained(bnb_llama(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert_close(peft_model(input_ids=ids).logits, expected, rel=1e-5)


def test_peft_adapter_trained_on_a_4bit_base_loads_into_splice_on_either_base(ids, tmp_path):
    """An adapter trained on a 4-bit base is an ordinary LoRA file: splice loads it on a 4-bit base
    (PEFT's outputs there) and on the full-precision base (PEFT's outputs there); the two differ by
    the base's quantization alone, the shift a user sees when moving the adapter off the 4-bit base."""
    torch.manual_seed(3)
    peft_model = get_peft_model(bnb_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                        init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        on_4bit = peft_model(input_ids=ids).logits
        peft_dense = PeftModel.from_pretrained(llama_for("bitsandbytes"), str(tmp_path / "peft"))(input_ids=ids).logits
        splice_4bit = splice.load(bnb_llama(), tmp_path / "peft")(ids).logits
        splice_dense = splice.load(llama_for("bitsandbytes"), tmp_path / "peft")(ids).logits
        base_shift = (bnb_llama()(ids).logits - llama_for("bitsandbytes")(ids).logits).norm()
    assert_close(splice_4bit, on_4bit, rel=1e-5)
    assert_close(splice_dense, peft_dense, rel=1e-5)
    shift = (splice_dense - splice_4bit).norm()
    assert 0.3 * base_shift < shift < 3 * base_shift  # the quantization's shift, not a broken adapter

