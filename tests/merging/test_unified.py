"""EMR / ConDU unify and decouple: the spec's identities on task vectors and on adapters."""

from __future__ import annotations

import pytest
import torch

import splice
from splice.merging import decouple, load_unified, unify, unify_adapters
from tests.merging.test_merge import assert_close, change, merged_change, trained


def vectors(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(6, 5, generator=generator, dtype=torch.float64),
            "b": torch.randn(4, generator=generator, dtype=torch.float64)}


def test_one_task_comes_back_exactly():
    tau = vectors(0)
    tau["a"][0, 0] = 0.0
    unified = unify([tau])
    assert unified.scales == [pytest.approx(1.0)]
    for name, value in decouple(unified, 0).items():
        assert torch.equal(value, tau[name])


def test_identical_tasks_come_back_exactly():
    tau = vectors(1)
    unified = unify([tau, tau])
    for task in range(2):
        for name, value in decouple(unified, task).items():
            torch.testing.assert_close(value, tau[name])


def test_entries_against_the_elected_sign_are_dropped_and_scale_restores_mean_magnitude():
    taus = [vectors(s) for s in (2, 3, 4)]
    unified = unify(taus)
    for i, tau in enumerate(taus):
        rebuilt = decouple(unified, i)
        for name in tau:
            sign = torch.where(sum(t[name] for t in taus) > 0, 1.0, -1.0).double()
            against = tau[name] * sign <= 0
            assert torch.all(rebuilt[name][against] == 0)
            assert torch.all(unified.vector[name].abs() >= (tau[name] * ~against).abs())
        own = sum(tau[n].abs().mean() for n in tau)
        restored = sum(rebuilt[n].abs().mean() for n in tau)
        assert restored.item() == pytest.approx(own.item(), rel=1e-12)


def test_adapters_unify_and_decouple_with_save_and_load(tmp_path):
    lora = trained(splice.LoRA(r=3, targets=["fc1", "conv"], lora_bias=True), 11)
    other = trained(splice.LoRA(r=2, rslora=True, targets=["fc1", "fc2"]), 12)
    alone = unify_adapters([lora])
    assert_close(merged_change(alone.decouple(0)), change(lora))
    both = unify_adapters([lora, other])
    loaded = load_unified(both.save(tmp_path / "unified"))
    for task in range(2):
        assert_close(merged_change(loaded.decouple(task)), merged_change(both.decouple(task)))
    with pytest.raises(splice.OutputExistsError):
        both.save(tmp_path / "unified")
    (tmp_path / "foreign").mkdir()
    with pytest.raises(splice.AdapterFileError, match="not a unified adapter"):
        load_unified(tmp_path / "foreign")
