"""splice: parameter-efficient fine-tuning for any PyTorch model, HF PEFT compatible.

    import splice
    splice.attach(model, splice.LoRA(r=8, targets=["query", "value"]))
    ...train...
    splice.save(model, "my-adapter")          # loads in HF PEFT as well
"""

from splice import _library_logs, assets, audit, compression, merging, placement, robust  # noqa: F401  (_library_logs first: its docstring)
from splice.compression import compress
from splice.core import *  # noqa: F403
from splice.core import __all__ as _core_all
from splice.io import load, save
from splice.methods import *  # noqa: F403  (every method's config class: splice.LoRA, splice.DoRA, ...)
from splice.methods import __all__ as _methods_all
from splice.placement import DomLoRA

__version__ = "0.1.0"
__all__ = [
    *_core_all, *_methods_all, "DomLoRA", "assets", "audit", "compress", "compression", "load", "merging", "placement",
    "robust", "save",
]
