"""splice: parameter-efficient fine-tuning for any PyTorch model, HF PEFT compatible.

    import splice
    splice.attach(model, splice.LoRA(r=8, targets=["query", "value"]))
    ...train...
    splice.save(model, "my-adapter")          # loads in HF PEFT as well

The public names load on first use (PEP 562): `import splice` and the light modules the `splice`
command's `--help` needs do not import torch and transformers; the first `splice.<name>` imports
them all, as `import splice` used to.
"""

from __future__ import annotations

from typing import Any

from splice import _library_logs  # noqa: F401  (its filters must be installed before transformers loads)
from splice._lazy import submodule

__version__ = "0.1.0"


def _public_names() -> dict[str, Any]:
    """`splice.<name>` for every public name: the core's verbs, every method's config class, and the
    packages and functions users reach from the top."""
    from splice import assets, audit, compression, core, merging, methods, placement, robust
    from splice.io import load, save

    return {
        **{name: getattr(core, name) for name in core.__all__},
        **{name: getattr(methods, name) for name in methods.__all__},
        "DomLoRA": placement.DomLoRA, "assets": assets, "audit": audit, "compress": compression.compress,
        "compression": compression, "load": load, "merging": merging, "placement": placement, "robust": robust,
        "save": save,
    }


def __getattr__(name: str) -> Any:
    if (name.startswith("__") and name != "__all__") or "." in name:
        raise AttributeError(f"module 'splice' has no attribute {name!r}")
    module = submodule("splice", name)
    if module is not None:
        return module  # a subpackage, alone: `splice.train`, ...
    names = _public_names()
    globals().update(names, __all__=sorted(names))
    if name not in globals():
        raise AttributeError(f"module 'splice' has no attribute {name!r}")
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__getattr__("__all__")})
