"""Regression fixtures (HF PEFT's idea): adapters saved by an earlier splice must keep loading.

`tests/fixtures/<version>/` holds adapters of every method as that version wrote them, the base
models' weights, a fixed batch and the outputs the adapted models gave (see its README.md and
`tests/fixtures/make_v0_1.py`, which must never be re-run for v0.1). Each fixture is loaded onto
its rebuilt base with `splice.load`, and PEFT-format ones with `peft.PeftModel.from_pretrained`
too; the outputs must equal the stored ones and differ from the base model's.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import splice

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ATOL = RTOL = 1e-5  # float32 outputs of at most ~8 in magnitude


def _generator(version: str):
    """The fixture version's generator module, for its base architectures and output function."""
    name = f"make_{version.replace('.', '_')}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FIXTURES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look the module up while it executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def _manifest(version: str) -> dict:
    return json.loads((FIXTURES / version / "manifest.json").read_text())


VERSIONS = ["v0.1"]
CASES = [(v, name) for v in VERSIONS for name in _manifest(v)]
PEFT_CASES = [(v, name) for v, name in CASES if _manifest(v)[name]["peft_loads"]]
BASES = [(v, kind) for v in VERSIONS for kind in _generator(v).BASE_KINDS]


def _ids(cases) -> list[str]:
    return [f"{v}-{name}" for v, name in cases]


def assert_outputs_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key in expected:
        diff = (actual[key] - expected[key]).abs().max().item()
        assert torch.allclose(actual[key], expected[key], atol=ATOL, rtol=RTOL), (
            f"{what}: output {key!r} differs from the stored one by up to {diff:.3g}")


def assert_outputs_differ(actual: dict[str, torch.Tensor], base: dict[str, torch.Tensor], what: str) -> None:
    """The adapter changes the outputs far beyond the tolerance, so equality means a right load."""
    change = max((actual[k] - base[k]).abs().max().item() for k in base)
    assert change > 100 * ATOL, f"{what}: outputs equal the base model's (max change {change:.3g})"


def test_every_fixture_folder_is_listed_and_complete():
    for version in VERSIONS:
        folder = FIXTURES / version
        listed = set(_manifest(version))
        present = {p.name for p in folder.iterdir() if p.is_dir()} - {"bases"}
        assert present == listed, f"{version}: folders {sorted(present ^ listed)} are not in both"
        for name in listed:
            files = {p.name for p in (folder / name).iterdir()}
            assert files == {"adapter_config.json", "adapter_model.safetensors", "expected.safetensors"}, name


@pytest.mark.parametrize(("version", "kind"), BASES, ids=_ids(BASES))
def test_base_model_is_rebuilt_exactly(version, kind):
    """The stored base weights on the rebuilt architecture give the stored base outputs (a
    failure here is the base model's, not a fixture's)."""
    gen = _generator(version)
    folder = FIXTURES / version
    outputs = gen.model_outputs(kind, gen.load_base(kind, folder), gen.load_inputs(folder))
    assert_outputs_equal(outputs, load_file(str(folder / "bases" / f"{kind}_outputs.safetensors")), kind)


@pytest.mark.parametrize(("version", "name"), CASES, ids=_ids(CASES))
def test_fixture_loads_with_the_stored_outputs(version, name):
    gen = _generator(version)
    folder = FIXTURES / version
    entry = _manifest(version)[name]
    kind, inputs = entry["base"], gen.load_inputs(folder)
    config = json.loads((folder / name / "adapter_config.json").read_text())
    assert ("peft_type" in config) == (entry["format"] == "peft")

    model = gen.load_base(kind, folder)
    assert splice.load(model, folder / name) is model
    model.eval()
    assert type(splice.adapters(model)["default"]).method == entry["loads_as"]
    assert splice.trainable_parameters(model) == {}  # loaded frozen
    outputs = gen.model_outputs(kind, model, inputs)
    assert_outputs_equal(outputs, load_file(str(folder / name / "expected.safetensors")), name)
    assert_outputs_differ(outputs, load_file(str(folder / "bases" / f"{kind}_outputs.safetensors")), name)

    splice.detach(model, "default")  # and the base model comes back (PiSSA restores its weights)
    assert_outputs_equal(gen.model_outputs(kind, model, inputs),
                         load_file(str(folder / "bases" / f"{kind}_outputs.safetensors")), f"{name} detached")


@pytest.mark.parametrize(("version", "name"), PEFT_CASES, ids=_ids(PEFT_CASES))
def test_peft_format_fixture_loads_in_hf_peft(version, name):
    gen = _generator(version)
    folder = FIXTURES / version
    kind = _manifest(version)[name]["base"]
    peft_model = PeftModel.from_pretrained(gen.load_base(kind, folder), str(folder / name)).eval()
    outputs = gen.model_outputs(kind, peft_model, gen.load_inputs(folder))
    assert_outputs_equal(outputs, load_file(str(folder / name / "expected.safetensors")), f"{name} in HF PEFT")
