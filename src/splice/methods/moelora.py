"""Mixture of LoRA experts: each token goes through the k experts a router picks
(volume-1 §10, volume-2 §6; GOAT, Fan et al., arXiv 2502.16894; VLA-GSE, arXiv 2605.06175).

Per targeted Linear, with E experts of rank r_e = r / E each (r is the total rank),

    y = W' x + (1/N_g) Σ_{shared g} s_g B_g A_g x + Σ_{e ∈ TopK(p(x))} p̂_e(x) s_e B_e A_e x,

where p = softmax(W_r x) (bias-free router) over the E - N_g routed experts, p̂ its top-k values
renormalised to sum 1, and the N_g shared experts always on. The load-balancing loss
`aux_loss * E_r Σ_e f_e P_e` (f_e: share of routed slots to e, which sum to k; P_e: mean router
probability; over attended tokens) goes to `splice.auxiliary_loss(model)` while training.

Initialisations (`init`):

- "default": LoRA's (Kaiming-uniform A, zero B per expert), scale alpha / r_e; W' = W.
- "goat": expert i from segment [iL, iL + r_e) of W's full singular spectrum cut in E chunks of
  length L = min(m, n) / E, with s B_i A_i = U_seg S_seg V_segᵀ / ρ, and W' = W - (1/E) Σ_i s B_i A_i
  (the expectation of uniform top-k routing; shared experts are taken out at their own weight
  1/N_g, so they are exact), scale s = √(3 η n / r_e), n = in_features.
- "gse": the leading r components of `svd_lowrank(W, q=r, niter=2)` in order, shared experts
  first, each at its scale s_i = √(3 η n / r_i), and W' = W - Σ_i w_i s_i B_i A_i with w_i = 1 for
  routed experts and 1/N_g, their forward weight, for shared ones; for N_g = 1 that is the
  released code's W - U_r S_r V_rᵀ / ρ (it takes shared experts out at 1 whatever N_g, so with
  N_g > 1 its init is not the base even with every expert on; here it is).
  `balance_gradients` rescales the routed experts to s_i = 2 mean_j(tr_j) / tr_i, tr_i = Σ S_{J_i}.

W' is an exact, reversible change of the frozen base: the host keeps what restores W bit for
bit on detach (see `Host.take_initial`); switched off, the adapter gives the taken part back as
an output, so "off" is the base model.

Compute ("dense", default): all experts' A rows are one [r, in] matrix and B one [out, r], so a
forward is two GEMMs of rank r with the gates (zero for unpicked experts) on the rank-r hidden:
LoRA-of-rank-r cost, whatever k. "grouped" sorts the token-expert assignments by expert and runs
each expert on its own rows only (k·r_e of rank per token instead of r, plus a gather and a
scatter per expert): it pays off when experts are wide. Both give the same values and gradients.

The router makes the change input-dependent: there is no weight change to merge or export.
Routing statistics accumulate per module (`routing_stats`); `prune_experts` removes routed
experts physically (DMEP, `splice.schedules.dmep`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from splice.core.api import adapters, model_state
from splice.core.config import Adapter, AdapterConfig, will_be_filled
from splice.core.errors import SpliceError
from splice.core.host import hosts
from splice.core.layers import LayerInfo, dense_weight
from splice.core.registry import register_method

Init = Literal["default", "goat", "gse"]
Scale = Literal["auto", "alpha", "aligned"]
BALANCED_SCALE = 2.0  # VLA-GSE's s_base for gradient-scale balancing


@register_method
@dataclass
class MoELoRA(AdapterConfig):
    """Hyperparameters of a mixture-of-LoRA-experts adapter.

    Attributes:
        experts: E, experts per module, shared ones included.
        top_k: routed experts per token (at most E - shared_experts).
        r: total rank, split evenly: r_e = r / E (r must be a multiple of E).
        alpha: scale numerator of scale="alpha": s = alpha / r_e (GOAT's released scripts).
        router: "softmax" (probabilities, top-k, renormalised) or "sigmoid" (independent scores,
            top-k, renormalised; DeepSeek-V3's gate).
        aux_loss: λ of the load-balancing loss E_r Σ f_e P_e (0: none).
        shared_experts: N_g always-on experts (VLA-GSE's generalized experts), weighted 1/N_g.
        init: "default", "goat" or "gse" (module docstring).
        dropout: dropout on the experts' input (not the router's).
        scale: "alpha" (alpha / r_e), "aligned" (√(3 η n / r_e), GOAT's alignment scale) or
            "auto": aligned for the SVD inits, alpha for the default one.
        rho: ρ, the SVD inits' shrink of the singular values they start from.
        eta: η of the aligned scale (the equivalent full fine-tuning gradient gain).
        balance_gradients: VLA-GSE's gradient-scale balancing of routed experts (init="gse").
        compute: "dense" or "grouped" (module docstring).
        expert_counts: routed experts kept per module after pruning (module name -> count),
            written by `prune_experts` so that a saved pruned adapter loads with its shapes.
    """

    method: ClassVar[str] = "moelora"
    reads_inputs: ClassVar[bool] = True  # the aux loss goes in the batch's aux_losses; padding is masked
    row_local: ClassVar[bool] = True  # it reads its rows' attention mask only
    experts: int = 8
    top_k: int = 2
    r: int = 16
    alpha: float = 32
    router: Literal["softmax", "sigmoid"] = "softmax"
    aux_loss: float = 0.01
    shared_experts: int = 0
    init: Init = "default"
    dropout: float = 0.0
    scale: Scale = "auto"
    rho: float = 10.0
    eta: float = 1.0
    balance_gradients: bool = False
    compute: Literal["dense", "grouped"] = "dense"
    expert_counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        routed = self.experts - self.shared_experts
        checks = [
            (self.experts >= 1, f"experts must be >= 1, got {self.experts}"),
            (0 <= self.shared_experts < self.experts,
             f"shared_experts must be in [0, experts) = [0, {self.experts}), got {self.shared_experts}"),
            (1 <= self.top_k <= routed, f"top_k must be in [1, {routed}] (the routed experts), got {self.top_k}"),
            (self.r >= self.experts and self.r % self.experts == 0,
             f"r (total rank) must be a positive multiple of experts={self.experts}, got {self.r}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.aux_loss >= 0 and self.rho > 0 and self.eta > 0, "aux_loss must be >= 0, rho and eta > 0"),
            (not self.balance_gradients or self.init == "gse", "balance_gradients is VLA-GSE's: it needs init='gse'"),
            (all(self.top_k <= n <= routed for n in self.expert_counts.values()),
             f"expert_counts must be in [top_k, {routed}]: {self.expert_counts}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SpliceError(f"MoELoRA {message}")

    def takes_from_base(self) -> bool:
        return self.init != "default"

    @property
    def expert_rank(self) -> int:
        return self.r // self.experts

    def expert_scale(self, in_features: int) -> float:
        """s of every expert: alpha / r_e, or the aligned √(3 η n / r_e)."""
        aligned = self.scale == "aligned" or (self.scale == "auto" and self.init != "default")
        return math.sqrt(3 * self.eta * in_features / self.expert_rank) if aligned else self.alpha / self.expert_rank

    def routed_for(self, module_name: str) -> int:
        return self.expert_counts.get(module_name, self.experts - self.shared_experts)

    def build(self, info: LayerInfo, module_name: str, base: nn.Module) -> MoELoRAAdapter:
        if info.kind != "linear":
            raise SpliceError(f"MoELoRA adapts Linear layers; {module_name!r} is a {info.kind} layer")
        adapter = MoELoRAAdapter(info, self, self.routed_for(module_name))
        if module_name in self.expert_counts and self.init != "default" and not will_be_filled():
            raise SpliceError(f"MoELoRA expert_counts ({module_name!r}: {self.expert_counts[module_name]}) is what "
                              f"pruning left of a trained adapter; a fresh init={self.init!r} starts with every expert")
        if self.init == "default":
            adapter.reset()
        elif will_be_filled():  # loading: the file has the factors; no SVD
            adapter.hold_initial_factors(torch.zeros(self.r, info.in_features), torch.zeros(info.out_features, self.r),
                                         torch.zeros(self.r))
        else:
            adapter.init_from_spectrum(dense_weight(base, info).float(), self)
        return adapter


class MoELoRAAdapter(Adapter):
    """Experts' factors stacked (A: [r, in], B: [out, r], shared experts first), the router
    [E_r, in], each expert's scale, and, for the SVD inits, the frozen factors taken out of the base."""

    merge_refusal: ClassVar[str] = ("MoELoRA's router makes its change depend on the input; there is no "
                                    "weight change to merge (keep it unmerged)")

    def __init__(self, info: LayerInfo, config: MoELoRA, routed: int) -> None:
        super().__init__()
        self.info, self.config = info, config
        self.shared, self.routed, self.rank = config.shared_experts, routed, config.expert_rank
        rows = (self.shared + routed) * self.rank
        self.lora_A = nn.Parameter(torch.zeros(rows, info.in_features))
        self.lora_B = nn.Parameter(torch.zeros(info.out_features, rows))
        self.router = nn.Parameter(torch.empty(routed, info.in_features))
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))  # nn.Linear's init
        scale = config.expert_scale(info.in_features)
        self.register_buffer("expert_scales", torch.full((self.shared + routed,), scale))
        # routing statistics (token-weighted sums since the last reset; `training_slots`: of
        # training forwards only, which DMEP reads and resets itself)
        for name, shape in (("routed_slots", routed), ("training_slots", routed), ("probability_sums", routed),
                            ("entropy_sum", ()), ("tokens_seen", ())):
            self.register_buffer(name, torch.zeros(shape), persistent=False)

    # -- initialisation --------------------------------------------------------------------------

    def reset(self) -> None:
        with torch.no_grad():
            for expert in range(self.shared + self.routed):
                nn.init.kaiming_uniform_(self.lora_A[self._rows(expert)], a=math.sqrt(5))
            self.lora_B.zero_()

    def init_from_spectrum(self, weight: torch.Tensor, config: MoELoRA) -> None:
        """GOAT's or VLA-GSE's experts from W's singular triplets, and the frozen copy of what
        they take out of the base (`initial_delta_weight`)."""
        experts, r_e = config.experts, self.rank
        if config.init == "goat":
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            chunk = S.shape[0] // experts
            if chunk < r_e:
                raise SpliceError(f"GOAT cuts the {S.shape[0]} singular values of a {tuple(weight.shape)} weight "
                                  f"into {experts} chunks of {chunk}; each expert needs {r_e}")
            index = torch.cat([torch.arange(i * chunk, i * chunk + r_e) for i in range(experts)])
        else:
            U, S, V = torch.svd_lowrank(weight, q=config.r, niter=2)
            Vh, index = V.T, torch.arange(config.r)
        U, S, Vh = U[:, index], S[index], Vh[index]
        scales = self.expert_scales.to(weight.device).clone()
        if config.balance_gradients:
            traces = S.view(experts, r_e).sum(1)[self.shared:]
            scales[self.shared:] = BALANCED_SCALE * traces.mean() / traces
        column_scale = scales.repeat_interleave(r_e)
        root = (S / (column_scale * config.rho)).sqrt()
        A, B = root[:, None] * Vh, U * root[None, :]
        # what is taken out of W per expert: shared at their forward weight 1/N_g; routed at 1/E_r
        # (GOAT: the expectation of uniform top-k routing) or 1 (VLA-GSE's code)
        routed_weight = 1.0 / (experts - self.shared) if config.init == "goat" else 1.0
        weights = torch.tensor([1.0 / max(self.shared, 1)] * self.shared + [routed_weight] * (experts - self.shared),
                               device=weight.device)
        with torch.no_grad():
            self.expert_scales.copy_(scales)
            kept = torch.arange((self.shared + self.routed) * r_e, device=weight.device)
            self.lora_A.copy_(A[kept])
            self.lora_B.copy_(B[:, kept])
        self.hold_initial_factors(A.clone(), B.clone(), column_scale * weights.repeat_interleave(r_e))

    def hold_initial_factors(self, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor) -> None:
        """Keep, frozen, what the adapter takes out of the base: (B * scales) @ A."""
        self.register_buffer("initial_A", A)
        self.register_buffer("initial_B", B)
        self.register_buffer("initial_scales", scales)

    def _rows(self, expert: int) -> slice:
        return slice(expert * self.rank, (expert + 1) * self.rank)

    # -- forward ---------------------------------------------------------------------------------

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        top_w, top_i = self.route_tokens(x)
        inputs = x.to(self.lora_A.dtype)
        if self.training and self.config.dropout:
            inputs = F.dropout(inputs, self.config.dropout)
        if self.config.compute == "grouped":
            return self._grouped(inputs, top_w, top_i)
        gates = torch.zeros(*top_w.shape[:-1], self.routed, dtype=top_w.dtype, device=top_w.device)
        gates = gates.scatter(-1, top_i, top_w)
        shared = torch.full((*gates.shape[:-1], self.shared), 1.0 / max(self.shared, 1), dtype=gates.dtype,
                            device=gates.device)
        column = torch.cat([shared, gates], -1).repeat_interleave(self.rank, -1) \
            * self.expert_scales.repeat_interleave(self.rank)
        return F.linear(F.linear(inputs, self.lora_A) * column, self.lora_B)

    def _grouped(self, inputs: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        """Each expert on the rows routed to it: assignments sorted by expert, one segment each."""
        flat = inputs.reshape(-1, inputs.shape[-1])
        out = torch.zeros(flat.shape[0], self.info.out_features, dtype=flat.dtype, device=flat.device)
        if self.shared:
            rows = slice(0, self.shared * self.rank)
            column = self.expert_scales[: self.shared].repeat_interleave(self.rank) / self.shared
            out = out + F.linear(F.linear(flat, self.lora_A[rows]) * column, self.lora_B[:, rows]).to(out.dtype)
        experts = top_i.reshape(-1)
        order = experts.argsort(stable=True)
        tokens = order // top_i.shape[-1]
        weights = top_w.reshape(-1)[order]
        counts = torch.bincount(experts, minlength=self.routed).tolist()
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = self._rows(self.shared + expert)
                picked = tokens[start : start + count]
                hidden = F.linear(flat.index_select(0, picked), self.lora_A[rows])
                hidden = hidden * (weights[start : start + count, None] * self.expert_scales[self.shared + expert])
                out.index_add_(0, picked, F.linear(hidden, self.lora_B[:, rows]).to(out.dtype))
            start += count
        return out.view(*inputs.shape[:-1], self.info.out_features)

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """[..., E, out]: every expert's own s_e B_e A_e x, ungated (shared experts first), e.g.
        to check an initialisation or to route by hand."""
        hidden = F.linear(x.to(self.lora_A.dtype), self.lora_A)
        hidden = hidden.unflatten(-1, (-1, self.rank)) * self.expert_scales[:, None]
        return torch.einsum("...er,oer->...eo", hidden, self.lora_B.unflatten(1, (-1, self.rank)))

    def route_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k weights (renormalised to sum 1) and indices [..., k] of the routed experts;
        adds the balancing loss while training and counts the statistics.

        A forward that activation checkpointing re-runs during backward does neither again: its
        loss is already in the graph, its tokens already counted.
        """
        logits = F.linear(x.to(self.router.dtype), self.router)
        scores = logits.softmax(-1) if self.config.router == "softmax" else logits.sigmoid()
        top_w, top_i = scores.topk(self.config.top_k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        if torch._C._current_graph_task_id() != -1:  # inside backward: a checkpointed block's recomputation
            return top_w, top_i
        weights = self._token_weights(x, top_i)
        probabilities = scores / scores.sum(-1, keepdim=True)
        if self.training and torch.is_grad_enabled() and self.config.aux_loss > 0:
            inputs = self.batch_inputs()
            if inputs is not None:
                inputs.add_aux_loss(self.config.aux_loss * balance_loss(probabilities, top_i, weights), self.owner)
        self._count(probabilities.detach(), top_i, weights)
        return top_w, top_i

    def _token_weights(self, x: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        """[tokens] 1 for each attended token of this input's rows, 0 for padding (all 1 where
        the mask is not known): weights, not a selection, so nothing waits for the device."""
        inputs = self.batch_inputs()
        mask = inputs.mask_for(x) if inputs is not None else None
        if mask is None:
            return torch.ones(top_i[..., 0].numel(), dtype=self.probability_sums.dtype, device=x.device)
        return mask.reshape(-1).to(self.probability_sums.dtype)

    @torch.no_grad()
    def _count(self, probabilities: torch.Tensor, top_i: torch.Tensor, weights: torch.Tensor) -> None:
        probabilities = probabilities.reshape(-1, self.routed).to(weights.dtype)
        top_i = top_i.reshape(-1, top_i.shape[-1])
        slots = weights[:, None].expand(top_i.shape).reshape(-1)
        self.routed_slots.scatter_add_(0, top_i.reshape(-1), slots)
        if self.training:
            self.training_slots.scatter_add_(0, top_i.reshape(-1), slots)
        self.probability_sums += (probabilities * weights[:, None]).sum(0)
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1)
        self.entropy_sum += (entropy * weights).sum()
        self.tokens_seen += weights.sum()

    # -- the base weight -------------------------------------------------------------------------

    def has_svd_init(self) -> bool:
        return "initial_A" in self._buffers

    def initial_delta_weight(self) -> torch.Tensor | None:
        if not self.has_svd_init():
            return None
        return (self.initial_B * self.initial_scales) @ self.initial_A

    def initial_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.has_svd_init():
            return None
        return F.linear(F.linear(x.to(self.initial_A.dtype), self.initial_A) * self.initial_scales, self.initial_B)

    # -- statistics and pruning ------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """Routing since the last reset: each routed expert's share of the routed slots and mean
        probability, the mean per-token routing entropy, and the top expert's share."""
        tokens = round(float(self.tokens_seen))
        slots = self.routed_slots.double()
        share = (slots / slots.sum()).tolist() if tokens else [float("nan")] * self.routed
        return {
            "tokens": tokens,
            "experts": self.routed,
            "top_k": self.config.top_k,
            "utilisation": share,
            "mean_probability": (self.probability_sums.double() / max(tokens, 1)).tolist(),
            "entropy": float(self.entropy_sum) / tokens if tokens else float("nan"),
            "max_entropy": math.log(self.routed),
            "top_share": max(share) if tokens else float("nan"),
        }

    def reset_statistics(self) -> None:
        for buffer in (self.routed_slots, self.probability_sums, self.entropy_sum, self.tokens_seen):
            buffer.zero_()

    def take_training_slots(self) -> torch.Tensor:
        """The routed slots of the training forwards since the last call, per routed expert."""
        slots = self.training_slots.clone()
        self.training_slots.zero_()
        return slots

    def prune(self, keep: Iterable[int]) -> dict[nn.Parameter, tuple[nn.Parameter, torch.Tensor, int]]:
        """Keep only the routed experts `keep` (indices among the routed ones), physically: their
        factor rows, router rows and scales. Returns, per replaced parameter, its successor, the
        kept indices and the dimension they index, so an optimizer's state can follow."""
        keep = sorted(set(int(k) for k in keep))
        if len(keep) < self.config.top_k or any(not 0 <= k < self.routed for k in keep):
            raise SpliceError(f"MoELoRA pruning must keep at least top_k={self.config.top_k} of the "
                              f"{self.routed} routed experts (indices 0..{self.routed - 1}); got {keep}")
        experts = list(range(self.shared)) + [self.shared + k for k in keep]
        rows = torch.cat([torch.arange(e * self.rank, (e + 1) * self.rank) for e in experts]).to(self.lora_A.device)
        routed = torch.tensor(keep, device=self.router.device)
        moves = {}
        for name, index, dim in (("lora_A", rows, 0), ("lora_B", rows, 1), ("router", routed, 0)):
            old = getattr(self, name)
            new = nn.Parameter(old.detach().index_select(dim, index).clone(), requires_grad=old.requires_grad)
            setattr(self, name, new)
            moves[old] = (new, index, dim)
        self.expert_scales = self.expert_scales[torch.tensor(experts, device=self.expert_scales.device)].clone()
        self.routed = len(keep)
        for name in ("routed_slots", "training_slots", "probability_sums"):  # counts of the old experts: restart
            setattr(self, name, torch.zeros_like(getattr(self, name)[: self.routed]))
        self.reset_statistics()
        return moves


def balance_loss(probabilities: torch.Tensor, top_i: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """E_r Σ_e f_e P_e over the tokens (weighted: 0 for padding): f_e the share of tokens whose
    top-k holds e (Σ f_e = k), P_e the mean probability of e. Exactly k under uniform routing."""
    experts = probabilities.shape[-1]
    probabilities = probabilities.reshape(-1, experts)
    hits = torch.zeros_like(probabilities).scatter(-1, top_i.reshape(-1, top_i.shape[-1]), 1.0)
    if weights is None:
        weights = torch.ones(probabilities.shape[0], dtype=probabilities.dtype, device=probabilities.device)
    weights = weights.to(probabilities.dtype)[:, None] / weights.sum().clamp_min(1)
    return experts * ((hits * weights).sum(0) * (probabilities * weights).sum(0)).sum()


def moe_adapters(model: nn.Module, name: str | None = None) -> tuple[str, dict[str, MoELoRAAdapter]]:
    """The MoELoRA adapter `name` (or the model's only one) and its per-module adapters."""
    attached = [n for n, c in adapters(model).items() if isinstance(c, MoELoRA)]
    if name is None:
        if len(attached) != 1:
            raise SpliceError(f"{len(attached)} MoELoRA adapters attached {attached}; pass name=")
        name = attached[0]
    if name not in attached:
        raise SpliceError(f"no MoELoRA adapter named {name!r}; attached: {attached}")
    return name, {module: host[name] for module, _, host in hosts(model) if name in host}


def routing_stats(model: nn.Module, name: str | None = None) -> dict[str, dict[str, Any]]:
    """Per targeted module, the routing since the last reset (`MoELoRAAdapter.statistics`;
    `reset_routing_stats` starts a new count)."""
    return {module: adapter.statistics() for module, adapter in moe_adapters(model, name)[1].items()}


def reset_routing_stats(model: nn.Module, name: str | None = None) -> None:
    for adapter in moe_adapters(model, name)[1].values():
        adapter.reset_statistics()


def prune_experts(model: nn.Module, keep: dict[str, Iterable[int]], name: str | None = None,
                  ) -> dict[nn.Parameter, tuple[nn.Parameter, torch.Tensor, int]]:
    """Remove every routed expert not in `keep[module]` from those modules (DMEP's phase 2), and
    record the counts in the adapter's config so that it saves and loads pruned. Returns the
    parameter moves (`MoELoRAAdapter.prune`) for the optimizer."""
    name, found = moe_adapters(model, name)
    unknown = sorted(set(keep) - set(found))
    if unknown:
        raise SpliceError(f"no MoELoRA {name!r} on modules {unknown[:5]}; it is on {sorted(found)[:5]}...")
    moves = {}
    for module, kept in keep.items():
        moves |= found[module].prune(kept)
    counts = {**model_state(model).adapters[name].config.expert_counts, **{m: found[m].routed for m in keep}}
    reconfigure(model, name, expert_counts=counts)
    return moves


def reconfigure(model: nn.Module, name: str | None = None, **changes: Any) -> MoELoRA:
    """Change settings of an attached MoELoRA that its built experts read at every forward
    (`aux_loss`, `top_k`, `compute`, `expert_counts`): the adapter's config, which saving writes,
    and every module's. The new config."""
    name, found = moe_adapters(model, name)
    record = model_state(model).adapters[name]
    record.config = record.config.replace(**changes)
    for adapter in found.values():
        adapter.config = record.config
    return record.config
