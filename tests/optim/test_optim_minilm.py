"""LoFT and LoRA+ on the real MiniLM and real Rotten Tomatoes reviews: a fixed batch is fitted
(the training loss falls), the frozen weights do not move, and the trained adapter saved in HF
PEFT's format loads back to the same logits."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import minilm_tokenizer

import splice
from splice import assets
from splice.optim import LoFT, loraplus_groups

pytestmark = pytest.mark.slow


def _batch() -> dict[str, torch.Tensor]:
    rows = assets.rotten_tomatoes().train[:16]
    batch = minilm_tokenizer()([r["text"] for r in rows], padding=True, truncation=True, max_length=48,
                               return_tensors="pt")
    return {**batch, "labels": torch.tensor([r["label"] for r in rows])}


@pytest.mark.parametrize("optimizer", ["loft", "loraplus"])
def test_fits_a_real_batch_and_round_trips(minilm, minilm_base, optimizer, tmp_path):
    torch.manual_seed(0)
    model = splice.attach(minilm, splice.LoRA(r=8, alpha=16, targets=["query", "value"], train_also=["classifier"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    if optimizer == "loft":
        opt = LoFT.for_model(model, lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)
    else:
        opt = torch.optim.AdamW(loraplus_groups(model, lr=1e-3, lr_ratio=16))
    batch = _batch()
    model.train()
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.eval()
    splice.save(model, tmp_path / "adapter")
    loaded = splice.load(copy.deepcopy(minilm_base), tmp_path / "adapter")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)

