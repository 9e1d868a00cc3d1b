"""`splice compress` through the real `splice` app: one target, the refusals, and a tiny sweep."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import logits, randomize, save_tiny_bert
from typer.testing import CliRunner

import splice
from splice.cli.main import app
from splice.compression.para import compress
from splice.io.peft_format import attach_state
from splice.train import TrainConfig, evaluate_adapter
from splice.train.tasks import load_pretrained

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer: a base model `--model` accepts."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny") / "tiny-bert", dropout=0.0)


@pytest.fixture(scope="module")
def adapter(tiny_folder, tmp_path_factory):
    """A LoRA r=4 on query/value with a trained 2-way head, saved in PEFT format."""
    model = load_pretrained(str(tiny_folder), "classification", ("0", "1"))
    splice.attach(model, splice.LoRA(r=4, alpha=8, targets=["query", "value"], train_also=["classifier"]))
    randomize(model)
    torch.nn.init.normal_(model.classifier.weight, generator=torch.Generator().manual_seed(0))
    return splice.save(model, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture
def ids():
    return torch.randint(1000, 5000, (2, 9), generator=torch.Generator().manual_seed(0))


def test_compress_writes_a_smaller_adapter_and_prints_the_ranks(adapter, tiny_folder, tmp_path, ids):
    out = tmp_path / "small"
    result = runner.invoke(app, ["compress", str(adapter), "--budget", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "new r" in result.output and "50.0% fewer" in result.output
    expected = compress(adapter, budget=0.5)
    config = json.loads((out / "adapter_config.json").read_text())
    assert {n: config["rank_pattern"].get(n, config["r"]) for n in expected.state.modules} == \
        {n: r for n, r in expected.ranks_after.items() if r}
    loaded = splice.load(load_pretrained(str(tiny_folder), "classification", ("0", "1")), out)
    reference = attach_state(load_pretrained(str(tiny_folder), "classification", ("0", "1")), expected.state)
    torch.testing.assert_close(logits(loaded, ids), logits(reference, ids))

    again = runner.invoke(app, ["compress", str(adapter), "--energy", "0.9", "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output
    assert json.loads((out / "adapter_config.json").read_text()) == config  # untouched
    forced = runner.invoke(app, ["compress", str(adapter), "--energy", "0.9", "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output


def test_without_out_nothing_is_written(adapter, tmp_path):
    before = sorted(p.name for p in adapter.iterdir())
    result = runner.invoke(app, ["compress", str(adapter), "--rank", "2", "--allocation", "per-module"])
    assert result.exit_code == 0, result.output
    assert "nothing written" in result.output
    assert sorted(p.name for p in adapter.iterdir()) == before


@pytest.mark.parametrize("args, message", [
    (["--budget", "0.5", "--energy", "0.9"], "exactly one"),
    ([], "exactly one"),
    (["--budget", "2"], "(0, 1]"),
    (["--budget", "0.5", "--normalize", "l2"], "normalize must be one of"),
    (["--sweep", "1,0.5", "--budget", "0.5", "--data", "rotten_tomatoes"], "leave out --budget"),
    (["--sweep", "1,0.5"], "pass --data"),
    (["--sweep", "1,half", "--data", "rotten_tomatoes"], "comma-separated"),
    (["--sweep", "1,0", "--data", "rotten_tomatoes"], "(0, 1]"),
])
def test_bad_requests_are_refused_with_the_reason(adapter, args, message):
    result = runner.invoke(app, ["compress", str(adapter), *args])
    assert result.exit_code == 1
    assert message in result.output


def test_a_folder_that_is_not_an_adapter_is_refused(tmp_path):
    result = runner.invoke(app, ["compress", str(tmp_path), "--budget", "0.5"])
    assert result.exit_code == 1 and "adapter_config.json" in result.output


def test_sweep_evaluates_every_budget_and_writes_the_curve(adapter, tiny_folder, tmp_path):
    out = tmp_path / "sweep"
    args = ["compress", str(adapter), "--sweep", "1,0.5,0.25", "--data", "rotten_tomatoes",
            "--max-eval-examples", "24", "--out", str(out)]
    result = runner.invoke(app, args)  # no --model: the adapter's recorded base model
    assert result.exit_code == 0, result.output
    report = json.loads((out / "sweep.json").read_text())
    assert [p["budget"] for p in report["points"]] == [1.0, 0.5, 0.25]
    assert report["metric"] == "accuracy" and report["rows"] == 24
    # the reference is what `splice eval` gives for the original adapter
    config = TrainConfig(model=str(tiny_folder), data="rotten_tomatoes", max_eval_examples=24, batch_size=32)
    expected = evaluate_adapter(config, adapter)
    assert report["reference_metrics"]["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert report["reference"] == expected["accuracy"]
    full = report["points"][0]  # budget 1 is the original adapter, exactly
    assert full["metrics"]["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert report["points"][2]["metrics"]["loss"] != pytest.approx(expected["loss"], abs=1e-5)
    parameters = [p["parameters"] for p in report["points"]]
    assert parameters == sorted(parameters, reverse=True) and parameters[0] == report["adapter_parameters"]
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    for budget in ("1", "0.5", "0.25"):
        assert (out / f"budget-{budget}" / "adapter_config.json").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "--force" in again.output
