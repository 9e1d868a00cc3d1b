"""Adapter forms, one file each. Importing this package registers them with the core.

`__all__` lists every form's config class; `splice/__init__` re-exports it, so a new method is
its file, its import and `__all__` entry here, and its own tests (tests/contract checks the rest).
"""

from splice.methods.conv_adapter import ConvAdapter
from splice.methods.diablo import DiaBlo
from splice.methods.dora import DoRA
from splice.methods.flexilora import FlexiLoRA
from splice.methods.lora import LoRA
from splice.methods.loreft import LoReFT
from splice.methods.loretta import LoRETTA
from splice.methods.moelora import MoELoRA
from splice.methods.rep_conv_adapter import RepConvAdapter
from splice.methods.tinylora import TinyLoRA
from splice.methods.ttlora import TTLoRA

__all__ = ["ConvAdapter", "DiaBlo", "DoRA", "FlexiLoRA", "LoRA", "LoReFT", "LoRETTA", "MoELoRA", "RepConvAdapter",
           "TTLoRA", "TinyLoRA"]
