"""Training runs under faults: stopped and resumed, diverging, and two runs racing for a folder
(issue 13, "Training runs").

Before: a run kept its best checkpoint in memory only, so Ctrl-C after two improvements left the
run folder empty, and nothing could be resumed; with lr=1e9 the loss became NaN and the run saved
an all-NaN adapter as its best checkpoint (a NaN model predicts class 0, which beat the start on
accuracy); two runs started into one folder both passed the emptiness check (the folder stays
empty until the end) and one adapter was lost; and `--tenants` compared folders as strings, so
`runs/x` and `runs/x/` shared one folder.

The runs here are the tiny BERT of `tests/helpers.py` on three-word-group texts: a run of 20
steps takes about a second. Resumed runs must match the uninterrupted run exactly (same
batches, random states, schedule, best checkpoint): compared with `torch.equal`, also with
dropout on, which only matches if the random states are restored.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import typer
from helpers import save_tiny_bert
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

import splice
from splice.cli import train_cmd
from splice.train import TrainConfig, checkpoint, evaluate_adapter, loop, report, run

pytestmark = pytest.mark.guards("lost")

LOCK = ".splice-run.lock"
WORDS = {0: ["good", "great", "fine", "superb"], 1: ["bad", "awful", "poor", "dull"]}
runner = CliRunner()


def quiet() -> Console:
    return Console(quiet=True)


def write_rows(path: Path, labels: list[int], seed: int) -> Path:
    """1..12 words, all from the label's own group: learnable within a few steps."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for label in labels:
            words = [rng.choice(WORDS[label]) for _ in range(rng.randint(1, 12))]
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


def balanced(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(0, 1) for _ in range(n)]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """Dropout 0: the issue's comparison (equal adapters)."""
    return save_tiny_bert(tmp_path_factory.mktemp("bert-no-dropout"), dropout=0.0)


