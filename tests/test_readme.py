"""The README's snippets work as written: every ```python block runs, top to bottom in one
namespace (as a reader pastes them), in a fresh folder; every `splice ...` command line in it
parses with the real CLI (commands, flags and their values; running them all would take the
main job's minutes)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main

from splice.cli.main import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def command_lines(text: str) -> list[str]:
    """`splice ...` lines of the ```bash blocks and of indented code, continuations joined,
    comments dropped."""
    code = [block for block in re.findall(r"```bash\n(.*?)```", text, re.S)]
    code.append("\n".join(line[4:] for line in text.splitlines() if line.startswith("    ")))
    lines = []
    for block in code:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("splice "):
                lines.append(line)
    return lines


def parse(line: str) -> None:
    """Parse a command line as `splice` would, without running it (click raises on a bad one)."""
    group = typer.main.get_command(app)
    name, command, rest = group.resolve_command(group.make_context("splice", [], resilient_parsing=True),
                                                shlex.split(line)[1:])
    command.make_context(name, rest)


def test_the_readme_has_snippets_to_check():
    assert len(PYTHON_BLOCKS) >= 3 and len(command_lines(README)) >= 10


def test_every_python_block_runs_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(PYTHON_BLOCKS, 1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)  # noqa: S102


@pytest.mark.parametrize("line", command_lines(README))
def test_every_command_line_parses(line):
    parse(line)


def test_a_flag_that_does_not_exist_fails_to_parse():  # so that the check above means something
    with pytest.raises(Exception, match="No such option[: ]*.--text-colum"):  # typer's own copy of click
        parse("splice train --text-colum review")
