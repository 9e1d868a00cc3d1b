"""`splice --help` and each command's help are read without importing torch or transformers (their
import takes seconds); the work of a command imports them when it runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from splice.cli.train_cmd import METHOD_NAMES
from splice.core.registry import config_class, method_names

HEAVY = ("torch", "transformers", "torchao", "bitsandbytes")


def imported_heavy_modules(code: str) -> list[str]:
    """Run `code` in a fresh interpreter and list the heavy modules it left imported."""
    script = f"import sys\n{code}\nprint('heavy:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    heavy = done.stdout.strip().splitlines()[-1].removeprefix("heavy:")
    return [m for m in heavy.split(",") if m]


COMMANDS = ("train", "eval", "inspect", "info", "merge", "analyze", "compare", "probe", "compress", "push",
            "continual", "federate", "autoconfig", "multitask", "boostlora", "boost-tabular", "audit", "sign", "keygen")


@pytest.mark.parametrize("args", [["--help"], *([name, "--help"] for name in COMMANDS)], ids=" ".join)
def test_help_does_not_import_torch(args):
    code = ("from typer.testing import CliRunner\nfrom splice.cli.main import app\n"
            f"result = CliRunner().invoke(app, {args!r})\nassert result.exit_code == 0, result.output")
    assert imported_heavy_modules(code) == []


def test_a_command_that_needs_a_model_still_loads_torch():
    code = ("from typer.testing import CliRunner\nfrom splice.cli.main import app\n"
            "result = CliRunner().invoke(app, ['inspect', 'minilm', '--targets', 'query'])\n"
            "assert result.exit_code == 0, result.output")
    assert "torch" in imported_heavy_modules(code)


def test_the_help_of_method_names_every_registered_method():
    builtin = [name for name in method_names() if config_class(name).__module__.startswith("splice.")]  # not tests'
    assert list(METHOD_NAMES) == builtin


def test_version_names_splice_and_the_libraries_without_importing_them():
    code = ("from typer.testing import CliRunner\nfrom splice.cli.main import app\nimport splice\n"
            "from importlib import metadata\n"
            "result = CliRunner().invoke(app, ['--version'])\nassert result.exit_code == 0, result.output\n"
            "assert result.output.startswith(f'splice {splice.__version__} (torch '), result.output\n"
            "assert f\"transformers {metadata.version('transformers')}\" in result.output, result.output")
    assert imported_heavy_modules(code) == []


def test_the_analyze_rows_default_is_the_librarys():
    from splice.analysis.routing import DEFAULT_ROWS
    from splice.cli.analysis_cmds import ROUTED_ROWS

    assert ROUTED_ROWS == DEFAULT_ROWS  # a copy only so that --help need not import torch
