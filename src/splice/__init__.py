"""splice: parameter-efficient fine-tuning for any PyTorch model, HF PEFT compatible.

    import splice
    splice.attach(model, splice.LoRA(r=8, targets=["query", "value"]))
    ...train...
    splice.save(model, "my-adapter")          # loads in HF PEFT as well
"""

from splice import assets, compress, merging, placement  # compress: a callable package (PARA)
from splice.core import *  # noqa: F403
from splice.core import __all__ as _core_all
from splice.io import load, save
from splice.methods import ConvAdapter, DiaBlo, DoRA, FlexiLoRA, LoRA, LoReFT, RepConvAdapter, TTLoRA
from splice.placement import DomLoRA

__version__ = "0.1.0"
__all__ = [
    *_core_all, "ConvAdapter", "DiaBlo", "DoRA", "FlexiLoRA", "LoRA", "LoReFT", "RepConvAdapter", "TTLoRA",
    "DomLoRA", "assets", "compress", "load", "merging", "placement", "save",
]
