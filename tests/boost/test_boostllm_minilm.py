"""Integration: BoostLLM with the real MiniLM on sklearn's iris (real weights, a real table): the
two text views, rounds that lower the held-out log-loss, and the routed prediction of all rounds
in one pass equal to the prior plus each round's own forward."""

from __future__ import annotations

import pytest
import torch

from splice.boost.tabular import draw_shots, load_table
from splice.boost.tabular_llm import boostllm


@pytest.mark.slow
def test_boostllm_on_minilm_learns_iris_and_its_routed_pass_is_the_sum_of_the_rounds():
    table = load_table("iris")
    split = draw_shots(table, shots=12, seed=0)
    result = boostllm("minilm", table, split, rounds=2, steps=6, lr=3e-3, head_lr=5e-2, r=4, alpha=8,
                      test_rows=30, max_length=96)
    history = result.history
    assert history["rounds"][-1]["validation_loss"] < history["prior_validation_loss"]
    assert result.test["accuracy"] > 0.6  # chance is 1/3; 0.93 here
    booster = result.booster
    rows = split.test.tolist()[:7] + split.test.tolist()[-5:]  # texts of different lengths: padding in the pass
    routed = booster.predict_logits(rows, batch_size=5)
    with torch.no_grad():
        explicit = booster.prior + sum(booster.settings.shrinkage * booster.round_logits(rows, m) for m in range(2))
    assert torch.allclose(routed, explicit, atol=1e-4)
    assert result.views == ["features", "path"] and result.adapter_parameters > 0
