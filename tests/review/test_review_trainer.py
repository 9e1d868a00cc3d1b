"""Review of the reusable trainer (`splice.train`: Trainer, TrainConfig, checkpoints and resume,
best keeping and early stopping, gradient accumulation, the schedule, the run folder and report)
against what a Hugging Face PEFT + transformers Trainer user expects and ../shared/DESIGN.md.

The tests marked "review finding" fail on the reviewed code for the reason their docstring
gives and pass once it is fixed; the others pin behaviour verified in review that tests/train
does not cover. Every run is a tiny random-weight model on a few rows (seconds each)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from splice.core.errors import ConfigError
from splice.train import Callback, TrainConfig, Trainer, loop

# ------------------------------------------------------------------------------- fixtures


def quiet() -> Console:
    return Console(quiet=True)


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def bert_config(bert_dir: Path, sentiment: tuple[str, str], out: Path, **fields) -> TrainConfig:
    train, val = sentiment
    base = dict(model=str(bert_dir), data=train, validation=val, batch_size=8, group_by_length=False,
                max_steps=4, eval_every=100, lr=5e-2, head_lr=0.2, checkpoint_every=None, output_dir=str(out))
    return TrainConfig(**{**base, **fields})


FROZEN = dict(lr=1e-30, head_lr=1e-30)  # an update too small to change any prediction: no evaluation improves


def step_gradients(trainer: Trainer) -> list[torch.Tensor]:
    """Records, at every real optimizer step, the gradients the optimizer is about to apply
    (all trained tensors, flattened), through torch's public step pre-hook."""
    seen: list[torch.Tensor] = []
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)

    def record(opt, args, kwargs):
        seen.append(torch.cat([p.grad.detach().flatten().clone() for g in opt.param_groups for p in g["params"]
                               if p.grad is not None]))

    optimizer.register_step_pre_hook(record)
    return seen


def run_steps(trainer: Trainer) -> None:
    while trainer.step() is not None:
        pass


# ------------------------------------------------------------------ gradient accumulation


