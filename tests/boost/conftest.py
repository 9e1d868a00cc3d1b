"""A tiny BERT (MiniLM's tokenizer, 2 layers, 32 wide, no dropout) and the word-list sentiment
rows as files, for BoostLoRA runs of seconds."""

from __future__ import annotations

import pytest
from boost_helpers import write_rows
from helpers import save_tiny_bert, sentiment_rows

from splice.train import TrainConfig


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return str(save_tiny_bert(tmp_path_factory.mktemp("boost-bert"), dropout=0.0))


@pytest.fixture
def sentiment_config(tiny_bert, tmp_path) -> TrainConfig:
    """LoRA's places (query, value) on the tiny BERT, 96 training and 48 validation rows, 12 steps."""
    return TrainConfig(model=tiny_bert, data=write_rows(tmp_path / "train.jsonl", sentiment_rows(96, 1)),
                       validation=write_rows(tmp_path / "val.jsonl", sentiment_rows(48, 2)), batch_size=8,
                       max_steps=12, lr=5e-2, head_lr=5e-2, output_dir=str(tmp_path / "boost"),
                       adapter={"method": "lora", "r": 4, "targets": ["query", "value"]})
