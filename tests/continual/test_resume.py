"""A continual run stopped after some tasks resumes at the next one and ends as the run that never
stopped: the same accuracy rows, switches, costs and final tensors, for every strategy."""

from __future__ import annotations

import pytest
import torch
import yaml
from continual_helpers import stop_at
from rich.console import Console
from typer.testing import CliRunner

from splice.cli.main import app
from splice.continual import SequenceConfig, run_sequence
from splice.continual.checkpoint import folder_of
from splice.core.errors import SpliceError

QUIET = Console(quiet=True)
LORA = {"method": "lora", "r": 4, "alpha": 8, "targets": ["query", "value"]}
ADAPTERS = {"core": {"method": "loreft", "r": 4, "positions": "f1+l1"}}
OPTIONS = {"loda": {"general": 2, "specific": 2, "statistic_batches": 2}}


def sequence(folder, files, out, strategy="sequential", **train) -> SequenceConfig:
    tasks = [{"name": "sentiment", "data": str(files["sentiment"])}, {"name": "topic", "data": str(files["topic"])},
             {"name": "again", "data": str(files["sentiment"])}]
    return SequenceConfig(
        tasks=tasks, strategy=strategy, model=str(folder), adapter=ADAPTERS.get(strategy, LORA),
        options=OPTIONS.get(strategy, {}),
        train={"batch_size": 16, "max_steps": 12, "lr": 1e-2, "head_lr": 5e-2, "max_length": 16,
               "checkpoint_every": None, "eval_every": None, "max_eval_examples": 32, **train},
        output_dir=str(out), angle_samples=2)


@pytest.mark.parametrize("strategy", ["sequential", "separate", "olora", "loda", "core", "condu"])
def test_stopped_run_resumes_and_ends_as_the_run_that_never_stopped(strategy, tiny_bert_folder, task_files,
                                                                    tmp_path, monkeypatch):
    whole = run_sequence(sequence(tiny_bert_folder, task_files, tmp_path / "whole", strategy), console=QUIET)
    config = sequence(tiny_bert_folder, task_files, tmp_path / "stopped", strategy)
    with monkeypatch.context() as patch:
        stop_at(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            run_sequence(config, console=QUIET)
    assert (folder_of(config.output_dir) / "state.pt").is_file()
    resumed = run_sequence(config, console=QUIET, resume=True)

    assert resumed.matrices == whole.matrices and resumed.routing == whole.routing
    assert resumed.before == whole.before and resumed.switches == whole.switches
    assert (resumed.trainable_parameters, resumed.stored_bytes) == (whole.trainable_parameters, whole.stored_bytes)
    want, have = whole.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
    assert not folder_of(config.output_dir).exists()  # an ended run has nothing to resume
    assert len(resumed.train_seconds) == 3 and resumed.wall_seconds > 0


def test_resume_refuses_what_it_cannot_continue(tiny_bert_folder, task_files, tmp_path, monkeypatch):
    config = sequence(tiny_bert_folder, task_files, tmp_path / "run")
    with pytest.raises(SpliceError, match="no progress/ with state.pt"):
        run_sequence(config, console=QUIET, resume=True)
    with monkeypatch.context() as patch:
        stop_at(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            run_sequence(config, console=QUIET)
    other = sequence(tiny_bert_folder, task_files, tmp_path / "run", lr=2e-2)
    with pytest.raises(SpliceError, match=r"another sequence config \(train: .*'lr': 0.01.* -> .*'lr': 0.02"):
        run_sequence(other, console=QUIET, resume=True)
    (folder_of(config.output_dir) / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SpliceError, match="progress is unreadable"):
        run_sequence(config, console=QUIET, resume=True)


def test_cli_says_how_to_resume_and_resumes(tiny_bert_folder, task_files, tmp_path, monkeypatch):
    path = tmp_path / "sequence.yaml"
    path.write_text(yaml.safe_dump(sequence(tiny_bert_folder, task_files, tmp_path / "run").to_dict()))
    with monkeypatch.context() as patch:
        stop_at(patch, 2)
        stopped = CliRunner().invoke(app, ["continual", str(path), "--quiet"])
    assert stopped.exit_code == 130 and "--resume" in stopped.output
    both = CliRunner().invoke(app, ["continual", str(path), "--resume", "--force"])
    assert both.exit_code != 0 and "--force replaces it" in both.output
    resumed = CliRunner().invoke(app, ["continual", str(path), "--resume", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert (tmp_path / "run" / "report" / "results.json").is_file()
