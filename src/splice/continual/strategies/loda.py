"""`loda`: LoDA, task-driven subspace decomposition of LoRA for continual learning (He, Cheng et al.,
arXiv 2603.00191). Only the abstract is public; what follows marks what it says and what is
reconstructed here (volume 1, §5).

From the paper: for each new task the LoRA update space is split into a *general* subspace P_g,
active on both the new and the old tasks' inputs (transfer), and a *task-specific* subspace P_s,
active on the new task and nearly silent on the old ones (isolation), both chosen by projection
energy. The down-projections are fixed to them and only the up-projections learn, with
"Gradient-Aligned Optimization" (GAO); before merging, the general update is recalibrated in
closed form towards a feature-level joint optimum along the shared directions.

Reconstructed [inferred], per adapted Linear layer with inputs x ∈ R^in:

    Σ_t = E[x xᵀ] over task t's tokens (padding excluded),  Σ_old = Σ_{t<T} Σ_t  (statistics only)
    E_t(P) = tr(P Σ_t Pᵀ)                            projection energy of orthonormal rows P
    P_g: top k_g eigenvectors of the harmonic mean H = 2 Σ_new (Σ_new + Σ̄_old + ε̄I)⁻¹ Σ̄_old
         (Σ̄_old = Σ_old/(T-1), the old tasks' average): vᵀHv <= 2 min(E_new(v), E_old(v)), so
         they maximise a bound on the energy a direction has on both the new and the old tasks
    P_s: top k_s of  Σ_new p = μ (Σ̄_old + ε̄ I) p  in the orthogonal complement of P_g,
         orthonormalised (QR keeps the nested spans, so the span is the generalised top-k_s)
    ΔW = s [B_g, B_s] [P_g; P_s],  A = [P_g; P_s] frozen, B = 0 at the start, B trained
    GAO (placeholder): + γ Σ_layers s² tr(B_g P_g Σ_old P_gᵀ B_gᵀ) / out, the mean squared change
         of an old output through the general subspace, from the statistics alone (no old data)
    recalibration: B_g* = argmin_B ‖B P_g X_new − B_g P_g X_new‖² + Σ_{t<T} ‖B P_g X_t‖² + λ̄‖B‖²
         = B_g C_new (C_new + C_old + λ̄ I)⁻¹,  C = P_g Σ Pᵀ_g  (per-task means, each task weighs 1)
    then merge: W ← W + s (B_g* P_g + B_s P_s).

ε̄ = eps·tr(Σ_new)/in and λ̄ = ridge·tr(C_new + C_old)/k_g, so both options are scale-free. On the
first task there are no old statistics: A holds the top k_g + k_s eigenvectors of Σ_new (the first
k_g called general), with no penalty and no recalibration (with no old term, B_g* is B_g up to the
ridge). The null-space alternative the paper argues against (GPM, InfLoRA) is `null_space_basis`.

Measured [not from the paper]: orthonormal rows along the top input-energy directions project a
decoder's inputs hard, since those directions carry its massive activations (SmolLM2-135M: |P x|
a median 12x a fresh LoRA A's; MiniLM 7x), so at LoRA's learning rate each step on B moves the
outputs ~12x more than a LoRA step. On SmolLM2's first task LoDA reached 0.56 at LoRA's 2e-3 and
0.84 at 6e-4 (LoRA 0.88). Rescaling A to a LoRA A's input energy instead made it too slow on the
tiny test BERT (0.44 vs 0.97 at the test's rate), so the rows stay orthonormal and the rate is
the user's (README).

The spec's simpler stand-in for P_g (eigenvectors of Σ_new whose old/new energy ratio is at
least τ) fails on sampled statistics: where a shared and a specific direction carry about the same
new energy, Σ_new's eigenvectors mix them, and P_g takes part of the specific directions (old/new
ratios 0.67-0.88 instead of ~1, and E_old(P_s)/E_new(P_s) = 0.13 instead of < 0.1, on the test
stream's sampled statistics, task 2). The harmonic mean separates them (0.92-1.10, and 0.054).

Measured on that stream: a GAO penalty during training and the recalibration both shrink B_g
towards the joint optimum, so using both shrinks twice: with γ = 1 the recalibration raises the
seen tasks' mean MSE (0.112 -> 0.120 at task 3), with γ = 0 it lowers it (0.120 -> 0.108), and
γ = 0 ends lowest (0.108; 0.112 with γ = 0.3, 0.120 with γ = 1). The default `gao` is therefore
0, and the recalibration does the sharing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

import splice
from splice.continual.strategies.base import Penalty, Strategy, TaskContext, active
from splice.core.api import attaching
from splice.core.config import AdapterConfig
from splice.core.errors import ConfigError
from splice.core.host import hosts
from splice.methods.lora import LoRA, lora_scale

Statistics = dict[str, tuple[torch.Tensor, int]]  # layer -> (Σ x xᵀ [in, in] float64, tokens)
Forward = Callable[[nn.Module, dict[str, torch.Tensor]], Any]


def model_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """`model(**batch)` without labels: statistics need the inputs only, never a loss."""
    return model(**{key: value for key, value in batch.items() if key != "labels"})


def input_covariances(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                      layers: Iterable[str] | None = None, forward: Forward = model_forward) -> Statistics:
    """(Σ x xᵀ, token count) of the inputs of hosted Linear layers (`layers`, default all), in
    float64, over `batches` run through `forward` in eval mode without gradients.

    Tokens are the rows of the input flattened to [-1, in]. Where the batch has an
    `attention_mask` with one entry per token of the input, padded tokens are left out (other
    inputs, e.g. after packing or pooling, count every row). The forward must run through as it
    would in training: a model with per-task heads needs one selected.
    """
    wanted = None if layers is None else set(layers)
    sites = {name: base for name, base, _ in hosts(model) if wanted is None or name in wanted}
    stats: dict[str, list] = {name: [None, 0] for name in sites}
    mask: list[torch.Tensor | None] = [None]

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().double()
            x = x.reshape(-1, x.shape[-1])
            weight = mask[0]
            if weight is None or weight.numel() != x.shape[0]:
                weight = torch.ones(x.shape[0], device=x.device)
            weight = weight.reshape(-1, 1).to(x)
            moment = (x * weight).T @ x
            entry = stats[name]
            entry[0] = moment if entry[0] is None else entry[0] + moment
            entry[1] += int(weight.sum().item())
        return hook

    handles = [base.register_forward_pre_hook(record(name)) for name, base in sites.items()]
    modes = {module: module.training for module in model.modules()}
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {key: value.to(device) for key, value in batch.items()}
                mask[0] = batch.get("attention_mask")
                forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)
    return {name: (moment, count) for name, (moment, count) in stats.items() if moment is not None}


def energy(P: torch.Tensor, sigma: torch.Tensor) -> float:
    """Projection energy tr(P Σ Pᵀ) of the rows of P."""
    return torch.trace(P @ sigma @ P.T).item()


def subspaces(sigma_new: torch.Tensor, sigma_old: torch.Tensor | None, k_general: int, k_specific: int,
              eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_g [k_g, in], P_s [k_s, in]), orthonormal rows, mutually orthogonal (module docstring).

    `sigma_new` and `sigma_old` are mean covariances (E[x xᵀ]); `sigma_old` None (first task)
    gives the top k_g + k_s eigenvectors of `sigma_new`, split in that order.
    """
    sigma_new = sigma_new.double()
    dim = sigma_new.shape[0]
    if k_general + k_specific > dim:
        raise ConfigError(f"loda: general + specific = {k_general + k_specific} exceeds the layer's "
                          f"input size {dim}")
    if sigma_old is None:
        top = torch.linalg.eigh(sigma_new)[1].flip(-1)[:, : k_general + k_specific].T.contiguous()
        return top[:k_general], top[k_general:]
    sigma_old = sigma_old.double()
    floor = eps * torch.trace(sigma_new) / dim * torch.eye(dim, dtype=sigma_new.dtype, device=sigma_new.device)
    harmonic = 2 * sigma_new @ torch.linalg.solve(sigma_new + sigma_old + floor, sigma_old)
    vectors = torch.linalg.eigh((harmonic + harmonic.T) / 2)[1].flip(-1)  # by decreasing shared energy
    general, complement = vectors[:, :k_general], vectors[:, k_general:]
    a = complement.T @ sigma_new @ complement
    b = complement.T @ (sigma_old + floor) @ complement
    specific = complement @ _generalized_top(a, b, k_specific)
    return general.T.contiguous(), torch.linalg.qr(specific).Q.T.contiguous()


