"""Every command's examples stay copy-pasteable in an 80-column terminal: each example line of a
docstring (a `splice ...` command, a `--flag` continuation, a `\\`-continued line) is rendered
by `--help` on one line, not wrapped in the middle of a command."""

from __future__ import annotations

import click
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from splice.cli.main import app

runner = CliRunner()


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found = []
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += _commands(command, (*prefix, name))
        else:
            found.append(((*prefix, name), command))
    return found


COMMANDS = _commands(get_command(app))


def _example_lines(doc: str) -> list[str]:
    lines = []
    for raw in doc.splitlines():
        line = raw.strip()
        if line.startswith("Example") and ": splice " in line:
            line = line.split(": ", 1)[1]
        if line.startswith(("splice ", "--")) or (line.endswith("\\") and "splice " in line):
            lines.append(line)
    return lines


def test_every_command_has_examples_to_check():
    assert len(COMMANDS) >= 15
    assert sum(bool(_example_lines(command.help or "")) for _, command in COMMANDS) >= 15


@pytest.mark.parametrize("path", [path for path, _ in COMMANDS], ids=" ".join)
def test_help_examples_fit_80_columns(path):
    command = dict(COMMANDS)[path]
    result = runner.invoke(app, [*path, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    rendered = [line.strip(" │") for line in result.output.splitlines()]
    assert max(len(line) for line in result.output.splitlines()) <= 80
    wrapped = [line for line in _example_lines(command.help or "") if not any(line in shown for shown in rendered)]
    assert not wrapped, f"splice {' '.join(path)} --help wraps these example lines at 80 columns: {wrapped}"
