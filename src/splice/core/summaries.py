"""Trainable vs total parameters, per adapter and per module type, heads counted apart."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

from splice.core.api import model_state
from splice.core.heads import head_module
from splice.core.host import hosts
from splice.core.nf4_layers import weight_count
from splice.core.quantization import base_bytes, quantized_layers


@dataclass
class AdapterCount:
    name: str
    method: str
    parameters: int
    trainable: int
    active: bool
    by_module_type: dict[str, int] = field(default_factory=dict)
    modules: int = 0


@dataclass
class Summary:
    """What `splice.summary(model)` returns; `str()` gives a readable table."""

    total: int
    trainable: int
    base: int
    heads: dict[str, int]  # per module trained in full: the adapters' copies of it together
    adapters: list[AdapterCount]
    heads_trainable: dict[str, int] = field(default_factory=dict)
    base_detail: str = ""  # a 4-bit base's layers and bytes (QLoRA)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(what, parameters, trainable, detail) rows, shared by `str()` and the CLI's table."""
        rows = [("base model (frozen)", f"{self.base:,}", "0", self.base_detail)]
        for a in self.adapters:
            types = ", ".join(f"{t}: {n:,}" for t, n in sorted(a.by_module_type.items()))
            state = "active" if a.active else "inactive"
            rows.append((f"adapter {a.name} ({a.method}, {state})", f"{a.parameters:,}",
                         f"{a.trainable:,}", f"{a.modules} modules; {types}"))
        for head, n in self.heads.items():
            trained = self.heads_trainable.get(head, 0)
            detail = "trained in full (train_also)" if trained else "saved with its adapter, frozen now"
            rows.append((f"head {head}", f"{n:,}", f"{trained:,}", detail))
        rows.append(("total", f"{self.total:,}", f"{self.trainable:,}",
                     f"{self.trainable_percent:.3f}% trainable"))
        return rows

    def __str__(self) -> str:
        rows = [("", "parameters", "trainable", "")] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join(
            f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip()
            for r in rows
        )


def summary(model: nn.Module) -> Summary:
    """Count parameters: the frozen base, each adapter (by base module type), and trained heads."""
    state = model_state(model)
    counts: dict[str, AdapterCount] = {}
    adapter_ids: set[int] = set()
    for name, record in state.adapters.items():
        counts[name] = AdapterCount(name, record.config.method, 0, 0, False)
    for _, base, host in hosts(model):
        for name, adapter in host.items():
            c = counts[name]
            n = sum(p.numel() for p in adapter.parameters())
            adapter_ids.update(id(p) for p in adapter.parameters())
            c.parameters += n
            c.trainable += sum(p.numel() for p in adapter.parameters() if p.requires_grad)
            c.modules += 1
            c.active = c.active or name in host.active
            c.by_module_type[type(base).__name__] = c.by_module_type.get(type(base).__name__, 0) + n
    heads: dict[str, int] = defaultdict(int)
    heads_trainable: dict[str, int] = defaultdict(int)
    head_ids: set[int] = set()
    for name, record in state.adapters.items():
        for head in record.heads:  # each adapter's own copy; the original stays with the base
            params = [p for p in head_module(model, head, name).parameters() if id(p) not in head_ids]
            heads[head] += sum(p.numel() for p in params)
            heads_trainable[head] += sum(p.numel() for p in params if p.requires_grad)
            head_ids.update(id(p) for p in params)
    total = sum(weight_count(p) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(weight_count(p) for p in model.parameters() if id(p) not in adapter_ids | head_ids)
    return Summary(total, trainable, base, dict(heads), list(counts.values()), dict(heads_trainable),
                   _four_bit_detail(model))


def _four_bit_detail(model: nn.Module) -> str:
    """"N Linear layers in 4-bit (library): X MiB, r x bf16", or "" for a base without them."""
    layers = quantized_layers(model)
    if not layers:
        return ""
    sizes = base_bytes(model)
    libraries = ", ".join(sorted({s.backend for s in layers.values() if s is not None})) or "bitsandbytes"
    return (f"{len(layers)} Linear layers in 4-bit ({libraries}): {sizes['quantized_bytes'] / 2**20:.1f} MiB, "
            f"{sizes['quantized_bytes'] / sizes['quantized_as_bf16_bytes']:.2f}x their bf16 size")
