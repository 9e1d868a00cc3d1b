"""Mixed-adapter batches: every row of a batch goes through its own adapter, or none.

    with splice.route(model, ["alice", "bob", None, "alice"]):
        logits = model(**batch).logits          # row 2 is the base model's output
        tokens = model.generate(**batch)        # ids follow rows through beam search

Each host computes the base output once for the whole batch. Adapters of LoRA's shape (any
form whose `low_rank_factors()` exists) on Linear hosts are then applied in one grouped
operation, Punica's BGMV idea: each row's adapter factors are gathered into one stack (ranks
zero-padded to the largest, scaling folded into B, zeros for rows without an adapter) and
applied with two batched matmuls, so the cost does not grow with the number of adapters and no
row is copied out of the batch. Without autograd the stacks are built once per `route` block
and host and reused by every forward (every decoding step) while the adapters are unchanged.
Other forms and hosts run the reference path, one `delta` per adapter on the rows
`index_select` picks; `grouped=False` forces it everywhere, which is how the grouped path is
tested.

Rows: the leading dimension of a hosted layer's input must be a multiple of the number of ids;
each id then covers that many consecutive entries. This is what beam search and
`num_return_sequences` produce (`repeat_interleave` of the prompts) and what a layer sees when
a model folds batch and sequence together, so both route correctly.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from splice.core.config import Adapter, adapter_delta
from splice.core.errors import MergeError, SpliceError
from splice.core.heads import all_head_copies
from splice.core.host import hosts
from splice.core.inputs import routed_rows
from splice.core.lowrank import LowRank
from splice.core.model_state import model_state
from splice.core.route_context import OpenRoute, close_route, open_route

if TYPE_CHECKING:
    from splice.core.host import Host

_VERSION = operator.attrgetter("_version")
TOKENS_FOR_TRANSPOSED = 12  # see _add_gathered
_POINTER = torch.Tensor.data_ptr


class Routing:
    """The adapter of every row of one batch, and what the hosts derived from it (cached)."""

    def __init__(self, adapter_ids: Sequence[str | None], grouped: bool = True) -> None:
        self.ids = list(adapter_ids)
        self.grouped = grouped
        self.names = list(dict.fromkeys(i for i in self.ids if i is not None))
        self.everywhere = len(self.names) == 1 and None not in self.ids
        self._rows: dict[tuple[tuple[str | None, ...], int, torch.device], torch.Tensor] = {}
        self._plans: dict[int, _Plan] = {}

    def add_to(self, host: Host, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Host output for a routed batch: base + each row's own adapter (minus nothing else)."""
        repeat = self.repeat(x)
        if self.grouped and host.info.kind == "linear" and not torch.is_grad_enabled():
            fused = self._add_fused(host, x, output)
            if fused is not None:
                return fused
        used = [name for name in self.names if name in host]
        base_output = output
        output = host.give_back(x, output, host.unmerged())  # on every row; the routed ones take it out again
        if not used:
            return output
        if self.everywhere:  # one adapter on every row: exactly its forward as the active adapter
            return output + self._own_delta(host[used[0]], x, base_output).to(output.dtype)
        if self.grouped and host.info.kind == "linear":
            factors = [host[name].low_rank_factors() for name in used]
            if all(f is not None for f in factors):
                return self._grouped(host, used, factors, x, output)
        for name in used:
            rows = self._row_index(name, repeat, x.device)
            base_rows = base_output.index_select(0, rows) if host[name].uses_base_output else base_output
            with routed_rows(rows):
                delta = self._own_delta(host[name], x.index_select(0, rows), base_rows)
            output = output.index_add(0, rows, delta.to(output.dtype))
        return output

    def _add_fused(self, host: Host, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        """Without autograd on a Linear host: the host's cached plan (`_inference_plan`) applied,
        or for one adapter on every row the host's in-place path; None (output untouched) where
        neither applies: a form without low-rank factors, or dropout in training mode."""
        plan = self._inference_plan(host, x)
        if plan.A_rows is not None:
            return None if plan.dropout > 0 and self._training(host) else plan.apply(host, x, output)
        if self.everywhere and plan.used and host.add_in_place(x, output, plan.used):
            return host.give_back(x, output, plan.restorers)
        return None

    @staticmethod
    def _own_delta(adapter: Adapter, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        """The adapter's delta minus what it took out of the base (added back for all rows)."""
        delta = adapter_delta(adapter, x, base_output)
        restore = adapter.initial_delta(x)
        return delta if restore is None else delta - restore

    def repeat(self, x: torch.Tensor) -> int:
        """How many consecutive entries of a layer's leading dimension each id covers."""
        rows = x.shape[0] if x.dim() else 0
        if rows % len(self.ids):
            raise SpliceError(
                f"route() was given {len(self.ids)} adapter ids but a hosted layer sees a batch of {rows} "
                "rows; give one id per example (the batch must be the leading dimension)"
            )
        return rows // len(self.ids)

    def _row_index(self, name: str, repeat: int, device: torch.device) -> torch.Tensor:
        return self.rows_of([name], repeat, device)

    def rows_of(self, ids: list[str | None], repeat: int, device: torch.device) -> torch.Tensor:
        """Indices of the leading-dimension entries routed to any of `ids` (None: the base model)."""
        key = (tuple(ids), repeat, device)
        if key not in self._rows:
            rows = torch.tensor([i for i, n in enumerate(self.ids) if n in ids], device=device, dtype=torch.long)
            offsets = torch.arange(repeat, device=device)
            self._rows[key] = (rows[:, None] * repeat + offsets).flatten()
        return self._rows[key]

    def _inference_plan(self, host: Host, x: torch.Tensor) -> _Plan:
        """The host's gathered factors for this routing, built once and kept while they are current.

        Decoding calls every host once per token with the same routing, and the rows' adapters
        do not change between steps (beam search reorders beams within each prompt's rows, which
        share the prompt's adapter), so the stacks are gathered once per `route` block and host.
        `_Plan.current` rebuilds them when an adapter tensor changes: in place (an optimizer
        step, a `torch.no_grad` edit, `load`), by a new storage (`module.to`) or a new object.
        """
        plan = self._plans.get(id(host))
        if plan is None or not plan.current(host):
            plan = self._plans[id(host)] = _Plan(self, host, x)
        return plan

    def _grouped(self, host: Host, used: list[str], factors: list[LowRank], x: torch.Tensor,
                 output: torch.Tensor) -> torch.Tensor:
        A_rows, B_rows = gathered(self.ids, used, factors)
        x = x.to(A_rows.dtype).reshape(len(self.ids), -1, x.shape[-1])
        if self._training(host) and any(f.dropout > 0 for f in factors):
            dropout = {name: f.dropout for name, f in zip(used, factors, strict=True)}
            keep = torch.tensor([1 - dropout.get(i, 0.0) for i in self.ids], device=x.device, dtype=x.dtype)
            keep = keep[:, None, None]
            x = x * torch.bernoulli(keep.expand_as(x)) / keep
        return _add_gathered(x, output, A_rows, B_rows)

    @staticmethod
    def _training(host: Host) -> bool:
        return any(adapter.training for adapter in host.values())


def gathered(ids: list[str | None], used: list[str], factors: list[LowRank]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every id's adapter factors in its row: A as [ids, r_max, in] and s * B^T as [ids, r_max, out]
    (ranks zero-padded to the largest); an id whose adapter is not among `used` gets zeros.

    One stack a factor, straight from the adapters' tensors (autograd reaches them through it), and
    the scalings as one multiplication by a per-row vector: a `route` block builds this once per
    host, and for 16 adapters it took a third of the time of stacking them first, scaling each B
    and gathering rows after.
    """
    r_max = max(f.A.shape[0] for f in factors)
    A_of = {name: _pad_rows(f.A, r_max) for name, f in zip(used, factors, strict=True)}
    B_of = {name: _pad_rows(f.B.T, r_max) for name, f in zip(used, factors, strict=True)}
    scaling = {name: f.scaling for name, f in zip(used, factors, strict=True)}
    first = factors[0]
    no_A, no_B = first.A.new_zeros(r_max, first.A.shape[1]), first.B.new_zeros(r_max, first.B.shape[0])
    A = torch.stack([A_of.get(i, no_A) for i in ids])
    B = torch.stack([B_of.get(i, no_B) for i in ids])
    scales = torch.tensor([scaling.get(i, 0.0) for i in ids], dtype=B.dtype, device=B.device)
    return A, B * scales[:, None, None]


class _Plan:
    """What a host needs to add a routed batch's deltas without gradients, and what it was built from.

    `A_rows` [ids, r, in] and `B_rows` [ids, r, out] are the gathered factors of every id's adapter
    (None where some routed adapter has no low-rank form, or one adapter serves every row);
    `dropout` is the largest of the adapters' (a plan applies none, so a host in training mode
    with dropout > 0 does not use it); `restorers` are the unmerged adapters that took part of
    the base weight at init (PiSSA), whose part goes back on every row. The rest is the state
    it was built from, which `current` compares cheaply: per token and host this check is what
    decoding pays instead of rebuilding.
    """

    def __init__(self, routing: Routing, host: Host, x: torch.Tensor) -> None:
        self.merged, self.adapters = list(host.merged), dict(host.items())
        modules = [module for adapter in host.values()
                   for module in (adapter.modules() if adapter._modules else (adapter,))]
        watched = [(owner, key, t) for module in modules for owner in (module._parameters, module._buffers)
                   for key, t in owner.items() if t is not None]
        self.owners = [owner for owner, _, _ in watched]
        self.keys = [key for _, key, _ in watched]
        self.tensors = [t for _, _, t in watched]
        self.versions, self.pointers = list(map(_VERSION, self.tensors)), list(map(_POINTER, self.tensors))
        self.restorers = [name for name in host.unmerged() if host[name].initial_delta(x) is not None]
        self.used = [name for name in routing.names if name in host]
        factors = [host[name].low_rank_factors() for name in self.used]
        self.A_rows = self.B_rows = None
        self.dropout = 0.0
        if self.used and not routing.everywhere and all(f is not None for f in factors):
            self.A_rows, self.B_rows = gathered(routing.ids, self.used, factors)
            self.dropout = max(f.dropout for f in factors)

    def current(self, host: Host) -> bool:
        """Whether the host still holds the same adapters, unmerged as then, with the same tensors:
        the same objects, version counters (in-place changes) and storages (`.data` swaps such as
        `module.to`, which also catch a move to another device)."""
        # map() over C functions: about 0.1 us a tensor, where a Python loop took 0.4 us
        return (host.merged == self.merged and host._modules == self.adapters
                and list(map(_VERSION, self.tensors)) == self.versions
                and list(map(_POINTER, self.tensors)) == self.pointers
                and all(map(operator.is_, map(dict.get, self.owners, self.keys), self.tensors)))

    def apply(self, host: Host, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if self.restorers:
            output = host.give_back(x, output, self.restorers)
        if x.dtype != self.A_rows.dtype:
            x = x.to(self.A_rows.dtype)
        return _add_gathered(x.reshape(self.A_rows.shape[0], -1, x.shape[-1]), output, self.A_rows, self.B_rows)


def _add_gathered(x: torch.Tensor, output: torch.Tensor, A_rows: torch.Tensor, B_rows: torch.Tensor) -> torch.Tensor:
    """output + per-row x A_i^T (s B_i^T), x as [rows, tokens, in], A_rows [rows, r, in], B_rows
    [rows, r, out]; in place when no graph is built.

    From TOKENS_FOR_TRANSPOSED tokens a row the first product runs as (A_i x_i^T)^T: MKL's
    batched GEMM takes 0.6-0.8x the time that way at 16-48 tokens a row (a mixed batch, a
    prefill), and up to 1.5x below 12 (a decoding step: one token), where x A_i^T is kept.
    """
    if x.shape[1] >= TOKENS_FOR_TRANSPOSED:
        hidden = torch.bmm(A_rows, x.transpose(1, 2)).transpose(1, 2)
    else:
        hidden = torch.bmm(x, A_rows.transpose(1, 2))
    out = output.reshape(A_rows.shape[0], -1, output.shape[-1])
    if out.dtype != hidden.dtype:
        return output + torch.bmm(hidden, B_rows).to(output.dtype).view(output.shape)
    if torch.is_grad_enabled():
        return torch.baddbmm(out, hidden, B_rows).view(output.shape)
    return out.baddbmm_(hidden, B_rows).view(output.shape)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


@contextmanager
def route(model: nn.Module, adapter_ids: Sequence[str | None], *, grouped: bool = True) -> Iterator[Routing]:
    """Within the block, row i of every batch goes through adapter `adapter_ids[i]` (None: base).

    Routing overrides which adapters are active; gradients reach every routed adapter that is
    trainable (`activate` them all to train several at once). Modules that adapters train in
    full (heads) are routed too: each row goes through its own adapter's head, rows of adapters
    without one (and None rows) through the original module. Merged adapters cannot be routed
    per row, so merging first is refused. `grouped=False` uses the reference path.

    The routing holds in the current context only (thread or asyncio task): several threads may
    route batches through one shared model at once. With activation checkpointing, call
    `backward()` inside the block: the recomputed forward must see the same routing (two
    threads that both train through checkpointed routes on one model are not supported).
    """
    if not len(adapter_ids):
        raise SpliceError("route() needs one adapter id (or None) per row; got an empty list")
    known = model_state(model).adapters
    unknown = sorted({i for i in adapter_ids if i is not None and i not in known})
    if unknown:
        raise SpliceError(f"route(): no adapter named {unknown}; attached: {list(known)}")
    all_hosts = [host for _, _, host in hosts(model)]
    merged = sorted({n for host in all_hosts for n in host.merged})
    if merged:
        raise MergeError(f"adapters {merged} are merged into the weights, so rows cannot be routed; unmerge first")
    routing = Routing(adapter_ids, grouped)
    entry = OpenRoute(routing, [*all_hosts, *all_head_copies(model)])
    open_route(entry)
    try:
        yield routing
    finally:
        close_route(entry)
