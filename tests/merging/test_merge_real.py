"""merge_adapters on the real MiniLM and real reviews: the merged weight change is the weighted
sum of the true changes on every targeted module, and HF PEFT loads the saved merge with the
logits splice gives."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import logits, minilm_tokenizer, randomize

import splice
from splice import assets
from splice.io.peft_format import attach_state
from splice.merging import merge_adapters

TARGETS = ["query", "value"]
WEIGHTS = [0.7, -0.4]


def true_change(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the active adapter changes: unload a copy (fold it in) and diff every parameter, float64."""
    merged = splice.unload(copy.deepcopy(model)).state_dict()
    assert merged.keys() == base.keys()
    return {k: merged[k].double() - base[k].double() for k in base}


@pytest.mark.slow
def test_linear_merge_of_real_minilm_adapters_is_the_weighted_sum_and_loads_in_peft(minilm_base, tmp_path):
    from peft import PeftModel

    base = minilm_base.state_dict()
    configs = [splice.LoRA(r=4, alpha=8, targets=TARGETS),
               splice.LoRA(r=2, alpha=4, rslora=True, targets=TARGETS)]  # other rank, rsLoRA scale
    changes, paths = [], []
    for i, config in enumerate(configs):
        model = splice.attach(copy.deepcopy(minilm_base), config)
        randomize(model, scale=0.05, seed=i + 1)
        changes.append(true_change(model, base))
        paths.append(tmp_path / f"adapter{i}")
        splice.save(model, paths[-1])

    result = merge_adapters(paths, "linear", weights=WEIGHTS)
    merged = attach_state(copy.deepcopy(minilm_base), result.state, "mix")
    got = true_change(merged, base)

    expected = {k: WEIGHTS[0] * changes[0][k] + WEIGHTS[1] * changes[1][k] for k in base}
    changed = {k for k, v in expected.items() if v.abs().max() > 0}
    assert changed == {f"bert.encoder.layer.{i}.attention.self.{t}.weight" for i in range(6) for t in TARGETS}
    for key in base:
        scale = expected[key].abs().max().item()
        assert (got[key] - expected[key]).abs().max().item() <= 1e-5 * max(scale, 1e-3), key

    reviews = [row["text"] for row in assets.rotten_tomatoes().test[:16]]
    batch = dict(minilm_tokenizer()(reviews, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    ours = logits(merged.eval(), **batch)
    assert (ours - logits(minilm_base, **batch)).abs().max() > 1e-3  # the merge changes the outputs
    saved = result.save(tmp_path / "merged")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(minilm_base), str(saved)).eval()
    torch.testing.assert_close(logits(peft_model, **batch), ours, atol=1e-5, rtol=1e-5)
    folded = copy.deepcopy(minilm_base)
    folded.load_state_dict({k: (base[k].double() + expected[k]).to(base[k].dtype) for k in base})
    torch.testing.assert_close(logits(folded, **batch), ours, atol=1e-4, rtol=1e-4)
