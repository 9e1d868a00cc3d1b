"""`splice federate` through the real `splice` app: a run's table and files, its refusals."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from splice.cli.main import app

runner = CliRunner()


def write(tmp_path, make_config, **overrides):
    config = make_config(**overrides).to_dict()
    path = tmp_path / "federate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config["output_dir"]


def test_a_run_prints_its_rounds_and_writes_the_report(tmp_path, make_config):
    path, folder = write(tmp_path, make_config, clients=2)
    result = runner.invoke(app, ["federate", str(path), "--rounds", "1"])
    assert result.exit_code == 0, result.output
    assert "global accuracy" in result.output and "uplink MB" in result.output and "wrote" in result.output
    assert (tmp_path / "run" / "report" / "results.md").exists()
    again = runner.invoke(app, ["federate", str(path)])  # the run folder exists now
    assert again.exit_code != 0 and "--force" in again.output


def test_bad_input_is_refused_before_anything_runs(tmp_path, make_config):
    path, _ = write(tmp_path, make_config)
    result = runner.invoke(app, ["federate", str(path), "--aggregation", "median"])
    assert result.exit_code != 0 and "aggregation must be" in result.output
    result = runner.invoke(app, ["federate", str(path), "--superlink", "127.0.0.1:9093", "--local-deployment"])
    assert result.exit_code != 0 and "give one" in result.output
    path.write_text("clients: 4\nroundz: 3\n")
    result = runner.invoke(app, ["federate", str(path)])
    assert result.exit_code != 0 and "unknown key 'roundz'; did you mean 'rounds'?" in result.output
    assert str(path) in result.output
