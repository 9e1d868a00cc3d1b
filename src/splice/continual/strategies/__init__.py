"""Continual-learning strategies, one module each, by the name a sequence file gives."""

from __future__ import annotations

from typing import Any

from splice.continual.strategies.base import Strategy, TaskContext, build
from splice.continual.strategies.condu import ConDU
from splice.continual.strategies.core import CoRe
from splice.continual.strategies.loda import LoDA
from splice.continual.strategies.olora import OLoRA
from splice.continual.strategies.separate import Separate
from splice.continual.strategies.sequential import Sequential
from splice.core.config import AdapterConfig
from splice.core.errors import ConfigError
from splice.core.validation import did_you_mean

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Sequential, Separate, OLoRA, LoDA, CoRe, ConDU)}


def make_strategy(name: str, adapter: AdapterConfig, options: dict[str, Any]) -> Strategy:
    """The strategy `name` with its options, for adapters of form `adapter`."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}{did_you_mean(name, STRATEGIES)}")
    return build(STRATEGIES[name], adapter, options)


__all__ = ["STRATEGIES", "CoRe", "ConDU", "LoDA", "OLoRA", "Separate", "Sequential", "Strategy", "TaskContext",
           "make_strategy"]
