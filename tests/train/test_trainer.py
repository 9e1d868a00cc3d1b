"""`Trainer`: `run` is a thin wrapper over it, a hand-driven trainer gives the same run, callbacks
see every step, evaluation and save, and a model with other adapters trains only the named one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from rich.console import Console
from safetensors.torch import load_file

import splice
from splice.train import Callback, TrainConfig, Trainer, run, tasks
from splice.train.data import load_splits


def quiet() -> Console:
    return Console(quiet=True)


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "adapter" / "adapter_model.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_run_equals_a_hand_driven_trainer(tiny_classification, tmp_path):
    by_run = run(tiny_classification, console=quiet())

    config = tiny_classification.from_dict(tiny_classification.to_dict(), output_dir=str(tmp_path / "by-hand"))
    set_seed(config.seed)  # what `Trainer.from_config` does, by hand
    splits = load_splits(config)
    model, tokenizer = tasks.load_model(config, splits.label_names)
    splice.attach(model, tasks.adapter_config(config, model))  # the task adds its head to train_also
    trainer = Trainer(model, tokenizer, config, splits=splits, console=quiet())
    entries = []
    while not trainer.done:
        entries.append(trainer.step())
    by_hand = trainer.finish()

    assert_same_tensors(adapter_tensors(by_run.paths["run_dir"]), adapter_tensors(tmp_path / "by-hand"))
    assert by_hand.metrics == by_run.metrics
    assert by_hand.history == by_run.history == entries
    assert by_hand.best_step == by_run.best_step and by_hand.status == by_run.status == "finished"
    reports = [json.loads((Path(folder) / "metrics.json").read_text()) for folder in
               (tmp_path / "by-hand", by_run.paths["run_dir"])]
    for key in ("before", "after", "best_step", "history", "status", "parameters"):
        assert reports[0][key] == reports[1][key], key



def test_the_public_step_pieces_driven_by_hand_give_the_same_run(tiny_classification, tmp_path):
    """What an orchestrator does with `next_batch`, `backward`, `record_backward` and
    `optimizer_step` (its own forward in between) is `step`: the same run, to the bit. grad_accum 5 over
    12 batches an epoch: steps of 5, 5 and 2 batches."""
    config = tiny_classification.from_dict(tiny_classification.to_dict(), grad_accum=5)
    by_run = run(config, console=quiet())
    trainer = Trainer.from_config(config.from_dict(config.to_dict(), output_dir=str(tmp_path / "by-hand")),
                                  console=quiet())
    trainer.begin()  # evaluates the start
    trainer.model.train()
    completed = []
    while not trainer.done:
        batch = trainer.next_batch()
        with trainer.accelerator.accumulate(trainer.model):
            loss = trainer.model(**batch).loss
            trainer.backward(loss)  # scaled for the accumulation under way (the last one has 2 batches)
        completed.append(trainer.record_backward(loss, len(batch["labels"])))
        if completed[-1]:
            trainer.optimizer_step()
    by_hand = trainer.finish()
    assert completed[:12] == [False] * 4 + [True] + [False] * 4 + [True, False, True]
    assert_same_tensors(adapter_tensors(by_run.paths["run_dir"]), adapter_tensors(tmp_path / "by-hand"))
    assert by_hand.history == by_run.history and by_hand.metrics == by_run.metrics

class Recorder(Callback):
    def __init__(self) -> None:
        self.steps, self.evaluations, self.saves = [], [], []

    def on_step_end(self, trainer, entry):
        self.steps.append(entry["step"])
        assert trainer.step_count == entry["step"]

    def on_evaluate(self, trainer, metrics):
        self.evaluations.append((trainer.step_count, sorted(metrics)))

    def on_save(self, trainer, path):
        assert trainer.main
        self.saves.append(path.name)


def test_callbacks_see_every_step_evaluation_and_save(tiny_classification):
    recorder = Recorder()
    result = Trainer.from_config(tiny_classification, callbacks=[recorder], console=quiet()).fit()
    assert recorder.steps == list(range(1, 13))
    # before (both splits), every 4 steps (validation), after (both splits, at the last step)
    assert recorder.evaluations == [(0, ["test", "validation"]), (4, ["validation"]), (8, ["validation"]),
                                    (12, ["validation"]), (12, ["test", "validation"])] or \
        recorder.evaluations == [(0, ["validation"]), (4, ["validation"]), (8, ["validation"]),
                                 (12, ["validation"]), (12, ["validation"])]
    # adapter/ at every improvement and the end; adapter-last/ (before the end) when the best is not the last
    expected = ["adapter-last"] * (result.best_step != 12) + ["adapter"]
    assert recorder.saves[-len(expected):] == expected and set(recorder.saves) <= {"adapter", "adapter-last"}
    assert result.status == "finished"


def test_a_trainer_trains_only_its_adapter_and_its_own_head(tiny_classification, tmp_path):
    """Two adapters on one backbone, each with its own classifier: training the second leaves the
    first (and its head) as its trainer saved it."""
    # evaluated on its training rows, which the tiny random model fits in 36 steps (held-out rows: not reliably)
    config = dataclasses.replace(tiny_classification, validation=tiny_classification.data, max_steps=36, lr=3e-2)
    splits = load_splits(config)
    set_seed(0)  # the adapters and heads are drawn here, outside the trainers' seeding
    model, tokenizer = tasks.load_model(config, splits.label_names)
    for name in ("first", "second"):
        splice.attach(model, splice.LoRA(r=4, targets=["query", "value"], train_also=["classifier"]), name)
    first = Trainer(model, tokenizer, config.from_dict(config.to_dict(), output_dir=str(tmp_path / "first")),
                    adapter_name="first", splits=splits, console=quiet())
    assert splice.active_adapters(model) == ["first"]
    assert first.fit().best_step > 0
    splice.activate(model, "first")
    first_state = {k: v.detach().clone() for k, v in splice.trainable_parameters(model).items()}
    second = Trainer(model, tokenizer, config.from_dict(config.to_dict(), output_dir=str(tmp_path / "second")),
                     adapter_name="second", splits=splits, console=quiet())
    second_start = second.snapshot()
    assert second.fit().best_step > 0
    assert any(not torch.equal(second_start[k], v) for k, v in second.snapshot().items())  # it trained
    splice.activate(model, "first")
    assert_same_tensors(first_state, {k: v.detach() for k, v in splice.trainable_parameters(model).items()})
    saved = {name: adapter_tensors(tmp_path / name) for name in ("first", "second")}
    heads = [t["base_model.model.classifier.weight"] for t in saved.values()]
    assert not torch.equal(*heads)  # one head per task


def test_a_frozen_or_missing_adapter_is_refused(tiny_classification):
    splits = load_splits(tiny_classification)
    model, tokenizer = tasks.load_model(tiny_classification, splits.label_names)
    with pytest.raises(splice.SpliceError, match="no adapter named 'x'"):
        Trainer(model, tokenizer, tiny_classification, adapter_name="x", splits=splits, console=quiet())
    splice.attach(model, splice.LoRA(r=2, targets=["query"]), "x", trainable=False)
    with pytest.raises(splice.SpliceError, match="frozen"):
        Trainer(model, tokenizer, tiny_classification, adapter_name="x", splits=splits, console=quiet())


def test_init_adapter_continues_a_saved_adapter_on_a_second_task(tiny_classification, tmp_path):
    """Task 1, then task 2 from task 1's adapter (config only, as from YAML): task 2 starts from
    exactly what task 1 saved, trains it, and leaves task 1's folder as it was."""
    task1 = tiny_classification.from_dict(tiny_classification.to_dict(), output_dir=str(tmp_path / "task1"),
                                          max_steps=24, lr=5e-2, head_lr=0.2)
    assert run(task1, console=quiet()).best_step > 0  # its head learned
    saved1 = adapter_tensors(tmp_path / "task1")
    flipped = tmp_path / "flipped.jsonl"  # the second task: the same words, the labels swapped
    flipped.write_text("".join(json.dumps({**row, "label": 1 - row["label"]}) + "\n" for row in
                               map(json.loads, Path(task1.data).read_text().splitlines())))
    task2 = task1.from_dict(task1.to_dict(), data=str(flipped), validation=None, output_dir=str(tmp_path / "task2"),
                            init_adapter=str(tmp_path / "task1" / "adapter"))
    trainer = Trainer.from_config(task2, console=quiet())
    start = {k: v for k, v in trainer.snapshot().items()}
    assert splice.adapters(trainer.plain_model)["default"].method == "lora"
    splice.save(trainer.plain_model, tmp_path / "start")
    loaded = load_file(tmp_path / "start" / "adapter_model.safetensors")
    head = "base_model.model.classifier.weight"
    assert_same_tensors({k: v for k, v in saved1.items() if "lora_" in k},  # the adapter exactly ...
                        {k: v for k, v in loaded.items() if "lora_" in k})
    set_seed(task2.seed)
    fresh, _ = tasks.load_model(task2, ("0", "1"))
    assert torch.equal(loaded[head], fresh.classifier.weight)  # ... with its own, fresh head
    assert not torch.equal(loaded[head], saved1[head])
    result = trainer.fit()
    assert result.status == "finished"
    assert any(not torch.equal(start[k], v) for k, v in trainer.snapshot().items())
    assert_same_tensors(saved1, adapter_tensors(tmp_path / "task1"))


