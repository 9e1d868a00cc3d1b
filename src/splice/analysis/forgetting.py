"""The Geometric Forgetting Law: how much sequential training on task B makes a LoRA forget task
A, predicted from the geometry of the two tasks' gradients (Steele, arXiv 2603.02224).

    F = a (1 - cos² θ_min) + b

F is the forgetting of task A, `acc_A(after A) - acc_A(after A then B)`, and θ_min the smallest
principal angle between the gradient subspaces of A and B. Overlapping subspaces (θ_min -> 0)
should forget most, so a is expected to be negative; it is fitted, never assumed. Three parts:

- `gradient_subspace` / `subspace_angle`: the angle meter. A task's gradient subspace at one
  adapted layer is spanned by k gradient samples, one per mini-batch, of the loss with respect to
  the layer's weight W, `G = dL/dW` (flattened, canonical [out, in] layout). Why this gradient
  rather than the adapter's own parameters': `h = W x + ΔW x` with ΔW = s B A, so dL/dW is
  exactly the gradient with respect to the LoRA product ΔW, the only thing a LoRA changes. It does
  not depend on the adapter's parametrisation: the same for every rank and init, so the angle is a
  property of the two tasks at that model, not of a random A. The factors' own gradients are a
  poor proxy: at B = 0, dL/dA = s Bᵀ G is zero and dL/dB = s G Aᵀ is G seen through the random A.
- `accuracy_matrix` / `forgetting`: the protocol for a sequence of tasks: a[t][j] is the accuracy
  on task j after training on tasks 0..t, and F_j = max_{t<K} a[t][j] - a[K][j] (Chaudhry et al.,
  2018), which for two tasks is exactly the two-task F above.
- `fit_forgetting_law`: a, b and R² by least squares on x = 1 - cos² θ_min.

Everything is generic over what a task is: `accuracy_matrix` takes any task objects with a train
and an evaluate callable, and `gradient_subspace` any iterable of batches with a loss function,
so the same code measures a synthetic regression and a trainer-based classification run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from splice.analysis.angles import min_principal_angle, orthonormal_basis
from splice.core.config import Targets
from splice.core.errors import SpliceError
from splice.core.host import hosts
from splice.core.layers import is_plain_float_weight
from splice.core.targets import matches

Task = TypeVar("Task")
LossFn = Callable[[nn.Module, Any], torch.Tensor]


def _model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default loss: `model(**batch).loss`, as a transformers model computes it from labels."""
    return model(**batch).loss


def _has_float_weight(base: nn.Module) -> bool:
    weight = getattr(base, "weight", None)  # a representation site (a whole block) has none
    return isinstance(weight, torch.Tensor) and is_plain_float_weight(weight)


def gradient_subspace(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    k: int = 8,
    modules: Targets = None,
    rtol: float = 1e-5,
) -> dict[str, torch.Tensor]:
    """Orthonormal bases [out*in, <=k] of a task's gradient subspace at every adapted layer, in
    the weights' dtype (computed in float64; `subspace_angle` measures them in float64).

    The first k batches each give one sample `dL/dW` per layer (see the module docstring), taken
    at the model as it is now: its adapters' current weights, its train/eval mode (call
    `model.eval()` for samples without dropout). The base weights are made to require grad for
    the duration and restored; nothing is accumulated into any `.grad`.

    Args:
        model: a model with adapters attached (`splice.attach`); its adapted layers are measured.
        batches: the task's mini-batches; k of them are used.
        loss_fn: `loss_fn(model, batch)` -> scalar loss; default `model(**batch).loss`.
        k: gradient samples (mini-batches) per subspace.
        modules: which adapted layers, with the `targets` rules (names or suffixes, or a regex);
            None: every adapted layer with a plain floating-point weight.
        rtol: directions whose singular value is below rtol times the largest are dropped, so
            that float32 round-off in a rank-deficient set of samples does not become a spurious
            direction (which could sit at any angle to the other task's subspace).
    """
    if k < 1:
        raise SpliceError(f"k (gradient samples per subspace) must be >= 1, got {k}")
    loss_fn = loss_fn or _model_loss
    sites = [(name, base, host.info.transposed) for name, base, host in hosts(model)
             if _has_float_weight(base) and (modules is None or matches(modules, name))]
    if not sites:
        raise SpliceError("no adapted layer with a floating-point weight to take gradients at"
                          + ("" if modules is None else f" among modules {modules!r}")
                          + "; attach an adapter first (splice.attach)")
    weights = [base.weight for _, base, _ in sites]
    flags = [w.requires_grad for w in weights]
    samples: list[list[torch.Tensor]] = [[] for _ in sites]
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in itertools.islice(batches, k):
            grads = torch.autograd.grad(loss_fn(model, batch), weights, allow_unused=True)
            for found, (_, base, transposed), grad in zip(samples, sites, grads, strict=True):
                grad = torch.zeros_like(base.weight) if grad is None else grad.detach()
                found.append((grad.T if transposed else grad).flatten().cpu())  # widened per layer below
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
    if not samples[0]:
        raise SpliceError("no batches to take gradient samples from")
    bases = {}
    for (name, _, _), found in zip(sites, samples, strict=True):
        # float64 one layer at a time (exactly the values a per-sample .double() gives), and the
        # layer's samples let go once stacked: at most one layer's samples in float64 at a time
        # (all of SmolLM2's linear layers' gradients are 0.43 GB a sample in float32). The basis
        # is kept in the samples' dtype: float64 bases of every layer were the largest allocation
        # (two tasks' at a task switch: 14 GB for SmolLM2 at k = 8); `subspace_angle`
        # re-orthonormalises each in float64, so the angles move by round-off only (~1e-7 rad)
        dtype = found[0].dtype
        stacked = torch.stack(found, dim=1).double()
        found.clear()
        largest = torch.linalg.svdvals(stacked)[0].item()
        basis = orthonormal_basis(stacked, tolerance=rtol * largest) if largest > 0 else stacked[:, :0]
        bases[name] = basis.to(dtype)
    return bases


