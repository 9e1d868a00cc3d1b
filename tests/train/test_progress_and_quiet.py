"""Progress bars of evaluation and generation on a terminal (and nowhere else), and `--quiet`:
no bars, no tables, only the closing line, in `splice train`, `eval` and `probe`."""

from __future__ import annotations

import io

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from splice.cli import probe_cmd, train_cmd
from splice.core import progress
from splice.train import Trainer, run

runner = CliRunner()
TABLE_CORNER = "┏"  # rich's tables start with it; the progress bars and lines do not


def terminal() -> Console:
    """A console that says it is a terminal and records what is drawn on it."""
    return Console(file=io.StringIO(), force_terminal=True, record=True, width=150)


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    train_cmd.register(app)
    probe_cmd.register(app)
    return app


def test_evaluation_shows_a_bar_over_its_batches_on_a_terminal(tiny_classification):
    console = terminal()
    Trainer.from_config(tiny_classification, console=console).evaluate()
    text = console.export_text()
    assert "evaluate" in text and "0/4" in text  # 32 validation rows, batches of 8


def test_greedy_exact_match_shows_a_bar_of_its_own(tiny_causal):
    console = terminal()
    Trainer.from_config(tiny_causal, console=console).evaluate()
    text = console.export_text()
    assert "evaluate" in text and "exact match" in text and "0/2" in text  # 16 validation rows, batches of 8


def test_no_bar_off_a_terminal_or_when_quiet(tiny_classification):
    plain = Console(file=io.StringIO(), record=True, width=150)
    Trainer.from_config(tiny_classification, console=plain).evaluate()
    assert "evaluate" not in plain.export_text()
    console = terminal()
    trainer = Trainer.from_config(tiny_classification, console=console)
    with progress.use(quiet=True):
        trainer.evaluate()
    assert "evaluate" not in console.export_text()


def test_training_draws_its_evaluations_beneath_its_own_bar(tiny_classification):
    console = terminal()
    run(tiny_classification, console=console)
    text = console.export_text()
    assert "train" in text and "ex/s" in text and "evaluate" in text


def test_train_quiet_prints_the_closing_line_only(app, tiny_classification, tmp_path):
    path = tmp_path / "job.yaml"
    tiny_classification.to_yaml(path)
    out = tmp_path / "quiet-run"
    result = runner.invoke(app, ["train", str(path), "--max-steps", "2", "--output-dir", str(out), "--quiet"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert TABLE_CORNER not in result.output and "before training" not in result.output
    *before, last = result.output.strip().splitlines()
    assert last.startswith(f"saved to {out}  validation: loss")
    assert all(line.startswith("warning: ") for line in before)  # 2 steps may not beat step 0: it says so
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_eval_quiet_prints_the_metrics_on_one_line(app, tiny_classification):
    trained = run(tiny_classification, console=Console(quiet=True))
    args = ["eval", "--model", tiny_classification.model, "--adapter", str(trained.paths["adapter"]),
            "--data", tiny_classification.validation]
    shown = runner.invoke(app, args, env={"COLUMNS": "200"})
    quiet = runner.invoke(app, [*args, "-q"], env={"COLUMNS": "200"})
    assert shown.exit_code == quiet.exit_code == 0, quiet.output
    assert TABLE_CORNER in shown.output and TABLE_CORNER not in quiet.output
    accuracy = trained.metrics["after"]["validation"]["accuracy"]
    assert quiet.output.strip().splitlines() == [f"{tiny_classification.validation}: loss "
                                                 f"{trained.metrics['after']['validation']['loss']:.4f}, "
                                                 f"accuracy {accuracy:.4f}"]


def test_probe_quiet_prints_no_ranking(app, tiny_classification, tmp_path):
    path = tmp_path / "job.yaml"
    tiny_classification.to_yaml(path)
    result = runner.invoke(app, ["probe", str(path), "--batches", "1", "--out", str(tmp_path / "probe"), "--quiet"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert TABLE_CORNER not in result.output and result.output.startswith("dominant module: ")
