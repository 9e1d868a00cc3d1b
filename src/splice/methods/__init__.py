"""Adapter forms, one file each. Importing this package registers them with the core."""

from splice.methods.lora import LoRA

__all__ = ["LoRA"]