def test_init_adapter_gives_a_head_the_folder_lacks_a_fresh_copy(tiny_classification, tmp_path):
    """An adapter saved without a head (LoRA only) continues on a task that trains the classifier."""
    splits = load_splits(tiny_classification)
    model, _ = tasks.load_model(tiny_classification, splits.label_names)
    splice.attach(model, splice.LoRA(r=4, targets=["query", "value"]))
    splice.save(model, tmp_path / "lora-only")
    config = tiny_classification.from_dict(tiny_classification.to_dict(), init_adapter=str(tmp_path / "lora-only"))
    trainer = Trainer.from_config(config, console=quiet())
    assert any(k.startswith("classifier.") for k in splice.trainable_parameters(trainer.plain_model))
    trainer.fit()
    assert "base_model.model.classifier.weight" in adapter_tensors(config.output_dir)


def test_init_adapter_must_be_a_folder(tiny_classification, tmp_path):
    config = tiny_classification.from_dict(tiny_classification.to_dict(), init_adapter=str(tmp_path / "nowhere"))
    with pytest.raises(splice.SpliceError, match="not a folder"):
        Trainer.from_config(config, console=quiet())


def test_two_tasks_in_sequence_from_yaml(tiny_classification, tmp_path):
    """Task 2's YAML names task 1's adapter folder; `run` does the rest."""
    task1 = tiny_classification.from_dict(tiny_classification.to_dict(), output_dir=str(tmp_path / "t1"),
                                          max_steps=24, lr=5e-2, head_lr=0.2)
    task1.to_yaml(tmp_path / "t1.yaml")
    (tmp_path / "t2.yaml").write_text(task1.to_yaml().replace(f"output_dir: {tmp_path / 't1'}", "output_dir: t2-run")
                                      + f"init_adapter: {tmp_path / 't1' / 'adapter'}\n")
    first = run(TrainConfig.from_yaml(tmp_path / "t1.yaml"), console=quiet())
    second_config = TrainConfig.from_yaml(tmp_path / "t2.yaml", output_dir=str(tmp_path / "t2"))
    assert second_config.init_adapter == str(tmp_path / "t1" / "adapter")
    second = run(second_config, console=quiet())
    assert first.status == second.status == "finished" and second.best_step > 0
    assert TrainConfig.from_yaml(tmp_path / "t2" / "config.yaml").init_adapter == second_config.init_adapter
    saved = [adapter_tensors(tmp_path / name) for name in ("t1", "t2")]
    assert saved[0].keys() == saved[1].keys()  # the same LoRA and a head of its own, trained further
    assert any(not torch.equal(saved[0][k], saved[1][k]) for k in saved[0] if "lora_B" in k)


