"""Merging adapters: pure functions on adapter states (no model needed), exact where the rule is.

    from splice.merging import merge_adapters
    merged = merge_adapters(["adapter-a", "adapter-b"], method="ties", density=0.5)
    merged.save("merged")            # a PEFT LoRA directory (rank_pattern for per-module ranks)
"""

from splice.core.svd import Factors, factor_dense, factor_product
from splice.merging.emr import Unified, decouple, unify
from splice.merging.fold import fold_into_base
from splice.merging.merge import METHODS, MergeResult, base_weight, merge_adapters
from splice.merging.unified import UnifiedAdapters, load_unified, unify_adapters

__all__ = [
    "METHODS", "Factors", "MergeResult", "Unified", "UnifiedAdapters", "base_weight", "decouple", "factor_dense",
    "factor_product", "fold_into_base", "load_unified", "merge_adapters", "unify", "unify_adapters",
]
