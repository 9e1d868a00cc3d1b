"""Several task adapters kept as one: EMR / ConDU's unified change plus a mask and a scale per
task (`splice.merging.emr`), on the adapters' true weight changes (bias as an extra column).

Storage is one dense change per module, one bit per entry and task, and one number per task;
`decouple(i)` rebuilds task i's adapter as low-rank factors: exact at its numerical rank
(the default), or truncated to `rank`. A DoRA task is unified through its true change
(`base` needed) and comes back as a LoRA with that change.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from splice.core.adapter_state import AdapterState, ModuleUpdate
from splice.core.errors import AdapterFileError, SpliceError
from splice.core.svd import factor_dense
from splice.io.adapter_states import AdapterSource, adapter_state
from splice.io.files import atomic_directory, write_json, write_tensors
from splice.merging.emr import Unified, decouple, unify
from splice.merging.merge import BaseWeights, base_weight, check_inputs, label_of

FORMAT = "splice-unified"
FORMAT_VERSION = 1
TENSORS_NAME = "unified.safetensors"
CONFIG_NAME = "unified.json"


@dataclass
class Layout:
    """What a module's update looks like, to rebuild factors of the same layout."""

    kind: str
    A_shape: list[int]
    B_shape: list[int]
    dtype: str
    has_bias: bool

    def template(self) -> ModuleUpdate:
        dtype = getattr(torch, self.dtype)
        return ModuleUpdate(torch.zeros(self.A_shape, dtype=dtype), torch.zeros(self.B_shape, dtype=dtype), 1.0,
                            self.kind)


@dataclass
class UnifiedAdapters:
    """The unified changes, per-task masks and scales, and each task's own metadata and heads."""

    unified: Unified
    layouts: dict[str, Layout]
    tasks: list[AdapterState]  # metadata and heads only (no modules)

    def decouple(self, task: int, rank: int | None = None) -> AdapterState:
        """Task `task`'s adapter, λ_i · M_i ⊙ τ_U as factors (exact at numerical rank)."""
        changes = decouple(self.unified, task)
        modules = {}
        for name, layout in self.layouts.items():
            change = changes[name]
            if not torch.any(change):
                continue
            bias = change[:, -1] if layout.has_bias else None
            factors = factor_dense(change[:, :-1] if layout.has_bias else change, rank)
            modules[name] = layout.template().from_matrix_factors(factors.B, factors.A, bias=bias)
        if not modules:
            raise SpliceError(f"task {task} has nothing left after unifying (its mask is empty)")
        return self.tasks[task].like(modules=modules, rslora=False)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the folder `load_unified` reads, whole or not at all (`io.files.atomic_directory`);
        a non-empty `path` is refused unless `overwrite`."""
        tensors = {f"vector.{n}": v for n, v in self.unified.vector.items()}
        for i, masks in enumerate(self.unified.masks):
            tensors |= {f"mask.{i}.{n}": m for n, m in masks.items()}
            tensors |= {f"head.{i}.{k}": v for k, v in self.tasks[i].head_tensors.items()}
        meta = [_file_meta(t) for t in self.tasks]
        with atomic_directory(path, overwrite) as folder:
            write_tensors(folder / TENSORS_NAME, {k: v.contiguous() for k, v in tensors.items()})
            write_json(folder / CONFIG_NAME, {
                "format": FORMAT, "format_version": FORMAT_VERSION, "scales": self.unified.scales,
                "layouts": {n: asdict(layout) for n, layout in self.layouts.items()}, "tasks": meta,
            })
        return Path(path)


def unify_adapters(adapters: Sequence[AdapterState | AdapterSource], base: BaseWeights = None) -> UnifiedAdapters:
    """Unify task adapters (states, directories or models) into one change plus masks and scales."""
    adapters = list(adapters)
    states = [a if isinstance(a, AdapterState) else adapter_state(a) for a in adapters]
    check_inputs(states, [label_of(a, i) for i, a in enumerate(adapters)])
    layouts: dict[str, Layout] = {}
    task_vectors: list[dict[str, torch.Tensor]] = [{} for _ in states]
    for name in dict.fromkeys(n for s in states for n in s.modules):
        present = [s.modules[name] for s in states if name in s.modules]
        has_bias = any(u.bias is not None for u in present)
        first = present[0]
        layouts[name] = Layout(first.kind, list(first.A.shape), list(first.B.shape),
                               str(first.A.dtype).removeprefix("torch."), has_bias)
        for i, state in enumerate(states):
            update = state.modules.get(name)
            if update is None:
                continue
            weight = base_weight(base, name) if update.magnitude is not None else None
            change = update.effective_matrix(weight)
            if has_bias:
                bias = update.scaled_bias()
                change = torch.cat([change, (torch.zeros(change.shape[0], dtype=change.dtype) if bias is None
                                             else bias)[:, None]], dim=1)
            task_vectors[i][name] = change
    tasks = [s.like(modules={}) for s in states]
    return UnifiedAdapters(unify(task_vectors), layouts, tasks)


def load_unified(path: str | Path) -> UnifiedAdapters:
    """Read what `UnifiedAdapters.save` wrote; a foreign or damaged folder is refused with the reason."""
    path = Path(path)
    config_file, tensor_file = path / CONFIG_NAME, path / TENSORS_NAME
    if not config_file.is_file() or not tensor_file.is_file():
        raise AdapterFileError(f"{path} is not a unified adapter folder (needs {CONFIG_NAME} and {TENSORS_NAME})")
    try:
        config = json.loads(config_file.read_text())
        tensors = load_file(str(tensor_file))
    except Exception as err:
        raise AdapterFileError(f"{path} is corrupt: {err}") from None
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{config_file} is not a splice unified adapter of version {FORMAT_VERSION}")
    try:
        layouts = {n: Layout(**layout) for n, layout in config["layouts"].items()}
        count = len(config["scales"])
        masks = [{n: tensors[f"mask.{i}.{n}"] for n in layouts} for i in range(count)]
        unified = Unified({n: tensors[f"vector.{n}"] for n in layouts}, masks, list(config["scales"]))
        tasks = []
        for i, meta in enumerate(config["tasks"]):
            prefix = f"head.{i}."
            heads = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            meta = {("heads" if k == HEADS_KEY else k): v for k, v in meta.items()}
            tasks.append(AdapterState(modules={}, head_tensors=heads, **meta))
    except (KeyError, TypeError) as err:
        raise AdapterFileError(f"{path} does not match its {CONFIG_NAME}: missing or unexpected {err}") from None
    return UnifiedAdapters(unified, layouts, tasks)


# The key under which unified.json lists each task's heads by name (written since format 1).
HEADS_KEY = "head_modules"


def _file_meta(task: AdapterState) -> dict[str, Any]:
    """A task's metadata as unified.json records it: no tensors, heads by name under HEADS_KEY."""
    meta = {k: v for k, v in asdict(task).items() if k not in ("modules", "head_tensors", "heads")}
    return {**meta, HEADS_KEY: list(task.heads)}
