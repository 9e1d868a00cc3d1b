"""Integration: BoostLoRA on the real MiniLM for Rotten Tomatoes (real weights, real reviews):
rounds in rotating slices of the pretrained weights raise validation accuracy, the merged change
has rank = kept rounds, and its LoRA file on a fresh MiniLM scores as the boosted model."""

from __future__ import annotations

import pytest
from rich.console import Console

import splice
from splice.boost import boostlora
from splice.train import TrainConfig, tasks
from splice.train.data import load_splits
from splice.train.evaluation import correct_rows


@pytest.mark.slow
def test_boostlora_on_minilm_keeps_gaining_rounds_and_its_lora_file_is_the_boosted_model(tmp_path):
    config = TrainConfig.from_yaml("examples/rotten_tomatoes_lora.yaml", max_train_examples=128,
                                   max_eval_examples=64, max_length=48, max_steps=32, eval_every=8, lr=3e-2,
                                   output_dir=str(tmp_path / "boost"))
    result = boostlora(config, rounds=2, r=2, u=4, console=Console(quiet=True))
    first = result.rounds[0]
    assert first.kept and first.validation_after > first.validation_before  # 0.47 -> 0.56 on 64 reviews here
    assert first.adapter_parameters == 4 * 12  # u x query, value of 6 layers
    kept = [r for r in result.rounds if r.kept]
    assert kept[-1].rank == {"mean": 2 * len(kept), "min": 2 * len(kept), "max": 2 * len(kept)}  # r = 2 a round
    assert result.validation["accuracy"] == pytest.approx(kept[-1].validation_after, abs=1e-6)
    splits = load_splits(config)
    model, tokenizer = tasks.load_model(config, splits.label_names)
    splice.load(model, result.adapter)  # a PEFT LoRA (rank: the kept rounds) for the untouched MiniLM, with its head
    hits = correct_rows(model, tokenizer, splits.validation, config)
    assert float(hits.float().mean()) == pytest.approx(result.validation["accuracy"], abs=1e-6)
    assert (tmp_path / "boost" / "report" / "boost.png").stat().st_size > 0
