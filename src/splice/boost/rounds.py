"""The rounds of BoostLoRA on one model: each a TinyLoRA in the next slice of the base weight's
singular basis, merged exactly into the weight when kept, removed when not (volume-1 §9).

    round k: attach TinyLoRA in J_k = [k r, (k+1) r) of W0's SVD (ROTATE), train it (the caller),
             then keep it (merge into W, discard the adapter) or undo it (W untouched)

The SVD is taken of W0, once, at the first round, and its slices are handed to every round's
adapter: slices of the merged weight's own SVD would no longer be disjoint from the earlier
rounds' changes. Disjoint slices make the merged change W_K - W0 = Σ_k U_Jk Σ_Jk R_k V_Jkᵀ of rank
up to K r; a fixed slice (`rotate=False`) caps it at r. The rounds' factors are kept (A = V_Jᵀ,
B = U_J Σ_J R), so the whole change is also an ordinary LoRA of rank K r for the untouched base
(`adapter_state`): merged model and LoRA file are two forms of one change.

Training, mining the failing rows and deciding whether a round is kept belong to the caller
(`splice.boost.boostlora` with the trainer; any loop for a plain `nn.Module`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import splice
from splice.core.adapter_state import AdapterState, ModuleUpdate
from splice.core.api import check_merge
from splice.core.config import filled_from_file
from splice.core.errors import SpliceError
from splice.core.host import add_to_weight, hosts
from splice.core.layers import dense_weight
from splice.core.svd import product_svd
from splice.io.adapter_states import adapter_state
from splice.methods.tinylora import TinyLoRA

ROUND_ADAPTER = "boost"
RANK_TOLERANCE = 1e-6  # relative to σ₁: float32 factors leave round-off near 1e-7, never a real direction


class BoostRounds:
    """Boosting rounds of TinyLoRA(r, u) on `targets` of `model`, at most `max_rounds` slices.

    `begin()` attaches the next round's adapter (named `ROUND_ADAPTER`, trainable); `end(keep)`
    merges it into the base and discards it, or removes it leaving the weights as they were.
    `ranks()` gives each module's rank of the merged change, `adapter_state()` that change as a
    LoRA for the original base.
    """

    def __init__(self, model: nn.Module, r: int, u: int, *, targets: str | list[str] | None = "all-linear",
                 exclude: str | list[str] | None = None, layers: int | list[int] | None = None,
                 layers_pattern: str | list[str] | None = None, train_also: Sequence[str] = (), rotate: bool = True,
                 max_rounds: int = 8, seed: int = 0) -> None:
        if splice.adapters(model):
            raise SpliceError(f"BoostLoRA merges every round into the base weights, so the model must carry no "
                              f"adapter; attached: {sorted(splice.adapters(model))}")
        if max_rounds < 1:
            raise SpliceError(f"BoostLoRA needs at least one round, got max_rounds={max_rounds}")
        self.model, self.r, self.rotate, self.max_rounds = model, r, rotate, max_rounds
        self.template = TinyLoRA(r=r, u=u, targets=targets, exclude=exclude, layers=layers,
                                 layers_pattern=layers_pattern, train_also=list(train_also), seed=seed)
        self.seed = seed
        self.basis: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # W0's top slices
        self.updates: dict[str, list[ModuleUpdate]] = {}  # the kept rounds' factors, per module
        # W0 of the modules whose weights are not fp32/fp64 (bf16, fp16): a kept round sets them to
        # W0 + the whole change rounded once, not each round's change rounded into the last weight
        self.low_precision: dict[str, tuple[torch.Tensor, bool]] = {}  # W0 as stored, and whether [in, out]
        self.head_tensors: dict[str, torch.Tensor] = {}
        self.heads: list[str] = []
        self.base_model: str | None = None
        self.transposed = False  # Conv1D hosts (GPT-2): PEFT records fan_in_fan_out
        self._infos: dict[str, Any] = {}  # each adapted module's LayerInfo
        self.kept = 0  # rounds merged
        self.started = 0  # rounds begun
        self.open = False

    @property
    def offset(self) -> int:
        """The next round's first singular index: the kept rounds' slices are used up (an undone
        round gives its slice back); 0 always without rotation."""
        return self.kept * self.r if self.rotate else 0

    def slices_left(self) -> bool:
        """Whether another round has a slice: within `max_rounds` and the weights' ranks."""
        if self.started >= self.max_rounds:
            return False
        return not self.basis or all(self.offset + self.r <= U.shape[1] for U, _, _ in self.basis.values())

    def begin(self) -> dict[str, nn.Module]:
        """Attach the next round's TinyLoRA; its adapter modules by module name."""
        if self.open:
            raise SpliceError("a BoostLoRA round is open: end it (keep or undo) before the next")
        if not self.slices_left():
            raise SpliceError(f"no BoostLoRA round left ({self.started} of {self.max_rounds} begun, slice at "
                              f"{self.offset} of width {self.r})")
        # a new random basis P each round (seed + round), in the next slice
        config = self.template.replace(offset=self.offset, seed=self.seed + self.started)
        with filled_from_file():  # the slices come from W0's SVD below, not from the current weight
            splice.attach(self.model, config, ROUND_ADAPTER)
        try:
            check_merge(self.model, [ROUND_ADAPTER])  # every kept round is merged: refuse before training
            adapters = self._set_slices()
        except Exception:
            splice.detach(self.model, ROUND_ADAPTER)
            raise
        self.started += 1
        self.open = True
        return adapters

    def _set_slices(self) -> dict[str, nn.Module]:
        """Give the open round's adapters their slice of W0's basis (taken at the first round)."""
        adapters = {}
        for module_name, base, host in hosts(self.model):
            if ROUND_ADAPTER not in host:
                continue
            adapter = host[ROUND_ADAPTER]
            if module_name not in self.basis:
                weight = dense_weight(base, adapter.info)
                self.basis[module_name] = top_singular(weight, self.r * (self.max_rounds if self.rotate else 1))
                if base.weight.dtype not in (torch.float32, torch.float64):
                    self.low_precision[module_name] = (base.weight.detach().clone(), adapter.info.transposed)
            U, S, Vh = self.basis[module_name]
            J = slice(self.offset, self.offset + self.r)
            adapter.set_basis(U[:, J], S[J], Vh[J])
            adapters[module_name] = adapter
            self._infos[module_name] = adapter.info
            self.transposed |= adapter.info.transposed
        return adapters

    def end(self, keep: bool) -> None:
        """Merge the open round into the base weights and discard its adapter (`keep`), or remove
        it with the weights and heads as they were before the round."""
        if not self.open:
            raise SpliceError("no BoostLoRA round is open")
        if keep:
            state = adapter_state(self.model, ROUND_ADAPTER)
            splice.unload(self.model)  # merges exactly (fp32 accumulation), drops the adapter, keeps the heads
            for module_name, update in state.modules.items():  # recorded once the merge went through
                self.updates.setdefault(module_name, []).append(
                    ModuleUpdate(update.A.detach().clone(), update.B.detach().clone(), update.scaling))
            self.head_tensors = {k: v.detach().clone() for k, v in state.head_tensors.items()}
            self.heads, self.base_model = list(state.heads), state.base_model
            self._round_once()
            self.kept += 1
        else:
            splice.detach(self.model, ROUND_ADAPTER)
        self.open = False

    @torch.no_grad()
    def _round_once(self) -> None:
        """Low-precision weights become W0 + the whole change, rounded once (each round's merge
        rounded a change of a few numbers into bf16, where it may vanish)."""
        modules = dict(self.model.named_modules())
        for module_name, (original, transposed) in self.low_precision.items():
            B, A = self.factors(module_name)
            change = (B.double() @ A.double()).float()
            weight = modules[module_name].weight
            weight.copy_((original.float() + (change.T if transposed else change)).to(weight.dtype))

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What `restore` needs to put a fresh copy of the model where this one is: the kept
        rounds' factors and the heads (tensors), the counts and names (plain values)."""
        tensors = {f"head.{key}": value for key, value in self.head_tensors.items()}
        for module_name, updates in self.updates.items():
            for k, update in enumerate(updates):
                tensors[f"round.{k}.{module_name}.A"] = update.A.contiguous()
                tensors[f"round.{k}.{module_name}.B"] = (update.B * update.scaling).contiguous()
        meta = {"kept": self.kept, "started": self.started, "modules": list(self.updates), "heads": self.heads,
                "base_model": self.base_model}
        return tensors, meta

    @torch.no_grad()
    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Bring a fresh engine on the pretrained model to the saved state: W0's basis taken, the
        kept rounds merged in their order with the merge's own arithmetic (so the weights equal
        the uninterrupted run's bit for bit), the heads as the last kept round left them."""
        if self.started or self.open:
            raise SpliceError("restore() needs a fresh BoostRounds on the pretrained model")
        config = self.template.replace(offset=0)
        with filled_from_file():
            splice.attach(self.model, config, ROUND_ADAPTER)
        try:
            self._set_slices()  # W0's basis (and low-precision copies), from the untouched weights
        finally:
            splice.detach(self.model, ROUND_ADAPTER)
        modules = dict(self.model.named_modules())
        for k in range(meta["kept"]):
            for module_name in meta["modules"]:
                A, B = tensors[f"round.{k}.{module_name}.A"], tensors[f"round.{k}.{module_name}.B"]
                self.updates.setdefault(module_name, []).append(ModuleUpdate(A, B, 1.0))
                if module_name not in self.low_precision:
                    add_to_weight(modules[module_name], self._infos[module_name], B @ A)
        self.kept, self.started = meta["kept"], meta["started"]
        self.heads, self.base_model = list(meta["heads"]), meta["base_model"]
        self.head_tensors = {key[len("head."):]: value for key, value in tensors.items() if key.startswith("head.")}
        if self.head_tensors:
            missing = [key for key in self.head_tensors if key not in self.model.state_dict()]
            if missing:
                raise SpliceError(f"the saved heads do not fit the model: {missing[:5]}")
            self.model.load_state_dict(self.head_tensors, strict=False)
        if self.kept:
            self._round_once()

    def factors(self, module_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """B [out, K r] and A [K r, in] with B A = the module's merged change W_K - W0."""
        updates = self.updates[module_name]
        return (torch.cat([u.B * u.scaling for u in updates], dim=1), torch.cat([u.A for u in updates], dim=0))

    def ranks(self) -> dict[str, int]:
        """Each changed module's rank of W_K - W0 (singular values above RANK_TOLERANCE σ₁)."""
        ranks = {}
        for module_name in self.updates:
            _, S, _ = product_svd(*self.factors(module_name))
            ranks[module_name] = int((S > RANK_TOLERANCE * S[0]).sum()) if S.numel() and S[0] > 0 else 0
        return ranks

    def adapter_state(self) -> AdapterState:
        """The merged change as a LoRA (scaling 1, rank K r per module) for the original base, with
        the heads as the last kept round left them."""
        if not self.updates:
            raise SpliceError("no BoostLoRA round was kept: there is no change to write")
        modules = {}
        for module_name in self.updates:
            B, A = self.factors(module_name)
            modules[module_name] = ModuleUpdate(A, B, 1.0)
        return AdapterState(modules, dict(self.head_tensors), list(self.heads), base_model=self.base_model,
                            fan_in_fan_out=self.transposed)


def top_singular(weight: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `count` (at most the weight's rank) singular triplets of `weight` [out, in]:
    U [out, k], S [k], Vh [k, in], float32, from a float64 SVD."""
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    k = min(count, S.numel())
    return U[:, :k].float().contiguous(), S[:k].float(), Vh[:k].float().contiguous()

