"""`splice train` / `splice eval` through typer's test runner, on an app of just these commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
import yaml
from safetensors.torch import load_file
from train_helpers import write_jsonl
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
    (["--method", "dora", "--set", "blocks=4"], "unknown setting 'blocks'"),
    (["--method", "nosuch"], "known methods"),
])
def test_bad_method_flags_are_explained(app, tiny_classification, tmp_path, flags, message):
    path = tmp_path / "job.yaml"
    tiny_classification.to_yaml(path)
    result = runner.invoke(app, ["train", str(path), "--max-steps", "1", *flags, "--output-dir", str(tmp_path / "x")],
                           env={"COLUMNS": "200"})
    assert result.exit_code != 0
    assert message in result.output


def _job(config, tmp_path, **fields) -> str:
    """`config` with `fields` changed, written as the YAML a command line starts from."""
    path = tmp_path / "job.yaml"
    config.from_dict(config.to_dict(), **fields).to_yaml(path)
    return str(path)


def test_settings_set_training_config_keys_too_and_null_unsets_one(app, tiny_classification, tmp_path):
    out = tmp_path / "set-run"
    result = runner.invoke(app, ["train", _job(tiny_classification, tmp_path), "--max-steps", "2", "--set",
                                 "max_length=16", "--set", "eval_every=null", "--set", "r=2", "--set", "lr=1e-3",
                                 "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["max_length"] == 16 and written["eval_every"] is None and written["lr"] == 0.001
    assert written["adapter"]["r"] == 2


def test_an_unknown_setting_is_refused_with_the_closest_key_and_both_key_lists(app, tiny_classification, tmp_path):
    result = runner.invoke(app, ["train", _job(tiny_classification, tmp_path), "--set", "max_eval_exampels=8",
                                 "--output-dir", str(tmp_path / "x")], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "did you mean 'max_eval_examples'?" in message
    assert "Training config keys: model, task, data," in message and "Keys of the 'lora' adapter: alpha," in message


def test_column_flags_read_a_file_with_other_column_names(app, tiny_classification, tmp_path):
    renamed = {}
    for split in ("data", "validation"):
        rows = [json.loads(line) for line in Path(getattr(tiny_classification, split)).read_text().splitlines()]
        renamed[split] = str(write_jsonl(tmp_path / f"{split}-reviews.jsonl",
                                         [{"review": r["text"], "sentiment": r["label"]} for r in rows]))
    job = _job(tiny_classification, tmp_path, **renamed)
    refused = runner.invoke(app, ["train", job, "--output-dir", str(tmp_path / "no-flags")], env={"COLUMNS": "200"})
    assert refused.exit_code == 1
    assert "has no column 'text'" in refused.output and "--text-column / --label-column" in refused.output
    out = tmp_path / "reviews"
    result = runner.invoke(app, ["train", job, "--max-steps", "2", "--text-column", "review", "--label-column",
                                 "sentiment", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert (written["text_column"], written["label_column"]) == ("review", "sentiment")


def test_max_eval_examples_flag_caps_the_evaluation_splits(app, tiny_classification, tmp_path):
    out = tmp_path / "quick"
    result = runner.invoke(app, ["train", _job(tiny_classification, tmp_path), "--max-steps", "2",
                                 "--max-eval-examples", "5", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["max_eval_examples"] == 5


def test_init_adapter_flag_continues_a_saved_adapter(app, tiny_classification, tmp_path):
    job = _job(tiny_classification, tmp_path)
    first = tmp_path / "first"
    trained = runner.invoke(app, ["train", job, "--max-steps", "24", "--lr", "5e-2", "--head-lr", "0.2",
                                  "--output-dir", str(first)])
    assert trained.exit_code == 0, trained.output
    second = tmp_path / "second"
    result = runner.invoke(app, ["train", job, "--init-adapter", str(first / "adapter"), "--max-steps", "1",
                                 "--lr", "1e-6", "--output-dir", str(second)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((second / "config.yaml").read_text())["init_adapter"] == str(first / "adapter")
    before, after = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (first, second))
    lora_b = [key for key in before if "lora_B" in key]
    assert lora_b and all(before[key].abs().max() > 1e-3 for key in lora_b)  # trained, not a fresh B = 0
    for key in lora_b:  # one step at lr 1e-6 from the saved factors, not from a fresh B = 0
        assert (after[key] - before[key]).abs().max() < 1e-4
