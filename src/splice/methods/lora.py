"""LoRA: a trainable low-rank change of a frozen weight (Hu et al., 2021, arXiv 2106.09685).

    h = W x + s * B A x,    A: [r, in],  B: [out, r],  s = alpha / r  (alpha / sqrt(r): rsLoRA;
                                                          alpha * sqrt(N / r): SFed-LoRA, N clients)

B starts at zero, so the model is unchanged at step 0 and only the product BA ever matters.
The same form is hosted by Linear layers, transformers' Conv1D (fan-in/fan-out weights),
convolutions (A is a conv with the base kernel, B a 1x1 conv) and embeddings (A is looked up
by token id), with HF PEFT's parameter shapes so adapters move between the two libraries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from splice.core.config import Adapter, AdapterConfig
from splice.core.errors import MergeError, SpliceError
from splice.core.host import hosts
from splice.core.layers import LayerInfo
from splice.core.lowrank import LowRank, LowRankForward, low_rank_delta
from splice.core.model_state import model_state
from splice.core.registry import register_method
from splice.core.validation import regex_error

Init = Literal["default", "gaussian", "pissa", "zeros"]
Scaling = Literal["standard", "rslora", "sfed"]
SCALINGS = ("standard", "rslora", "sfed")


@register_method
@dataclass
class LoRA(AdapterConfig):
    """Hyperparameters of a LoRA adapter.

    Attributes:
        r: rank of the update. The LoRA paper (section 7.2) finds tiny ranks (1-8) enough for
            GPT-3's q/v projections because the useful update has very low intrinsic rank.
        alpha: scale numerator. Scaling by alpha/r keeps the learning rate roughly valid when
            r changes (paper section 4.1); set alpha = 2r as a common default.
        dropout: dropout on the adapter's input only, a regulariser for small datasets.
        rslora: scale by alpha/sqrt(r) instead (Kalajdzievski 2023, arXiv 2312.03732), which keeps
            larger ranks learning; at r=8 it is a 2.8x larger step than alpha/r. Kept as HF
            PEFT's `use_rslora`; the same as scaling="rslora".
        init: "default" (Kaiming-uniform A, zero B, as Microsoft's loralib), "gaussian"
            (A ~ N(0, 1/r)), "pissa" (A, B from the top-r singular triplets of W, which are
            subtracted from W: the output is unchanged at init, training starts along the
            principal directions; arXiv 2404.02948), or "zeros" (both factors zero, for loading).
        rank_pattern, alpha_pattern: per-module overrides, {name or suffix regex: value}, as in
            PEFT (a key matches a module whose name ends with it).
        lora_bias: also train a change of the layer's bias, s * b (PEFT's `lora_bias`); only on
            Linear and Conv layers that have a bias, not with DoRA.
        scaling: the scale rule: "standard" (alpha/r), "rslora" (alpha/sqrt(r)) or "sfed"
            (alpha * sqrt(N/r), SFed-LoRA, arXiv 2603.08058, for federated training with FedAvg of
            A and B over N clients). Averaging N clients' updates injects variance that grows
            with N and, at high rank, makes the gradients collapse; rsLoRA's rule ignores that
            aggregation step, SFed's sqrt(N) makes up for it (N=1 is rsLoRA exactly). None:
            "standard", or "rslora" with rslora=True; rslora=True with "standard" or "sfed" is
            refused as a contradiction. Per-module patterns apply: each module's scale comes
            from its own r and alpha.
        num_clients: N of scaling="sfed" (required there, refused elsewhere): the number of
            clients whose updates are averaged each round. When participation changes, update
            an attached adapter with `splice.methods.lora.set_num_clients`. Saved in PEFT's
            format, an sfed adapter is written as rsLoRA with lora_alpha = alpha * sqrt(N) (PEFT
            computes the same scale) and loads back as such; format="splice" keeps the fields.
    """

    method: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    rslora: bool = False
    init: Init = "default"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_bias: bool = False
    scaling: Scaling | None = None
    num_clients: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_scaling()
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                if (problem := regex_error(key)) is not None:
                    raise SpliceError(f"{name} key {key!r} is not a valid regular expression ({problem}); "
                                      "keys are module names or regular expressions")
        if self.r < 1:
            raise SpliceError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpliceError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("default", "gaussian", "pissa", "zeros"):
            raise SpliceError(f"LoRA init must be default, gaussian, pissa or zeros, got {self.init!r}")
        if any(v < 1 for v in self.rank_pattern.values()):
            raise SpliceError(f"rank_pattern ranks must be >= 1: {self.rank_pattern}")

    def _check_scaling(self) -> None:
        if self.scaling is not None and self.scaling not in SCALINGS:
            raise SpliceError(f"LoRA scaling must be one of {', '.join(SCALINGS)} (or None), got {self.scaling!r}")
        if self.rslora and self.scaling in ("standard", "sfed"):
            raise SpliceError(
                f"rslora=True contradicts scaling={self.scaling!r}: rslora=True means scaling='rslora' "
                f"(alpha/sqrt(r)); drop rslora=True to scale by "
                f"{'alpha/r' if self.scaling == 'standard' else 'alpha*sqrt(num_clients/r)'}")
        if self.num_clients is not None:
            check_num_clients(self.num_clients)
        if self.scaling == "sfed" and self.num_clients is None:
            raise SpliceError("scaling='sfed' needs num_clients=N (>= 1), the number of clients whose updates "
                              "FedAvg averages each round: the scale is alpha*sqrt(N/r)")
        if self.scaling != "sfed" and self.num_clients is not None:
            raise SpliceError(f"num_clients={self.num_clients} only applies to scaling='sfed' (the scale "
                              f"alpha*sqrt(N/r)); this config scales by the {self.scaling_rule!r} rule")

    @property
    def scaling_rule(self) -> Scaling:
        """The scale rule in force: `scaling`, or where it is None, "rslora" if `rslora` else "standard"."""
        if self.scaling is not None:
            return self.scaling
        return "rslora" if self.rslora else "standard"

    def takes_from_base(self) -> bool:
        return self.init == "pissa"

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scaling_for(self, module_name: str) -> float:
        return lora_scale(self.scaling_rule, self.alpha_for(module_name), self.rank_for(module_name),
                          self.num_clients)

    def build(self, info: LayerInfo, module_name: str, base: nn.Module) -> LoRAAdapter:
        if self.lora_bias and (info.kind == "embedding" or getattr(base, "bias", None) is None):
            raise SpliceError(f"lora_bias=True needs a Linear or Conv layer with a bias; {module_name!r} "
                              f"({type(base).__name__}) has none")
        adapter = LoRAAdapter(info, self.rank_for(module_name), self.scaling_for(module_name), self.dropout,
                              bias=self.lora_bias)
        if self.init == "pissa":
            adapter.init_pissa(base, module_name)
        else:
            adapter.reset(self.init)
        return adapter


def lora_scale(rule: Scaling, alpha: float, r: int, num_clients: int | None = None) -> float:
    """The adapter scale s: alpha/r ("standard"), alpha/sqrt(r) ("rslora") or alpha*sqrt(N/r) ("sfed").

    SFed's is computed as (alpha*sqrt(N))/sqrt(r), the way HF PEFT computes an rsLoRA scale from
    the lora_alpha = alpha*sqrt(N) that PEFT's file records, and so that N=1 gives rsLoRA's
    scale bit for bit.
    """
    if rule == "standard":
        return alpha / r
    if rule == "rslora":
        return alpha / math.sqrt(r)
    if rule == "sfed":
        if num_clients is None:
            raise SpliceError("scaling='sfed' needs num_clients")
        return alpha * math.sqrt(num_clients) / math.sqrt(r)
    raise SpliceError(f"unknown LoRA scaling {rule!r}; one of {', '.join(SCALINGS)}")


def check_num_clients(num_clients: object) -> None:
    """Refuse a client count that is not an int >= 1 (a bool is not a count)."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise SpliceError(f"num_clients must be an int >= 1 (the number of clients averaged each round), "
                          f"got {num_clients!r}")


