"""Sequence files (every bad value refused with file, key and value), task data (re-labelled,
as words), the scores of an accuracy matrix, and the CLI."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from splice.assets import DatasetSplits
from splice.cli.main import app
from splice.continual import SequenceConfig, TaskSpec
from splice.continual.data import as_words, relabelled
from splice.continual.metrics import scores
from splice.core.errors import ConfigError, SpliceError

TASKS = [{"name": "a", "data": "rotten_tomatoes"}, {"name": "b", "data": "bbc_news"}]


def write(tmp_path, **fields):
    path = tmp_path / "sequence.yaml"
    path.write_text(yaml.safe_dump({"tasks": TASKS, **fields}))
    return path


@pytest.mark.parametrize(("fields", "message"), [
    ({"strategi": "olora"}, "unknown key 'strategi'; did you mean 'strategy'"),
    ({"strategy": "olra"}, "unknown strategy 'olra'; did you mean 'olora'"),
    ({"strategy": "olora", "options": {"penalti": 1}}, "no option 'penalti'; did you mean 'penalty'"),
    ({"tasks": [TASKS[0]]}, "at least two tasks"),
    ({"tasks": [TASKS[0], TASKS[0]]}, "task names must differ"),
    ({"tasks": [TASKS[0], {"name": "b"}]}, "tasks[1] has no 'data'"),
    ({"tasks": [TASKS[0], {**TASKS[1], "max_step": 3}]}, "tasks[1]: unknown key 'max_step'; did you mean 'max_steps'"),
    ({"tasks": [TASKS[0], {**TASKS[1], "max_steps": "ten"}]}, "tasks[1].max_steps must be"),
    ({"train": {"model": "smollm2"}}, "train.model is set by the sequence itself"),
    ({"train": {"batch_sise": 4}}, "did you mean 'batch_size'"),
    ({"train": {"batch_size": 0}}, "batch_size must be a positive number"),
    ({"settings": ["task_agnostc"]}, "settings must be a list of one of"),
    ({"tasks": [TASKS[0], {**TASKS[1], "as_words": True}]}, "as_words makes rows for a causal LM"),
])
def test_bad_sequence_files_are_refused_naming_file_key_and_value(tmp_path, fields, message):
    path = write(tmp_path, **fields)
    with pytest.raises(ConfigError) as err:
        config = SequenceConfig.from_yaml(path)
        from splice.continual.strategies import make_strategy

        make_strategy(config.strategy, config.train_config(config.tasks[0]).adapter_config(), config.options)
    assert message in str(err.value)


def test_a_sequence_gives_each_task_its_own_training_config(tmp_path):
    config = SequenceConfig.from_yaml(write(tmp_path, train={"lr": 1e-3, "max_steps": 50},
                                            tasks=[TASKS[0], {**TASKS[1], "max_steps": 7, "lr": 5e-4}]),
                                      strategy="separate", seed=3)
    first, second = (config.train_config(t) for t in config.tasks)
    assert (first.max_steps, first.lr, second.max_steps, second.lr) == (50, 1e-3, 7, 5e-4)
    assert first.seed == second.seed == 3 and second.data == "bbc_news"
    assert config.output_dir == "runs/continual-minilm-separate"
    assert second.output_dir.endswith("runs/continual-minilm-separate/tasks/b")


SPLITS = DatasetSplits([{"text": "x y", "label": 0}, {"text": "z", "label": 2}], [{"text": "w", "label": 1}], [],
                       task="classification", label_names=("business", "sport", "tech"))


def test_relabelling_maps_names_and_refuses_a_partial_map():
    spec = TaskSpec(name="bt", data="bbc_news", labels={"business": "bt", "tech": "bt", "sport": "other"})
    out = relabelled(SPLITS, spec)
    assert out.label_names == ("bt", "other")
    assert [r["label"] for r in out.train] == [0, 0] and out.validation[0]["label"] == 1
    with pytest.raises(ConfigError, match="missing \\['sport'\\]"):
        relabelled(SPLITS, TaskSpec(name="bt", data="bbc_news", labels={"business": "a", "tech": "b"}))


def test_as_words_writes_prompts_and_label_words_cut_to_max_words():
    out = as_words(SPLITS, "Text: {text}\nTopic:", max_words=1)
    assert out.task == "causal_lm"
    assert out.train == [{"prompt": "Text: x\nTopic:", "completion": " business"},
                         {"prompt": "Text: z\nTopic:", "completion": " tech"}]


def test_scores_follow_their_definitions():
    matrix = [[0.9, 0.5, None], [0.7, 0.8, 0.6], [0.6, 0.75, 0.85]]
    s = scores(matrix, before=[0.5, 0.4, 0.3])
    assert s.average_accuracy == pytest.approx((0.6 + 0.75 + 0.85) / 3)
    assert s.backward_transfer == pytest.approx(((0.6 - 0.9) + (0.75 - 0.8)) / 2)
    assert s.forward_transfer == pytest.approx(((0.5 - 0.4) + (0.6 - 0.3)) / 2)
    assert s.forgetting == pytest.approx([0.9 - 0.6, 0.8 - 0.75])
    with pytest.raises(SpliceError, match="lacks a seen task"):
        scores([[None, None], [0.5, 0.5]])


def test_cli_runs_a_sequence_and_refuses_to_overwrite_without_force(tiny_bert_folder, task_files, tmp_path):
    path = tmp_path / "seq.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(tiny_bert_folder), "strategy": "separate", "settings": ["task_incremental"], "angle_samples": 0,
        "adapter": {"method": "lora", "r": 2, "alpha": 4},
        "train": {"batch_size": 16, "max_steps": 4, "max_length": 16, "eval_every": None, "checkpoint_every": None},
        "tasks": [{"name": n, "data": str(task_files[n])} for n in ("sentiment", "topic")],
    }))
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["continual", str(path), "--output-dir", str(out), "--quiet"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "average final accuracy" not in result.output and "wrote" in result.output  # --quiet: the closing line only
    assert (out / "report" / "results.md").is_file()
    again = runner.invoke(app, ["continual", str(path), "--output-dir", str(out)], env={"COLUMNS": "200"})
    assert again.exit_code == 1 and "--force" in again.output or "not empty" in again.output
    forced = runner.invoke(app, ["continual", str(path), "--output-dir", str(out), "--force",
                                 "--strategy", "sequential"], env={"COLUMNS": "200"})
    assert forced.exit_code == 0, forced.output
    assert "sequential: accuracy after each" in forced.output and "BWT" in forced.output