@pytest.fixture(scope="module")
def accumulated(bert_dir, sentiment, tmp_path_factory) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of grad_accum 3 over 4 batches an epoch (steps of 3 batches, then 1) and of
    grad_accum 1 over the same batches in the same order (no clipping, a frozen lr so that the
    parameters stay where they were)."""
    out = tmp_path_factory.mktemp("review-trainer-accum")
    common = dict(max_grad_norm=None, **FROZEN)
    seen = []
    for name, grad_accum, steps in (("a", 3, 2), ("b", 1, 4)):  # one after the other (see the next finding)
        config = bert_config(bert_dir, sentiment, out / name, grad_accum=grad_accum, max_steps=steps, **common)
        trainer = Trainer.from_config(config, console=quiet())
        seen.append(step_gradients(trainer))
        run_steps(trainer)
    assert len(seen[0]) == 2 and len(seen[1]) == 4
    return seen[0], seen[1]


def test_a_full_accumulation_applies_the_mean_gradient_of_its_batches(accumulated):
    """Verified: grad_accum 3 of batch 8 applies the mean of the three batches' gradients
    (what one batch of 24 would give for a classifier), as HF Trainer does."""
    three, one = accumulated
    torch.testing.assert_close(three[0], (one[0] + one[1] + one[2]) / 3, rtol=1e-4, atol=1e-8)


def test_review_finding_the_partial_accumulation_at_an_epochs_end_is_not_scaled_down(accumulated):
    """Review finding. An epoch of 4 batches with grad_accum 3 ends on a step of 1 batch
    (trainer.py:266 `record_backward` ends the accumulation at the epoch's last batch), but the
    batch's loss is still divided by grad_accum (accelerate's `backward` divides by
    `gradient_accumulation_steps`, set in evaluation.py:33; trainer.py:407 calls it), so that
    step applies 1/3 of its gradient: a silently smaller step at every epoch end (Adam's moment
    estimates see a gradient 3x too small). HF Trainer divides each accumulation by the number
    of batches it really holds (`current_gradient_accumulation_steps = len(batch_samples)`).
    Expected: the partial step applies the mean gradient of its own batches."""
    three, one = accumulated
    ratio = (three[1].norm() / one[3].norm()).item()
    assert ratio == pytest.approx(1.0, rel=1e-3), f"the 1-batch step applies {ratio:.3f} x its gradient"


def test_review_finding_a_trainer_built_later_does_not_change_an_earlier_ones_accumulation(
        accumulated, bert_dir, sentiment, tmp_path):
    """Review finding. `make_accelerator` (evaluation.py:32-33) resets accelerate's process-wide
    state for every new Trainer, and accelerate's GradientState (`num_steps`, what
    `accelerator.backward` divides by and what `accumulate` syncs on) is a singleton: building a
    second Trainer (grad_accum 1) before training the first (grad_accum 3) makes the first
    divide by 1 and so apply the SUM of its three batches' gradients, 3x the mean (two trainers
    in one notebook, a job that sets up its next training before the current one ends).
    Expected: a Trainer's steps depend on its own config only: the same gradients as when it
    was built alone."""
    alone, _ = accumulated
    common = dict(max_grad_norm=None, **FROZEN)
    first = Trainer.from_config(bert_config(bert_dir, sentiment, tmp_path / "a", grad_accum=3, max_steps=1, **common),
                                console=quiet())
    Trainer.from_config(bert_config(bert_dir, sentiment, tmp_path / "b", grad_accum=1, max_steps=1, **common),
                        console=quiet())
    seen = step_gradients(first)
    run_steps(first)
    ratio = (seen[0].norm() / alone[0].norm()).item()
    assert ratio == pytest.approx(1.0, rel=1e-3), f"the first trainer applies {ratio:.3f} x its gradient"


@pytest.mark.xfail(strict=True, reason="not fixed yet: weighting micro-batches by their label tokens "
                                        "(transformers' num_items_in_batch) needs the accumulation's token count first")
def test_review_finding_causal_lm_accumulation_weights_tokens_as_one_batch(llama_dir, tmp_path):
    """Review finding. For causal LM, grad_accum 2 of batch 2 should give the gradient of one
    batch of 4 (the loss is a mean over completion tokens): `record_backward`/`check_step`
    (trainer.py:256-266, results.py:152) average the micro-batches' per-token means, so a
    micro-batch with few completion tokens weighs as much as one with many. transformers'
    Trainer fixed exactly this (4.46, `num_items_in_batch`): its accumulated gradient and logged
    loss equal one big batch's. The rows have 1, 2, 4 and 8 completion words, so no split into
    two pairs has equal token counts. Expected: equal first-step gradients and logged loss."""
    words = "one two three four five six seven eight".split()
    rows = [{"prompt": f"count {n}:", "completion": " " + " ".join(words[:n])} for n in (1, 2, 4, 8)]
    train = write_rows(tmp_path / "train.jsonl", rows)
    val = write_rows(tmp_path / "val.jsonl", rows[:2])

    def first_step(name: str, **fields):
        config = TrainConfig(model=str(llama_dir), task="causal_lm", data=train, validation=val, max_length=48,
                             adapter={"method": "lora", "r": 4, "alpha": 8, "targets": "all-linear"},
                             group_by_length=False, max_grad_norm=None, max_steps=1, eval_every=100,
                             checkpoint_every=None, output_dir=str(tmp_path / name), **FROZEN, **fields)
        trainer = Trainer.from_config(config, console=quiet())
        seen = step_gradients(trainer)
        entry = trainer.step()
        return seen[0], entry["loss"]

    accumulated, accumulated_loss = first_step("accum", batch_size=2, grad_accum=2)
    whole, whole_loss = first_step("whole", batch_size=4, grad_accum=1)
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-4)
    torch.testing.assert_close(accumulated, whole, rtol=1e-3, atol=1e-7)


# ------------------------------------------------------------------ early stopping and report


def test_early_stopping_stops_after_exactly_patience_evaluations_without_improvement(bert_dir, sentiment, tmp_path):
    """Verified (no run-level test in tests/train): patience 2 with an evaluation every 2 steps
    and no improvement on step 0 stops at step 4 (HF's EarlyStoppingCallback counts the same
    way), keeps step 0, and the report says it stopped early."""
    config = bert_config(bert_dir, sentiment, tmp_path / "run", max_steps=12, eval_every=2,
                         early_stopping_patience=2, **FROZEN)
    result = loop.run(config, console=quiet())
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert result.best_step == 0 and result.stopped_early and result.status == "finished"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stopped_early"] is True


def test_review_finding_a_run_that_took_all_its_steps_is_not_reported_as_stopped_early(bert_dir, sentiment,
                                                                                      tmp_path):
    """Review finding. ending.py:69 reports `stopped_early=trainer.best.should_stop`, which is
    also true when the patience runs out on the run's last evaluation (step == total_steps):
    the run took every step, yet metrics.json says `stopped_early: true` and ending.py:116
    prints "early stopping: no improvement in 2 evaluations". Expected: stopped_early only when
    the run ended before its last step (`should_stop and state.step < total_steps`)."""
    config = bert_config(bert_dir, sentiment, tmp_path / "run", max_steps=4, eval_every=2,
                         early_stopping_patience=2, **FROZEN)
    result = loop.run(config, console=quiet())
    assert len(result.history) == 4  # every step was taken
    assert result.stopped_early is False
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stopped_early"] is False


class CrashAfter(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, entry) -> None:
        if entry["step"] == self.step + 1:  # after step `self.step`'s checkpoint, before the next one
            raise KeyboardInterrupt


def test_a_resumed_run_keeps_its_patience_count_and_stops_where_the_whole_run_stops(bert_dir, sentiment, tmp_path):
    """Verified: the early-stopping counter and best step travel in the checkpoint: a run
    killed after its step-4 checkpoint (two evaluations without improvement of patience 3)
    resumes, stops at step 6 as the run that never stopped did, with the same history."""
    fields = dict(max_steps=20, eval_every=2, early_stopping_patience=3, checkpoint_every=2, **FROZEN)
    whole = loop.run(bert_config(bert_dir, sentiment, tmp_path / "whole", **fields), console=quiet())
    assert len(whole.history) == 6 and whole.stopped_early
    crashed = bert_config(bert_dir, sentiment, tmp_path / "crashed", **fields)
    with pytest.raises(KeyboardInterrupt):
        Trainer.from_config(crashed, callbacks=[CrashAfter(4)], console=quiet()).fit()
    resumed = loop.resume(tmp_path / "crashed", console=quiet())
    assert resumed.history == whole.history
    assert (resumed.best_step, resumed.stopped_early) == (0, True)


# ------------------------------------------------------------------ evaluation


def test_evaluation_leaves_no_gradient_and_the_next_step_trains_in_train_mode(bert_dir, sentiment, tmp_path):
    """Verified: an evaluation between steps (a caller's `trainer.evaluate()`) runs the model in
    eval mode under no_grad, adds nothing to the gradients, and the next step runs in train
    mode again (dropout on)."""
    trainer = Trainer.from_config(bert_config(bert_dir, sentiment, tmp_path / "run", max_steps=3), console=quiet())
    modes: list[bool] = []
    trainer.plain_model.register_forward_pre_hook(lambda module, args, kwargs: modes.append(module.training),
                                                  with_kwargs=True)
    trainer.step()
    modes.clear()
    trainer.evaluate(["validation"])
    assert modes and not any(modes)
    assert all(p.grad is None or not p.grad.any() for p in trainer.trained.values())
    modes.clear()
    trainer.step()
    assert modes and all(modes)


# ------------------------------------------------------------------ schedule and optimizer


@pytest.mark.xfail(strict=True, reason="not changed yet: with splice's default warmup_ratio 0.06 (transformers' "
                                        "is 0), the ceiling gives every run a first step at lr 0; the default and the "
                                        "rounding are to be decided together")
def test_review_finding_warmup_ratio_gives_its_share_of_the_steps(bert_dir, sentiment, tmp_path):
    """Review finding. trainer.py:186 takes `int(config.warmup_ratio * self.total_steps)`
    warm-up steps; 0.29 * 100 is 28.999999999999996 in floating point, so warmup_ratio 0.29 of
    100 steps warms up for 28 steps, not 29, and the lr peaks one step early (and 0.1 of 5
    steps gives no warm-up at all). HF's TrainingArguments.get_warmup_steps takes
    `math.ceil(num_training_steps * warmup_ratio)`. Expected: 29 warm-up steps, so the lr in
    effect after step 28 is 28/29 of the peak."""
    config = bert_config(bert_dir, sentiment, tmp_path / "run", max_steps=100, warmup_ratio=0.29, lr=0.01,
                         head_lr=None)
    trainer = Trainer.from_config(config, console=quiet())
    lrs = [trainer.step()["lr"] for _ in range(28)]
    assert lrs[0] == pytest.approx(0.01 / 29)
    assert lrs[27] == pytest.approx(0.01 * 28 / 29)


def test_review_finding_biases_and_norms_get_no_weight_decay(bert_dir, sentiment, tmp_path):
    """Review finding (HF parity). optimizers.py:63 and 69 put every trained tensor, the
    classification head's bias included, in groups with `weight_decay` (0.01 by default), so
    AdamW pulls biases (and any LayerNorm a run trains with train_also) towards zero. HF
    Trainer (which HF PEFT users train with) leaves out of decay every parameter whose name holds
    "bias" or a norm (`Trainer.get_decay_parameter_names`). Expected: classifier.bias in a group
    with weight_decay 0."""
    trainer = Trainer.from_config(bert_config(bert_dir, sentiment, tmp_path / "run", weight_decay=0.1),
                                  console=quiet())
    biases = {id(p): name for name, p in trainer.trained.items() if name.endswith("bias")}
    assert biases, sorted(trainer.trained)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    decayed = [biases[id(p)] for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]
               if id(p) in biases]
    assert decayed == []


# ------------------------------------------------------------------ config values


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_review_finding_a_seed_set_seed_cannot_take_is_refused_by_the_config(seed):
    """Review finding. TrainConfig.validate (config.py:194) accepts any int seed, but
    run_setup.py:41 `set_seed(config.seed)` (NumPy) accepts only 0 <= seed < 2**32: `splice
    train --seed -1` passes validation, claims the run folder, then dies with a ValueError
    traceback (not a SpliceError, so the CLI's `user_errors` does not turn it into a message).
    Expected: a ConfigError naming `seed` and the valid range, before any work."""
    with pytest.raises(ConfigError, match="seed"):
        TrainConfig(seed=seed)


def test_review_finding_yaml_exponents_in_optimizer_betas_are_read_as_numbers(tmp_path):
    """Review finding. PyYAML reads `9e-1` (no dot) as a string; config.py:186-188 turns such
    strings into numbers for the top-level values of an option mapping (`eps: 1e-8` works) but
    not inside a list, so `betas: [9e-1, 0.999]` is refused with "betas must be two numbers in
    [0, 1), got ['9e-1', 0.999]" although both are numbers in YAML 1.2 (and in every other
    place a splice config takes a number). Expected: betas read as [0.9, 0.999]."""
    path = tmp_path / "job.yaml"
    path.write_text("optimizer: {name: adamw, betas: [9e-1, 0.999], eps: 1e-8}\n")
    config = TrainConfig.from_yaml(path)
    assert config.optimizer["betas"] == [0.9, 0.999] and config.optimizer["eps"] == 1e-8


def test_yaml_config_reading_verified_cases(tmp_path):
    """Verified: exponents without a dot are numbers, strings are not bools, an unknown key is
    refused with the closest one, and non-finite or wrongly typed values are refused."""
    path = tmp_path / "job.yaml"
    path.write_text("lr: 5e-4\nhead_lr: 1E-3\nweight_decay: 0\nmax_grad_norm: 1\n")
    config = TrainConfig.from_yaml(path)
    assert (config.lr, config.head_lr, config.weight_decay, config.max_grad_norm) == (5e-4, 1e-3, 0, 1)
    for text, message in [("group_by_length: 'false'\n", "group_by_length must be true or false"),
                          ("lerning_rate: 1\n", "unknown training config field"),
                          ("lrr: 1\n", "did you mean 'lr'"),
                          ("lr: .nan\n", "finite"), ("max_steps: 10.5\n", "max_steps must be an integer"),
                          ("eval_every: true\n", "eval_every must be an integer")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_yaml(path)


# ------------------------------------------------------------------ run folder


def test_review_finding_force_leaves_no_earlier_runs_adapter_last(llama_dir, tmp_path):
    """Review finding. `--force` (report.py:116-117, claim_run_dir) removes an earlier run's
    checkpoints and metrics.json "so they do not pass for this run's", but not its
    adapter-last/. A forced run whose best state is its last one writes no adapter-last/
    (ending.py:91), so the earlier run's final adapter stays beside this run's adapter/ and
    passes for this run's last state. Expected: after the run, adapter-last/ is absent unless
    this run wrote it."""
    rows = [{"prompt": f"say {w}:", "completion": f" {w}"} for w in "red green blue gold pink gray".split()]
    train, val = write_rows(tmp_path / "train.jsonl", rows), write_rows(tmp_path / "val.jsonl", rows[:2])
    out = tmp_path / "run"

    def config(**fields) -> TrainConfig:
        return TrainConfig(model=str(llama_dir), task="causal_lm", data=train, validation=val, max_length=16,
                           batch_size=6, adapter={"method": "lora", "r": 4, "alpha": 8, "targets": "all-linear"},
                           checkpoint_every=None, output_dir=str(out), **fields)

    earlier = loop.run(config(max_steps=2, eval_every=1, **FROZEN), console=quiet())
    assert "last_adapter" in earlier.paths and (out / "adapter-last").is_dir()  # best step 0, last step 2
    result = loop.run(config(max_steps=4, eval_every=4, lr=1e-2), console=quiet(), force=True)
    assert result.best_step == 4, "precondition: the forced run's best state is its last one"
    assert "last_adapter" not in result.paths
    assert not (out / "adapter-last").exists(), "the earlier run's adapter-last/ passes for this run's"


def test_sigterm_report_counts_match_the_history(bert_dir, sentiment, tmp_path):
    """Verified: a SIGTERM between steps stops after the step under way with a checkpoint; the
    partial report's status, history and best step agree with what ran."""

    class Terminate(Callback):
        def on_step_end(self, trainer, entry) -> None:
            if entry["step"] == 2:
                signal.raise_signal(signal.SIGTERM)

    config = bert_config(bert_dir, sentiment, tmp_path / "run", max_steps=6, eval_every=2, **FROZEN)
    with pytest.raises(loop.TrainingInterrupted) as stopped:
        Trainer.from_config(config, callbacks=[Terminate()], console=quiet()).fit()
    assert stopped.value.exit_code == 143
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["status"] == "interrupted" and [h["step"] for h in written["history"]] == [1, 2]
    assert written["best_step"] == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["max_steps"] == 6
    assert (tmp_path / "run" / "checkpoints" / "step-2").is_dir()
