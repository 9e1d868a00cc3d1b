"""The forgetting law's meter, protocol and fit, and the synthetic law of the spec (volume 2, §3 d 2).

Synthetic tasks: inputs of task T live in a p-dimensional subspace U_T of R^d, and its teacher is
y = (W0 + m_T U_Tᵀ) x: the frozen layer W0 plus a change whose input side is U_T. U_B is U_A
turned by φ (every principal angle between them is φ), and m_A ⊥ m_B are unit vectors, so the
tasks conflict wherever their inputs overlap. A full-weight learner that fits A then B would
forget F = cos²φ (1 + cos²φ) (accuracy = 1 - MSE / the variance of the task's own change); a
LoRA adds a small floor through its shared factors. d = 256 is large next to r <= 8, so the
random init of A rarely couples the two tasks; at d = 16 the per-seed spread of F at 90° is
~30% and its rank CV ~10%.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import splice
from splice.analysis.forgetting import (
    accuracy_matrix,
    fit_forgetting_law,
    forgetting,
    gradient_subspace,
    subspace_angle,
)

D, P = 256, 2  # input dimension, dimension of each task's input subspace
ANGLES = [0.0, 18.0, 36.0, 54.0, 72.0, 90.0]
SEEDS = [0, 1]
STEPS, LR, BATCH = 150, 0.2, 16


@dataclass
class RegressionTask:
    x: torch.Tensor  # training inputs [64, D]
    y: torch.Tensor
    x_eval: torch.Tensor  # held-out inputs [256, D]
    y_eval: torch.Tensor
    y_eval_base: torch.Tensor  # what the frozen layer alone predicts on them


def make_tasks(phi_degrees: float, seed: int, identical: int = 0) -> tuple[torch.Tensor, list[RegressionTask]]:
    """W0 and tasks A, B at angle φ; with `identical` = K, K copies of task A instead."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(D, 2 * P, generator=g))[0]
    phi = math.radians(phi_degrees)
    u_a, u_b = q[:, :P], math.cos(phi) * q[:, :P] + math.sin(phi) * q[:, P:]
    m = torch.linalg.qr(torch.randn(P, 2, generator=g))[0].T  # two orthonormal rows
    w0 = torch.randn(1, D, generator=g) / math.sqrt(D)
    specs = [(u_a, m[:1])] * identical if identical else [(u_a, m[:1]), (u_b, m[1:])]
    tasks = []
    for u, m_t in specs:
        teacher = w0 + m_t @ u.T
        x, x_eval = (u @ torch.randn(P, 64, generator=g)).T, (u @ torch.randn(P, 256, generator=g)).T
        tasks.append(RegressionTask(x, x @ teacher.T, x_eval, x_eval @ teacher.T, x_eval @ w0.T))
    return w0, tasks


def lora_model(w0: torch.Tensor, r: int, seed: int) -> nn.Module:
    layer = nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w0)
    torch.manual_seed(seed)
    return splice.attach(nn.Sequential(layer), splice.LoRA(r=r, alpha=r, targets=["0"]))


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def batches(task: RegressionTask, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(task.x[i : i + size], task.y[i : i + size]) for i in range(0, len(task.x), size)]


