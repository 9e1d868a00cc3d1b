"""`splice train` / `splice eval` through typer's test runner, on an app of just these commands."""

from __future__ import annotations

import json

import pytest
import typer
import yaml
from typer.testing import CliRunner

from splice.cli import train_cmd


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    train_cmd.register(app)
    return app


runner = CliRunner()


@pytest.mark.parametrize(("command", "example"), [
    ("train", "splice train examples/smollm2_arithmetic.yaml"),
    ("eval", "splice eval --model minilm --adapter"),
])
def test_help_shows_an_example(app, command, example):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert example in result.output


def test_flags_override_the_yaml(app, tiny_classification, tmp_path):
    path = tmp_path / "job.yaml"
    tiny_classification.to_yaml(path)
    out = tmp_path / "cli-run"
    result = runner.invoke(app, ["train", str(path), "--max-steps", "3", "--r", "2", "--targets", "query,key",
                                 "--lr", "0.002", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["max_steps"] == 3 and written["lr"] == 0.002
    assert written["adapter"] == {"method": "lora", "r": 2, "alpha": 16, "targets": ["query", "key"]}
    assert written["batch_size"] == tiny_classification.batch_size  # from the YAML
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and sorted(adapter["target_modules"]) == ["key", "query"]
    assert "results" in result.output


def test_existing_output_is_refused_without_force_with_a_hint(app, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "file").write_text("x")
    result = runner.invoke(app, ["train", "--output-dir", str(out)])
    assert result.exit_code == 1
    assert "--force" in result.output and "Traceback" not in result.output


def test_bad_values_give_a_message_not_a_traceback(app):
    result = runner.invoke(app, ["train", "--precision", "fp8", "--output-dir", "unused"])
    assert result.exit_code == 1
    assert "precision must be one of no, bf16, fp16" in result.output


def test_eval_reports_the_saved_adapters_metrics(app, tiny_classification, tmp_path):
    from rich.console import Console

    from splice.train import run

    trained = run(tiny_classification, console=Console(quiet=True))
    result = runner.invoke(app, ["eval", "--model", tiny_classification.model, "--adapter",
                                 str(trained.paths["adapter"]), "--data", tiny_classification.validation])
    assert result.exit_code == 0, result.output
    accuracy = trained.metrics["after"]["validation"]["accuracy"]
    assert f"{accuracy:.4f}" in result.output


def test_method_and_its_hyperparameters_from_flags(app, tiny_classification, tmp_path):
    path = tmp_path / "job.yaml"
    tiny_classification.to_yaml(path)
    out = tmp_path / "dora-run"
    result = runner.invoke(app, ["train", str(path), "--max-steps", "2", "--method", "dora", "--set", "r=3",
                                 "--set", "rslora=true", "--set", "targets=[query]", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["adapter"] == {"method": "dora", "r": 3, "rslora": True, "targets": ["query"]}
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True and adapter["use_rslora"] is True and adapter["r"] == 3


@pytest.mark.parametrize(("flags", "message"), [
    (["--set", "blocks"], "KEY=VALUE"),
    (["--method", "dora", "--set", "blocks=4"], "bad 'dora' config"),
    (["--method", "nosuch"], "known methods"),
])
def test_bad_method_flags_are_explained(app, tiny_classification, tmp_path, flags, message):
    path = tmp_path / "job.yaml"
    tiny_classification.to_yaml(path)
    result = runner.invoke(app, ["train", str(path), "--max-steps", "1", *flags, "--output-dir", str(tmp_path / "x")],
                           env={"COLUMNS": "200"})
    assert result.exit_code != 0
    assert message in result.output
