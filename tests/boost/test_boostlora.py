"""`splice.boost.boostlora` with the trainer on a tiny BERT: rounds train on the rows still wrong,
are kept only on a validation gain, the boosted model equals its saved LoRA on the original base,
and the report says what happened."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict

import pytest
import torch
from rich.console import Console

import splice
from splice.boost import boostlora, mined_rows
from splice.core.errors import OutputExistsError, SpliceError
from splice.train import Trainer, tasks
from splice.train.data import load_splits

QUIET = Console(quiet=True)


def test_mined_rows_are_the_wrong_ones_with_the_asked_share_of_right_ones():
    rows = [{"i": i} for i in range(20)]
    correct = torch.tensor([i % 4 != 0 for i in range(20)])  # 5 wrong, 15 right
    assert mined_rows(rows, correct, "errors", 0.0, seed=0) == [rows[i] for i in (0, 4, 8, 12, 16)]
    mixed = mined_rows(rows, correct, "errors", 0.5, seed=0)  # as many right as wrong
    assert len(mixed) == 10 and {r["i"] for r in mixed} >= {0, 4, 8, 12, 16}
    assert mixed == mined_rows(rows, correct, "errors", 0.5, seed=0) != mined_rows(rows, correct, "errors", 0.5, 1)
    assert mined_rows(rows, correct, "all", 0.5, seed=0) == rows


def test_a_round_is_kept_only_on_a_validation_gain_and_an_undone_one_leaves_the_base_bit_for_bit(sentiment_config):
    """The tiny random BERT learns nothing in a TinyLoRA round (its singular directions carry no
    meaning, unlike a pretrained model's: tests/boost/test_boostlora_minilm.py), so every round
    is undone: the model must come back exactly the pretrained one."""
    result = boostlora(sentiment_config, rounds=3, r=2, u=4, patience=2, console=QUIET)
    assert [r.round for r in result.rounds] == [0, 1] and result.stop == "no_gain"
    for record in result.rounds:
        assert record.kept == (record.validation_after > record.validation_before)
        assert record.offset == 0  # an undone round gives its slice back
    first, second = result.rounds
    assert first.trained_rows == 96 and first.steps == 4  # round 0 on every row; 12 steps over 3 rounds
    assert second.trained_rows == 96  # no round kept yet: still F_0's fit, on every row
    assert first.adapter_parameters == 4 * 4  # u x (query, value of 2 layers)
    assert result.kept == 0 and result.adapter is None
    fresh, _ = tasks.load_model(sentiment_config, load_splits(sentiment_config).label_names)
    boosted = dict(result.model.named_parameters())
    assert not splice.adapters(result.model)
    assert all(torch.equal(p, boosted[n]) for n, p in fresh.named_parameters() if not n.startswith("classifier"))
    report = sentiment_config.output_dir + "/report/"
    saved = json.loads(open(report + "boost.json").read())
    assert saved["stop_reason"] == "validation stopped improving" and len(saved["rounds"]) == 2
    assert "| round |" in open(report + "boost.md").read()
    with pytest.raises(OutputExistsError, match="already exists"):
        boostlora(sentiment_config, rounds=1, console=QUIET)


def test_a_trainer_gives_its_model_data_and_places(sentiment_config):
    trainer = Trainer.from_config(sentiment_config, console=QUIET)
    result = boostlora(trainer, rounds=2, r=2, u=2, steps_per_round=3, console=QUIET)
    assert result.rounds[0].adapter_parameters == 2 * 4 and result.rounds[0].steps == 3
    assert not splice.adapters(trainer.plain_model)  # its LoRA was taken off, the rounds merged


def test_bad_settings_are_refused_before_any_work(sentiment_config, tmp_path):
    with pytest.raises(SpliceError, match=r"rounds must be >= 1, got 0; mix_correct must be in \[0, 1\), got 1.0"):
        boostlora(sentiment_config, rounds=0, mix_correct=1.0, console=QUIET)
    with pytest.raises(SpliceError, match="key 'mine' has value 'wrong' .*expected one of 'errors', 'all'"):
        boostlora(sentiment_config, mine="wrong", console=QUIET)
    assert not (tmp_path / "boost").exists()


def test_a_stopped_run_resumes_from_its_progress_and_ends_as_the_run_that_never_stopped(sentiment_config,
                                                                                        monkeypatch, tmp_path):
    whole = boostlora(dataclasses.replace(sentiment_config, output_dir=str(tmp_path / "whole")), rounds=3,
                      patience=3, steps_per_round=2, console=QUIET)
    stopped = dataclasses.replace(sentiment_config, output_dir=str(tmp_path / "stopped"))
    real_fit = Trainer.fit

    def stop_in_round_2(self):
        if self.config.output_dir.endswith("round-2"):
            monkeypatch.setattr(Trainer, "interrupt_requested", property(lambda trainer: trainer.state.step >= 1))
        return real_fit(self)

    monkeypatch.setattr(Trainer, "fit", stop_in_round_2)
    with pytest.raises(SpliceError, match=r"stopped in round 2 .*--resume"):
        boostlora(stopped, rounds=3, patience=3, steps_per_round=2, console=QUIET)
    monkeypatch.undo()
    with pytest.raises(SpliceError, match=r"another boost \(patience: 3 -> 2\)"):
        boostlora(stopped, rounds=3, patience=2, steps_per_round=2, console=QUIET, resume=True)
    resumed = boostlora(stopped, rounds=3, patience=3, steps_per_round=2, console=QUIET, resume=True)
    plain = [{**asdict(r), "seconds": 0} for r in resumed.rounds]
    assert plain == [{**asdict(r), "seconds": 0} for r in whole.rounds] and len(plain) == 3
    assert resumed.validation == whole.validation and resumed.stop == whole.stop
    assert not (tmp_path / "stopped" / "progress").exists()  # the run ended
    with pytest.raises(SpliceError, match="no progress/progress.json"):
        boostlora(stopped, rounds=3, patience=3, steps_per_round=2, console=QUIET, resume=True)