def set_num_clients(model: nn.Module, num_clients: int, name: str | None = None) -> list[str]:
    """Rescale the attached SFed-LoRA adapters (`scaling="sfed"`; adapter `name`, or all of them)
    to N = `num_clients`, as SFed-LoRA recomputes its scale when participation changes: every
    module's scale becomes alpha*sqrt(N/r) from its own r and alpha, the factors stay as they
    are, and the stored config records the new N (so a saved adapter does too). Returns the
    names of the adapters changed.

    Refused, with nothing changed: no sfed LoRA adapter attached (the message lists what is), an
    adapter merged into the weights (its delta there was made with the old scale; unmerge first),
    or a PiSSA-initialised one (what it took out of the base weight was scaled by the old scale).
    """
    check_num_clients(num_clients)
    records = model_state(model).adapters
    sfed = [n for n, record in records.items()
            if isinstance(record.config, LoRA) and record.config.scaling_rule == "sfed"]
    if name is not None and name not in records:
        raise SpliceError(f"no adapter named {name!r}; attached: {_describe_adapters(records)}")
    if not sfed or (name is not None and name not in sfed):
        what = f"adapter {name!r} is not a" if name is not None else "the model has no"
        hint = ""
        if any(isinstance(r.config, LoRA) and r.config.scaling_rule == "rslora" for r in records.values()):
            hint = (" (an sfed adapter saved in HF PEFT's format loads back as rsLoRA with lora_alpha = "
                    "alpha*sqrt(N); save with format='splice' to keep scaling='sfed')")
        raise SpliceError(f"{what} LoRA adapter with scaling='sfed', whose scale depends on num_clients; "
                          f"attached: {_describe_adapters(records)}{hint}")
    names = [name] if name is not None else sfed
    sites = [(module_name, host) for module_name, _, host in hosts(model)]
    for adapter_name in names:
        for module_name, host in sites:
            if adapter_name not in host:
                continue
            if adapter_name in host.merged:
                raise MergeError(f"adapter {adapter_name!r} is merged into the weights ({module_name}) with its "
                                 "current scale; unmerge it before changing num_clients")
            if host[adapter_name].has_pissa():
                raise SpliceError(f"adapter {adapter_name!r} was initialised with PiSSA, which took s*B0*A0 out of "
                                  f"the base weight ({module_name}) at the current scale; num_clients cannot change")
    for adapter_name in names:
        record = records[adapter_name]
        config = record.config.replace(num_clients=num_clients)
        for module_name, host in sites:
            if adapter_name in host:
                host[adapter_name].set_scaling(config.scaling_for(module_name))
        record.config = config
    return names


