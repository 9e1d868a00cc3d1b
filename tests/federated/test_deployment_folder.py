"""A deployment run's output folder lies on the SuperLink's machine, where the submitter cannot
check it: the ServerApp itself refuses to replace an earlier run there unless the submission
carries --force."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from flwr.app import Context, RecordDict

from splice.core.errors import SpliceError
from splice.federated import FederatedConfig
from splice.federated.deployment import app_folder
from splice.federated.server import check_no_earlier_run, server_app


def submitted_context(config: FederatedConfig, folder: Path, overwrite: bool) -> Context:
    """The Context a ServerApp gets for the app folder `splice federate --superlink` submits."""
    project = tomllib.loads((app_folder(config, folder, overwrite) / "pyproject.toml").read_text())
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                   run_config=project["tool"]["flwr"]["app"]["config"])


@pytest.fixture
def config(tiny_bert, word_file, tmp_path) -> FederatedConfig:
    return FederatedConfig(model=str(tiny_bert), data=str(word_file), clients=2, rounds=1, local_steps=1,
                           output_dir=str(tmp_path / "run"))


def test_the_server_app_refuses_an_earlier_run_without_force(config, tmp_path):
    (Path(config.output_dir) / "report").mkdir(parents=True)
    context = submitted_context(config, tmp_path / "app", overwrite=False)
    with pytest.raises(SpliceError, match=r"holds an earlier run \(report\); submit with --force"):
        server_app()(None, context)  # refused before the first round: the grid is never reached
    assert (Path(config.output_dir) / "report").is_dir()


def test_force_travels_with_the_submission(config, tmp_path):
    (Path(config.output_dir) / "global-adapter").mkdir(parents=True)
    context = submitted_context(config, tmp_path / "app", overwrite=True)
    assert context.run_config["splice-overwrite"] is True
    check_no_earlier_run(config, overwrite=True)
    with pytest.raises(SpliceError, match="global-adapter"):
        check_no_earlier_run(config, overwrite=False)
