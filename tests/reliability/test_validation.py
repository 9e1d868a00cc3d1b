"""Typed validation of what splice reads, and merges that cannot be right (issue 13).

Before, `adapter_config.json`, splice's own config, YAML training configs and `--set` values were
read without type checks: `"use_rslora": "false"` was read as true (other outputs, silently);
`"lora_alpha": "16"`, NaN alpha, `r: "four"`, `rank_pattern: []`, a bad regex, `batch_size: 2.5`
or `r=2.5` gave raw TypeError/ValueError/re.error tracebacks; NaN/Inf, integer, boolean, empty
and 0-dim tensors loaded silently or crashed; a BERT and a Llama adapter merged into one chimera;
NaN factors reached the SVD (LinAlgError) and `rank=0` silently became the default rank.

Each case checks the error's type and that the message names the file (where there is one), the
key or tensor, the value, and what was expected.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import make_bert, make_llama
from safetensors.torch import load_file, save_file

import splice
from splice.core.adapter_state import AdapterState
from splice.core.errors import AdapterFileError, ConfigError, IncompatibleAdaptersError, SpliceError
from splice.io import native, peft_format
from splice.merging import merge_adapters, task_vectors
from splice.train import TrainConfig

pytestmark = pytest.mark.guards("crash")

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
QUERY = "bert.encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A PEFT-format LoRA (with a trained head) and a splice-format DiaBlo of the tiny BERT."""
    root = tmp_path_factory.mktemp("saved")
    peft_model = splice.attach(make_bert(), splice.LoRA(r=4, targets=["query", "value"], train_also=["classifier"]))
    native_model = splice.attach(make_bert(), splice.DiaBlo(blocks=4, targets=["query", "value"]))
    return {"peft": splice.save(peft_model, root / "peft"), "native": splice.save(native_model, root / "native")}