def _generalized_top(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """The top k vectors p of a p = μ b p (b positive definite), as columns, by decreasing μ."""
    L = torch.linalg.cholesky(b)
    whitened = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, a, upper=False).T, upper=False)
    _, vectors = torch.linalg.eigh((whitened + whitened.T) / 2)
    return torch.linalg.solve_triangular(L.T, vectors.flip(-1)[:, :k], upper=True)


def null_space_basis(sigma_old: torch.Tensor, k: int) -> torch.Tensor:
    """[k, in]: the k directions of least old energy (the null-space choice of GPM / InfLoRA)."""
    return torch.linalg.eigh(sigma_old.double())[1][:, :k].T.contiguous()


def recalibrate(B_g: torch.Tensor, P_g: torch.Tensor, sigma_new: torch.Tensor, sigma_old: torch.Tensor,
                ridge: float = 1e-3) -> torch.Tensor:
    """B_g* = B_g C_new (C_new + C_old + λ̄ I)⁻¹ with C = P_g Σ P_gᵀ, λ̄ = ridge·tr(C_new + C_old)/k_g:
    the general update that keeps the new task's general outputs and the old tasks' outputs
    (`sigma_old`: the sum of the old tasks' mean covariances) jointly closest, in float64."""
    P = P_g.double()
    c_new = P @ sigma_new.double() @ P.T
    total = c_new + P @ sigma_old.double() @ P.T
    k = P.shape[0]
    total = total + ridge * torch.trace(total) / k * torch.eye(k, dtype=total.dtype, device=total.device)
    return torch.linalg.solve(total, (B_g.double() @ c_new).T).T.to(B_g.dtype)


