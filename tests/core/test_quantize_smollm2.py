"""QLoRA on real weights: SmolLM2-135M with its Linear layers in NF4 learns arithmetic answers,
and its adapter, saved and loaded on a fresh 4-bit base, gives the same outputs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import splice
from splice.train.data import collator
from splice.train.tasks import stats_from_logits


def smollm2(tokenizer_too: bool = False):
    try:
        path = splice.assets.smollm2_path()
    except splice.assets.AssetMissingError as err:
        pytest.skip(str(err))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if not tokenizer_too:
        return model
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model, tokenizer


def completion_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    stats = stats_from_logits("causal_lm", logits, batch["labels"])
    return stats["loss_sum"].sum() / stats["tokens"].sum()


@pytest.mark.slow
def test_qlora_on_smollm2_learns_and_reloads(tmp_path):
    model, tokenizer = smollm2(tokenizer_too=True)
    splice.quantize(model, "nf4", backend="torchao")
    sizes = splice.base_bytes(model)
    assert sizes["quantized_bytes"] <= 0.3 * sizes["quantized_as_bf16_bytes"]  # the memory goal
    assert len(splice.quantized_layers(model)) == 30 * 7  # every projection; the tied LM head stays dense
    splice.attach(model, splice.LoRA(r=8, alpha=16, targets="all-linear"))
    rows = splice.assets.arithmetic().train[:16]
    batch = collator("causal_lm", tokenizer, 64)(rows)  # prompt + answer + eos, the loss on the answer
    optimizer = torch.optim.AdamW(splice.trainable_parameters(model).values(), lr=2e-3)
    model.train()
    first = None
    for _ in range(6):
        loss = completion_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    model.eval()
    with torch.no_grad():
        trained = completion_loss(model, batch).item()
        logits = model(input_ids=batch["input_ids"][:4]).logits
    assert trained < 0.7 * first
    splice.save(model, tmp_path / "qlora")
    fresh = splice.load(splice.quantize(smollm2(), "nf4", backend="torchao"), tmp_path / "qlora").eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=batch["input_ids"][:4]).logits, logits)
