"""The only code every method depends on: targets, hosts, the registry and the verbs."""

from splice.core.api import (
    activate,
    active_adapters,
    adapters,
    attach,
    auxiliary_loss,
    deactivate,
    detach,
    disabled,
    freeze,
    merge,
    trainable_parameters,
    unload,
    unmerge,
)
from splice.core.config import Adapter, AdapterConfig
from splice.core.errors import (
    AdapterFileError,
    ConfigError,
    DataError,
    IncompatibleAdaptersError,
    MergeError,
    OutputExistsError,
    ShapeMismatchError,
    SpliceError,
    TargetError,
)
from splice.core.lowrank import LowRank
from splice.core.quantize import base_bytes, dequantize, quantize, quantized_layers
from splice.core.registry import config_from_dict, method_names, register_method
from splice.core.routing import route
from splice.core.summary import Summary, summary
from splice.core.targets import resolve_targets

__all__ = [
    "Adapter", "AdapterConfig", "AdapterFileError", "ConfigError", "DataError", "IncompatibleAdaptersError",
    "MergeError", "OutputExistsError",
    "ShapeMismatchError", "SpliceError", "Summary", "TargetError", "activate", "active_adapters", "auxiliary_loss",
    "LowRank", "adapters", "attach", "base_bytes", "config_from_dict", "deactivate", "dequantize", "detach", "disabled",
    "freeze", "merge", "quantize", "quantized_layers",
    "method_names", "register_method", "resolve_targets", "route", "summary", "trainable_parameters",
    "unload", "unmerge",
]