def old_output_change(B_g: torch.Tensor, c_old: torch.Tensor, scaling: float) -> torch.Tensor:
    """s² tr(B_g C_old B_gᵀ) / out: the mean squared change of an old output along P_g (GAO)."""
    return scaling ** 2 * ((B_g @ c_old) * B_g).sum() / B_g.shape[0]


class LoDA(Strategy):
    """A LoRA per task with frozen A = [P_g; P_s] and trained B, recalibrated and merged when its
    task ends; only the input covariances are kept.

    Options: `general` (k_g) and `specific` (k_s), the two subspaces' sizes (the adapter's rank is
    k_g + k_s; its alpha is set to keep the adapter config's scaling s); `eps`, the floor added to
    Σ_old in both eigenproblems (times the mean new eigenvalue); `ridge`, the recalibration's λ
    (times the mean eigenvalue of C_new + C_old); `gao`, the weight γ of the GAO placeholder
    penalty (0: none, see the module docstring); `statistic_batches`, the training batches per
    task the covariances are taken from (the harness's seeded shuffle).
    """

    name = "loda"

    def __init__(self, adapter: AdapterConfig, general: int = 4, specific: int = 4, eps: float = 1e-3,
                 ridge: float = 1e-3, gao: float = 0.0, statistic_batches: int = 8) -> None:
        super().__init__(adapter)
        _check_options(adapter, general=general, specific=specific, eps=eps, ridge=ridge, gao=gao,
                       statistic_batches=statistic_batches)
        self.general, self.specific, self.statistic_batches = general, specific, statistic_batches
        self.eps, self.ridge, self.gao = float(eps), float(ridge), float(gao)
        self.old: dict[str, torch.Tensor] = {}  # layer -> Σ_{t<T} Σ_t (per-task means), float64, CPU
        self.new: dict[str, torch.Tensor] = {}  # layer -> Σ_T of the task under way

    def task_config(self) -> LoRA:
        """The adapter config with rank k_g + k_s, the same scaling s, and zero init (A is set)."""
        a = self.adapter
        scaling = lora_scale(a.scaling_rule, a.alpha, a.r, a.num_clients)
        rank = self.general + self.specific
        return a.replace(r=rank, alpha=scaling * rank, rslora=False, scaling=None, num_clients=None, init="zeros")

    def begin_task(self, model: nn.Module, task: TaskContext) -> str:
        with attaching(model, self.task_config(), task.name):
            sites = {name: host[task.name] for name, _, host in hosts(model) if task.name in host}
            for name, adapter in sites.items():
                if adapter.info.kind != "linear":
                    raise ConfigError(f"loda needs Linear (or Conv1D) layers; {name} is a {adapter.info.kind} layer")
            stats = input_covariances(model, task.batches(self.statistic_batches), sites)
            missing = [name for name in sites if name not in stats or stats[name][1] == 0]
            if missing:
                raise ConfigError(f"loda: layers {missing} saw no input in task {task.name!r}'s statistic batches")
            self.new = {name: (moment / count).cpu() for name, (moment, count) in stats.items()}
            for name, adapter in sites.items():
                old = self.old[name] / len(self.trained) if self.trained else None
                P_g, P_s = subspaces(self.new[name], old, self.general, self.specific, self.eps)
                with torch.no_grad():
                    adapter.lora_A.copy_(torch.cat([P_g, P_s]).to(adapter.lora_A))
        splice.activate(model, task.name)
        for adapter in sites.values():
            adapter.lora_A.requires_grad_(False)  # fixed down-projections: the Trainer trains B
        return task.name

    def penalties(self, model: nn.Module, task: TaskContext) -> list[Penalty]:
        if not self.trained or self.gao == 0 or self.general == 0:
            return []
        k, weight = self.general, self.gao
        terms = []
        for name, _, host in hosts(model):
            if task.name in host:
                adapter = host[task.name]
                P_g = adapter.lora_A[:k].detach().double().cpu()
                c_old = (P_g @ self.old[name] @ P_g.T).to(adapter.lora_B)
                terms.append((adapter.lora_B, c_old, adapter.scaling))

        def gao() -> torch.Tensor:
            return weight * sum(old_output_change(B[:, :k], c_old, s) for B, c_old, s in terms)

        return [gao]

    def end_task(self, model: nn.Module, task: TaskContext) -> None:
        k = self.general
        if self.trained and k:
            for name, _, host in hosts(model):
                if task.name in host:
                    adapter = host[task.name]
                    B_g = recalibrate(adapter.lora_B[:, :k].detach().cpu(), adapter.lora_A[:k].detach().cpu(),
                                      self.new[name], self.old[name], self.ridge)
                    with torch.no_grad():
                        adapter.lora_B[:, :k] = B_g.to(adapter.lora_B)
        splice.merge(model, task.name)
        for name, sigma in self.new.items():
            self.old[name] = self.old[name] + sigma if name in self.old else sigma
        self.new = {}
        super().end_task(model, task)

    def rebuild(self, model: nn.Module, task: TaskContext) -> None:
        splice.attach(model, self.task_config(), task.name)
        splice.merge(model, task.name)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "old": self.old}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.old = dict(state["old"])

    @contextmanager
    def view(self, model: nn.Module, task: str) -> Iterator[None]:
        with active(model, []):  # every finished task is merged into the weights
            yield

    def stored_bytes(self, model: nn.Module) -> int:
        """The accumulated covariances (the merged adapters are in the weights, not needed apart)."""
        return sum(t.numel() * t.element_size() for t in self.old.values())


def _check_options(adapter: AdapterConfig, **options: Any) -> None:
    """ConfigErrors naming the option and its value."""
    if getattr(adapter, "method", None) != "lora" or not isinstance(adapter, LoRA):
        raise ConfigError(f"loda needs a plain LoRA adapter (method: lora); got method "
                          f"{getattr(adapter, 'method', None)!r}")
    if adapter.lora_bias or adapter.rank_pattern or adapter.alpha_pattern:
        raise ConfigError("loda sets the LoRA rank to general + specific and has no bias term: "
                          "leave lora_bias, rank_pattern and alpha_pattern unset")
    for key, least in (("general", 0), ("specific", 0), ("statistic_batches", 1)):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"loda: {key} must be an integer >= {least}, got {value!r}")
    if options["general"] + options["specific"] < 1:
        raise ConfigError("loda: general + specific must be >= 1, got 0")
    for key in ("eps", "ridge", "gao"):
        value = options[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (number and (value > 0 if key == "eps" else value >= 0)):
            raise ConfigError(f"loda: {key} must be a finite number {'>' if key == 'eps' else '>='} 0, "
                              f"got {value!r}")
