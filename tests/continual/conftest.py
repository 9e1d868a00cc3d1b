"""Tiny continual sequences: a 2-layer BERT (MiniLM's tokenizer) and word-list tasks that it
learns in a few dozen steps, written as files a sequence config points at."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import save_tiny_bert, save_tiny_llama

WORDS = {
    "sentiment": {"positive": ["good", "great", "fine", "lovely"], "negative": ["bad", "awful", "poor", "dull"]},
    "topic": {"animal": ["cat", "dog", "horse", "bird"], "colour": ["red", "blue", "green", "yellow"]},
}


def word_rows(task: str, n: int, seed: int) -> list[dict]:
    """Three-word texts whose label is the word list they are drawn from."""
    rng = random.Random(seed)
    lists = WORDS[task]
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(lists))
        rows.append({"text": " ".join(rng.choice(lists[label]) for _ in range(3)), "label": label})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("continual-bert"), dropout=0.0)


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("continual-llama"))


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> dict[str, Path]:
    """sentiment.jsonl and topic.jsonl, 320 rows each."""
    folder = tmp_path_factory.mktemp("continual-data")
    return {task: write_rows(folder / f"{task}.jsonl", word_rows(task, 320, seed))
            for seed, task in enumerate(WORDS)}
