"""A tiny federated task: a 2-layer BERT (MiniLM's tokenizer, no dropout) and a word-list
sentiment file it learns in a few steps; and a config builder with a small budget."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from helpers import save_tiny_bert

from splice.federated import FederatedConfig

WORDS = {"positive": ["good", "great", "fine", "lovely"], "negative": ["bad", "awful", "poor", "dull"],
         "neutral": ["table", "chair", "door", "wall"]}


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("federated-bert"), dropout=0.0)


@pytest.fixture(scope="session")
def word_file(tmp_path_factory) -> Path:
    """240 three-word rows, labelled by the word list they come from."""
    rng = random.Random(0)
    rows = []
    for _ in range(240):
        label = rng.choice(sorted(WORDS))
        rows.append({"text": " ".join(rng.choice(WORDS[label]) for _ in range(3)), "label": label})
    path = tmp_path_factory.mktemp("federated-data") / "words.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config_maker(model: Path, data: Path, folder: Path):
    """A FederatedConfig builder on the tiny task; keywords override, `name` picks the run folder."""
    def make(name: str = "run", **overrides: Any) -> FederatedConfig:
        settings: dict[str, Any] = dict(
            model=str(model), data=str(data), clients=3, rounds=1, local_steps=3,
            adapter={"method": "lora", "r": 4, "alpha": 8}, eval_examples=12,
            train={"batch_size": 8, "max_length": 16, "lr": 5e-3, "group_by_length": False},
            partition={"scheme": "iid"}, output_dir=str(folder / name))
        settings.update(overrides)
        return FederatedConfig(**settings)
    return make


@pytest.fixture
def make_config(tiny_bert, word_file, tmp_path):
    return config_maker(tiny_bert, word_file, tmp_path)


@pytest.fixture(scope="session")
def plain_three(tiny_bert, word_file, tmp_path_factory) -> FederatedConfig:
    """A finished plain FedAvg run of 3 clients, 1 round: the reference of several tests."""
    from splice.federated import run_federated

    config = config_maker(tiny_bert, word_file, tmp_path_factory.mktemp("federated-plain"))(name="plain")
    run_federated(config)
    return config
