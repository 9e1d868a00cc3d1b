"""`optimizer: adamw | loft | loraplus` in a training run: the groups and learning rates the
trainer builds, LoFT's own clipping, a LoFT run that learns and resumes as the run that never
stopped, and errors that name the key."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from rich.console import Console
from train_helpers import assert_resumes_as_whole

from splice.core.errors import ConfigError, SpliceError
from splice.optim import LoFT
from splice.train import TrainConfig, Trainer


def quiet() -> Console:
    return Console(quiet=True)


def plain(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper


def test_loraplus_groups_in_the_trainer(tiny_classification):
    config = replace(tiny_classification, optimizer={"name": "loraplus", "lr_ratio": 4}, lr=1e-3, head_lr=1e-2)
    trainer = Trainer.from_config(config, console=quiet())
    names = {id(p): n for n, p in trainer.trained.items()}
    by_lr: dict[float, set[str]] = {}
    for group in plain(trainer.optimizer).param_groups:
        by_lr.setdefault(round(group["initial_lr"], 9), set()).update(names[id(p)] for p in group["params"])
    assert by_lr[1e-3] and all(n.endswith("lora_A") for n in by_lr[1e-3])
    assert by_lr[4e-3] and all(n.endswith("lora_B") for n in by_lr[4e-3])
    assert by_lr[1e-2] == {n for n in trainer.trained if n.startswith("classifier")}


def test_loft_run_learns_and_clips_in_w_space(tiny_classification):
    config = replace(tiny_classification, optimizer="loft", max_steps=20, lr=5e-2, head_lr=0.2, max_grad_norm=0.5)
    trainer = Trainer.from_config(config, console=quiet())
    optimizer = plain(trainer.optimizer)
    assert isinstance(optimizer, LoFT) and optimizer.max_grad_norm == 0.5 and trainer.clipped_by_optimizer
    pairs = [g for g in optimizer.param_groups if g["pair"]]
    assert len(pairs) == 4 and all(g["scaling"] == 2.0 for g in pairs)  # r 8, alpha 16 on 2 layers x q, v
    losses = [trainer.step()["loss"] for _ in range(20)]
    assert sum(losses[-5:]) < sum(losses[:5]) - 0.2  # the tiny random model learns slowly, but it does


def test_loft_run_resumed_ends_as_the_run_that_never_stopped(tiny_classification, tmp_path):
    """Dies after step 7, resumes from step 5's checkpoint: LoFT's moments and partner copies come back."""
    config = replace(tiny_classification, optimizer="loft", max_steps=10, eval_every=5, checkpoint_every=5, lr=5e-3)
    assert_resumes_as_whole(config, tmp_path, crash_at=7)


def test_loft_refuses_an_adapter_without_factors(tiny_classification):
    config = replace(tiny_classification, optimizer="loft", adapter={"method": "diablo", "blocks": 4})
    with pytest.raises(SpliceError, match="optimizer loft needs a LoRA-shaped adapter"):
        Trainer.from_config(config, console=quiet())


@pytest.mark.parametrize(("value", "message"), [
    ("sgd", "optimizer 'sgd' is not known"),
    ({"name": "loraplus", "ratio": 4}, r"no option \['ratio'\]"),
    ({"name": "loft", "betas": [0.9]}, "betas must be two numbers"),
    ({"name": "loraplus", "lr_ratio": 0}, "lr_ratio must be a positive number"),
])
def test_bad_optimizer_settings_name_the_key(value, message):
    with pytest.raises(ConfigError, match=message) as caught:
        TrainConfig(optimizer=value)
    assert caught.value.key == "optimizer"


def test_yaml_optimizer_error_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimizer: {name: loraplus, lr_ratio: -1}\n")
    with pytest.raises(ConfigError, match=f"{path}.*lr_ratio"):
        TrainConfig.from_yaml(path)


def test_cli_optimizer_flag_reaches_the_config(tiny_classification, tmp_path):
    from typer.testing import CliRunner

    from splice.cli.main import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["train", "--model", tiny_classification.model, "--data", tiny_classification.data,
                                      "--max-steps", "2", "--optimizer", "loraplus", "--output-dir", str(out),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    written = json.loads((out / "metrics.json").read_text())
    assert written["config"]["optimizer"] == "loraplus"


@pytest.mark.parametrize("optimizer", ["adamw", "loraplus", "loft"])
def test_weight_decay_follows_transformers_trainers_rule(tiny_classification, optimizer):
    """Every trained tensor takes the config's weight decay exactly when transformers' Trainer
    would decay it (not biases, not norms), whichever optimizer groups it."""
    from transformers import Trainer as HFTrainer

    config = replace(tiny_classification, optimizer=optimizer, weight_decay=0.1)
    trainer = Trainer.from_config(config, console=quiet())
    hf_decayed = set(HFTrainer.get_decay_parameter_names(None, trainer.model))
    names = {id(p): n for n, p in trainer.trained.items()}
    decay = {names[id(p)]: g["weight_decay"] for g in plain(trainer.optimizer).param_groups for p in g["params"]}
    assert decay.keys() == set(trainer.trained)
    assert any(n.endswith("bias") for n in decay), sorted(decay)
    assert decay == {n: 0.1 if n in hf_decayed else 0.0 for n in decay}