@pytest.fixture(scope="module")
def dropout_bert_dir(tmp_path_factory) -> Path:
    """Dropout 0.1: a resumed run matches only if every random state comes back."""
    return save_tiny_bert(tmp_path_factory.mktemp("bert-dropout"), dropout=0.1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """96 training rows (12 batches of 8 per epoch) and 32 validation rows."""
    folder = tmp_path_factory.mktemp("data")
    return write_rows(folder / "train.jsonl", balanced(96, 1), 1), write_rows(folder / "val.jsonl", balanced(32, 2), 2)


def config(model: Path, data: tuple[Path, Path], out: Path, **fields) -> TrainConfig:
    """A run that learns: its validation accuracy improves more than once in 24 steps."""
    train, val = data
    base = dict(model=str(model), data=str(train), validation=str(val), batch_size=8, max_steps=24, eval_every=4,
                lr=5e-2, head_lr=0.2, checkpoint_every=None, output_dir=str(out))
    return TrainConfig(**{**base, **fields})


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def metrics(run_dir: Path) -> dict:
    """metrics.json, read as strict JSON (NaN is not JSON)."""
    def refuse(name: str):
        raise ValueError(f"{name} in metrics.json")
    return json.loads((run_dir / "metrics.json").read_text(), parse_constant=refuse)


def assert_same_run(expected: Path, got: Path) -> None:
    """Bit-equal adapters (the best checkpoint, with its head), equal history and metrics."""
    want, have = adapter_tensors(expected), adapter_tensors(got)
    assert want.keys() == have.keys()
    for key in want:
        assert torch.equal(want[key], have[key]), key
    a, b = metrics(expected), metrics(got)
    assert b["status"] == a["status"] == "finished"
    assert b["history"] == a["history"]  # every step's loss and lr, every evaluation
    assert (b["before"], b["after"], b["best_step"]) == (a["before"], a["after"], a["best_step"])


def evaluations(history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["eval"]["accuracy"] for h in history if "eval" in h}


class SignalAt(Console):
    """A console that sends `signum` to this process when the loop reports step `step`'s
    evaluation: a real signal, delivered to the loop's real handler, at a known step."""

    def __init__(self, step: int, signum: int = signal.SIGINT) -> None:
        super().__init__(quiet=True)
        self.mark, self.signum, self.sent = f"step {step}[/]", signum, False

    def print(self, *objects, **kwargs) -> None:
        if not self.sent and any(self.mark in str(o) for o in objects):
            self.sent = True
            os.kill(os.getpid(), self.signum)
        super().print(*objects, **kwargs)


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    train_cmd.register(app)
    return app


# -- resume --------------------------------------------------------------------------------------


class Crash(Exception):
    """The process dying right after a checkpoint (what is on disk is all a resume has)."""


def test_resume_from_a_periodic_checkpoint_ends_as_the_run_that_never_stopped(bert_dir, data, tmp_path,
                                                                              monkeypatch):
    # grad_accum 5 over 12 batches: steps of 5, 5 and 2 batches per epoch; the crash after the
    # step-8 checkpoint is in the middle of the third epoch.
    fields = dict(grad_accum=5, checkpoint_every=4, max_steps=12, lr=0.1, head_lr=0.1)
    whole = run(config(bert_dir, data, tmp_path / "whole", **fields), console=quiet())
    assert len(evaluations(whole.history)) == 3 and whole.best_step > 0  # it learned
    assert not (tmp_path / "whole" / "checkpoints").exists()  # an ended run keeps none

    save_checkpoint = checkpoint.save_checkpoint

    def crash_after_step_8(accelerator, model, run_dir, step, show):
        saved = save_checkpoint(accelerator, model, run_dir, step, show)
        if step == 8:
            raise Crash
        return saved

    monkeypatch.setattr(checkpoint, "save_checkpoint", crash_after_step_8)
    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        run(config(bert_dir, data, out, **fields), console=quiet())
    monkeypatch.undo()
    assert report.checkpoint_steps(out) == [8]  # step 4's was replaced
    saved = load_file(out / "checkpoints" / "step-8" / "model.safetensors")
    trainable = {k for k, v in adapter_tensors(tmp_path / "whole").items()}
    assert len(saved) == len(trainable) and all(".lora_" in k or "classifier" in k for k in saved)  # no base weights
    assert not (out / LOCK).exists()  # released on the way out

    resumed = loop.resume(out, console=quiet())
    assert resumed.status == "finished" and len(resumed.history) == 12
    assert_same_run(tmp_path / "whole", out)
    assert not (out / "checkpoints").exists()


def test_ctrl_c_keeps_the_best_adapter_and_resume_ends_as_the_run_that_never_stopped(dropout_bert_dir, data,
                                                                                    tmp_path, monkeypatch, app):
    whole_config = config(dropout_bert_dir, data, tmp_path / "whole")
    whole = run(whole_config, console=quiet())
    first_half = {s: a for s, a in evaluations(whole.history).items() if s <= 12}
    start = whole.metrics["before"]["validation"]["accuracy"]
    assert max(first_half.values()) > start  # two improvements (the start, then one) before the signal
    job = tmp_path / "job.yaml"
    whole_config.to_yaml(job)

    # SIGINT at step 12, the end of the first epoch: the step ends, is checkpointed, and the
    # command exits 130 naming the resume command.
    out = tmp_path / "run"
    monkeypatch.setattr(train_cmd, "console", SignalAt(12))
    result = runner.invoke(app, ["train", str(job), "--output-dir", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 130, result.output
    assert f"splice train --resume {out}" in result.output
    assert report.checkpoint_steps(out) == [12]
    partial = metrics(out)
    assert partial["status"] == "interrupted" and "after" not in partial
    assert partial["history"] == metrics(tmp_path / "whole")["history"][:12]
    assert TrainConfig.from_yaml(out / "config.yaml", output_dir=str(tmp_path / "whole")) == whole_config
    # The best adapter so far is on disk, and it is the one of the best evaluation so far.
    best = max(first_half, key=lambda s: (first_half[s], -s))
    assert partial["best_step"] == best
    on_validation = TrainConfig.from_dict(whole_config.to_dict(), data=whole_config.validation)
    again = evaluate_adapter(on_validation, out / "adapter")
    assert again["accuracy"] == pytest.approx(first_half[best])
    assert not (out / LOCK).exists()

    monkeypatch.setattr(train_cmd, "console", quiet())
    result = runner.invoke(app, ["train", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert_same_run(tmp_path / "whole", out)


def test_sigterm_stops_after_the_step_with_a_checkpoint(bert_dir, data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(loop.TrainingInterrupted) as stopped:
        run(config(bert_dir, data, out), console=SignalAt(8, signal.SIGTERM))
    assert stopped.value.exit_code == 143 and stopped.value.result.status == "interrupted"
    assert "SIGTERM" in str(stopped.value) and f"splice train --resume {out}" in str(stopped.value)
    assert report.checkpoint_steps(out) == [8] and len(metrics(out)["history"]) == 8
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


@pytest.mark.guards("silent")
def test_resume_refuses_what_it_cannot_continue(bert_dir, data, tmp_path, app):
    done = tmp_path / "done"
    run(config(bert_dir, data, done, max_steps=4), console=quiet())
    with pytest.raises(splice.SpliceError, match="finished.*nothing to resume"):
        loop.resume(done, console=quiet())
    result = runner.invoke(app, ["train", "--resume", str(done)], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "nothing to resume" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["train", "--resume", str(done), "--lr", "0.1"], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "--lr" in result.output
    result = runner.invoke(app, ["train", "--resume", str(done), "--no-group-by-length"], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "--group-by-length" in result.output  # a "no" flag is given too
    with pytest.raises(splice.SpliceError, match="no config.yaml"):
        loop.resume(tmp_path / "nowhere", console=quiet())
    # Stopped before its first checkpoint: only config.yaml (and the best adapter) exist.
    early = tmp_path / "early"
    early.mkdir()
    config(bert_dir, data, early).to_yaml(early / "config.yaml")
    with pytest.raises(splice.SpliceError, match="no checkpoint"):
        loop.resume(early, console=quiet())
    # A config.yaml edited since the checkpoint is not what the checkpoint continues.
    stopped = tmp_path / "stopped"
    with pytest.raises(loop.TrainingInterrupted):
        run(config(bert_dir, data, stopped), console=SignalAt(4))
    TrainConfig.from_dict(config(bert_dir, data, stopped).to_dict(), lr=0.5).to_yaml(stopped / "config.yaml")
    with pytest.raises(splice.SpliceError, match=r"lr: 0\.05 -> 0\.5"):
        loop.resume(stopped, console=quiet())


# -- non-finite numbers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def majority_zero(tmp_path_factory) -> tuple[Path, Path]:
    """Validation with three quarters class 0, where the untrained head scores 0.25: a NaN model
    (argmax of NaN is class 0) scores 0.75 and would be "best"."""
    folder = tmp_path_factory.mktemp("majority-zero")
    return (write_rows(folder / "train.jsonl", balanced(96, 1), 1),
            write_rows(folder / "val.jsonl", [0] * 24 + [1] * 8, 3))


@pytest.mark.guards("silent")
@pytest.mark.parametrize("policy", ["stop", "skip"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lr_1e9_never_selects_or_saves_a_nan_adapter(bert_dir, majority_zero, tmp_path, policy, seed):
    out = tmp_path / "run"
    result = run(config(bert_dir, majority_zero, out, lr=1e9, max_steps=16, seed=seed, on_nonfinite=policy),
                 console=quiet())
    assert result.metrics["before"]["validation"]["accuracy"] == 0.25  # what a NaN model would beat
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out).values())
    assert result.best_step == 0  # nothing after the start was finite
    assert result.status == "diverged" and "non-finite" in result.message and "learning rate" in result.message
    report_ = metrics(out)  # strict JSON
    assert report_["status"] == "diverged" and report_["best_step"] == 0
    losses = [h["loss"] for h in result.history]
    if policy == "stop":  # stopped at the first non-finite step, which is not in the history
        assert all(loss is not None for loss in losses) and len(losses) < 16
    else:  # skipped: no update from a non-finite step, and 10 in a row end the run
        skipped = [h["step"] for h in result.history if h.get("skipped")]
        assert len(skipped) == result.skipped_steps == loop.MAX_SKIPS_IN_A_ROW
        assert skipped == list(range(skipped[0], skipped[0] + 10)) and len(losses) < 16


def test_the_cli_exits_1_on_divergence_naming_the_saved_adapter(bert_dir, majority_zero, tmp_path, app):
    out = tmp_path / "run"
    job = tmp_path / "job.yaml"
    config(bert_dir, majority_zero, out, lr=1e9, max_steps=8).to_yaml(job)
    result = runner.invoke(app, ["train", str(job)], env={"COLUMNS": "300"})
    assert result.exit_code == 1
    assert "non-finite" in result.output and "best finite state (step 0)" in result.output
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out).values())


@pytest.mark.guards("silent")
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_one_non_finite_step_is_skipped_or_stops_the_run(bert_dir, data, tmp_path, monkeypatch, policy):
    """A NaN gradient at step 6 only (an auxiliary loss of NaN x the parameters)."""
    calls = itertools.count(1)

    def poisoned(model):
        if next(calls) == 6:
            return float("nan") * sum(p.sum() for p in splice.trainable_parameters(model).values())
        return None

    monkeypatch.setattr(splice, "auxiliary_loss", poisoned)
    out = tmp_path / "run"
    result = run(config(bert_dir, data, out, on_nonfinite=policy), console=quiet())
    tensors = adapter_tensors(out)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    if policy == "skip":
        assert result.status == "finished" and result.skipped_steps == 1 and len(result.history) == 24
        assert result.history[5]["skipped"].startswith("loss") and result.history[5]["loss"] is None
        assert all(h["loss"] is not None for h in result.history if h["step"] != 6)
        assert result.best_step > 6  # training went on, and improved, after the skipped step
    else:
        assert result.status == "diverged" and len(result.history) == 5 and "step 6" in result.message


@pytest.mark.guards("silent")
def test_best_keeper_refuses_non_finite_metrics_and_states():
    keeper = loop.BestKeeper("accuracy", higher_is_better=True, patience=2)
    assert keeper.offer({"accuracy": 0.25, "loss": 0.7}, 0, lambda: {"w": torch.zeros(2)})
    assert not keeper.offer({"accuracy": 0.75, "loss": float("nan")}, 4, lambda: {"w": torch.zeros(2)})
    assert not keeper.offer({"accuracy": 0.75, "loss": 0.6}, 8, lambda: {"w": torch.tensor([1.0, float("inf")])})
    assert keeper.step == 0 and keeper.value == 0.25 and keeper.should_stop  # two evaluations without a finite gain
    with pytest.raises(splice.SpliceError, match="non-finite"):
        model = torch.nn.Linear(2, 2)
        with torch.no_grad():
            model.weight[0, 0] = float("nan")
        loop.save_adapter(model, Path("unused"), tensors=dict(model.named_parameters()))


# -- run folders -----------------------------------------------------------------------------------


class Gate(Console):
    """A console that holds its run (and so the run's folder) at "before training" until opened."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.reached, self.open = threading.Event(), threading.Event()

    def print(self, *objects, **kwargs) -> None:
        if any("before training" in str(o) for o in objects):
            self.reached.set()
            self.open.wait(timeout=60)
        super().print(*objects, **kwargs)


def test_a_second_run_into_a_folder_in_use_is_refused_at_once(bert_dir, data, tmp_path):
    out = tmp_path / "run"
    gate = Gate()
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(result=run(config(bert_dir, data, out, max_steps=4),
                                                                     console=gate)))
    thread.start()
    try:
        assert gate.reached.wait(timeout=60)
        assert (out / "config.yaml").is_file()  # written at the start, not at the end
        # The second run's model does not exist: it must be refused before it looks.
        second = config(tmp_path / "no-such-model", data, out)
        tick = time.perf_counter()
        with pytest.raises(report.RunFolderBusy, match=f"process {os.getpid()}") as err:
            run(second, console=quiet())
        assert time.perf_counter() - tick < 5 and str(out) in str(err.value)
        with pytest.raises(report.RunFolderBusy):  # --force does not take a live run's folder either
            run(second, console=quiet(), force=True)
    finally:
        gate.open.set()
        thread.join(timeout=120)
    assert first["result"].status == "finished" and (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / LOCK).exists()


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0); os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def other_process_lock(tmp_path):
    """Another process (as a run does) holding the lock of tmp_path/"taken" (PID in the file)."""
    folder = tmp_path / "taken"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield folder, holder
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_a_folder_locked_by_another_process_is_refused_naming_it(bert_dir, data, tmp_path, other_process_lock, app):
    folder, holder = other_process_lock
    with pytest.raises(report.RunFolderBusy, match=f"process {holder.pid}"):
        run(config(tmp_path / "no-such-model", data, folder), console=quiet())
    job = tmp_path / "job.yaml"
    config(bert_dir, data, folder).to_yaml(job)
    result = runner.invoke(app, ["train", str(job), "--force"], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and f"process {holder.pid}" in result.output and "Traceback" not in result.output
    from splice.orchestrate import multiplex

    with pytest.raises(report.RunFolderBusy, match=f"process {holder.pid}"):
        multiplex([config(bert_dir, data, folder)], console=quiet())
    assert sorted(p.name for p in folder.iterdir()) == [LOCK]  # nothing written into it


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_lock_left_by_a_killed_run_is_taken_over(bert_dir, data, tmp_path, other_process_lock):
    folder, holder = other_process_lock
    holder.kill()  # SIGKILL: no clean-up, the lock file stays with a dead PID in it
    holder.wait()
    assert (folder / LOCK).read_text().strip() == str(holder.pid)
    console = Console(record=True, width=300)
    result = run(config(bert_dir, data, folder, max_steps=4), console=console)
    assert result.status == "finished" and (folder / "adapter" / "adapter_config.json").is_file()
    assert f"from process {holder.pid}, which is gone" in console.export_text()
    assert not (folder / LOCK).exists()


def test_tenants_spelling_one_folder_differently_are_refused(bert_dir, data, tmp_path, monkeypatch, app):
    from splice.orchestrate import multiplex

    monkeypatch.chdir(tmp_path)
    for other in ("runs/x/", "./runs/x", str(tmp_path / "runs" / "x"), "runs/y/../x"):
        configs = [config(bert_dir, data, Path("."), output_dir="runs/x"), config(bert_dir, data, Path("."),
                                                                                  output_dir=other)]
        with pytest.raises(splice.SpliceError, match="same folder"):
            multiplex(configs, console=quiet())
    assert not (tmp_path / "runs").exists()  # refused before any work
    jobs = []
    for name, out in (("a", "runs/x"), ("b", "runs/x/")):
        config(bert_dir, data, Path(out)).to_yaml(tmp_path / f"{name}.yaml")
        jobs.append(str(tmp_path / f"{name}.yaml"))
    result = runner.invoke(app, ["train", "--tenants", *jobs], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "own output_dir" in result.output


def test_a_diverging_tenant_stops_alone_with_its_best_finite_adapter(bert_dir, data, majority_zero, tmp_path):
    from splice.orchestrate import multiplex

    wild = config(bert_dir, majority_zero, tmp_path / "wild", lr=1e9, max_steps=12)
    calm = config(bert_dir, data, tmp_path / "calm", max_steps=12)
    results = multiplex([wild, calm], console=quiet())
    for name in ("wild", "calm"):
        assert all(torch.isfinite(t).all() for t in adapter_tensors(tmp_path / name).values())
    assert results["wild"].best_step == 0 and results["wild"].status == "diverged"
    assert results["calm"].status == "finished" and len(results["calm"].history) == 12
    for name in ("wild", "calm"):
        assert metrics(tmp_path / name)["status"] == results[name].status
        assert not (tmp_path / name / LOCK).exists()
    alone = run(config(bert_dir, data, tmp_path / "calm-alone", max_steps=12), console=quiet())
    assert [h["loss"] for h in results["calm"].history] == pytest.approx([h["loss"] for h in alone.history], rel=1e-5)


# -- real processes, real signals (slow: each process imports torch and transformers) -----------------


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_to_a_training_process_then_resume(bert_dir, data, tmp_path):
    out = tmp_path / "run"
    job = tmp_path / "job.yaml"
    long = config(bert_dir, data, out, max_steps=200, eval_every=50, checkpoint_every=5)
    long.to_yaml(job)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    process = subprocess.Popen([sys.executable, "-m", "splice.cli.main", "train", str(job)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not report.checkpoint_steps(out) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert report.checkpoint_steps(out), "no checkpoint appeared"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stdout[-2000:] + stderr[-3000:]
    assert f"splice train --resume {out}" in stderr
    stopped_at = metrics(out)["history"][-1]["step"]
    assert 0 < stopped_at < 200 and report.checkpoint_steps(out) == [stopped_at]
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / LOCK).exists()
    loop.resume(out, console=quiet())
    run(TrainConfig.from_dict(long.to_dict(), output_dir=str(tmp_path / "whole")), console=quiet())
    assert_same_run(tmp_path / "whole", out)


@pytest.mark.slow
@pytest.mark.guards("silent")
@pytest.mark.parametrize("seed", [1, 3, 5])
def test_lr_1e9_on_minilm_saves_no_nan_adapter(tmp_path, seed):
    """The issue's case: the main job (LoRA on the real MiniLM for Rotten Tomatoes) with lr=1e9.
    On 64 validation reviews a NaN model (all class 0) scores 0.5625; these seeds start below."""
    out = tmp_path / "run"
    result = run(TrainConfig(lr=1e9, max_steps=12, eval_every=4, max_eval_examples=64, seed=seed,
                             checkpoint_every=None, output_dir=str(out)), console=quiet())
    assert result.metrics["before"]["validation"]["accuracy"] < 0.5625
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out).values())
    assert all(math.isfinite(v) for v in result.metrics["after"]["validation"].values())
    assert result.status == "diverged"


DDP_WORKER = """
import sys
import torch
from rich.console import Console
from splice.train import TrainConfig, checkpoint, loop, run

torch.set_num_threads(1)
config_file, mode = sys.argv[1], sys.argv[2]
if mode == "resume":
    loop.resume(TrainConfig.from_yaml(config_file).output_dir, console=Console(quiet=True))
    sys.exit()
if mode == "crash":  # every process dies right after the step-16 checkpoint
    save_checkpoint = checkpoint.save_checkpoint

    def crash(accelerator, model, run_dir, step, show):
        saved = save_checkpoint(accelerator, model, run_dir, step, show)
        if step == 16:
            sys.exit(3)
        return saved

    checkpoint.save_checkpoint = crash
run(TrainConfig.from_yaml(config_file), console=Console(quiet=True))
"""


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_resume_under_accelerate_launch_with_two_processes(dropout_bert_dir, data, tmp_path):
    """Two CPU processes (DDP over gloo): the checkpoint holds each process's random states."""
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}

    def launch(out: Path, mode: str) -> int:
        job = tmp_path / f"{out.name}.yaml"
        config(dropout_bert_dir, data, out, batch_size=4, max_steps=32, eval_every=8, checkpoint_every=8).to_yaml(job)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0", str(worker), str(job), mode]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == (1 if mode == "crash" else 0), done.stderr[-4000:]
        return done.returncode

    launch(tmp_path / "whole", "whole")
    launch(tmp_path / "run", "crash")
    checkpoint = tmp_path / "run" / "checkpoints" / "step-16"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    launch(tmp_path / "run", "resume")
    assert_same_run(tmp_path / "whole", tmp_path / "run")
