"""The training loop on tiny models: refusal, schedule, seeds, best checkpoint, files, causal LM."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from rich.console import Console

import splice
from splice.train import TrainConfig, evaluate_adapter, run
from splice.train.loop import BestKeeper


def quiet() -> Console:
    return Console(quiet=True)


def test_non_empty_output_dir_is_refused_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    # The model does not exist either: the refusal must come first, naming the folder and --force.
    config = TrainConfig(model=str(tmp_path / "no-model"), output_dir=str(run_dir))
    with pytest.raises(splice.OutputExistsError, match="--force") as err:
        run(config, console=quiet())
    assert str(run_dir) in str(err.value)
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_force_writes_into_a_non_empty_folder(tiny_classification, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "old.txt").write_text("x")
    result = run(tiny_classification, console=quiet(), force=True)
    assert (result.paths["adapter"] / "adapter_config.json").is_file()


def test_lr_follows_linear_warmup_then_cosine(tiny_classification):
    config = TrainConfig.from_dict(tiny_classification.to_dict(), max_steps=10, warmup_ratio=0.2, lr=0.01)
    result = run(config, console=quiet())
    lrs = [h["lr"] for h in result.history]
    # The lr in effect after optimizer step k (scheduler stepped k times); warm-up is 2 steps.
    expected = [0.01 * (k / 2 if k < 2 else 0.5 * (1 + math.cos(math.pi * (k - 2) / 8))) for k in range(1, 11)]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_same_seed_same_run_and_another_seed_differs(tiny_classification, tmp_path):
    def losses(seed: int, folder: str):
        config = TrainConfig.from_dict(tiny_classification.to_dict(), seed=seed, output_dir=str(tmp_path / folder))
        result = run(config, console=quiet())
        return [h["loss"] for h in result.history], result.metrics

    first, second, other = losses(7, "a"), losses(7, "b"), losses(8, "c")
    assert first == second
    assert first[0] != other[0]


def test_best_checkpoint_is_restored_and_saved(tiny_classification):
    result = run(tiny_classification, console=quiet())
    evals = {0: result.metrics["before"]["validation"]} | {h["step"]: h["eval"] for h in result.history if "eval" in h}
    assert sorted(evals) == [0, 4, 8, 12]
    best_step = max(evals, key=lambda s: (evals[s]["accuracy"], -s))
    assert result.best_step == best_step
    assert result.metrics["after"]["validation"] == pytest.approx(evals[best_step])
    # The saved adapter (with its trained head) reproduces the metrics on a fresh model.
    again = evaluate_adapter(TrainConfig.from_dict(tiny_classification.to_dict(), data=tiny_classification.validation),
                             result.paths["adapter"])
    assert again == pytest.approx(result.metrics["after"]["validation"], rel=1e-5)


def test_run_folder_holds_the_report(tiny_classification):
    result = run(tiny_classification, console=quiet())
    run_dir = result.paths["run_dir"]
    assert TrainConfig.from_yaml(run_dir / "config.yaml") == tiny_classification
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["after"] == result.metrics["after"] and report["before"] == result.metrics["before"]
    # LoRA r=8 on query and value of 2 layers (2 x 2 x (8x32 + 32x8)) and the 32->2 head.
    assert report["parameters"]["trainable"] == 2 * 2 * 512 + 66
    assert len(report["history"]) == 12 and set(report["versions"]) >= {"torch", "transformers", "splice"}
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["output_dir"] == tiny_classification.output_dir


def test_tiny_classifier_learns(tiny_classification):
    config = TrainConfig.from_dict(tiny_classification.to_dict(), max_steps=48, eval_every=12, lr=3e-2)
    result = run(config, console=quiet())
    assert result.metrics["after"]["validation"]["accuracy"] > result.metrics["before"]["validation"]["accuracy"]
    assert result.metrics["after"]["validation"]["accuracy"] >= 0.9


def test_causal_lm_loss_falls_on_the_completions(tiny_causal):
    result = run(tiny_causal, console=quiet())
    before, after = result.metrics["before"]["validation"], result.metrics["after"]["validation"]
    assert after["loss"] < before["loss"] - 1.0
    assert set(after) == {"loss", "perplexity", "exact_match"}
    assert (result.paths["adapter"] / "adapter_config.json").is_file()


@pytest.mark.parametrize(("values", "patience", "best_step", "stops"), [
    ([0.5, 0.6, 0.55, 0.58], 2, 1, True),
    ([0.5, 0.6, 0.55, 0.7], 2, 3, False),
    ([0.5, 0.4, 0.3, 0.2], None, 0, False),
])
def test_best_keeper_keeps_the_best_and_counts_patience(values, patience, best_step, stops):
    keeper = BestKeeper("accuracy", higher_is_better=True, patience=patience)
    for step, value in enumerate(values):
        keeper.offer({"accuracy": value}, step, lambda step=step: {"step": step})
    assert keeper.step == best_step and keeper.state == {"step": best_step}
    assert keeper.should_stop is stops


def test_bf16_autocast_runs_on_cpu_after_an_fp32_run_in_the_same_process(tiny_classification, tmp_path):
    fp32 = run(TrainConfig.from_dict(tiny_classification.to_dict(), max_steps=4), console=quiet())
    config = TrainConfig.from_dict(tiny_classification.to_dict(), max_steps=4, precision="bf16",
                                   output_dir=str(tmp_path / "bf16"))
    bf16 = run(config, console=quiet())
    fp32_losses, bf16_losses = ([h["loss"] for h in r.history] for r in (fp32, bf16))
    assert fp32_losses != bf16_losses  # autocast changed the arithmetic...
    assert bf16_losses == pytest.approx(fp32_losses, abs=0.02)  # ...but not the result
