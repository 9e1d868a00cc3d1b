"""Federated task sequences (`FederatedConfig.tasks`, `splice.federated.sequence`): each task its
own head and partition, `rounds` rounds each; the server aggregates only what the task trains,
so a finished task's head is not touched by later tasks; the report holds the accuracy matrix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splice.core.errors import ConfigError
from splice.federated import FederatedConfig, run_federated

THREE = {"positive": "pos", "negative": "other", "neutral": "other"}


def sequence_config(tiny_bert: Path, word_file: Path, folder: Path, second: dict, **overrides) -> FederatedConfig:
    settings = dict(model=str(tiny_bert), tasks=[{"name": "one", "data": str(word_file)}, second],
                    clients=2, rounds=1, local_steps=3, adapter={"method": "lora", "r": 4, "alpha": 8},
                    eval_examples=12, train={"batch_size": 8, "max_length": 16, "lr": 5e-3, "group_by_length": False},
                    partition={"scheme": "iid"}, output_dir=str(folder))
    settings.update(overrides)
    return FederatedConfig(**settings)


def test_a_finished_tasks_head_is_the_same_whatever_the_later_tasks_train(tiny_bert, word_file, tmp_path):
    heads = []
    for name, second in (("a", {"name": "two", "data": str(word_file)}),
                         ("b", {"name": "two", "data": str(word_file), "labels": THREE})):
        config = sequence_config(tiny_bert, word_file, tmp_path / name, second)
        result = run_federated(config)
        heads.append(load_file(Path(config.output_dir) / "task-heads.safetensors"))
        assert not any(r["failures"] for r in result.rounds)
        matrix = result.results["accuracy_matrix"]
        assert len(matrix) == 2 and matrix[0][1] is None and None not in matrix[1]
        assert [r.get("task") for r in result.rounds] == ["one", "one", "two"]
        assert set(result.final["continual"]) >= {"average_accuracy", "backward_transfer", "mean_forgetting"}
    first, second = heads
    for key in ("classifier.heads.one.weight", "classifier.heads.one.bias"):
        assert torch.equal(first[key], second[key])  # task one's head: bit for bit, whatever task two did
    assert first["classifier.heads.two.weight"].shape == (3, 32)
    assert second["classifier.heads.two.weight"].shape == (2, 32)
    assert not torch.equal(first["classifier.heads.two.weight"][:2], second["classifier.heads.two.weight"])


@pytest.mark.parametrize("changes, key", [
    ({"data": "rotten_tomatoes"}, "data"),
    ({"tasks": [{"name": "one", "data": "x.jsonl"}]}, "tasks"),
    ({"tasks": [{"name": "one", "data": "x.jsonl"}, {"name": "one", "data": "y.jsonl"}]}, "distinct"),
    ({"tasks": [{"name": "one", "data": "x.jsonl"}, {"name": "two", "data": "y.jsonl", "max_steps": 5}]},
     "per-task budget"),
    ({"tasks": [{"name": "one", "data": "x.jsonl"}, {"name": "two", "data": "y.jsonl", "lable": {}}]}, "labels"),
    ({"tasks": [{"name": "one", "data": "x.jsonl", "head": "two"}, {"name": "two", "data": "y.jsonl"}]},
     "earlier task"),
    ({"aggregation": "exact"}, "aggregation"),
    ({"method": "dual"}, "trains one task"),
    ({"secure": {"num_shares": 3, "reconstruction_threshold": 2}, "clients": 3}, "secure"),
    ({"privacy": {"side": "server"}}, "privacy"),
])
def test_a_sequence_config_refuses_what_it_cannot_run(tiny_bert, word_file, tmp_path, changes, key):
    with pytest.raises(ConfigError, match=key):
        sequence_config(tiny_bert, word_file, tmp_path, {"name": "two", "data": str(word_file)}, **changes)


def test_a_sequence_config_reads_back_what_it_writes_and_travels_to_a_deployment(tiny_bert, word_file, tmp_path):
    from splice.federated.deployment import portable

    config = sequence_config(tiny_bert, word_file, tmp_path / "run",
                             {"name": "two", "data": str(word_file), "labels": THREE})
    again = FederatedConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict() and again.tasks == config.tasks
    carried = portable(config)
    assert all(Path(task.data).is_absolute() for task in carried.tasks) and carried.data is None
    assert carried.tasks[1].labels == THREE
