"""`quantize:` in training configs (QLoRA): the run trains LoRA on a 4-bit base and its adapter
reproduces the run's evaluation on a fresh 4-bit base; bad values are refused by key."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

import splice
from splice.cli.main import app
from splice.core.errors import ConfigError
from splice.train import TrainConfig, run
from splice.train.evaluation import evaluate
from splice.train.run_setup import load_run

runner = CliRunner()


def test_a_qlora_run_trains_on_4bit_and_its_adapter_reloads(tiny_causal):
    config = TrainConfig.from_dict(tiny_causal.to_dict(), quantize={"scheme": "nf4", "backend": "torchao"})
    result = run(config)
    losses = [entry["loss"] for entry in result.history]
    assert losses[-1] < losses[0]
    assert yaml.safe_load((result.paths["run_dir"] / "config.yaml").read_text())["quantize"] == {
        "scheme": "nf4", "backend": "torchao"}
    setup = load_run(config)  # a fresh 4-bit base, as the run had it
    assert splice.quantized_layers(setup.model) and "lm_head" not in splice.quantized_layers(setup.model)
    splice.detach(setup.model, "default")
    splice.load(setup.model, result.paths["adapter"])
    reloaded = evaluate(setup.model, setup.tokenizer, setup.splits.validation, config)
    assert reloaded["loss"] == pytest.approx(result.metrics["after"]["validation"]["loss"], rel=1e-5)


@pytest.mark.parametrize(("value", "message"), [
    ("int3", "scheme 'int3' is not supported"),
    ({"scheme": "nf4", "compute": "bfloat16"}, r"unknown key\(s\) \['compute'\].*compute_dtype"),
    ({"compute_dtype": "int8"}, "compute_dtype must be one of"),
    ({"backend": "gptq"}, "backend 'gptq' is not one of"),
    ({"block_size": 0}, "block_size must be a positive integer"),
])
def test_bad_quantize_values_are_refused_by_key(tiny_causal, value, message):
    with pytest.raises(ConfigError, match=message) as caught:
        TrainConfig.from_dict(tiny_causal.to_dict(), quantize=value)
    assert caught.value.key == "quantize"


def test_cli_flag_quantizes_the_base(tiny_causal, tmp_path):
    path = tmp_path / "job.yaml"
    tiny_causal.to_yaml(path)
    out = tmp_path / "cli-qlora"
    result = runner.invoke(app, ["train", str(path), "--quantize", "nf4", "--max-steps", "2", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["quantize"] == "nf4"
    assert "NF4Linear" in result.output  # the summary names the 4-bit layers the adapter sits on
    metrics = json.loads((out / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["after"]["validation"]["loss"]))


def test_bf16_autocast_on_a_4bit_base_trains_and_evaluates(tiny_causal):
    config = TrainConfig.from_dict(tiny_causal.to_dict(), quantize="nf4", precision="bf16", max_steps=3, eval_every=3)
    result = run(config)
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in result.history)
    assert torch.isfinite(torch.tensor(result.metrics["after"]["validation"]["loss"]))
