"""`splice multitask`: help, a run with its summary tables, the output folder refused without
--force, overrides, and errors as messages."""

from __future__ import annotations

import json

import typer
import yaml
from multitask_helpers import task
from typer.testing import CliRunner

from splice.cli import multitask_cmd

runner = CliRunner(env={"COLUMNS": "200"})
app = typer.Typer()
multitask_cmd.register(app)


@app.callback()
def _main() -> None:
    """The `splice` app holds it beside the other commands (a lone command would be the app itself)."""


def write(tmp_path, files, model, **extra):
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({
        "model": model, "tasks": [task(files, "colour"), task(files, "animal")],
        "adapter": {"method": "lora", "r": 2, "alpha": 4, "targets": "all-linear"},
        "train": {"batch_size": 8, "max_steps": 6, "max_length": 16, "max_eval_examples": 16},
        "output_dir": str(tmp_path / "job"), **extra}))
    return path


def test_help_explains_the_job():
    result = runner.invoke(app, ["multitask", "--help"])
    assert result.exit_code == 0, result.output
    for words in ("transfer", "--force", "--resume", "--seed", "--max-steps", "--mixing", "--no-compare",
                  "one adapter per task"):
        assert words in result.output


def test_a_run_prints_its_tables_and_refuses_to_overwrite_without_force(tmp_path, files, tiny_llama):
    config = write(tmp_path, files, tiny_llama)
    result = runner.invoke(app, ["multitask", str(config), "--no-compare", "--seed", "3", "--set", "lr=1e-3"])
    assert result.exit_code == 0, result.output
    assert "shared adapter: accuracy" in result.output and "wrote " in result.output
    saved = json.loads((tmp_path / "job" / "report" / "results.json").read_text())
    assert saved["config"]["seeds"] == [3] and saved["transfer"] is None and saved["config"]["train"]["lr"] == 1e-3
    assert [r["name"] for r in saved["runs"]] == ["joint"]
    again = runner.invoke(app, ["multitask", str(config), "--no-compare"])
    assert again.exit_code == 1 and "already exists" in again.output and "--force" in again.output
    forced = runner.invoke(app, ["multitask", str(config), "--max-steps", "2", "--force", "--quiet"])
    assert forced.exit_code == 0, forced.output
    assert "transfer" not in forced.output.lower() and "shared adapter" in forced.output  # the closing line only
    saved = json.loads((tmp_path / "job" / "report" / "results.json").read_text())
    assert {r["name"]: r["steps"] for r in saved["runs"] if r["seed"] == 0} == {
        "joint": 4, "single-colour": 2, "single-animal": 2}
    assert saved["transfer"]["mean"][0][0] == 0.0


def test_mistakes_are_messages_not_tracebacks(tmp_path, files, tiny_llama):
    result = runner.invoke(app, ["multitask", str(write(tmp_path, files, tiny_llama, mixing="uniform"))])
    assert result.exit_code == 1 and "mixing must be one of 'proportional', 'temperature'" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["multitask", str(write(tmp_path, files, tiny_llama)), "--set", "grad_accum=2"])
    assert result.exit_code == 1 and "grad_accum" in result.output
    result = runner.invoke(app, ["multitask", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_resume_continues_the_job_in_its_folder_and_refuses_other_flags(tmp_path, files, tiny_llama):
    config = write(tmp_path, files, tiny_llama)
    first = runner.invoke(app, ["multitask", str(config), "--max-steps", "2"])
    assert first.exit_code == 0, first.output
    resumed = runner.invoke(app, ["multitask", str(config), "--max-steps", "2", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.count("finished before") == 3 and "wrote " in resumed.output
    other = runner.invoke(app, ["multitask", str(config), "--max-steps", "3", "--resume"])
    assert other.exit_code == 1 and "another config" in other.output and "'max_steps': 2" in other.output