def run_sequence(model: nn.Module, tasks: list[RegressionTask]) -> list[list[float]]:
    """SGD on each task in turn (one LoRA carried over); the accuracy matrix."""
    params = list(splice.trainable_parameters(model).values())

    def train(task: RegressionTask) -> None:
        optimizer = torch.optim.SGD(params, lr=LR)
        for step in range(STEPS):
            i = step * BATCH % len(task.x)
            loss = mse(model, (task.x[i : i + BATCH], task.y[i : i + BATCH]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def evaluate(task: RegressionTask) -> float:
        error = ((model(task.x_eval) - task.y_eval) ** 2).mean()
        return 1.0 - (error / ((task.y_eval - task.y_eval_base) ** 2).mean()).item()

    return accuracy_matrix(tasks, train, evaluate)


def two_task_point(phi: float, r: int, seed: int) -> tuple[float, float]:
    """(θ_min between the tasks' gradient subspaces at the untrained model, F of task A)."""
    w0, tasks = make_tasks(phi, seed)
    model = lora_model(w0, r, seed)
    spaces = [gradient_subspace(model, batches(task), mse, k=8) for task in tasks]
    theta = subspace_angle(*spaces).mean
    return theta, forgetting(run_sequence(model, tasks))[0]


@pytest.fixture(scope="module")
def law_points() -> dict[tuple[float, int, int], tuple[float, float]]:
    """(φ, r, seed) -> (θ_min, F): every angle at r = 4, every rank at 90°."""
    torch.set_num_threads(1)
    keys = [(phi, 4, s) for phi in ANGLES for s in SEEDS] + [(90.0, r, s) for r in (1, 2, 8) for s in SEEDS]
    return {key: two_task_point(*key) for key in keys}


def test_gradient_angle_recovers_the_constructed_angle(law_points):
    for (phi, _, _), (theta, _) in law_points.items():
        assert theta == pytest.approx(math.radians(phi), abs=1e-4)


def test_forgetting_falls_with_the_angle_and_follows_the_law(law_points):
    mean_f = [statistics.mean(law_points[(phi, 4, s)][1] for s in SEEDS) for phi in ANGLES]
    assert all(later <= earlier for earlier, later in zip(mean_f, mean_f[1:], strict=False)), mean_f
    assert mean_f[0] > 1.5  # full overwrite: cos²0 (1 + cos²0) = 2
    points = [law_points[(phi, 4, s)] for phi in ANGLES for s in SEEDS]
    law = fit_forgetting_law([t for t, _ in points], [f for _, f in points])
    assert law.r2 > 0.9, law
    assert law.a < 0  # forgetting grows with overlap


def test_forgetting_barely_depends_on_rank_at_90_degrees(law_points):
    per_rank = [statistics.mean(law_points[(90.0, r, s)][1] for s in SEEDS) for r in (1, 2, 4, 8)]
    cv = statistics.pstdev(per_rank) / statistics.mean(per_rank)
    assert cv < 0.05, per_rank


def test_identical_tasks_forget_nothing():
    """Metric sanity (§4): K identical tasks in a row -> F_j ~ 0 for every j."""
    w0, tasks = make_tasks(0.0, seed=3, identical=3)
    matrix = run_sequence(lora_model(w0, 4, seed=3), tasks)
    assert min(min(row) for row in matrix) > 0.99
    assert max(abs(f) for f in forgetting(matrix)) < 1e-3


def test_identical_tasks_have_zero_gradient_angle():
    w0, (task, _) = make_tasks(0.0, seed=4)
    model = lora_model(w0, 2, seed=4)
    first, second = (gradient_subspace(model, batches(task)[half::2], mse, k=4) for half in (0, 1))
    assert first["0"].shape[1] == P
    assert subspace_angle(first, second).mean == pytest.approx(0.0, abs=1e-5)


def test_gradient_subspace_is_the_weight_gradient_in_canonical_layout(gpt2, ids):
    """GPT-2's Conv1D stores [in, out]; the sample is dL/dW as [out, in], flattened. The frozen
    weights keep requires_grad=False and no .grad is left anywhere."""
    splice.attach(gpt2, splice.LoRA(r=2, targets=["c_attn"]))
    spaces = gradient_subspace(gpt2, [{"input_ids": ids, "labels": ids}], k=1, modules=["0.attn.c_attn"])
    assert list(spaces) == ["transformer.h.0.attn.c_attn"]
    weight = gpt2.transformer.h[0].attn.c_attn.weight
    assert not weight.requires_grad and all(p.grad is None for p in gpt2.parameters())
    weight.requires_grad_(True)
    (grad,) = torch.autograd.grad(gpt2(input_ids=ids, labels=ids).loss, [weight])
    weight.requires_grad_(False)
    expected = grad.T.flatten().double() / grad.norm()
    assert spaces["transformer.h.0.attn.c_attn"].dtype == weight.dtype  # kept in the weights' dtype
    basis = spaces["transformer.h.0.attn.c_attn"][:, 0].double()
    assert torch.allclose(basis * torch.sign(basis @ expected), expected, atol=1e-6)


def test_subspace_angle_of_float32_bases_keeps_small_angles_on_a_large_layer():
    """Bases stored in float32 (as `gradient_subspace` keeps them) still give a 1e-3 rad angle to
    1e-6, on a layer as large as a vocabulary projection, where numpy's rank rule on float32
    (n * eps > 1) would have called every stored direction round-off."""
    n, phi = 9_000_000, 1e-3
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, 3, generator=generator, dtype=torch.float64))
    first = q[:, :2]
    second = torch.stack([math.cos(phi) * q[:, 0] + math.sin(phi) * q[:, 2], q[:, 1]], dim=1)
    angle = subspace_angle({"lm_head": first.float()}, {"lm_head": second.float()})
    assert angle.min == pytest.approx(0.0, abs=1e-6)  # the shared direction q_1
    third = torch.stack([math.cos(phi) * q[:, 0] + math.sin(phi) * q[:, 2]], dim=1)
    assert subspace_angle({"lm_head": q[:, :1].float()}, {"lm_head": third.float()}).min == pytest.approx(phi, abs=1e-6)


def test_gradient_subspace_needs_an_adapter(gpt2, ids):
    with pytest.raises(splice.SpliceError, match="attach"):
        gradient_subspace(gpt2, [{"input_ids": ids, "labels": ids}])


def test_accuracy_matrix_and_forgetting_on_a_hand_made_example():
    scores = iter([0.9, 0.1, 0.2, 0.7, 0.8, 0.3, 0.6, 0.5, 0.9])
    trained = []
    matrix = accuracy_matrix(["a", "b", "c"], trained.append, lambda task: next(scores))
    assert trained == ["a", "b", "c"]
    assert matrix == [[0.9, 0.1, 0.2], [0.7, 0.8, 0.3], [0.6, 0.5, 0.9]]
    assert forgetting(matrix) == pytest.approx([0.9 - 0.6, 0.8 - 0.5])
    assert forgetting([[0.9, 0.5], [0.6, 0.8]]) == pytest.approx([0.3])  # acc_A(A) - acc_A(A then B)
    with pytest.raises(splice.SpliceError, match="square"):
        forgetting([[0.9, 0.5]])


def test_fit_recovers_a_known_law_exactly():
    thetas = [0.0, 0.3, 0.7, 1.1, 1.4, math.pi / 2]
    law = fit_forgetting_law(thetas, [-0.7 * math.sin(t) ** 2 + 0.4 for t in thetas])
    assert (law.a, law.b, law.r2, law.r, law.n) == pytest.approx((-0.7, 0.4, 1.0, -1.0, 6), abs=1e-12)
    assert law.predict(0.0) == pytest.approx(0.4)
    with pytest.raises(splice.SpliceError, match="two different angles"):
        fit_forgetting_law([0.5, 0.5], [0.1, 0.2])
