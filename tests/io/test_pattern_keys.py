"""rank_pattern / alpha_pattern keys with PEFT's exact rule (issue 12, defect 2).

With modules `lin0`, `block.lin0` and `block2.lin0`, a key `lin0` selects all three under PEFT's
rule (`(.*\\.)?(key)$`); `^lin0` selects the top-level one only. splice reads keys with that rule
and writes keys that select exactly the intended modules, both ways with identical outputs.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_close, randomize
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import splice
from splice.core.errors import AdapterFileError
from splice.methods.lora import exact_pattern, pattern_value


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 6)
        self.block = nn.Module()
        self.block.lin0 = nn.Linear(6, 6)
        self.block2 = nn.Module()
        self.block2.lin0 = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2.lin0(self.block.lin0(self.lin0(x)))


NAMES = ["lin0", "block.lin0", "block2.lin0"]


def nested() -> Nested:
    torch.manual_seed(0)
    return Nested()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(2))


def peft_with_random_factors(config: LoraConfig) -> PeftModel:
    model = get_peft_model(nested(), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.mark.parametrize("patterns", [
    {"alpha_pattern": {"^lin0": 3}},
    {"alpha_pattern": {"block.lin0": 5, "lin0": 3}},  # first match wins: block.lin0 gets 5
    {"rank_pattern": {"^lin0": 4}, "alpha_pattern": {"block2.lin0": 7}},
    {"rank_pattern": {"lin0": 3}},
])
def test_peft_patterns_load_in_splice_and_back_with_peft_outputs(tmp_path, x, patterns):
    model = peft_with_random_factors(LoraConfig(r=2, lora_alpha=2, target_modules=["lin0"], **patterns))
    expected = model(x)
    model.save_pretrained(tmp_path / "peft")
    ours = splice.load(nested(), tmp_path / "peft")
    assert_close(ours(x), expected, rel=1e-6)
    splice.save(ours, tmp_path / "splice")
    written = json.loads((tmp_path / "splice" / "adapter_config.json").read_text())
    again = PeftModel.from_pretrained(nested(), tmp_path / "splice").eval()
    assert_close(again(x), expected, rel=1e-6)
    for key in ("rank_pattern", "alpha_pattern"):  # every written key selects one module only
        for pattern_key in written[key]:
            assert sum(pattern_value({pattern_key: 1}, n, 0) for n in NAMES) == 1, (key, pattern_key)


def test_splice_per_module_ranks_on_same_suffix_modules_load_in_peft(tmp_path, x):
    model = nested()
    splice.attach(model, splice.LoRA(r=2, alpha=4, targets=["lin0"], rank_pattern={"^lin0": 3, "block2.lin0": 1},
                                     alpha_pattern={"^block\\.lin0": 8}))
    randomize(model)
    ranks = {n: m.splice["default"].r for n, m in model.named_modules() if hasattr(m, "splice")}
    assert ranks == {"lin0": 3, "block.lin0": 2, "block2.lin0": 1}
    expected = model(x)
    splice.save(model, tmp_path / "a")
    assert_close(PeftModel.from_pretrained(nested(), tmp_path / "a").eval()(x), expected, rel=1e-6)
    assert_close(splice.load(nested(), tmp_path / "a")(x), expected, rel=1e-6)


def test_exact_pattern_anchors_only_where_a_suffix_is_ambiguous():
    keys = exact_pattern({"lin0": 1, "block.lin0": 2, "encoder.layer.0.query": 3},
                         [*NAMES, "encoder.layer.0.query", "encoder.layer.10.query"])
    assert keys == {"^lin0": 1, "block.lin0": 2, "encoder.layer.0.query": 3}
    for key, value in keys.items():
        hits = [n for n in [*NAMES, "encoder.layer.0.query"] if pattern_value({key: value}, n, None) is not None]
        assert len(hits) == 1


def test_a_load_that_does_not_fit_leaves_no_half_adapter(tmp_path, x):
    model = peft_with_random_factors(LoraConfig(r=2, target_modules=["lin0"], rank_pattern={"^lin0": 4}))
    model.save_pretrained(tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["rank_pattern"] = {"lin0": 4}  # now claims rank 4 for all three: the file contradicts it
    config_path.write_text(json.dumps(config))
    target = nested()
    splice.attach(target, splice.LoRA(r=2, targets=["block.lin0"]), "kept")
    randomize(target, "kept")
    before = target(x)
    requires_grad = {n: p.requires_grad for n, p in target.named_parameters()}
    with pytest.raises(AdapterFileError, match="rank"):
        splice.load(target, tmp_path / "peft", "new")
    assert list(splice.adapters(target)) == ["kept"]
    assert torch.equal(target(x), before)
    assert {n: p.requires_grad for n, p in target.named_parameters()} == requires_grad
