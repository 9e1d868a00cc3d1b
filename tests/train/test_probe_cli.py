"""`splice probe`: the PAGE ranking of a config's model on its data, as a table, JSON and PNG."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from splice.cli import probe_cmd

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    probe_cmd.register(app)
    app.command("unused")(lambda: None)  # two commands, so typer keeps the command name
    return app


def test_probe_ranks_the_modules_and_writes_json_and_a_heatmap(app, tiny_classification, tmp_path):
    path = tmp_path / "job.yaml"
    tiny_classification.to_yaml(path)
    out = tmp_path / "probe"
    result = runner.invoke(app, ["probe", str(path), "--batches", "2", "--r", "2", "--out", str(out)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    data = json.loads((out / "probe.json").read_text())
    shares = [site["share"] for site in data["sites"]]
    assert data["batches"] == 2 and abs(sum(shares) - 1) < 1e-9 and shares == sorted(shares, reverse=True)
    assert len(data["sites"]) == 2 * 6 + 1  # tiny BERT: 2 x (q, k, v, attention out, intermediate, out) + pooler
    assert {site["kind"] for site in data["sites"] if site["layer"] == 0} == {
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense"}
    assert (out / "probe.png").stat().st_size > 0
    assert data["sites"][0]["name"] in result.output and "dominant module" in result.output
    again = runner.invoke(app, ["probe", str(path), "--batches", "1", "--out", str(out)], env={"COLUMNS": "200"})
    assert again.exit_code != 0 and "--force" in again.output
