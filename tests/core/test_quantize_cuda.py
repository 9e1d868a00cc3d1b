"""QLoRA on CUDA, for a machine with a GPU (skipped elsewhere; CI never depends on it): `auto`
picks bitsandbytes there, an adapter trains in bf16 compute, and HF PEFT loads it on the same
bitsandbytes base with the same outputs."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, lm_training_losses, make_llama, randomize
from peft import PeftModel

import splice

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_4bit_llama() -> torch.nn.Module:
    return splice.quantize(make_llama().cuda(), "nf4", compute_dtype=torch.bfloat16)


def test_auto_picks_bitsandbytes_on_cuda_and_trains(ids):
    model = cuda_4bit_llama()
    assert {s.backend for s in splice.quantized_layers(model).values()} == {"bitsandbytes"}
    splice.attach(model, splice.LoRA(r=4, targets="all-linear"))
    losses = lm_training_losses(model, ids.cuda(), steps=10)
    assert losses[-1] < losses[0]


def test_peft_loads_a_splice_adapter_on_the_same_cuda_base(ids, tmp_path):
    model = cuda_4bit_llama()
    splice.attach(model, splice.LoRA(r=4, targets="all-linear"))
    randomize(model)
    splice.save(model, tmp_path / "adapter")
    ids = ids.cuda()
    with torch.no_grad():
        expected = model(ids).logits
        peft_model = PeftModel.from_pretrained(cuda_4bit_llama(), str(tmp_path / "adapter")).eval()
        assert_close(peft_model(input_ids=ids).logits.float(), expected.float(), rel=1e-3)
        plain = splice.unload(model, dequantize=True)
        assert not splice.quantized_layers(plain)
        assert_close(plain(ids).logits.float(), expected.float(), rel=1e-2)  # bf16 compute vs fp32 products
