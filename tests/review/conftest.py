"""Fixtures the review tests of training share: tiny models saved as folders and a small
sentiment data set (in `test_review_trainer.py` and `test_review_train_cli.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import save_tiny_bert, save_tiny_llama, sentiment_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import write_jsonl  # noqa: E402  (the train folder's helpers)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """128 position embeddings, dropout 0: gradients of two runs compare exactly."""
    return save_tiny_bert(tmp_path_factory.mktemp("review-bert"), dropout=0.0)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("review-llama"))


@pytest.fixture(scope="session")
def sentiment(tmp_path_factory) -> tuple[str, str]:
    """32 training rows (4 batches of 8) and 8 validation rows."""
    folder = tmp_path_factory.mktemp("review-data")
    return (str(write_jsonl(folder / "train.jsonl", sentiment_rows(32, 1))),
            str(write_jsonl(folder / "val.jsonl", sentiment_rows(8, 2))))
