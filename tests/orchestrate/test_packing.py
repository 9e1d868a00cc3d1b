"""Packing a step's rows into passes: every row once, limits kept, padding only where needed."""

from __future__ import annotations

import torch

from splice.orchestrate import packing


def _batch(lengths: list[int], width: int | None = None, pad: int = 0) -> dict[str, torch.Tensor]:
    width = width or max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    ids = torch.where(mask.bool(), torch.arange(1, width + 1).expand(len(lengths), width), pad)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}


def test_every_row_lands_in_exactly_one_group_within_the_limits():
    batches = {"a": _batch([30, 28, 3, 2]), "b": _batch([5, 4, 29, 1, 6])}
    groups = packing.plan(batches, max_rows=3, max_padding=0.3)
    seen = sorted((name, int(i)) for g in groups for name, rows in g.rows.items() for i in rows)
    assert seen == sorted([("a", i) for i in range(4)] + [("b", i) for i in range(5)])
    for group in groups:
        lengths = [int(batches[n]["attention_mask"][i].sum()) for n, rows in group.rows.items() for i in rows]
        assert group.size <= 3
        assert group.length == max(lengths)
        assert 1 - sum(lengths) / (group.length * len(lengths)) <= 0.3


def test_long_and_short_rows_go_to_different_passes():
    batches = {"a": _batch([40, 40]), "b": _batch([4, 4])}
    groups = packing.plan(batches, max_rows=None, max_padding=0.25)
    assert [(g.length, g.size) for g in groups] == [(40, 2), (4, 2)]
    stats = packing.PaddingStats()
    packing.record(stats, batches, groups)
    assert stats.naive_share == 1 - 88 / (4 * 40)
    assert stats.packed_share == 0.0


def test_without_limits_everything_is_one_pass():
    batches = {"a": _batch([9, 3]), "b": _batch([7])}
    assert len(packing.plan(batches, max_rows=None, max_padding=0.99)) == 1


def test_assemble_pads_each_tenant_to_the_group_length_with_the_right_values():
    batches = {"a": _batch([3, 2]), "b": _batch([5, 1], width=6)}
    group = packing.Group({"a": torch.tensor([0, 1]), "b": torch.tensor([0])}, length=5)
    inputs, segments = packing.assemble(batches, group, pad_token_id=7)
    assert segments == [("a", 2), ("b", 1)]
    assert inputs["input_ids"].shape == (3, 5)
    assert inputs["input_ids"][0].tolist() == [1, 2, 3, 7, 7]  # padded with the pad token
    assert inputs["attention_mask"][1].tolist() == [1, 1, 0, 0, 0]
    assert inputs["labels"][1].tolist() == [1, 2, -100, -100, -100]
    assert inputs["input_ids"][2].tolist() == [1, 2, 3, 4, 5]  # b's row trimmed from 6 to 5
