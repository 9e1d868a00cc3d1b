"""A multi-task file's every mistake is refused before anything loads, naming the file, the key
and the value."""

from __future__ import annotations

import pytest
import yaml

from splice.core.errors import ConfigError
from splice.multitask import MultitaskConfig, load_tasks

TASKS = [{"name": "sentiment", "data": "rotten_tomatoes"}, {"name": "topic", "data": "bbc_news"}]


def write(tmp_path, **data):
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({"tasks": TASKS, **data}))
    return path


@pytest.mark.parametrize(("data", "message"), [
    ({"mixin": "temperature"}, r"mix.yaml: unknown key 'mixin'; did you mean 'mixing'\?"),
    ({"mixing": "uniform"}, r"mix.yaml: mixing must be one of 'proportional', 'temperature', got 'uniform'"),
    ({"mixing": "temperature", "temperature": -2}, r"mix.yaml: temperature must be a positive number, got -2"),
    ({"mixing": "temperature", "temperature": "hot"}, r"temperature must be a number, got 'hot' \(a string\)"),
    ({"budget": "half"}, r"budget must be one of 'per_task', 'total', got 'half'"),
    ({"seeds": []}, r"seeds must be a non-empty list of distinct integers"),
    ({"seeds": [1, 1]}, r"seeds must be a non-empty list of distinct integers, got \[1, 1\]"),
    ({"tasks": TASKS[:1]}, r"a mixture needs at least two tasks, got 1"),
    ({"tasks": [TASKS[0], TASKS[0]]}, r"task names must differ"),
    ({"tasks": [TASKS[0], {"name": "topic", "dataa": "bbc_news"}]}, r"tasks\[1\]: unknown key 'dataa'; did you "
                                                                    r"mean 'data'\?"),
    ({"tasks": [TASKS[0], {"name": "topic"}]}, r"tasks\[1\] has no 'data'"),
    ({"tasks": [TASKS[0], {"name": "2nd", "data": "bbc_news"}]}, r"tasks\[1\] \('2nd'\): a task name is letters"),
    ({"tasks": [TASKS[0], {"name": "topic", "data": "bbc_news", "max_words": "ten"}]},
     r"tasks\[1\]\.max_words must be an integer or null, got 'ten' \(a string\)"),
    ({"tasks": [TASKS[0], {"name": "topic", "data": "bbc_news", "head": "nobody"}]},
     r"head 'nobody' must name another task of the mixture, one of \['sentiment'\]"),
    ({"tasks": [TASKS[0], {"name": "sums", "data": "arithmetic", "kind": "causal_lm"}]},
     r"kind causal_lm needs a generator; set task: causal_lm"),
    ({"task": "causal_lm", "model": "smollm2", "tasks": [TASKS[0], {**TASKS[1], "head": "sentiment"}]},
     r"head shares a classification head; a generator has none"),
    ({"train": {"grad_accum": 4}}, r"train.grad_accum must be 1: a multi-task step is one batch of one task.*got 4"),
    ({"train": {"eval_every": 20}}, r"train.eval_every must be None: .*evaluated once, at the end"),
    ({"train": {"model": "smollm2"}}, r"train.model is set by the multi-task run itself"),
    ({"train": {"lrr": 0.1}}, r"train.lrr is not a training field; did you mean 'lr'\?"),
    ({"train": {"lr": -1}}, r"mix.yaml: lr must be a positive number, got -1"),
    ({"train": {"max_length": "long"}}, r"max_length must be an integer"),
    ({"compare": False, "transfer": True}, r"transfer: Δ_ij needs the single-task runs"),
    ({"adapter": {"method": "lora", "r": "eight"}}, r"adapter"),
])
def test_bad_values_are_refused_naming_file_key_and_value(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message) as err:
        MultitaskConfig.from_yaml(write(tmp_path, **data))
    assert str(tmp_path / "mix.yaml") in str(err.value)


def test_defaults_and_overrides(tmp_path):
    path = write(tmp_path, seeds=[0, 1, 2], train={"max_steps": 50, "lr": "1e-3"})
    config = MultitaskConfig.from_yaml(path)
    assert config.mixing == "proportional" and config.budget == "per_task" and config.compare and config.transfer
    assert config.output_dir == "runs/multitask-minilm" and config.shared_config().lr == 1e-3
    config = MultitaskConfig.from_yaml(path, seeds=[7], mixing="temperature", compare=False,
                                       train={"max_steps": 5, "max_eval_examples": None})
    assert config.seeds == [7] and config.mixing == "temperature" and config.transfer is False  # follows compare
    assert config.train == {"max_steps": 5, "lr": 1e-3,  # YAML 1.1's string "1e-3" read as the number
                            "max_eval_examples": None}  # a None in train unsets the field (--set KEY=null)
    (tmp_path / "no-tasks.yaml").write_text("model: minilm\n")
    with pytest.raises(ConfigError, match="no-tasks.yaml: no 'tasks' list"):
        MultitaskConfig.from_yaml(tmp_path / "no-tasks.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        MultitaskConfig.from_yaml(tmp_path / "missing.yaml")


def test_data_errors_name_the_task(mixture, files):
    shared = mixture(tasks=[{"name": "colour", "data": files["colour"]},
                            {"name": "animal", "data": files["animal"], "head": "colour"}])
    with pytest.raises(ConfigError, match=r"task 'animal' shares the head of 'colour' but its labels"):
        load_tasks(shared)
    words = mixture(tasks=[{"name": "colour", "data": files["colour"]}, {"name": "sums", "data": files["counting"]}])
    with pytest.raises(ConfigError, match=r"task 'sums': .*counting.jsonl' holds prompt/completion rows, which a "
                                          r"classifier cannot learn"):
        load_tasks(words)


def test_the_examples_read_and_tag_their_tasks():
    for name in ("minilm", "smollm2"):
        assert MultitaskConfig.from_yaml(f"examples/multitask_{name}.yaml").seeds == [0]
    config = MultitaskConfig.from_yaml("examples/multitask_smollm2.yaml", train={"max_train_examples": 4})
    sentiment, topic, arithmetic = load_tasks(config)
    assert sentiment.splits.train[0]["prompt"].startswith("[sentiment] Review: ")
    assert {r["completion"] for r in sentiment.splits.test} == {" positive", " negative"}
    assert len(topic.splits.train[0]["prompt"].split()) <= 40 + 4  # tag, "Article:", "Topic:"
    assert arithmetic.splits.train[0]["prompt"].startswith("[arithmetic] Question: ")
    assert [len(t.splits.train) for t in (sentiment, topic, arithmetic)] == [4, 4, 4]
