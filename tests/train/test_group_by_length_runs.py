"""Training runs with length-grouped batches (the default) and with packing: a grouped run
resumed from a checkpoint ends bit for bit as the run that never stopped, a packed run follows
the padded run's losses, and the config and `splice train --group-by-length` say so."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import typer
import yaml
from rich.console import Console
from safetensors.torch import load_file
from train_helpers import Crash, CrashAt, write_jsonl
from typer.testing import CliRunner

from splice.cli import train_cmd
from splice.core.errors import ConfigError, SpliceError
from splice.train import TrainConfig, Trainer, checkpoint, loop

WORDS = {0: ["bad", "awful", "poor", "dull"], 1: ["good", "great", "fine", "superb"]}


def quiet() -> Console:
    return Console(quiet=True)


def rows(n: int, seed: int) -> list[dict]:
    """1 to 24 words from the label's own group: learnable, and of very different lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        out.append({"text": " ".join(rng.choice(WORDS[label]) for _ in range(rng.randint(1, 24))), "label": label})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """96 training rows: 12 batches of 8 per epoch."""
    folder = tmp_path_factory.mktemp("varied")
    return write_jsonl(folder / "train.jsonl", rows(96, 1)), write_jsonl(folder / "val.jsonl", rows(32, 2))


def config(model: Path, data: tuple[Path, Path], out: Path, **fields) -> TrainConfig:
    train, val = data
    base = dict(model=str(model), data=str(train), validation=str(val), batch_size=8, max_steps=20, eval_every=4,
                lr=5e-2, head_lr=0.2, checkpoint_every=4, output_dir=str(out), group_by_length=True)
    return TrainConfig(**{**base, **fields})


def outcome(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return (load_file(run_dir / "adapter" / "adapter_model.safetensors"),
            json.loads((run_dir / "metrics.json").read_text()))


def test_grouped_run_resumed_mid_epoch_ends_as_the_run_that_never_stopped(tiny_bert_dir, data, tmp_path):
    """The tiny BERT has dropout 0.1: the resumed run matches only if every random state comes back."""
    whole = loop.run(config(tiny_bert_dir, data, tmp_path / "whole"), console=quiet())
    assert whole.best_step > 0  # it learned
    plain = loop.run(config(tiny_bert_dir, data, tmp_path / "plain", group_by_length=False), console=quiet())
    assert [h["loss"] for h in plain.history] != [h["loss"] for h in whole.history]  # grouping changed the batches

    out = tmp_path / "crashed"
    with pytest.raises(Crash):  # step 16 is the 4th batch of the second epoch
        Trainer.from_config(config(tiny_bert_dir, data, out), callbacks=[CrashAt(16)], console=quiet()).fit()
    resumed = loop.resume(out, console=quiet())
    assert resumed.status == "finished" and len(resumed.history) == 20
    (want, want_metrics), (have, have_metrics) = outcome(tmp_path / "whole"), outcome(out)
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
    assert have_metrics["history"] == want_metrics["history"]
    assert (have_metrics["after"], have_metrics["best_step"]) == (want_metrics["after"], want_metrics["best_step"])


def test_packed_run_follows_the_padded_run(tiny_causal):
    """Packing changes only the batches' layout: same rows per step, same losses up to rounding,
    every example counted."""
    padded = Trainer.from_config(replace(tiny_causal, group_by_length=False, max_steps=6,
                                         output_dir=tiny_causal.output_dir + "-padded"), console=quiet())
    packed = Trainer.from_config(replace(tiny_causal, packing=True, max_steps=6), console=quiet())
    padded_losses = [padded.step()["loss"] for _ in range(6)]
    packed_losses = [packed.step()["loss"] for _ in range(6)]
    assert packed_losses == pytest.approx(padded_losses, rel=1e-4)
    assert packed.state.examples == padded.state.examples == 6 * tiny_causal.batch_size


def test_config_defaults_and_refusals():
    assert TrainConfig().group_by_length is True and TrainConfig().packing is False
    with pytest.raises(ConfigError, match="packing applies to task causal_lm only"):
        TrainConfig(packing=True)
    with pytest.raises(ConfigError, match="group_by_length must be true or false"):
        TrainConfig(group_by_length="yes")
    assert yaml.safe_load(TrainConfig(group_by_length=False).to_yaml())["group_by_length"] is False


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    train_cmd.register(app)
    return app


@pytest.mark.parametrize(("flags", "expected"), [([], True), (["--no-group-by-length"], False),
                                                 (["--group-by-length"], True)])
def test_cli_flag_sets_group_by_length(app, tiny_bert_dir, data, tmp_path, flags, expected):
    path = tmp_path / "job.yaml"
    config(tiny_bert_dir, data, tmp_path / "unused", max_steps=2, checkpoint_every=None).to_yaml(path)
    out = tmp_path / "cli-run"
    result = CliRunner().invoke(app, ["train", str(path), *flags, "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["group_by_length"] is expected


def test_a_checkpoint_from_before_the_fields_resumes_only_as_it_ran(tmp_path):
    """A checkpoint written before `group_by_length` and `packing` existed ran without them."""
    current = checkpoint.comparable(TrainConfig(output_dir=str(tmp_path), group_by_length=False))
    older = {k: v for k, v in current.items() if k not in ("group_by_length", "packing")}
    checkpoint.check_same_config(older, current, tmp_path)
    with pytest.raises(SpliceError, match="group_by_length: False -> True"):
        checkpoint.check_same_config(older, {**current, "group_by_length": True}, tmp_path)


def test_a_run_folder_from_before_the_default_changed_resumes_as_it_ran(tiny_bert_dir, data, tmp_path):
    """Its config.yaml has no group_by_length: `resume` keeps that run's plain shuffle, not today's
    default (grouped), and ends as the plain run that never stopped."""
    whole = loop.run(config(tiny_bert_dir, data, tmp_path / "whole", group_by_length=False, max_steps=12),
                     console=quiet())
    out = tmp_path / "older"
    with pytest.raises(Crash):
        Trainer.from_config(config(tiny_bert_dir, data, out, group_by_length=False, max_steps=12),
                            callbacks=[CrashAt(8)], console=quiet()).fit()
    written = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in written.items()
                                                     if k not in ("group_by_length", "packing")}))
    resumed = loop.resume(out, console=quiet())
    assert resumed.status == "finished"
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
