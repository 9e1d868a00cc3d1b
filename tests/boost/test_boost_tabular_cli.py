"""`splice boost-tabular` on a tiny BERT folder and a CSV table: the report compares BoostLLM with
the baselines on the same shots, --features-only drops the tree view, and bad input is a message."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from splice.boost.baselines import _all_classes, fit_baselines
from splice.boost.tabular import draw_shots, load_table
from splice.cli import boost_cmd

runner = CliRunner(env={"COLUMNS": "200"})
app = typer.Typer()
boost_cmd.register(app)


@app.callback()
def _main() -> None:
    """The `splice` app holds it beside the other commands (a lone command would be the app itself)."""


def write_csv(path) -> str:
    """Two numeric columns and a string one; the label is whether x > y."""
    lines = ["x,y,colour,label"]
    for i in range(40):
        x, y = (i * 7) % 11, (i * 5) % 13
        lines.append(f"{x},{y / 2},{'red' if i % 3 else 'blue'},{'big' if x > y / 2 else 'small'}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_boost_tabular_reports_boostllm_beside_the_baselines(tmp_path, tiny_bert):
    data = write_csv(tmp_path / "table.csv")
    result = runner.invoke(app, ["boost-tabular", "--data", data, "--shots", "12", "--model", tiny_bert, "--rounds",
                                 "2", "--steps", "2", "--seed", "0", "--seed", "1", "--output-dir",
                                 str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [d["seed"] for d in report["draws"]] == [0, 1]
    assert set(report["summary"]) >= {"BoostLLM", "logistic_regression", "hist_gradient_boosting"}
    first = report["draws"][0]
    assert first["boostllm"]["test_rows"] == 40 - 12 and len(first["boostllm"]["history"]["rounds"]) == 2
    assert first["boostllm"]["views"] == ["features", "path"]
    assert "| BoostLLM |" in (tmp_path / "out" / "results.md").read_text()
    once = runner.invoke(app, ["boost-tabular", "--data", data, "--shots", "12", "--model", tiny_bert, "--rounds",
                               "1", "--shrinkage", "1", "--features-only", "--steps", "2", "--no-baselines",
                               "--output-dir", str(tmp_path / "out"), "--force", "--quiet"])
    assert once.exit_code == 0, once.output
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["draws"][0]["boostllm"]["views"] == ["features"] and report["draws"][0]["baselines"] == {}


def test_bad_tables_and_settings_are_messages(tmp_path, tiny_bert):
    result = runner.invoke(app, ["boost-tabular", "--data", "titanic", "--model", tiny_bert])
    assert result.exit_code == 1 and "breast_cancer" in result.output and "CSV" in result.output
    data = write_csv(tmp_path / "table.csv")
    result = runner.invoke(app, ["boost-tabular", "--data", data, "--shots", "1", "--model", tiny_bert,
                                 "--output-dir", str(tmp_path / "o1")])
    assert result.exit_code == 1 and "at least 2" in result.output
    result = runner.invoke(app, ["boost-tabular", "--data", data, "--model", tiny_bert, "--shrinkage", "2",
                                 "--output-dir", str(tmp_path / "o2")])
    assert result.exit_code == 1 and "shrinkage must be in (0, 1]" in result.output


def test_the_baselines_fit_the_same_shots_and_score_the_same_rows():
    """Logistic regression, HistGradientBoosting and XGBoost (installed with splice[tabular]) on
    breast_cancer's 64 shots: real scores on the rows not drawn; a missing class in the shots
    still gives probabilities over every class."""
    pytest.importorskip("xgboost", reason="splice[tabular] installs xgboost-cpu")
    table = load_table("breast_cancer")
    split = draw_shots(table, shots=64, seed=0)
    test = split.test.tolist()
    scored = fit_baselines(table, split, test, seed=0)
    assert set(scored) == {"logistic_regression", "hist_gradient_boosting", "xgboost"}
    for name, s in scored.items():
        assert 0.8 < s["accuracy"] <= 1.0 and 0.85 < s["auc"] <= 1.0, (name, s)
    probabilities = _all_classes(np.array([[0.25, 0.75]]), np.array([0, 2]), 3)
    assert probabilities.tolist() == [[0.25, 0.0, 0.75]]
