"""The only code every method depends on: targets, hosts, the registry and the verbs.

Names are imported on first use (`splice._lazy`): the CLI's light modules import
`splice.core.errors` without loading torch."""

from splice._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["activate", "active_adapters", "adapters", "attach", "auxiliary_loss", "deactivate", "detach",
                     "disabled", "freeze", "merge", "trainable_parameters", "unload", "unmerge"], "api"),
    **dict.fromkeys(["Adapter", "AdapterConfig"], "config"),
    **dict.fromkeys(["AdapterFileError", "ConfigError", "DataError", "IncompatibleAdaptersError", "MergeError",
                     "OutputExistsError", "ShapeMismatchError", "SpliceError", "TargetError"], "errors"),
    "LowRank": "lowrank",
    **dict.fromkeys(["base_bytes", "dequantize", "quantize", "quantized_layers"], "quantization"),
    **dict.fromkeys(["config_from_dict", "method_names", "register_method"], "registry"),
    "route": "routing",
    **dict.fromkeys(["Summary", "summary"], "summaries"),
    "resolve_targets": "targets",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
