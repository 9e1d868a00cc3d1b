"""What the commands print at 80 columns: whole module names in tables, help paragraphs that
reflow instead of breaking where the docstring's lines break."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from splice.cli.main import app
from splice.cli.output import reflowed

runner = CliRunner()


def first_column(output: str) -> str:
    """The cells of a rich table's first column, run together: a name folded onto several lines
    reads whole again."""
    return "".join(line.split("│")[1].strip() for line in output.splitlines() if line.startswith("│"))


def test_inspect_at_80_columns_folds_long_module_names_instead_of_cutting_them():
    result = runner.invoke(app, ["inspect", "minilm", "--targets", "query,value"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines() if line.startswith("│")) <= 80
    assert "…" not in result.output
    names = first_column(result.output)
    for name in ("bert.encoder.layer.N.attention.self.query", "bert.encoder.layer.N.attention.self.value",
                 "bert.encoder.layer.N.attention.output.dense"):
        assert name in names


@pytest.mark.parametrize("columns", ["80", "120"])
def test_help_paragraphs_reflow_at_the_terminal_width(columns):
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    assert not any(line == "trained)" or line.endswith("CPU cores,") for line in lines)  # the docstring's breaks
    assert any("trained) on the bundled MiniLM" in line for line in lines)
    assert "splice train --resume runs/rotten-tomatoes-lora" in lines  # an example stays a line of its own


def test_reflowed_joins_prose_lines_and_keeps_indented_ones():
    doc = """Summary line.

    A paragraph broken
    over three
    lines.

    Examples:

        splice train --force
        splice train x.yaml
    """
    assert reflowed(doc) == ("Summary line.\n\nA paragraph broken over three lines.\n\nExamples:\n\n"
                             "    splice train --force\n    splice train x.yaml")
