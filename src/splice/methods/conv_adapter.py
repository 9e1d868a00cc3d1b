"""Conv-Adapter: a small bottleneck of convolutions beside a frozen Conv2d (after Chen et al.,
2022, arXiv 2208.07463).

    h = conv(x) + alpha * up(act(mid(down(x))))
    down: 1x1, in -> w       mid: k x k with the host's kernel, stride and padding, w -> w
    up:   1x1, w -> out      w = max(1, out // reduction)

A LoRA on a conv is linear; this adapter puts a non-linearity and a spatial (by default
depthwise) filter inside the bottleneck, which is what lets it re-shape the features of a
frozen ConvNet for a new domain at a few percent of the conv's parameters. `mid` repeats the
host's geometry, so the adapter's output has the host's spatial size for any kernel, stride and
padding. `up` starts at zero, so the model is unchanged at step 0. The form is non-linear and
has no equivalent weight change, so it cannot be merged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from splice.core.config import Adapter, AdapterConfig
from splice.core.errors import SpliceError, TargetError
from splice.core.layers import LayerInfo
from splice.core.registry import register_method

Activation = Literal["gelu", "relu", "silu"]
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@register_method
@dataclass
class ConvAdapter(AdapterConfig):
    """Hyperparameters of a Conv-Adapter on Conv2d layers.

    Attributes:
        reduction: bottleneck width is the host's out_channels // reduction (at least 1).
        depthwise: whether the k x k bottleneck conv is depthwise (w * k * k weights) or full
            (w * w * k * k); the paper builds its bottleneck from depthwise-separable convs.
        activation: "gelu", "relu" or "silu", between the k x k conv and the up-projection.
        alpha: fixed scale of the adapter's output (Conv-Adapter's scaling factor).
    """

    method: ClassVar[str] = "conv_adapter"
    reduction: int = 4
    depthwise: bool = True
    activation: Activation = "gelu"
    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reduction < 1:
            raise SpliceError(f"ConvAdapter reduction must be >= 1, got {self.reduction}")
        if self.activation not in ACTIVATIONS:
            raise SpliceError(f"ConvAdapter activation must be one of {sorted(ACTIVATIONS)}, "
                              f"got {self.activation!r}")
        if not math.isfinite(self.alpha):
            raise SpliceError(f"ConvAdapter alpha must be finite, got {self.alpha}")

    def build(self, info: LayerInfo, module_name: str, base: nn.Module) -> ConvAdapterModule:
        require_conv2d(info, module_name, "ConvAdapter")
        width = max(1, info.out_features // self.reduction)
        return ConvAdapterModule(info, width, self.depthwise, self.activation, self.alpha)


def require_conv2d(info: LayerInfo, module_name: str, method: str) -> None:
    if info.kind != "conv" or info.conv_dims != 2:
        what = f"Conv{info.conv_dims}d" if info.kind == "conv" else info.kind
        raise TargetError(f"{method} needs an nn.Conv2d host; {module_name!r} is a {what} layer")


class ConvAdapterModule(Adapter):
    """delta(x) = alpha * up(act(mid(down(x)))), with `up` zero at init."""

    def __init__(self, info: LayerInfo, width: int, depthwise: bool, activation: Activation,
                 alpha: float) -> None:
        super().__init__()
        self.info, self.activation, self.alpha = info, activation, alpha
        self.down = nn.Conv2d(info.in_features, width, 1)
        self.mid = nn.Conv2d(width, width, info.kernel_size, stride=info.stride, padding=info.padding,
                             groups=width if depthwise else 1)
        self.up = nn.Conv2d(width, info.out_features, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        hidden = ACTIVATIONS[self.activation](self.mid(self.down(x.to(self.down.weight.dtype))))
        return self.up(hidden) * self.alpha
