"""`splice train --tenants a.yaml b.yaml`: several configs trained together from the command line."""

from __future__ import annotations

import json

import pytest
import typer
from mux_helpers import text_rows
from typer.testing import CliRunner

from splice.cli import train_cmd
from splice.train import TrainConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    train_cmd.register(app)
    return app


def _yaml(tmp_path, bert_dir, name: str, labels: int) -> str:
    config = TrainConfig(model=str(bert_dir), data=str(text_rows(tmp_path / f"{name}.jsonl", 24, labels, 6, 1)),
                         batch_size=8, max_steps=3, output_dir=str(tmp_path / name))
    path = tmp_path / f"{name}.yaml"
    config.to_yaml(path)
    return str(path)


def test_tenants_train_together_and_each_gets_its_run_folder(app, bert_dir, tmp_path):
    a, b = _yaml(tmp_path, bert_dir, "a", 2), _yaml(tmp_path, bert_dir, "b", 3)
    result = runner.invoke(app, ["train", "--tenants", a, b, "--max-steps", "2", "--join-at", "0,1"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "multiplexed training: 2 tenants" in result.output and "padded token slots" in result.output
    for name in ("a", "b"):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert len(metrics["history"]) == 2  # --max-steps applied to every tenant
        assert (tmp_path / name / "adapter" / "adapter_config.json").is_file()


def test_misuse_is_explained(app, bert_dir, tmp_path):
    a, b = _yaml(tmp_path, bert_dir, "a", 2), _yaml(tmp_path, bert_dir, "b", 2)
    result = runner.invoke(app, ["train", a, b])
    assert result.exit_code != 0 and "--tenants" in result.output
    result = runner.invoke(app, ["train", "--tenants", a, b, "--output-dir", str(tmp_path / "same")])
    assert result.exit_code != 0 and "own output_dir" in result.output
    result = runner.invoke(app, ["train", a, "--max-rows", "4"])
    assert result.exit_code != 0 and "--tenants" in result.output
