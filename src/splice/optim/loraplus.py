"""LoRA+: train B at a higher learning rate than A (Hayou et al., arXiv 2402.12354).

With B starting at zero and A random, the same step size for both is inefficient when the
width is large: the paper's analysis gives B a rate λ times A's (λ = 16 is its default
suggestion, 2^4). The groups are those HF PEFT's `create_loraplus_optimizer` builds, so that
a recipe tuned there gives the same optimizer here:

    A group      everything else (A factors, other 2-d adapter tensors)     lr,            weight_decay
    embedding    adapters hosted by an embedding layer                       lr_embedding,  weight_decay
    B            "lora_B" tensors and every 1-d tensor, outside LayerNorms   lr * ratio,    weight_decay
    B, no decay  the same, inside LayerNorms or named "bias"                 lr * ratio,    0

`weight_decay` defaults to 0, as PEFT's `loraplus_weight_decay` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names

from splice.core.host import hosts


def loraplus_groups(model: nn.Module, parameters: Mapping[str, nn.Parameter] | None = None, *, lr: float,
                    lr_ratio: float = 16.0, lr_embedding: float = 1e-6,
                    weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer param groups for `parameters` (name in `model` -> tensor; default: all of the
    model's trainable ones), as PEFT's LoRA+ makes them; empty groups are left out."""
    if parameters is None:
        parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    decays = {name for name in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in name}
    on_embeddings = {id(p) for _, _, host in hosts(model) if host.info.kind == "embedding"
                     for adapter in host.values() for p in adapter.parameters()}
    groups: dict[str, list[torch.Tensor]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in parameters.items():
        if id(p) in on_embeddings:
            groups["embedding"].append(p)
        elif "lora_B" in name or p.ndim == 1:
            groups["B" if name in decays else "B_no_decay"].append(p)
        else:
            groups["A"].append(p)
    settings = {"A": (lr, weight_decay), "embedding": (lr_embedding, weight_decay),
                "B": (lr * lr_ratio, weight_decay), "B_no_decay": (lr * lr_ratio, 0.0)}
    return [{"params": ps, "lr": settings[key][0], "weight_decay": settings[key][1], "loraplus": key}
            for key, ps in groups.items() if ps]
