"""SEA-PEFT on the real MiniLM and a few Rotten Tomatoes rows: two audits over LoRA and LoReFT units
of the top two layers, within the budget, and the exported choice fine-tunes (slow: ~30 s)."""

from __future__ import annotations

import pytest
from rich.console import Console

from splice.selection.sea_peft import SeaPeftConfig, finetune, search
from splice.train import TrainConfig


@pytest.mark.slow
def test_sea_peft_on_minilm_audits_within_the_budget_and_fine_tunes_the_choice(tmp_path):
    config = TrainConfig(model="minilm", data="rotten_tomatoes", max_train_examples=96, max_eval_examples=32,
                         batch_size=8, max_length=32, lr=2e-3, head_lr=3e-2, max_steps=3, eval_every=3,
                         output_dir=str(tmp_path / "search"), seed=0)
    budget = 2 * 8 * (384 + 384)  # two LoRA r=8 units on a 384x384 projection
    space = SeaPeftConfig(budget=budget, sites={"q": ["query"], "v": ["value"]}, layers=[4, 5],
                          families=[{"method": "lora", "r": [4, 8]}, {"method": "loreft", "r": 4, "positions": "f1"}],
                          warmup=2, audit_every=2, audits=2, probe_steps=1)
    seen = []
    selection = search(config, space, console=Console(quiet=True), on_audit=seen.append)
    assert len(selection.units) == 2 * 2 * 2 + 2 and len(selection.audits) == 2
    assert all(len(a["measured"]) == 2 for a in selection.audits)  # ceil(20% of 10)
    assert all(a["active_params"] <= budget for a in seen) and selection.params <= budget
    assert all(m["delta"] is not None for a in selection.audits for m in a["measured"])
    assert selection.steps == {"train": 4, "probe": sum(not m["was_active"] for a in selection.audits
                                                        for m in a["measured"]), "evaluations": 2 + 4}
    if not selection.adapters:
        pytest.skip("this short search kept no unit")
    result = finetune(TrainConfig(**{**config.to_dict(), "output_dir": str(tmp_path / "finetune")}),
                      selection.adapters, console=Console(quiet=True))
    assert result.status == "finished"
    assert result.parameters["trainable"] - (384 + 1) * 2 == selection.params  # the head is trained too
