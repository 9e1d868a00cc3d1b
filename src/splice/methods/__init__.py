"""Adapter forms, one file each. Importing this package registers them with the core."""

from splice.methods.conv_adapter import ConvAdapter
from splice.methods.diablo import DiaBlo
from splice.methods.dora import DoRA
from splice.methods.flexilora import FlexiLoRA
from splice.methods.lora import LoRA
from splice.methods.loreft import LoReFT
from splice.methods.rep_conv_adapter import RepConvAdapter
from splice.methods.ttlora import TTLoRA

__all__ = ["ConvAdapter", "DiaBlo", "DoRA", "FlexiLoRA", "LoRA", "LoReFT", "RepConvAdapter", "TTLoRA"]