@dataclass(frozen=True)
class SubspaceAngle:
    """θ_min (radians) between two tasks' gradient subspaces, per layer and aggregated."""

    per_module: dict[str, float]
    mean: float  # over layers, as the paper aggregates
    min: float  # the closest pair of subspaces anywhere in the model


def subspace_angle(task_a: dict[str, torch.Tensor], task_b: dict[str, torch.Tensor]) -> SubspaceAngle:
    """The smallest principal angle between two `gradient_subspace` results, layer by layer.

    A layer whose gradient vanished for a task (an empty basis) counts as orthogonal (pi/2).
    """
    shared = [name for name in task_a if name in task_b]
    if not shared:
        raise SpliceError(f"the two subspaces share no layer: {sorted(task_a)[:4]} vs {sorted(task_b)[:4]}")
    # orthonormal columns stored in float32 have singular values 1 ± 1e-6: every one is a direction
    per_module = {name: min_principal_angle(task_a[name], task_b[name], tolerance=0.5) for name in shared}
    values = list(per_module.values())
    return SubspaceAngle(per_module, sum(values) / len(values), min(values))


def accuracy_matrix(
    tasks: Sequence[Task], train: Callable[[Task], object], evaluate: Callable[[Task], float]
) -> list[list[float]]:
    """Train on the tasks in order; after each, evaluate every task: a[t][j] (K x K).

    `train(task)` trains the model the caller holds, in place (one adapter carried over from
    task to task); `evaluate(task)` returns its accuracy (any score where higher is better).
    """
    matrix = []
    for task in tasks:
        train(task)
        matrix.append([float(evaluate(other)) for other in tasks])
    return matrix


def forgetting(matrix: Sequence[Sequence[float | None]]) -> list[float]:
    """F_j = max_{j<=t<K} a[t][j] - a[K][j] for every task j but the last (K = the final row):
    the best accuracy task j had once trained, minus its last. Entries before task j was
    trained (None where not evaluated) do not count.

    For two tasks, F_0 = acc_A(after A) - acc_A(after A then B). Negative means the later tasks
    improved task j (backward transfer).
    """
    rows = [list(row) for row in matrix]
    if len(rows) < 2 or any(len(row) != len(rows) for row in rows):
        raise SpliceError(f"an accuracy matrix is square with at least 2 tasks; got rows of lengths "
                          f"{[len(row) for row in rows]}")
    K = len(rows) - 1
    return [max(float(rows[t][j]) for t in range(j, K)) - float(rows[K][j]) for j in range(K)]


@dataclass(frozen=True)
class ForgettingLaw:
    """F = a (1 - cos² θ_min) + b, least-squares fitted; r2 its coefficient of determination and
    r the Pearson correlation of x = 1 - cos² θ_min with F (sign(a) * sqrt(r2))."""

    a: float
    b: float
    r2: float
    r: float
    n: int

    def predict(self, theta_min: float) -> float:
        return self.a * (1.0 - math.cos(theta_min) ** 2) + self.b


def fit_forgetting_law(theta_min: Sequence[float], forgetting: Sequence[float]) -> ForgettingLaw:
    """Fit the law to (θ_min in radians, F) points. R² and r are nan when F does not vary."""
    theta = torch.as_tensor(list(theta_min), dtype=torch.float64)
    F = torch.as_tensor(list(forgetting), dtype=torch.float64)
    if theta.shape != F.shape or theta.dim() != 1:
        raise SpliceError(f"need as many angles as forgetting values; got {theta.numel()} and {F.numel()}")
    for what, values in (("angle", theta), ("forgetting value", F)):
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad:
            raise SpliceError(f"{what} {bad[0]} is {values[bad[0]].item()}: the fit needs finite points "
                              "(a diverged run's accuracy?)")
    x = 1.0 - torch.cos(theta) ** 2
    dx, dF = x - x.mean(), F - F.mean()
    sxx = (dx * dx).sum().item()
    if len(x) < 2 or sxx <= 1e-24:
        raise SpliceError("the fit needs at least two different angles (1 - cos² θ_min must vary)")
    a = (dx * dF).sum().item() / sxx
    b = F.mean().item() - a * x.mean().item()
    ss_res = ((F - (a * x + b)) ** 2).sum().item()
    ss_tot = (dF * dF).sum().item()
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    r = math.copysign(math.sqrt(max(r2, 0.0)), a) if ss_tot > 0 else math.nan
    return ForgettingLaw(a, b, r2, r, len(x))