def copy_dir(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in (CONFIG, WEIGHTS):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def edited(source: Path, target: Path, config=None, tensors=None) -> Path:
    """A copy of adapter directory `source` with config keys set (None: removed) and tensors
    replaced (a callable gets the old tensor)."""
    copy_dir(source, target)
    data = json.loads((target / CONFIG).read_text())
    for key, value in (config or {}).items():
        holder, _, leaf = key.rpartition(".")
        inner = data[holder] if holder else data
        if value is None:
            inner.pop(leaf, None)
        else:
            inner[leaf] = value
    (target / CONFIG).write_text(json.dumps(data))  # NaN is written as JSON's NaN, as Python reads it
    if tensors:
        weights = load_file(str(target / WEIGHTS))
        for key, change in tensors.items():
            weights[key] = change(weights[key]) if callable(change) else change
        save_file(weights, str(target / WEIGHTS))
    return target


def load_error(path: Path, error: type[Exception]) -> str:
    model = make_bert()
    with pytest.raises(error) as caught:
        splice.load(model, path)
    assert splice.adapters(model) == {}  # refused before anything was attached
    return str(caught.value)


# -- adapter_config.json (HF PEFT's format) --------------------------------------------------


PEFT_CONFIG_CASES = {
    "use_rslora-string": ({"use_rslora": "false"}, "true or false"),
    "use_dora-string": ({"use_dora": "false"}, "true or false"),
    "lora_bias-int": ({"lora_bias": 0}, "true or false"),
    "fan_in_fan_out-string": ({"fan_in_fan_out": "false"}, "true or false"),
    "lora_alpha-string": ({"lora_alpha": "16"}, "a number"),
    "lora_alpha-nan": ({"lora_alpha": math.nan}, "finite"),
    "lora_alpha-inf": ({"lora_alpha": math.inf}, "finite"),
    "r-string": ({"r": "four"}, "an integer"),
    "r-fraction": ({"r": 2.5}, "an integer"),
    "r-zero": ({"r": 0}, ">= 1"),
    "rank_pattern-list": ({"rank_pattern": []}, "a mapping"),
    "rank_pattern-bad-regex": ({"rank_pattern": {"quer(y": 4}}, "regular expression"),
    "rank_pattern-string-rank": ({"rank_pattern": {"query": "4"}}, "integers"),
    "alpha_pattern-bad-regex": ({"alpha_pattern": {"[value": 8}}, "regular expression"),
    "alpha_pattern-nan": ({"alpha_pattern": {"value": math.nan}}, "finite"),
    "lora_dropout-out-of-range": ({"lora_dropout": 1.5}, "< 1"),
    "modules_to_save-string": ({"modules_to_save": "classifier"}, "a list of strings"),
    "target_modules-number": ({"target_modules": 5}, "a string, a list of strings or null"),
    "init_lora_weights-number": ({"init_lora_weights": 3}, "true or false or a string"),
}


@pytest.mark.parametrize("case", PEFT_CONFIG_CASES, ids=list(PEFT_CONFIG_CASES))
def test_peft_config_values_are_type_checked(saved, tmp_path, case):
    changes, expected = PEFT_CONFIG_CASES[case]
    key, value = next(iter(changes.items()))
    message = load_error(edited(saved["peft"], tmp_path / "a", changes), AdapterFileError)
    assert CONFIG in message and repr(key) in message and expected in message
    shown = repr(next(iter(value))) if isinstance(value, dict) and value else repr(value)
    assert shown in message


def test_peft_config_names_the_directory_and_every_bad_key(saved, tmp_path):
    path = edited(saved["peft"], tmp_path / "a", {"use_rslora": "false", "lora_alpha": "16"})
    with pytest.raises(AdapterFileError) as caught:
        peft_format.from_peft(json.loads((path / CONFIG).read_text()), load_file(str(path / WEIGHTS)), source=path)
    message = str(caught.value)
    assert str(path / CONFIG) in message and "'use_rslora'" in message and "'lora_alpha'" in message


def test_keys_peft_writes_that_splice_does_not_use_are_ignored(saved, tmp_path):
    extra = {"revision": None, "megatron_config": None, "layers_to_transform": None, "loftq_config": {},
             "eva_config": None, "exclude_modules": None, "use_qalora": False, "qalora_group_size": 16}
    model = splice.load(make_bert(), edited(saved["peft"], tmp_path / "a", extra))
    assert "default" in splice.adapters(model)


# -- splice's own format ---------------------------------------------------------------------


NATIVE_CASES = {
    "method-field-string": ({"config.blocks": "4"}, "'blocks'", "an integer"),
    "method-field-fraction": ({"config.blocks": 2.5}, "'blocks'", "an integer"),
    "method-field-unknown": ({"config.block": 4}, "'block'", "did you mean 'blocks'"),
    "modules-string": ({"modules": QUERY}, "'modules'", "a list of strings"),
    "config-list": ({"config": []}, "'config'", "a mapping"),
    "format_version-string": ({"format_version": "1"}, "'1'", "version"),
    "method-disagrees": ({"method": "lora"}, "'lora'", "'diablo'"),
}


@pytest.mark.parametrize("case", NATIVE_CASES, ids=list(NATIVE_CASES))
def test_native_config_values_are_type_checked(saved, tmp_path, case):
    changes, named, expected = NATIVE_CASES[case]
    message = load_error(edited(saved["native"], tmp_path / "a", changes), AdapterFileError)
    assert CONFIG in message and named in message and expected in message


@pytest.mark.guards("silent")
def test_native_boolean_string_is_refused_not_read_as_true(tmp_path):
    model = splice.attach(make_bert(), splice.LoRA(r=2, targets=["query"], rslora=True))
    path = splice.save(model, tmp_path / "a", format="splice")
    bad = edited(path, tmp_path / "b", {"config.rslora": "false"})
    message = load_error(bad, AdapterFileError)
    assert "'rslora'" in message and "'false'" in message and "true or false" in message


# -- adapter mappings: YAML `adapter:`, `--set` values, splice.config_from_dict -------------------


ADAPTER_CASES = {
    "r-string": ({"method": "lora", "r": "four"}, "'r'", "an integer"),
    "r-fraction": ({"method": "lora", "r": 2.5}, "'r'", "an integer"),
    "rslora-string": ({"method": "lora", "rslora": "false"}, "'rslora'", "true or false"),
    "alpha-nan": ({"method": "lora", "alpha": math.nan}, "'alpha'", "a finite number"),
    "alpha-string": ({"method": "lora", "alpha": "16"}, "'alpha'", "a number"),
    "rank_pattern-list": ({"method": "lora", "rank_pattern": []}, "'rank_pattern'", "a mapping"),
    "rank_pattern-bad-regex": ({"method": "lora", "rank_pattern": {"q(": 2}}, "'q('", "regular expression"),
    "unknown-key": ({"method": "lora", "rn": 4}, "'rn'", "did you mean 'r'"),
    "diablo-blocks-fraction": ({"method": "diablo", "blocks": 2.5}, "'blocks'", "an integer"),
    "loreft-bool-string": ({"method": "loreft", "share_weights": "no"}, "'share_weights'", "true or false"),
    "ttlora-modes-string": ({"method": "ttlora", "modes": "4x8"}, "'modes'", "a list of integers"),
    "targets-number": ({"method": "lora", "targets": 3}, "'targets'", "a string, a list of strings or null"),
    "method-typo": ({"method": "lroa"}, "'lroa'", "did you mean 'lora'"),
    "habitual-rank": ({"method": "lora", "rank": 8}, "'rank'", "did you mean 'r'"),
    "peft-name": ({"method": "lora", "target_modules": ["query"]}, "'target_modules'", "did you mean 'targets'"),
}


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=list(ADAPTER_CASES))
def test_adapter_mappings_are_type_checked(case):
    data, named, expected = ADAPTER_CASES[case]
    with pytest.raises(ConfigError) as caught:
        splice.config_from_dict(data)
    message = str(caught.value)
    assert named in message and expected in message


