"""Optimizers for adapters: LoFT (AdamW whose factor steps move BA as AdamW moves W) and LoRA+
(a higher learning rate for B than for A, with HF PEFT's parameter groups)."""

from splice.optim.loft import FactorPair, LoFT, factor_pairs, optimizer_state_bytes
from splice.optim.loraplus import loraplus_groups

__all__ = ["FactorPair", "LoFT", "factor_pairs", "loraplus_groups", "optimizer_state_bytes"]
