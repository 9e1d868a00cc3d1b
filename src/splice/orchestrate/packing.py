"""Packing the rows of several tenants' batches into few, little-padded forward passes.

Every tenant hands in one right-padded batch per step. Concatenating them as they are pads
every row to the longest row of any tenant. Instead the step's rows are sorted by their real
length and cut into groups, each padded only to its own longest row: a new group starts when
adding the next (shorter) row would push the group's padded share above `max_padding`, or its
size above `max_rows`. Groups are forward passes whose gradients add up before the tenants'
optimizer steps, and each tenant's loss is normalised by its whole batch, so the grouping
changes which rows share a kernel call, never what a tenant learns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splice.train.data import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


@dataclass
class Group:
    """One forward pass: `rows[tenant]` are the row indices taken from that tenant's batch."""

    rows: dict[str, torch.Tensor]
    length: int

    @property
    def size(self) -> int:
        return sum(len(r) for r in self.rows.values())


@dataclass
class PaddingStats:
    """Token slots computed and real tokens among them, naive concatenation vs packed groups."""

    real: int = 0
    naive_slots: int = 0
    packed_slots: int = 0
    forwards: int = 0
    steps: int = 0

    @property
    def naive_share(self) -> float:
        return 1 - self.real / self.naive_slots if self.naive_slots else 0.0

    @property
    def packed_share(self) -> float:
        return 1 - self.real / self.packed_slots if self.packed_slots else 0.0

    def to_dict(self) -> dict[str, float]:
        return {"padded_share_naive": self.naive_share, "padded_share_packed": self.packed_share,
                "real_tokens": self.real, "forwards": self.forwards, "steps": self.steps}


def plan(batches: dict[str, Batch], max_rows: int | None, max_padding: float) -> list[Group]:
    """Groups of rows for one step, longest rows first (see the module docstring)."""
    lengths = {name: _lengths(batch) for name, batch in batches.items()}
    rows = sorted(((int(n), name, i) for name, ls in lengths.items() for i, n in enumerate(ls.tolist())),
                  key=lambda r: -r[0])
    groups: list[list[tuple[int, str, int]]] = []
    for row in rows:
        current = groups[-1] if groups else None
        if current is not None and _fits(current, row, max_rows, max_padding):
            current.append(row)
        else:
            groups.append([row])
    out = []
    for members in groups:
        by_tenant: dict[str, list[int]] = {}
        for _, name, i in members:
            by_tenant.setdefault(name, []).append(i)
        out.append(Group({n: torch.tensor(sorted(ix)) for n, ix in by_tenant.items()}, members[0][0]))
    return out


def _fits(group: list[tuple[int, str, int]], row: tuple[int, str, int], max_rows: int | None,
          max_padding: float) -> bool:
    if max_rows is not None and len(group) >= max_rows:
        return False
    slots = group[0][0] * (len(group) + 1)
    real = sum(r[0] for r in group) + row[0]
    return 1 - real / slots <= max_padding


def _lengths(batch: Batch) -> torch.Tensor:
    return batch["attention_mask"].sum(-1)


def assemble(batches: dict[str, Batch], group: Group, pad_token_id: int) -> tuple[Batch, list[tuple[str, int]]]:
    """The group's rows as one batch (tenant after tenant), and (tenant, row count) segments."""
    parts: dict[str, list[torch.Tensor]] = {}
    segments = []
    for name, rows in group.rows.items():
        batch = batches[name]
        for key, value in batch.items():
            picked = value.index_select(0, rows.to(value.device))
            if picked.dim() == 2:
                picked = _fit_length(picked, group.length, _pad_value(key, pad_token_id))
            parts.setdefault(key, []).append(picked)
        segments.append((name, len(rows)))
    return {key: torch.cat(values) for key, values in parts.items()}, segments


def _fit_length(t: torch.Tensor, length: int, pad: int) -> torch.Tensor:
    if t.shape[1] >= length:
        return t[:, :length]
    return torch.cat([t, t.new_full((t.shape[0], length - t.shape[1]), pad)], dim=1)


def _pad_value(key: str, pad_token_id: int) -> int:
    return {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)


def record(stats: PaddingStats, batches: dict[str, Batch], groups: list[Group]) -> None:
    """Add one step's slot counts: naive = every row padded to the step's longest batch."""
    real = sum(int(_lengths(b).sum()) for b in batches.values())
    longest = max(b["attention_mask"].shape[1] for b in batches.values())
    stats.real += real
    stats.naive_slots += sum(b["attention_mask"].shape[0] for b in batches.values()) * longest
    stats.packed_slots += sum(g.size * g.length for g in groups)
    stats.forwards += len(groups)
    stats.steps += 1