def _describe_adapters(records: dict) -> str:
    """{name: method (scale rule)} of the attached adapters, for messages."""
    described = {n: r.config.method + (f" ({r.config.scaling_rule})" if isinstance(r.config, LoRA) else "")
                 for n, r in records.items()}
    return str(described) if described else "none"


def pattern_value(pattern: dict, module_name: str, default):
    """PEFT's pattern rule (`get_pattern_key`): the first key, in order, that matches the end of
    the module name after a dot (`^name` matches the whole name only)."""
    for key, value in pattern.items():
        if _pattern_matches(key, module_name):
            return value
    return default


def exact_pattern(values: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """`rank_pattern`/`alpha_pattern` keys that give each module of `values` its value and touch
    no other module of `names` under PEFT's rule: the module's name where no other name ends
    with it, else the name anchored with `^` (escaped where its dots could match other names)."""
    names = list(dict.fromkeys([*names, *values]))
    out = {}
    for name, value in values.items():
        for key in (name, f"^{name}", f"^{re.escape(name)}"):
            if [n for n in names if _pattern_matches(key, n)] == [name]:
                out[key] = value
                break
    return out


def _pattern_matches(key: str, module_name: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


class LoRAAdapter(Adapter, LowRankForward):
    """delta(x) = s * (B(A(dropout(x))) + b), with A and B shaped as HF PEFT stores them; the
    bias b (PEFT's `lora_B.bias`) exists only with `lora_bias=True`."""

    def __init__(self, info: LayerInfo, r: int, scaling: float, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        self.info, self.r, self.scaling, self.p = info, r, scaling, dropout
        if info.kind == "conv":
            a_shape = (r, info.in_features, *info.kernel_size)
            b_shape = (info.out_features, r, *(1,) * info.conv_dims)
        else:
            a_shape, b_shape = (r, info.in_features), (info.out_features, r)
        self.lora_A = nn.Parameter(torch.zeros(a_shape))
        self.lora_B = nn.Parameter(torch.zeros(b_shape))
        self.lora_bias = nn.Parameter(torch.zeros(info.out_features)) if bias else None

    def set_scaling(self, scaling: float) -> None:
        """Change the scale s in place (SFed-LoRA's when the number of clients changes); the
        factors stay, so the delta becomes scaling/s times what it was."""
        self.scaling = scaling
        if "_eval_ratio" in self.__dict__:  # DoRA keeps g = m/||W + sBA|| in eval mode, keyed by tensors only
            self._eval_ratio = None

    def reset(self, init: Init = "default") -> None:
        with torch.no_grad():
            if init == "zeros":
                self.lora_A.zero_()
                self.lora_B.zero_()
            elif self.info.kind == "embedding":
                # As loralib/PEFT for embeddings: A = 0, B ~ N(0, 1); the product starts at zero.
                self.lora_A.zero_()
                nn.init.normal_(self.lora_B)
            else:
                if init == "gaussian":
                    nn.init.normal_(self.lora_A, std=1 / self.r)
                else:
                    nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                self.lora_B.zero_()
            if self.lora_bias is not None:
                self.lora_bias.zero_()

    def init_pissa(self, base: nn.Module, module_name: str) -> None:
        """Principal singular triplets into A and B, and out of the base weight (PiSSA)."""
        if self.info.kind != "linear":
            raise SpliceError(f"PiSSA init needs a Linear host; {module_name!r} is {self.info.kind}")
        weight = base.weight.detach().float()
        weight = weight.T if self.info.transposed else weight
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        root = (S[: self.r] / self.scaling).sqrt()
        with torch.no_grad():
            self.lora_A.copy_(root[:, None] * Vh[: self.r])
            self.lora_B.copy_(U[:, : self.r] * root[None, :])
        # The factors at init are kept to export a plain LoRA for the unmodified base.
        self.register_buffer("pissa_A0", self.lora_A.detach().clone())
        self.register_buffer("pissa_B0", self.lora_B.detach().clone())  # attach takes B0 A0 out of the base

    def has_pissa(self) -> bool:
        """Whether PiSSA took part of the base weight into this adapter (it keeps `pissa_A0`).

        A dict lookup, not `hasattr`: a missing attribute of an nn.Module raises inside
        `__getattr__`, which costs microseconds on every forward of every hosted layer.
        """
        return "pissa_A0" in self._buffers

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        out = self._apply_factors(x, self.lora_A, self.lora_B, self.p)
        if self.lora_bias is None:
            return out
        bias = self.lora_bias * self.scaling
        return out + (bias.view(-1, *(1,) * self.info.conv_dims) if self.info.kind == "conv" else bias)

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.lora_bias is None else self.lora_bias * self.scaling

    def initial_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """s * B0 A0 x: what PiSSA took out of the base weight, as an output (no dropout)."""
        if not self.has_pissa():
            return None
        return self._apply_factors(x, self.pissa_A0, self.pissa_B0, 0.0)

    def _apply_factors(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, p: float) -> torch.Tensor:
        if self.info.kind == "embedding":
            return F.embedding(x, A.T, padding_idx=self.info.padding_idx) @ B.T * (self.scaling * self.info.embed_scale)
        if self.info.kind == "conv":
            x = F.dropout(x.to(A.dtype), p, training=self.training)
            conv = F.conv1d if self.info.conv_dims == 1 else F.conv2d
            hidden = conv(x, A, stride=self.info.stride, padding=self.info.padding)
            return conv(hidden, B) * self.scaling
        return low_rank_delta(x, LowRank(A, B, self.scaling, p), self.training)

    def low_rank_factors(self) -> LowRank | None:
        """On a Linear host, this adapter minus what PiSSA took out of the base, as s * B A.

        For PiSSA that is the rank-2r form s(BA - B0A0) = s[B, -B0][A; A0], valid without
        dropout (the taken-out part is not dropped out).
        """
        if self.info.kind != "linear" or self.lora_bias is not None:
            return None
        if not self.has_pissa():
            return LowRank(self.lora_A, self.lora_B, self.scaling, self.p)
        if self.p > 0:
            return None
        return LowRank(torch.cat([self.lora_A, self.pissa_A0]), torch.cat([self.lora_B, -self.pissa_B0], dim=1),
                       self.scaling)

    def trained_factors(self) -> LowRank | None:
        """lora_A and lora_B on a Linear host, whatever else the form adds (PiSSA's offset, a
        bias, DoRA's magnitude)."""
        return LowRank(self.lora_A, self.lora_B, self.scaling, self.p) if self.info.kind == "linear" else None

    def delta_weight(self) -> torch.Tensor:
        return self._product(self.lora_A, self.lora_B)

    def initial_delta_weight(self) -> torch.Tensor | None:
        if not self.has_pissa():
            return None
        return self._product(self.pissa_A0, self.pissa_B0)

    def _product(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        product = B.flatten(1) @ A.flatten(1) * self.scaling
        if self.info.kind == "embedding":
            return product.T
        return product.view(self.info.out_features, *A.shape[1:])

    def exported_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of a plain LoRA with the same scaling that is exact on the original base.

        For a PiSSA adapter this is PEFT's rank-2r conversion: s(BA - B0A0) = s[B, -B0][A; A0].
        """
        if not self.has_pissa():
            return self.lora_A.detach(), self.lora_B.detach()
        A = torch.cat([self.lora_A.detach(), self.pissa_A0], dim=0)
        B = torch.cat([self.lora_B.detach(), -self.pissa_B0], dim=1)
        return A, B