@pytest.mark.parametrize(("method", "kwargs", "meant"), [
    ("LoRA", {"rank": 8}, "'r'"), ("DoRA", {"lora_alpha": 8}, "'alpha'"), ("LoRA", {"modules_to_save": ["c"]},
                                                                         "'train_also'"),
    ("DiaBlo", {"block": 4}, "'blocks'"),
])
def test_an_unknown_constructor_keyword_names_the_key_meant(method, kwargs, meant):
    with pytest.raises(TypeError, match=rf"got an unexpected keyword argument '{next(iter(kwargs))}'; did you "
                                        rf"mean {meant}"):
        getattr(splice, method)(**kwargs)


@pytest.mark.parametrize(("kwargs", "named", "expected"), [
    ({"r": 2.5}, "'r'", "an integer"),
    ({"alpha": math.nan}, "'alpha'", "a finite number"),
    ({"rslora": "false"}, "'rslora'", "true or false"),
    ({"rank_pattern": {"(": 2}}, "'('", "regular expression"),
    ({"alpha_pattern": {"q": "2"}}, "'alpha_pattern'", "numbers"),
], ids=["r-fraction", "alpha-nan", "rslora-string", "bad-regex", "alpha_pattern-string"])
def test_lora_from_python_checks_types(kwargs, named, expected):
    with pytest.raises(SpliceError) as caught:
        splice.LoRA(**kwargs)
    assert named in str(caught.value) and expected in str(caught.value)


# -- YAML training configs and command-line values ---------------------------------------------


YAML_CASES = {
    "batch_size-fraction": ("batch_size: 2.5\n", "batch_size", "2.5", "an integer"),
    "lr-nan": ("lr: .nan\n", "lr", "nan", "finite"),
    "eval_every-bool": ("eval_every: true\n", "eval_every", "True", "an integer"),
    "on_nonfinite-unknown": ("on_nonfinite: ignore\n", "on_nonfinite", "'ignore'", "stop, skip"),
    "checkpoint_every-zero": ("checkpoint_every: 0\n", "checkpoint_every", "0", "positive"),
    "model-number": ("model: 5\n", "model", "5", "a string"),
    "adapter-bool-string": ("adapter: {method: lora, rslora: 'false'}\n", "rslora", "'false'", "true or false"),
    "adapter-r-word": ("adapter: {method: lora, r: four}\n", "'r'", "'four'", "an integer"),
    "adapter-unknown-key": ("adapter: {method: lora, alpah: 8}\n", "'alpah'", "alpah", "did you mean 'alpha'"),
    "unknown-field": ("batchsize: 8\n", "'batchsize'", "batchsize", "did you mean 'batch_size'"),
}


@pytest.mark.parametrize("case", YAML_CASES, ids=list(YAML_CASES))
def test_yaml_config_errors_name_the_file_key_and_value(tmp_path, case):
    text, key, value, expected = YAML_CASES[case]
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_yaml(path)
    message = str(caught.value)
    assert str(path) in message and key in message and value in message and expected in message


