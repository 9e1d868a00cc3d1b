"""Federated methods: each one file whose class overrides the hooks of `FederatedMethod` that its
paper changes; `make_method` builds the one a config names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from splice.federated.methods.base import FederatedMethod
from splice.federated.methods.dual import DualLoRA
from splice.federated.methods.fedeu import FedEU
from splice.federated.methods.fstq import FedFSTQ
from splice.federated.methods.prism import PRISM

if TYPE_CHECKING:
    from splice.federated.config import FederatedConfig

METHODS: dict[str, type[FederatedMethod]] = {cls.name: cls for cls in (FederatedMethod, DualLoRA, FedEU, FedFSTQ,
                                                                        PRISM)}


def make_method(config: FederatedConfig) -> FederatedMethod:
    """The method `config.method` names, with `config.options` checked."""
    return METHODS[config.method](config)


__all__ = ["METHODS", "DualLoRA", "FedEU", "FedFSTQ", "FederatedMethod", "PRISM", "make_method"]
