"""`splice boostlora`: help, a run from a YAML with a boost: section and flags on top, the summary
line, and bad settings as messages that name the file and the key."""

from __future__ import annotations

import json

import typer
import yaml
from boost_helpers import write_rows
from helpers import sentiment_rows
from typer.testing import CliRunner

from splice.cli import boost_cmd

runner = CliRunner(env={"COLUMNS": "200"})
app = typer.Typer()
boost_cmd.register(app)


@app.callback()
def _main() -> None:
    """The `splice` app holds it beside the other commands (a lone command would be the app itself)."""


def config_file(tmp_path, tiny_bert, **boost) -> str:
    path = tmp_path / "boost.yaml"
    path.write_text(yaml.safe_dump({
        "model": tiny_bert, "data": write_rows(tmp_path / "train.jsonl", sentiment_rows(64, 1)),
        "validation": write_rows(tmp_path / "val.jsonl", sentiment_rows(32, 2)), "batch_size": 8, "max_steps": 6,
        "adapter": {"method": "lora", "targets": ["query", "value"]}, "output_dir": str(tmp_path / "out"),
        "boost": {"rounds": 3, "u": 2, **boost}}))
    return str(path)


def test_help_explains_the_rounds():
    result = runner.invoke(app, ["boostlora", "--help"])
    assert result.exit_code == 0, result.output
    for words in ("--rounds", "--mix-correct", "--no-rotate", "singular", "--force", "boost.png", "PEFT"):
        assert words in result.output


def test_flags_override_the_boost_section_and_the_run_is_summed_up(tmp_path, tiny_bert):
    path = config_file(tmp_path, tiny_bert, patience=1)
    result = runner.invoke(app, ["boostlora", path, "--rounds", "2", "--steps-per-round", "2", "--patience", "2",
                                 "--set", "lr=1e-2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "round(s) kept" in result.output and "Wrote " in result.output
    saved = json.loads((tmp_path / "out" / "report" / "boost.json").read_text())
    assert {k: saved["settings"][k] for k in ("rounds", "u", "steps_per_round", "patience")} == {
        "rounds": 2, "u": 2, "steps_per_round": 2, "patience": 2}
    assert saved["config"]["lr"] == 1e-2 and len(saved["rounds"]) == 2
    again = runner.invoke(app, ["boostlora", path])
    assert again.exit_code == 1 and "already exists" in again.output and "--force" in again.output


def test_an_unknown_or_bad_boost_setting_names_the_file_and_the_key(tmp_path, tiny_bert):
    path = config_file(tmp_path, tiny_bert, round=4)
    result = runner.invoke(app, ["boostlora", path])
    assert result.exit_code == 1 and "boost.yaml" in result.output
    assert "unknown boost setting 'round'" in result.output and "rounds" in result.output
    bad = config_file(tmp_path, tiny_bert, mix_correct=1.5)
    result = runner.invoke(app, ["boostlora", bad])
    assert result.exit_code == 1 and "mix_correct must be in [0, 1), got 1.5" in result.output
    assert not (tmp_path / "out").exists()