def test_the_continual_example_reads():
    config = TrainConfig.from_yaml(Path(__file__).parents[2] / "examples" / "continual_rt_then_bbc.yaml")
    assert config.init_adapter == "runs/continual-rt/adapter" and config.data == "bbc_news"


def test_a_run_that_never_beats_step_0_says_so_and_keeps_the_last_state(tiny_classification, tmp_path):
    config = tiny_classification.__class__(**{**tiny_classification.__dict__, "lr": 1e-12, "max_steps": 4,
                                             "eval_every": 2, "output_dir": str(tmp_path / "flat")})
    console = Console(record=True, width=200)
    result = run(config, console=console)
    assert result.status == "finished" and result.best_step == 0
    assert "no evaluation beat the untrained adapter" in result.message
    assert "warning: no evaluation beat the untrained adapter" in console.export_text()
    assert json.loads((tmp_path / "flat" / "metrics.json").read_text())["message"] == result.message
    best = load_file(tmp_path / "flat" / "adapter" / "adapter_model.safetensors")
    last = load_file(result.paths["last_adapter"] / "adapter_model.safetensors")
    b_keys = [k for k in best if "lora_B" in k]
    assert b_keys and all(not best[k].any() for k in b_keys)  # the untrained adapter: B = 0
    assert any(last[k].any() for k in b_keys)  # the state the 4 steps reached


def test_a_run_that_improves_has_no_warning_and_keeps_its_last_state_beside_the_best(tiny_classification,
                                                                                      tmp_path):
    config = tiny_classification.__class__(**{**tiny_classification.__dict__, "lr": 0.1, "max_steps": 48,
                                             "output_dir": str(tmp_path / "learns")})
    result = run(config, console=Console(quiet=True))
    assert 0 < result.best_step < 48 and result.message == ""  # it learns, and peaks before the end
    best = load_file(result.paths["adapter"] / "adapter_model.safetensors")
    last = load_file(result.paths["last_adapter"] / "adapter_model.safetensors")
    assert best.keys() == last.keys() and any(not torch.equal(best[k], last[k]) for k in best)


def test_accumulation_size_is_never_below_one_for_a_driver_past_the_loaders_length(tiny_classification, tmp_path):
    """A driver that draws its own batches (multitask's mixture) counts them past the trainer's
    loader: the backward scale stays 1 / (batches in the accumulation), never 0 or negative
    (which would divide by zero or turn descent into ascent)."""
    for accum in (1, 3):
        config = tiny_classification.from_dict(tiny_classification.to_dict(), grad_accum=accum,
                                                output_dir=str(tmp_path / f"accum-{accum}"))
        trainer = Trainer.from_config(config, console=quiet())
        batches = len(trainer.train_loader)
        sizes = []
        for done in (0, batches - 1, batches, batches + 1, 3 * batches + 2):
            trainer.state.batches = done
            sizes.append(trainer.accumulation_size())
        assert all(1 <= size <= accum for size in sizes), (accum, sizes)
        if accum == 1:
            assert sizes == [1] * 5
