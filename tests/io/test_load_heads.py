"""`splice.load(..., heads=False)`: the adapter without the modules it trained in full, in
either format (what `TrainConfig.init_adapter` uses to give a new task its own heads)."""

from __future__ import annotations

import pytest
import torch
from helpers import logits, make_bert, randomize, randomize_module

import splice
from splice.core.api import model_state
from splice.core.heads import head_module

IDS = torch.tensor([[1, 5, 9, 13, 17, 21]])


@pytest.mark.parametrize("config", [
    splice.LoRA(r=2, targets=["query", "value"], train_also=["classifier"]),
    splice.DiaBlo(blocks=4, targets=["query"], train_also=["classifier"]),
], ids=["peft-format", "splice-format"])
def test_heads_false_leaves_the_trained_heads_out(tmp_path, config):
    trained = make_bert()
    splice.attach(trained, config)
    randomize(trained)
    with torch.no_grad():
        randomize_module(head_module(trained, "classifier", "default"), seed=4)
    splice.save(trained, tmp_path)
    base = make_bert()
    original = {k: v.clone() for k, v in base.classifier.state_dict().items()}
    loaded = splice.load(base, tmp_path, trainable=True, heads=False)
    record = model_state(loaded).adapters["default"]
    assert record.heads == [] and record.trainable
    assert all(torch.equal(v, original[k]) for k, v in loaded.classifier.state_dict().items())
    assert not any(name.startswith("classifier.") for name in splice.trainable_parameters(loaded))
    with_heads = splice.load(make_bert(), tmp_path)
    assert torch.equal(logits(with_heads, input_ids=IDS), logits(trained, input_ids=IDS))
    assert not torch.equal(logits(loaded, input_ids=IDS), logits(trained, input_ids=IDS))  # the old head is left out
