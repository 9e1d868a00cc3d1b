"""Tiny random-weight model folders that `TrainConfig.model` can point at, and small data files.

The models use MiniLM's tokenizer (a real WordPiece vocabulary) with 2-layer, 32-wide bodies,
so a training step takes milliseconds. `[SEP]` doubles as the end-of-sequence token of the
causal LM, so completions end with it as they would with a decoder's own eos.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import minilm_tokenizer, save_tiny_bert, save_tiny_llama, sentiment_rows
from train_helpers import write_jsonl

from splice import assets
from splice.train import TrainConfig


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer():
    """MiniLM's tokenizer with `[SEP]` as its eos token, as the tiny Llama has it."""
    tokenizer = minilm_tokenizer()
    tokenizer.eos_token = "[SEP]"
    return tokenizer




@pytest.fixture
def sentiment_files(tmp_path) -> tuple[Path, Path]:
    return (write_jsonl(tmp_path / "train.jsonl", sentiment_rows(96, 1)),
            write_jsonl(tmp_path / "val.jsonl", sentiment_rows(32, 2)))


@pytest.fixture
def tiny_classification(tiny_bert_dir, sentiment_files, tmp_path) -> TrainConfig:
    """A run of a few seconds: tiny BERT, 96 training rows, 12 steps."""
    train, val = sentiment_files
    return TrainConfig(model=str(tiny_bert_dir), data=str(train), validation=str(val), batch_size=8,
                       max_steps=12, eval_every=4, lr=1e-2, output_dir=str(tmp_path / "run"))


@pytest.fixture
def tiny_causal(tiny_llama_dir, tmp_path) -> TrainConfig:
    """SFT of the tiny Llama on arithmetic; the random lm_head trains too, or nothing could learn."""
    rows = assets.arithmetic_problems(80, seed=3)
    train = write_jsonl(tmp_path / "sft.jsonl", rows[:64])
    val = write_jsonl(tmp_path / "sft-val.jsonl", rows[64:])
    return TrainConfig(model=str(tiny_llama_dir), task="causal_lm", data=str(train), validation=str(val),
                       adapter={"method": "lora", "r": 4, "alpha": 8, "targets": "all-linear",
                                "train_also": ["lm_head"]},
                       max_length=48, batch_size=8, max_steps=24, eval_every=8, lr=1e-2,
                       output_dir=str(tmp_path / "sft-run"))
