"""LoFT: AdamW for LoRA factors that moves the product BA the way AdamW would move W
(Tastan et al., arXiv 2505.21289; volume-2 §5 of the method specs).

Plain AdamW on the factors A [r, in] and B [out, r] of `W = W0 + s B A` keeps moments of the
factors' gradients, which mean nothing once the partner factor has moved, and its step on one
factor changes W by an amount that depends on the other's scale. LoFT keeps Adam's moments in
W's space, expressed in the factors' coordinates, and projects W's AdamW step onto the factor:

    B̃ = s B,  G = ∂L/∂W                         (B̃ carries the scale: W = W0 + B̃ A)
    Ĝ_A = (B̃ᵀB̃ + λI)⁻¹ ∇A,  Ĝ_B̃ = ∇B̃ (AAᵀ + λI)⁻¹      so  B̃ Ĝ_A = P_B G,  Ĝ_B̃ A = G P_A
    moments re-expressed after the partner moved:  R_A = (B̃ᵀB̃+λI)⁻¹ B̃ᵀ B̃_prev,
        M_A ← R_A M_A,  V_A[j] ← R_A V_A[j] R_Aᵀ;   R_B = A_prev Aᵀ (AAᵀ+λI)⁻¹,
        M_B ← M_B R_B,  V_B[i] ← R_Bᵀ V_B[i] R_B
    M ← β1 M + (1-β1) Ĝ;  V_A[j] ← β2 V_A[j] + (1-β2) ĝ_j ĝ_jᵀ (columns of Ĝ_A), V_B[i] likewise (rows)
    one factor per step, B first (it starts at zero), then A, alternately:
        A-step: U = (B̃ M_A / c1) / (sqrt(b_iᵀ V_A[j] b_i / c2) + ε),  A ← A(1 - η wd) - η (B̃ᵀB̃+λI)⁻¹ B̃ᵀ U
        B-step: U = (M_B A / c1) / (sqrt(a_jᵀ V_B[i] a_j / c2) + ε),  B̃ ← B̃(1 - η wd) - η U Aᵀ (AAᵀ+λI)⁻¹

so W moves by -η P_B U (or -η U P_A): AdamW's step on W, projected. At full rank (r = in = out)
the projections are the identity and the trajectory of W is AdamW's on W exactly (tested to
1e-9 in float64 for any betas, with weight decay, scale and clipping). Everything is computed
from the factors' values before the step. The reference code (tnurbek/loft) processes A first
and then rescales B's gradient with the freshly updated A, and conjugates V as RᵀVR: run on a
full-rank factorisation it matches AdamW only for betas (0, 0) (bench/loft_reference_order.py).

Weight decay is AdamW's (decoupled, times the learning rate; the reference code omits the
learning rate). Clipping (`max_grad_norm`) is on the norm of what each factor's gradient
means in W's space, `B̃ Ĝ_A` or `Ĝ_B̃ A`, over the factors that step (and the other parameters'
raw gradients); a trainer must not clip the raw factor gradients as well (`clips_gradients`).
Parameters outside a pair (a classifier head, DoRA's magnitudes) take plain AdamW steps.

Memory: first moments, an r x r second-moment matrix per column of A and per row of B (r times
the factors' size) and a copy of each factor: (r + 2) times the factors' size where AdamW keeps
2x, so 5x AdamW's state at r = 8 (measured: 2.95 MB against 0.59 MB for MiniLM's q, v).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splice.core.errors import SpliceError
from splice.core.host import hosts


@dataclass(frozen=True)
class FactorPair:
    """The two trained factors of one low-rank adapter, `W = W0 + scaling * B A`."""

    A: nn.Parameter
    B: nn.Parameter
    scaling: float
    name: str = ""


def factor_pairs(model: nn.Module, parameters: Iterable[nn.Parameter] | None = None) -> list[FactorPair]:
    """The (A, B) pairs of the model's low-rank adapters whose factors are both trainable
    parameters (among `parameters`, if given): every adapter with `trained_factors()` on a
    Linear host (LoRA, rsLoRA, PiSSA, LoRA with a bias, DoRA's direction, ...). Forms whose
    factors are computed (tensor-train cores) are not pairs: their parameters take AdamW steps."""
    allowed = None if parameters is None else {id(p) for p in parameters}
    pairs = []
    for module_name, _, host in hosts(model):
        for adapter_name, adapter in host.items():
            factors = adapter.trained_factors()
            if factors is None:
                continue
            A, B = factors.A, factors.B
            if not (isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter)
                    and A.requires_grad and B.requires_grad):
                continue
            if allowed is not None and not (id(A) in allowed and id(B) in allowed):
                continue
            pairs.append(FactorPair(A, B, float(factors.scaling), f"{module_name}[{adapter_name}]"))
    return pairs


class LoFT(torch.optim.Optimizer):
    """LoFT for the factor pairs in `params` (groups made by `LoFT.groups`), AdamW for the rest.

    A param group with `pair=True` holds exactly [A, B] and its `scaling`; any other group is
    stepped as `torch.optim.AdamW` would (same formula, same defaults). Build it from a model
    with `LoFT.for_model(model, lr=...)`. The state (moments, partner copies, step counts) is a
    plain optimizer state: `state_dict()` checkpoints it and `load_state_dict()` resumes it.
    """

    clips_gradients = True  # see the module docstring: a trainer leaves clipping to it

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, max_grad_norm: float | None = None,
                 damping: float = 1e-8) -> None:
        if not lr >= 0:
            raise SpliceError(f"LoFT: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise SpliceError(f"LoFT: betas must be in [0, 1), got {tuple(betas)}")
        if not eps >= 0 or not weight_decay >= 0:
            raise SpliceError(f"LoFT: eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        if not damping > 0:
            raise SpliceError(f"LoFT: damping must be > 0 (B starts at zero: B^T B is singular at the first step), "
                              f"got {damping}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise SpliceError(f"LoFT: max_grad_norm must be positive or None, got {max_grad_norm}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, pair=False, scaling=1.0, name="")
        super().__init__(params, defaults)
        self.max_grad_norm, self.damping = max_grad_norm, damping
        for group in self.param_groups:
            if group["pair"] and (len(group["params"]) != 2 or group["params"][0].dim() != 2
                                  or group["params"][0].shape[0] != group["params"][1].shape[1]):
                raise SpliceError("LoFT: a pair group holds [A (r x in), B (out x r)], got shapes "
                                  f"{[tuple(p.shape) for p in group['params']]}")

    @staticmethod
    def groups(pairs: Sequence[FactorPair], others: Sequence[nn.Parameter] = (),
               **options: Any) -> list[dict[str, Any]]:
        """Param groups: one per pair, one for the `others`; `options` (lr, weight_decay) on each."""
        groups = [{"params": [pair.A, pair.B], "pair": True, "scaling": pair.scaling, "name": pair.name, **options}
                  for pair in pairs]
        return groups + ([{"params": list(others), **options}] if others else [])

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs: Any) -> LoFT:
        """LoFT on all trainable parameters of `model`: its factor pairs, AdamW on the rest."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        pairs = factor_pairs(model, trainable)
        if not pairs:
            raise SpliceError("LoFT found no low-rank adapter (LoRA-shaped, with trainable A and B on a Linear layer) "
                              "among the model's trainable parameters")
        paired = {id(p) for pair in pairs for p in (pair.A, pair.B)}
        return cls(cls.groups(pairs, [p for p in trainable if id(p) not in paired]), **kwargs)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        steps = [self._prepare_pair(group) for group in self.param_groups if group["pair"]]
        steps = [each for each in steps if each is not None]
        others = [(p, group) for group in self.param_groups if not group["pair"]
                  for p in group["params"] if p.grad is not None]
        clip = self._clip_factor(steps, [p.grad for p, _ in others])
        for each in steps:
            self._step_pair(each, clip)
        for p, group in others:
            self._adamw(p, group, clip)
        return loss

    # -- pairs --------------------------------------------------------------------------------

    def _prepare_pair(self, group: dict[str, Any]) -> dict[str, Any] | None:
        """The rescaled gradients (in float64 solves), the factor that steps and its gradient's
        norm in W's space, all from the pre-step factors; None when the pair has no gradient."""
        A, B = group["params"]
        if A.grad is None or B.grad is None:
            if A.grad is not None or B.grad is not None:
                raise SpliceError(f"LoFT: only one factor of the pair {group.get('name') or ''} has a gradient; both "
                                  "are needed (is one frozen?)")
            return None
        state_A, state_B = self.state[A], self.state[B]
        if not state_A:
            self._init_pair(A, B, state_A, state_B)
        s = group["scaling"]
        Bs = B.detach() * s
        gram_B = _gram(Bs.T @ Bs, self.damping)  # r x r, float64
        gram_A = _gram(A @ A.T, self.damping)
        hat_A = _solve(gram_B, A.grad)                           # (B̃ᵀB̃)⁻¹ ∇A
        hat_B = _solve(gram_A, (B.grad / s).T).T                 # ∇B̃ (AAᵀ)⁻¹
        step = state_A["step"] + 1
        update_A = step % 2 == 0  # B steps first: it starts at zero
        norm_sq = None
        if self.max_grad_norm is not None:  # what the stepping factor's gradient means in W, for clipping
            norm_sq = (Bs @ hat_A if update_A else hat_B @ A).float().pow(2).sum()
        return dict(group=group, A=A, B=B, Bs=Bs, gram_A=gram_A, gram_B=gram_B, hat_A=hat_A, hat_B=hat_B,
                    step=step, update_A=update_A, norm_sq=norm_sq)

    @staticmethod
    def _init_pair(A: torch.Tensor, B: torch.Tensor, state_A: dict[str, Any], state_B: dict[str, Any]) -> None:
        r, n = A.shape
        m = B.shape[0]
        state_A.update(step=0, exp_avg=torch.zeros_like(A), row_products=A.new_zeros(n, r, r), previous=None)
        state_B.update(exp_avg=torch.zeros_like(B), row_products=B.new_zeros(m, r, r), previous=None)

    def _clip_factor(self, pairs: list[dict[str, Any]], grads: list[torch.Tensor]) -> float:
        """min(1, max_grad_norm / norm) over the W-space gradients of the stepping factors and
        the other parameters' raw gradients (1 without clipping)."""
        if self.max_grad_norm is None:
            return 1.0
        squares = [each["norm_sq"] for each in pairs] + [g.float().pow(2).sum() for g in grads]
        norm = float(torch.stack([t.to(squares[0].device) for t in squares]).sum().sqrt()) if squares else 0.0
        return min(1.0, self.max_grad_norm / (norm + 1e-6)) if math.isfinite(norm) else 1.0

    def _step_pair(self, each: dict[str, Any], clip: float) -> None:
        group, A, B, Bs = each["group"], each["A"], each["B"], each["Bs"]
        s, lr, wd, eps = group["scaling"], group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        state_A, state_B = self.state[A], self.state[B]
        hat_A, hat_B = each["hat_A"] * clip, each["hat_B"] * clip
        if state_A["previous"] is not None:  # the partner moved since the moments were written
            R_A = _solve(each["gram_B"], Bs.T @ state_B["previous"])       # r x r
            R_B = _solve(each["gram_A"], A @ state_A["previous"].T).T      # A_prev Aᵀ (AAᵀ)⁻¹
            state_A["exp_avg"] = R_A @ state_A["exp_avg"]
            state_A["row_products"] = R_A @ state_A["row_products"] @ R_A.T
            state_B["exp_avg"] = state_B["exp_avg"] @ R_B
            state_B["row_products"] = R_B.T @ state_B["row_products"] @ R_B
        state_A["previous"], state_B["previous"] = A.detach().clone(), Bs.clone()
        state_A["exp_avg"].mul_(beta1).add_(hat_A, alpha=1 - beta1)
        state_B["exp_avg"].mul_(beta1).add_(hat_B, alpha=1 - beta1)
        state_A["row_products"].mul_(beta2).add_(torch.einsum("rn,qn->nrq", hat_A, hat_A), alpha=1 - beta2)
        state_B["row_products"].mul_(beta2).add_(torch.einsum("mr,mq->mrq", hat_B, hat_B), alpha=1 - beta2)
        step = state_A["step"] = each["step"]
        c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
        if each["update_A"]:
            first = Bs @ state_A["exp_avg"] / c1
            second = torch.einsum("ir,jrq,iq->ij", Bs, state_A["row_products"], Bs) / c2
            U = first / (second.clamp_min(0).sqrt() + eps)
            A.mul_(1 - lr * wd).sub_(_solve(each["gram_B"], Bs.T @ U), alpha=lr)
        else:
            first = state_B["exp_avg"] @ A / c1
            second = torch.einsum("rj,irq,qj->ij", A, state_B["row_products"], A) / c2
            U = first / (second.clamp_min(0).sqrt() + eps)
            B.mul_(1 - lr * wd).sub_(_solve(each["gram_A"], (U @ A.T).T).T, alpha=lr / s)

    # -- everything else ----------------------------------------------------------------------

    def _adamw(self, p: torch.Tensor, group: dict[str, Any], clip: float) -> None:
        """torch.optim.AdamW's update (its formula and order), for the parameters outside a pair;
        written here because the optimizer owns their state alongside the pairs'."""
        state = self.state[p]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        beta1, beta2 = group["betas"]
        grad = p.grad * clip if clip != 1.0 else p.grad
        state["step"] += 1
        c1, c2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        p.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(c2)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / c1)


def _gram(matrix: torch.Tensor, damping: float) -> torch.Tensor:
    """A small Gram matrix plus `damping` I, in float64 (r x r: the solves cost nothing and
    stay accurate when a factor is still near zero)."""
    gram = matrix.double()
    return gram + damping * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """gram⁻¹ rhs in float64, returned in rhs's dtype."""
    return torch.linalg.solve(gram, rhs.double()).to(rhs.dtype)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in an optimizer's state (moments, partner copies)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t))
