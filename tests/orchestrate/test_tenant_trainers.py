"""A multiplexed tenant is a `splice.train.Trainer` over its view of the shared model: callbacks
see its steps, evaluations and saves, its history is the result's, and it trains its own
parameters only; a view evaluates as the lone model does, whoever else trains which heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mux_helpers import text_rows
from rich.console import Console

import splice
from splice.orchestrate import Multiplexer, multiplex
from splice.train import Callback, TrainConfig, Trainer, run


class Recorder(Callback):
    def __init__(self) -> None:
        self.entries, self.evaluations, self.saves = [], [], []

    def on_step_end(self, trainer, entry):
        self.entries.append(entry)

    def on_evaluate(self, trainer, metrics):
        self.evaluations.append((trainer.step_count, sorted(metrics)))

    def on_save(self, trainer, path):
        self.saves.append(path.name)


def test_a_tenant_is_a_trainer_that_callbacks_follow(bert_dir, tmp_path):
    common = dict(model=str(bert_dir), batch_size=8, lr=2e-2)
    a = TrainConfig(**common, data=str(text_rows(tmp_path / "a.jsonl", 48, 2, 6, 1)),
                    validation=str(text_rows(tmp_path / "a-val.jsonl", 16, 2, 6, 11)), max_steps=5, eval_every=2,
                    output_dir=str(tmp_path / "a"))
    b = TrainConfig(**common, data=str(text_rows(tmp_path / "b.jsonl", 40, 3, 3, 2)),
                    validation=str(text_rows(tmp_path / "b-val.jsonl", 16, 3, 3, 12)), max_steps=3, eval_every=2,
                    grad_accum=2, output_dir=str(tmp_path / "b"))
    recorder = Recorder()
    mux = Multiplexer(console=Console(quiet=True))
    mux.add(a)
    mux.add(b, callbacks=[recorder])
    trainer = mux.tenants["b"].trainer
    assert isinstance(trainer, Trainer) and trainer.plain_model is mux.tenants["b"].model
    assert recorder.evaluations == [(0, ["validation"])]  # the start, evaluated when it joined
    own = set(trainer.trained)
    assert own and all(".splice.b." in k or k.startswith("classifier.") for k in own)  # not a's adapter
    assert not any(".splice.a." in k for k in own)
    results = mux.run()

    assert [e["step"] for e in recorder.entries] == [1, 2, 3]
    assert results["b"].history == recorder.entries == trainer.history
    assert recorder.evaluations[1:] == [(2, ["validation"]), (3, ["validation"]), (3, ["validation"])]
    # adapter/ at each improvement and at the end; adapter-last/ when the best step is not the last
    assert recorder.saves[-1] == "adapter" and set(recorder.saves) <= {"adapter", "adapter-last"}
    assert ("adapter-last" in recorder.saves) == (results["b"].best_step != 3)
    assert results["b"].timings["left_at_step"] == 5  # 5 batches an epoch: steps after batches 2, 4 and 5
    assert len(results["a"].history) == 5


def test_a_tenant_joining_after_another_trains_a_head_evaluates_as_alone(llama_dir, tmp_path):
    """b trains its own lm_head, so the shared model routes that module per tenant; a, joining
    after, has no lm_head of its own: its evaluations go through the original, as alone."""
    rows = splice.assets.arithmetic_problems(72, seed=3)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(model=str(llama_dir), task="causal_lm", data=str(data), max_length=48, batch_size=8, lr=1e-2,
                  max_eval_examples=8, eval_every=2)
    b = TrainConfig(**common, max_steps=4, seed=2, output_dir=str(tmp_path / "b"),
                    adapter={"method": "lora", "r": 2, "alpha": 2, "targets": "all-linear", "train_also": ["lm_head"]})
    a = TrainConfig(**common, max_steps=4, seed=1, output_dir=str(tmp_path / "a"),
                    adapter={"method": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]})
    alone = run(TrainConfig.from_dict(a.to_dict(), output_dir=str(tmp_path / "alone")), console=Console(quiet=True))
    results = multiplex([b, a], console=Console(quiet=True))
    evaluations = [(e["step"], e["eval"]) for e in results["a"].history if "eval" in e]
    expected = [(e["step"], e["eval"]) for e in alone.history if "eval" in e]
    assert [s for s, _ in evaluations] == [s for s, _ in expected] == [2, 4]
    for (_, got), (_, want) in zip(evaluations, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    assert results["a"].metrics["after"]["validation"] == pytest.approx(alone.metrics["after"]["validation"],
                                                                        rel=1e-5)
    assert Path(results["a"].paths["adapter"]).is_dir()


def test_a_tenant_continues_a_saved_adapter_as_a_lone_run_does(bert_dir, tmp_path):
    """`init_adapter` is set up by the code a lone run uses: the same start, the same steps."""
    quiet = Console(quiet=True)
    first = TrainConfig(model=str(bert_dir), data=str(text_rows(tmp_path / "a.jsonl", 48, 2, 6, 1)),
                        batch_size=8, max_steps=3, lr=2e-2, output_dir=str(tmp_path / "first"))
    run(first, console=quiet)
    then = TrainConfig.from_dict(first.to_dict(), data=str(text_rows(tmp_path / "b.jsonl", 40, 3, 3, 2)), seed=5,
                                 init_adapter=str(tmp_path / "first" / "adapter"), output_dir=str(tmp_path / "alone"))
    alone = run(then, console=quiet)
    other = TrainConfig.from_dict(first.to_dict(), seed=3, output_dir=str(tmp_path / "other"))
    results = multiplex([other, TrainConfig.from_dict(then.to_dict(), output_dir=str(tmp_path / "then"))],
                        console=quiet)
    assert [h["loss"] for h in results["then"].history] == pytest.approx([h["loss"] for h in alone.history],
                                                                         rel=1e-5)
    assert results["then"].metrics["after"]["validation"] == pytest.approx(alone.metrics["after"]["validation"],
                                                                           rel=1e-5)
