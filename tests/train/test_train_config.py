"""TrainConfig: defaults, YAML round trip, override precedence, and refusals that say why."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from splice import LoRA, SpliceError
from splice.train import TrainConfig
from splice.train.config import _merge_adapter


def test_defaults_are_the_main_job():
    config = TrainConfig()
    assert (config.model, config.task, config.data) == ("minilm", "classification", "rotten_tomatoes")
    adapter = config.adapter_config()
    assert isinstance(adapter, LoRA) and (adapter.r, adapter.alpha) == (8, 16)
    assert config.output_dir == "runs/rotten-tomatoes-lora"


def test_output_dir_defaults_to_data_and_method():
    assert TrainConfig(data="data/reviews.jsonl").output_dir == "runs/reviews-lora"
    assert TrainConfig(data="bbc_news", output_dir="mine").output_dir == "mine"


def test_yaml_round_trip(tmp_path):
    config = TrainConfig(lr=3e-4, max_steps=7, adapter={"method": "lora", "r": 4, "targets": ["query"]},
                         precision="bf16", validation="val.jsonl")
    path = tmp_path / "run.yaml"
    config.to_yaml(path)
    assert TrainConfig.from_yaml(path) == config


def test_flags_override_yaml_and_none_means_not_given(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.1\nepochs: 3\nadapter:\n  method: lora\n  r: 4\n  targets: [query]\n")
    config = TrainConfig.from_yaml(path, lr=0.5, epochs=None, adapter={"r": 16})
    assert config.lr == 0.5
    assert config.epochs == 3
    assert config.adapter == {"method": "lora", "r": 16, "targets": ["query"]}


def test_settings_set_fields_or_adapter_keys_after_the_flags_and_null_unsets(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("max_steps: 10\nadapter: {method: lora, r: 4, targets: [query]}\n")
    config = TrainConfig.from_yaml(path, settings={"max_steps": None, "r": 2, "lr": "1e-3"}, lr=0.5, max_steps=3)
    assert config.max_steps is None and config.lr == 1e-3
    assert config.adapter == {"method": "lora", "r": 2, "targets": ["query"]}
    with pytest.raises(SpliceError, match=r"job.yaml .*unknown setting 'rslorra': did you mean 'rslora'\?"):
        TrainConfig.from_yaml(path, settings={"rslorra": True})
    with pytest.raises(SpliceError, match="Training config keys: model, .*Keys of the 'dora' adapter: "):
        TrainConfig.from_dict(settings={"method": "dora", "zzz": 1})


def test_adapter_override_applies_to_the_default_adapter():
    config = TrainConfig.from_dict({}, adapter={"targets": ["query", "key"]})
    assert config.adapter == {"method": "lora", "r": 8, "alpha": 16, "targets": ["query", "key"]}


def test_switching_method_keeps_only_placement_keys():
    base = {"method": "lora", "r": 4, "alpha": 8, "targets": ["query"], "layers": [0]}
    assert _merge_adapter(base, {"method": "other", "rank": 2}) == {
        "method": "other", "targets": ["query"], "layers": [0], "rank": 2}
    assert _merge_adapter(base, {"method": "lora", "r": 2})["alpha"] == 8


def test_yaml_numbers_written_without_a_dot_are_read_as_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nbatch_size: '8'\n")  # PyYAML reads 1e-3 as a string
    config = TrainConfig.from_yaml(path)
    assert config.lr == 1e-3 and config.batch_size == 8


@pytest.mark.parametrize(("fields", "message"), [
    ({"batchsize": 8}, "did you mean 'batch_size'"),
    ({"task": "regression"}, "task must be one of classification, causal_lm"),
    ({"precision": "fp8"}, "precision must be one of no, bf16, fp16"),
    ({"lr": 0}, "lr must be a positive number"),
    ({"lr": "fast"}, "lr must be a number"),
    ({"warmup_ratio": 1.0}, "warmup_ratio must be in [0, 1)"),
    ({"max_steps": -1}, "max_steps must be a positive number"),
    ({"adapter": {"r": 8}}, "'method' key"),
    ({"adapter": {"method": "lora", "r": 0}}, "rank r must be >= 1"),
    ({"adapter": {"method": "lorax"}}, "unknown adapter method 'lorax'"),
    ({"task": "causal_lm"}, "use --model smollm2"),
])
def test_invalid_values_are_refused_with_the_fix(fields, message):
    with pytest.raises(SpliceError) as err:
        TrainConfig.from_dict(fields)
    assert message in str(err.value)


def test_missing_and_malformed_yaml_files(tmp_path):
    with pytest.raises(SpliceError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- lr\n- 0.1\n")
    with pytest.raises(SpliceError, match="must hold a mapping"):
        TrainConfig.from_yaml(bad)


def test_shipped_examples_load(request):
    examples = request.config.rootpath / "examples"
    main = TrainConfig.from_yaml(examples / "rotten_tomatoes_lora.yaml")
    assert main == TrainConfig(adapter={**TrainConfig().adapter, "targets": ["query", "value"]})
    sft = TrainConfig.from_yaml(examples / "smollm2_arithmetic.yaml")
    assert (sft.model, sft.task, sft.data) == ("smollm2", "causal_lm", "arithmetic")


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[2].glob("examples/*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    if path.name.startswith("audit_"):  # `splice audit --config`
        from splice.audit.settings import read_audit_settings

        assert read_audit_settings(path, {}).model is not None
        return
    if "clients" in yaml.safe_load(path.read_text()):  # a federated run (`splice federate`), tasks or not
        from splice.federated import FederatedConfig

        federated = FederatedConfig.from_yaml(path)
        assert federated.train_config().adapter_config().method == federated.adapter["method"]
        assert federated.output_dir.startswith("runs/federated-")
        return
    if "mixing" in yaml.safe_load(path.read_text()):  # a task mixture (`splice multitask`)
        from splice.multitask import MultitaskConfig

        mixture = MultitaskConfig.from_yaml(path)
        assert len(mixture.tasks) >= 2 and str(mixture.output_dir).startswith("runs/multitask-")
        return
    if "tasks" in yaml.safe_load(path.read_text()):  # a continual sequence (`splice continual`)
        from splice.continual import SequenceConfig
        from splice.continual.strategies import make_strategy

        sequence = SequenceConfig.from_yaml(path)
        configs = [sequence.train_config(task) for task in sequence.tasks]
        make_strategy(sequence.strategy, configs[0].adapter_config(), sequence.options)
        assert all(c.output_dir.startswith(f"runs/continual-{sequence.model}-") for c in configs)
        return
    if "boost" in yaml.safe_load(path.read_text()):  # boosting rounds (`splice boostlora`)
        from splice.boost.boostlora import read_boost_config

        train, boost = read_boost_config(path)
        assert boost.rounds >= 1 and train.output_dir.startswith("runs/")
        return
    if "sea_peft" in yaml.safe_load(path.read_text()):  # an adapter search (`splice autoconfig`)
        from splice.selection.autoconfig import read_autoconfig

        train, space = read_autoconfig(path)
        assert space.budget > 0 and train.output_dir.startswith("runs/")
        return
    config = TrainConfig.from_yaml(path)
    adapter = config.adapter_config()
    assert adapter.method == config.adapter["method"]
    assert config.output_dir.startswith("runs/")
