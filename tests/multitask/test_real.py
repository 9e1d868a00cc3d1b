"""The job on real weights and real data: MiniLM with a head per task on Rotten Tomatoes (2
classes) and BBC News (5), few rows and steps."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from splice.multitask import MultitaskConfig, run_multitask


@pytest.mark.slow
def test_minilm_learns_reviews_and_news_with_one_adapter_and_two_heads(tmp_path):
    config = MultitaskConfig(
        tasks=[{"name": "sentiment", "data": "rotten_tomatoes"}, {"name": "topic", "data": "bbc_news"}],
        model="minilm", adapter={"method": "lora", "r": 4, "alpha": 8},
        train={"batch_size": 8, "max_steps": 12, "max_length": 48, "lr": 3e-3, "head_lr": 0.1,
               "max_train_examples": 96, "max_eval_examples": 48},
        output_dir=str(tmp_path / "job"))
    result = run_multitask(config, console=Console(quiet=True), quiet=True)
    joint = result.run("joint", 0)
    assert joint.head_parameters == {"sentiment": 384 * 2 + 2, "topic": 384 * 5 + 5}
    assert joint.steps == 24 and sum(joint.batches.values()) == 24
    assert abs(joint.weights["sentiment"] - 0.5) < 1e-9  # 96 rows each: proportional is even
    assert joint.scores["topic"] > 0.4  # 5 topics, chance 0.2: the topic head learned through the shared adapter
    assert result.summary["costs"]["single"]["adapter_parameters"] == 2 * joint.adapter_parameters
    assert [row[i] for i, row in enumerate(result.transfer["mean"])] == [0.0, 0.0]
    saved = json.loads((result.output_dir / "report" / "results.json").read_text())
    assert saved["tasks"][1]["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert (result.output_dir / "report" / "transfer.png").is_file()
