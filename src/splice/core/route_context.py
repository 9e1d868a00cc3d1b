"""Which `route` blocks are open, per context: what a host asks before each forward.

A context variable holds the open blocks of this context (thread, asyncio task), innermost
last, so that threads serving one shared model each route their own batches; a block removes
exactly its own entry on exit, so blocks left out of order cannot leave a stale route. A
process-wide list holds the same blocks for backward passes only: autograd may run a
checkpointed block's recomputation on its own thread (CUDA), outside the block's context. A
backward on a Python thread (on CPU, the thread that called it) looks only at the blocks that
thread opened, so another thread's open block never routes its recomputation.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from splice.core.routing import Routing


class OpenRoute:
    """One open `route` block: its routing and the hosts (and head copies) it applies to."""

    __slots__ = ("routing", "members", "thread")

    def __init__(self, routing: Routing, members: list[nn.Module]) -> None:
        self.routing, self.members = routing, frozenset(id(m) for m in members)
        self.thread = threading.get_ident()  # the thread that opened it


_OPEN: ContextVar[tuple[OpenRoute, ...]] = ContextVar("splice_open_routes", default=())
_OPEN_ANYWHERE: list[OpenRoute] = []


def routing_of(member: nn.Module) -> Routing | None:
    """The routing in force for a host (or a module's head copies) here, if any."""
    if not _OPEN_ANYWHERE:  # no block open in any context: every hosted layer of a plain forward asks
        return None
    key = id(member)
    for entry in reversed(_OPEN.get()):
        if key in entry.members:
            return entry.routing
    if torch._C._current_graph_task_id() != -1:  # a recomputation inside backward
        # autograd's own device threads are not Python threads: any open block may be theirs
        foreign = isinstance(threading.current_thread(), threading._DummyThread)
        here = threading.get_ident()
        for entry in reversed(_OPEN_ANYWHERE):
            if key in entry.members and (foreign or entry.thread == here):
                return entry.routing
    return None


def open_route(entry: OpenRoute) -> None:
    _OPEN.set((*_OPEN.get(), entry))
    _OPEN_ANYWHERE.append(entry)


def close_route(entry: OpenRoute) -> None:
    _OPEN.set(tuple(e for e in _OPEN.get() if e is not entry))
    _OPEN_ANYWHERE.remove(entry)
