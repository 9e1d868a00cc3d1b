"""A `datasets.Dataset` given as `TrainConfig(data=...)` trains, and the run records a
description of it (not the object: YAML cannot hold one, and a repr is not a record)."""

from __future__ import annotations

import json

import datasets
import pytest
from helpers import sentiment_rows

from splice.core.errors import DataError
from splice.train import TrainConfig, run


def test_a_datasets_object_trains_and_its_description_is_recorded(tiny_bert_dir, tmp_path):
    train = datasets.Dataset.from_list(sentiment_rows(64, 1))
    validation = datasets.Dataset.from_list(sentiment_rows(16, 2))
    config = TrainConfig(model=str(tiny_bert_dir), data=train, validation=validation, batch_size=8, max_steps=4,
                         lr=1e-2, output_dir=str(tmp_path / "run"))
    result = run(config)
    assert result.status == "finished"
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]["data"]
    assert recorded.startswith("<in memory: datasets.Dataset, 64 rows; columns text, label; fingerprint ")
    assert train._fingerprint in recorded
    assert config.to_yaml().count("<in memory: datasets.Dataset") == 2  # data and validation
    # The same rows describe the same (resuming compares the recorded config), others not.
    assert TrainConfig(data=datasets.Dataset.from_list(sentiment_rows(64, 1))).to_dict()["data"] == recorded
    assert TrainConfig(data=datasets.Dataset.from_list(sentiment_rows(64, 3))).to_dict()["data"] != recorded


def test_a_run_config_of_rows_in_memory_asks_for_the_rows_again(tiny_bert_dir, tmp_path):
    config = TrainConfig(model=str(tiny_bert_dir), data=datasets.Dataset.from_list(sentiment_rows(32, 1)),
                         max_steps=1, output_dir=str(tmp_path / "run"))
    written = TrainConfig.from_yaml(config.to_yaml(tmp_path / "config.yaml") and tmp_path / "config.yaml")
    with pytest.raises(DataError, match="in memory.*give them again"):
        run(written)


def test_a_list_of_rows_trains_too_and_names_the_default_run_folder():
    config = TrainConfig(data=sentiment_rows(8, 1))
    assert config.output_dir == "runs/dataset-lora"
    assert config.to_dict()["data"] == "<in memory: builtins.list, 8 rows>"
