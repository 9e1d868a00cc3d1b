"""RepConvAdapter: a multi-branch adapter beside a frozen Conv2d that folds into one conv for
inference (RepVGG's structural re-parameterisation, Ding et al., 2021, arXiv 2101.03697; the
"Lightweight" adapter of the prompt-free SAM2 dual adapters, arXiv 2605.05979).

    training:  delta(x) = BN(conv_kxk(x)) + BN(conv_1x1(x)) + BN(x)
    inference: delta(x) = W' * x + b'     (one k x k conv, the host's geometry)

The branches see the same pixels as the host, so the 1x1 and identity branches are the k x k
kernel's centre tap: they read x shifted by (padding - k // 2) and strided like the host (a
negative shift crops), which is what padding the 1x1 kernel to k x k at the centre and writing
the identity as a Dirac kernel compute. That holds for any host padding, not only "same", and
the output always has the host's spatial size. The identity branch exists only when in ==
out channels and the stride is 1; on a 1x1 host the k x k branch already is the 1x1 branch, so
there is no second one. Host kernels must be odd, so that a centre tap exists.

With a BN's running statistics (mean m, variance v) and affine (gamma, beta), a branch with
kernel W folds to W * gamma / sqrt(v + eps) and bias beta - m * gamma / sqrt(v + eps); the three
are summed. The fold uses the running statistics, so it equals the branches in eval mode,
which is when merging and `folded()` are exact (in train mode BN normalises with batch
statistics, as in RepVGG).

Zero init: every branch's BN gamma (and beta) starts at 0, so the adapter adds exactly zero in
train and eval mode and its folded kernel and bias are zero. The convolutions keep PyTorch's
default init: a gamma of 0 still gets a gradient (the normalised branch output), and once the
gammas move the conv weights train too. Zeroing the conv weights instead would feed BN a
constant, whose normalisation divides by sqrt(eps) and blows up gradients.

The folded bias merges only into a host that has a bias (`splice.merge` refuses otherwise);
`folded()` gives the single conv, bias included, for any host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from splice.core.config import Adapter, AdapterConfig
from splice.core.errors import TargetError
from splice.core.layers import LayerInfo
from splice.core.registry import register_method
from splice.methods.conv_adapter import require_conv2d


@register_method
@dataclass
class RepConvAdapter(AdapterConfig):
    """A re-parameterisable adapter on Conv2d layers; it has no hyperparameters of its own."""

    method: ClassVar[str] = "rep_conv_adapter"

    def build(self, info: LayerInfo, module_name: str, base: nn.Module) -> RepConvAdapterModule:
        require_conv2d(info, module_name, "RepConvAdapter")
        if any(k % 2 == 0 for k in info.kernel_size):
            raise TargetError(f"RepConvAdapter needs an odd kernel (a centre tap for the 1x1 and identity "
                              f"branches); {module_name!r} has kernel_size={info.kernel_size}")
        return RepConvAdapterModule(info)


def numeric_padding(info: LayerInfo) -> tuple[int, ...]:
    """The host's padding as numbers: "valid" is 0, "same" (stride 1, odd kernel) is k // 2."""
    if info.padding == "valid":
        return (0,) * info.conv_dims
    if info.padding == "same":
        return tuple(k // 2 for k in info.kernel_size)
    return tuple(info.padding)


class RepConvAdapterModule(Adapter):
    """Training-time branches (k x k conv + BN, 1x1 conv + BN, identity BN) and their fold."""

    def __init__(self, info: LayerInfo) -> None:
        super().__init__()
        self.info = info
        self.padding = numeric_padding(info)
        channels_in, channels_out, kernel = info.in_features, info.out_features, info.kernel_size
        # Padding of the 1x1 and identity branches: the centre tap's offset (negative crops).
        self.shift = tuple(p - k // 2 for p, k in zip(self.padding, kernel, strict=True))
        self.conv = nn.Conv2d(channels_in, channels_out, kernel, stride=info.stride, padding=self.padding,
                              bias=False)
        self.bn = nn.BatchNorm2d(channels_out)
        has_1x1 = kernel != (1, 1)
        has_identity = channels_in == channels_out and info.stride == (1, 1)
        self.conv_1x1 = nn.Conv2d(channels_in, channels_out, 1, stride=info.stride, bias=False) if has_1x1 else None
        self.bn_1x1 = nn.BatchNorm2d(channels_out) if has_1x1 else None
        self.bn_identity = nn.BatchNorm2d(channels_out) if has_identity else None
        for bn in self.norms():
            nn.init.zeros_(bn.weight)
            nn.init.zeros_(bn.bias)

    def norms(self) -> list[nn.BatchNorm2d]:
        return [bn for bn in (self.bn, self.bn_1x1, self.bn_identity) if bn is not None]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv.weight.dtype)
        out = self.bn(self.conv(x))
        if self.conv_1x1 is None and self.bn_identity is None:
            return out
        shifted = self._centre_tap_input(x)
        if self.conv_1x1 is not None:
            out = out + self.bn_1x1(self.conv_1x1(shifted))
        if self.bn_identity is not None:
            out = out + self.bn_identity(shifted)
        return out

    def _centre_tap_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as the k x k kernel's centre tap reads it: padded (or cropped) by `shift`."""
        shift_h, shift_w = self.shift
        if shift_h == 0 and shift_w == 0:
            return x
        return F.pad(x, (shift_w, shift_w, shift_h, shift_h))

    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kernel [out, in, kh, kw], bias [out]) of the one conv equal to the branches in eval mode."""
        weight, bias = _fuse(self.conv.weight, self.bn)
        centre_h, centre_w = (k // 2 for k in self.info.kernel_size)
        if self.conv_1x1 is not None:
            padded = F.pad(self.conv_1x1.weight, (centre_w, centre_w, centre_h, centre_h))
            w, b = _fuse(padded, self.bn_1x1)
            weight, bias = weight + w, bias + b
        if self.bn_identity is not None:
            dirac = nn.init.dirac_(torch.empty_like(self.conv.weight))
            w, b = _fuse(dirac, self.bn_identity)
            weight, bias = weight + w, bias + b
        return weight, bias

    def delta_weight(self) -> torch.Tensor:
        return self.fold()[0]

    def delta_bias(self) -> torch.Tensor:
        return self.fold()[1]

    def folded(self) -> nn.Conv2d:
        """The single conv (with bias) that computes `delta` in eval mode: the inference form."""
        weight, bias = self.fold()
        conv = nn.Conv2d(self.info.in_features, self.info.out_features, self.info.kernel_size,
                         stride=self.info.stride, padding=self.padding, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        return conv


def _fuse(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv kernel followed by BN (running statistics) as one kernel and bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale
