"""Helpers the training tests share (imported as `train_helpers`; fixtures are in conftest)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from splice.train import Callback, TrainConfig, Trainer, loop


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Crash(Exception):
    """The process dying right after the checkpoint of step `at`."""


class CrashAt(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer, entry) -> None:
        if entry["step"] == self.at:
            raise Crash


def assert_resumes_as_whole(config: TrainConfig, folder: Path, crash_at: int) -> None:
    """Run `config` whole, and again dying after step `crash_at` and resumed from its newest
    checkpoint: both end with the same adapter tensors, bit for bit, and the same losses."""
    quiet = Console(quiet=True)
    whole = loop.run(replace(config, output_dir=str(folder / "whole")), console=quiet)
    crashed = replace(config, output_dir=str(folder / "crashed"))
    with pytest.raises(Crash):
        Trainer.from_config(crashed, callbacks=[CrashAt(crash_at)], console=quiet).fit()
    resumed = loop.resume(Path(crashed.output_dir), console=quiet)
    assert resumed.status == "finished"
    want = load_file(Path(whole.paths["adapter"]) / "adapter_model.safetensors")
    have = load_file(Path(resumed.paths["adapter"]) / "adapter_model.safetensors")
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
