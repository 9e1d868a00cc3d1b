"""Tiny mixtures: 2-layer random-weight models (MiniLM's tokenizer) and word-list tasks written as
files, which a multi-task config points at."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from helpers import save_tiny_bert, save_tiny_llama
from multitask_helpers import LISTS, counting, jsonl, labelled, task

from splice.multitask import MultitaskConfig


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("multitask-llama")))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return str(save_tiny_bert(tmp_path_factory.mktemp("multitask-bert"), dropout=0.0))


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> dict[str, str]:
    """<task>.jsonl (200 training rows) and <task>-val.jsonl (200 evaluation rows) of each word-list
    task, and counting.jsonl (prompt/completion)."""
    folder = tmp_path_factory.mktemp("multitask-data")
    out = {"counting": jsonl(folder / "counting.jsonl", counting(120, 5))}
    for i, (name, lists) in enumerate(LISTS.items()):
        out[name] = jsonl(folder / f"{name}.jsonl", labelled(lists, 200, 2 * i))
        out[f"{name}-val"] = jsonl(folder / f"{name}-val.jsonl", labelled(lists, 200, 2 * i + 1))
    return out


@pytest.fixture
def mixture(files, tiny_llama, tmp_path) -> Callable[..., MultitaskConfig]:
    """A config factory: colour + animal on the tiny Llama as a classifier (its `score` head becomes
    a head per task), 10 steps a task."""

    def make(tasks: list[dict[str, Any]] | None = None, train: dict[str, Any] | None = None,
             **fields: Any) -> MultitaskConfig:
        return MultitaskConfig(**{
            "tasks": tasks or [task(files, "colour"), task(files, "animal")], "model": tiny_llama,
            "adapter": {"method": "lora", "r": 4, "alpha": 8, "targets": "all-linear"},
            "train": {"batch_size": 8, "max_steps": 10, "lr": 5e-3, "head_lr": 2e-2, "max_length": 16,
                      "max_eval_examples": 48, **(train or {})},
            "output_dir": str(tmp_path / "job"), **fields})

    return make