@pytest.mark.parametrize(("overrides", "named", "expected"), [
    ({"adapter": {"rslora": "false"}}, "'rslora'", "true or false"),
    ({"adapter": {"r": 2.5}}, "'r'", "an integer"),
    ({"adapter": {"r": "four"}}, "'four'", "an integer"),
    ({"batch_size": 2.5}, "batch_size", "an integer"),
], ids=["set-bool-string", "set-r-fraction", "set-r-word", "flag-batch-size"])
def test_command_line_values_are_type_checked(tmp_path, overrides, named, expected):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.001\n")
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_yaml(path, **overrides)
    message = str(caught.value)
    assert named in message and expected in message
    if "adapter" not in overrides:  # a flag's own bad value is not blamed on the file
        assert str(path) not in message


def test_yaml_exponent_numbers_still_read(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nadapter: {method: lora, alpha: 1e1}\n")  # PyYAML reads both as strings
    config = TrainConfig.from_yaml(path)
    assert config.lr == 1e-3 and config.adapter_config().alpha == 10.0


# -- tensors ---------------------------------------------------------------------------------


A_KEY = f"{PREFIX}{QUERY}.lora_A.weight"
B_KEY = f"{PREFIX}{QUERY}.lora_B.weight"
HEAD_KEY = f"{PREFIX}classifier.modules_to_save.default.weight"


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = math.nan
    return t


def _inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[1] = -math.inf
    return t


TENSOR_CASES = {
    "A-nan": (A_KEY, _nan, "NaN"),
    "B-inf": (B_KEY, _inf, "infinite"),
    "head-nan": (HEAD_KEY, _nan, "NaN"),
    "A-int": (A_KEY, lambda t: t.round().to(torch.int64), "int64"),
    "B-bool": (B_KEY, lambda t: t > 0, "bool"),
    "A-0-dim": (A_KEY, lambda t: torch.tensor(1.0), "0 dimensions"),
    "rank-0": (A_KEY, lambda t: t[:0], "rank-0"),
}


def _head_key(path: Path) -> str:
    return next(k for k in load_file(str(path / WEIGHTS)) if k.startswith(f"{PREFIX}classifier") and
                k.endswith("weight"))


@pytest.mark.guards("silent")
@pytest.mark.parametrize("case", TENSOR_CASES, ids=list(TENSOR_CASES))
def test_peft_tensors_must_be_finite_float_matrices(saved, tmp_path, case):
    key, change, expected = TENSOR_CASES[case]
    key = _head_key(saved["peft"]) if key == HEAD_KEY else key
    tensors = {key: change}
    if case == "rank-0":
        tensors[B_KEY] = lambda t: t[:, :0]
    message = load_error(edited(saved["peft"], tmp_path / "a", tensors=tensors), AdapterFileError)
    assert WEIGHTS in message and any(repr(k) in message for k in tensors) and expected in message


def test_nonfinite_factors_load_when_asked(saved, tmp_path):
    path = edited(saved["peft"], tmp_path / "a", tensors={A_KEY: _nan})
    config, tensors = json.loads((path / CONFIG).read_text()), load_file(str(path / WEIGHTS))
    state = peft_format.from_peft(config, tensors, allow_nonfinite=True)
    assert torch.isnan(state.modules[QUERY].A).any()


NATIVE_TENSOR_CASES = {"nan": (_nan, "NaN"), "int": (lambda t: t.round().to(torch.int32), "int32")}


@pytest.mark.guards("silent")
@pytest.mark.parametrize("case", NATIVE_TENSOR_CASES, ids=list(NATIVE_TENSOR_CASES))
def test_native_tensors_must_be_finite_and_float(saved, tmp_path, case):
    change, expected = NATIVE_TENSOR_CASES[case]
    key = next(iter(load_file(str(saved["native"] / WEIGHTS))))
    message = load_error(edited(saved["native"], tmp_path / "a", tensors={key: change}), AdapterFileError)
    assert WEIGHTS in message and repr(key) in message and expected in message


def test_native_read_names_the_directory(saved, tmp_path):
    path = edited(saved["native"], tmp_path / "a", {"config.blocks": "4"})
    with pytest.raises(AdapterFileError, match="blocks") as caught:
        native.read(make_bert(), json.loads((path / CONFIG).read_text()), load_file(str(path / WEIGHTS)),
                    "default", False, source=path)
    assert str(path / CONFIG) in str(caught.value)


# -- merging ---------------------------------------------------------------------------------


@pytest.mark.guards("silent")
def test_bert_and_llama_adapters_do_not_merge_into_a_chimera():
    bert = _state_of(make_bert(), ["query", "value"])
    llama = _state_of(make_llama(), ["q_proj", "v_proj"])
    assert bert.base_model is None and llama.base_model is None  # nothing recorded to tell them apart
    with pytest.raises(IncompatibleAdaptersError) as caught:
        merge_adapters([bert, llama], "linear")
    message = str(caught.value)
    assert "adapter 1" in message and "adapter 2" in message and "q_proj" in message and "query" in message


@pytest.mark.guards("silent")
def test_different_recorded_base_models_are_named():
    a, b = _state_of(make_bert(), ["query"]), _state_of(make_bert(), ["query"])
    a.base_model, b.base_model = "org/bert-a", "org/bert-b"
    with pytest.raises(IncompatibleAdaptersError, match=r"adapter 1: 'org/bert-a', adapter 2: 'org/bert-b'"):
        merge_adapters([a, b])


def _state_of(model, targets, seed: int = 0) -> AdapterState:
    from splice.io.adapter_states import adapter_state

    splice.attach(model, splice.LoRA(r=2, targets=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in splice.trainable_parameters(model).values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return adapter_state(model)


def _poison(state: AdapterState, value: float) -> tuple[AdapterState, str]:
    name = sorted(state.modules)[0]
    update = state.modules[name]
    A = update.A.clone()
    A.view(-1)[0] = value
    modules = {**state.modules, name: update.like(A=A)}
    return AdapterState(modules, state.head_tensors, state.heads, base_model=state.base_model), name


@pytest.mark.parametrize(("method", "value"), [("svd", math.nan), ("linear", math.inf), ("ties", math.nan),
                                                ("dare_linear", -math.inf)])
def test_nonfinite_factors_are_refused_before_the_svd(method, value):
    good = _state_of(make_bert(), ["query", "value"], seed=1)
    bad, name = _poison(_state_of(make_bert(), ["query", "value"], seed=2), value)
    with pytest.raises(SpliceError) as caught:
        merge_adapters([good, bad], method)
    message = str(caught.value)
    assert "adapter 2" in message and f"{name}.lora_A" in message
    assert ("NaN" if math.isnan(value) else "infinite") in message


@pytest.mark.guards("silent")
@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_merge_rank_must_be_a_positive_integer(rank):
    states = [_state_of(make_bert(), ["query"], seed=s) for s in (1, 2)]
    with pytest.raises(SpliceError, match=r"rank must be a positive integer.*got " + repr(rank).replace(".", r"\.")):
        merge_adapters(states, "svd", rank=rank)


def test_merge_weights_must_be_finite_numbers():
    states = [_state_of(make_bert(), ["query"], seed=s) for s in (1, 2)]
    with pytest.raises(SpliceError, match=r"weights must be finite numbers.*nan"):
        merge_adapters(states, "linear", weights=[math.nan, 1.0])


def test_task_vector_rules_refuse_nonfinite_inputs():
    taus = torch.randn(2, 4, 4, dtype=torch.float64)
    taus[1, 0, 0] = math.nan
    with pytest.raises(SpliceError, match="task vectors holds 1 NaN"):
        task_vectors.ties(taus, torch.ones(2, dtype=torch.float64), 0.5)


def test_disjoint_targets_of_one_model_still_merge():
    """Regression guard (passes before and after): query-only and value-only adapters of one
    BERT share parent modules, so they belong together even with no base model recorded."""
    merged = merge_adapters([_state_of(make_bert(), ["query"], 1), _state_of(make_bert(), ["value"], 2)], "cat")
    assert any(n.endswith("query") for n in merged.state.modules) and any(n.endswith("value")
                                                                          for n in merged.state.modules)


def test_unify_refuses_nonfinite_and_chimera_inputs():
    from splice.merging import unify_adapters

    good = _state_of(make_bert(), ["query", "value"], seed=1)
    bad, name = _poison(_state_of(make_bert(), ["query", "value"], seed=2), math.nan)
    with pytest.raises(SpliceError, match=f"adapter 2: {name}.lora_A"):
        unify_adapters([good, bad])
    with pytest.raises(IncompatibleAdaptersError):
        unify_adapters([good, _state_of(make_llama(), ["q_proj", "v_proj"])])


def test_info_names_a_badly_typed_key(saved, tmp_path):
    from splice.io.info import inspect_adapter

    with pytest.raises(AdapterFileError, match="'r' has value 'four'"):
        inspect_adapter(edited(saved["peft"], tmp_path / "bad", config={"r": "four"}))
