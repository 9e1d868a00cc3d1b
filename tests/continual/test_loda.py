"""LoDA (volume 1, §5): the spec's four CPU tests (d)1-4 on a linear-regression stream of three
correlated Gaussian tasks (d = 32), the functional core against its formulas, the options, and a
two-task harness run on the tiny BERT.

The stream: inputs x = Q diag(√spec_t) z share a random basis Q; every task has energy 1 on six
shared directions (more than k_g = 4, so the specific subspace must tell shared from specific),
0.05 on sixteen middle ones and 0.002 on the ten last; task t adds 0.8 on its own four middle
directions (which the other tasks see at 0.05: correlated tasks). Targets are y = W_t x + noise
with W_t = W_c + 0.5 G_t, so the tasks disagree on the shared directions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from rich.console import Console
from torch import nn

import splice
import splice.continual.strategies
from splice.continual import SequenceConfig, run_sequence
from splice.continual.strategies import make_strategy
from splice.continual.strategies.loda import (
    LoDA,
    energy,
    input_covariances,
    null_space_basis,
    old_output_change,
    recalibrate,
    subspaces,
)
from splice.core.errors import ConfigError
from splice.core.host import hosts

D, OUT, ROWS, BATCH, STEPS = 32, 8, 2048, 64, 300


@dataclass
class RegressionTask:
    """What LoDA reads of a harness task: a name and `batches(n)` (x and labels)."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    sigma: torch.Tensor = field(repr=False)  # the population E[x xᵀ], float64

    def batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        return [{"x": self.x[i * BATCH:(i + 1) * BATCH], "labels": self.y[i * BATCH:(i + 1) * BATCH]}
                for i in range(count)]


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, OUT, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def stream(seed: int = 0) -> list[RegressionTask]:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    common = torch.cat([torch.full((6,), 1.0), torch.full((16,), 0.05), torch.full((10,), 0.002)])
    W_c = torch.randn(OUT, D, generator=g) / D ** 0.5
    tasks = []
    for t in range(3):
        spec = common.clone()
        spec[6 + 4 * t:10 + 4 * t] += 0.8
        W = W_c + 0.5 * torch.randn(OUT, D, generator=g) / D ** 0.5
        drawn = []
        for _ in range(2):
            x = (torch.randn(ROWS, D, generator=g) * spec.sqrt()) @ Q.T
            drawn += [x, x @ W.T + 0.01 * torch.randn(ROWS, OUT, generator=g)]
        sigma = Q.double() @ torch.diag(spec.double()) @ Q.T.double()
        tasks.append(RegressionTask(f"t{t}", *drawn, sigma=sigma))
    return tasks


def mse(model: nn.Module, task: RegressionTask) -> float:
    with torch.no_grad():
        return ((model(task.x_test) - task.y_test) ** 2).mean().item()


def train(model: nn.Module, task: RegressionTask, penalties=()) -> None:
    """Adam on whatever requires grad, seeded mini-batches, MSE plus the penalties."""
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(STEPS):
        rows = torch.randint(0, ROWS, (BATCH,), generator=g)
        loss = ((model(task.x[rows]) - task.y[rows]) ** 2).mean() + sum(p() for p in penalties)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@dataclass
class Runs:
    """The stream learnt by LoDA (default options) and by plain LoRA, and what was measured."""

    tasks: list[RegressionTask]
    strategy: LoDA
    loda: list[list[float]]  # after task i, every task's test MSE
    lora: list[list[float]]
    joint: list[tuple[float, float]]  # seen tasks' mean MSE with the trained B_g, then with B_g*
    down: list[tuple[torch.Tensor, torch.Tensor]]  # A as begin_task set it, A after training


@pytest.fixture(scope="module")
def runs() -> Runs:
    tasks = stream()
    torch.manual_seed(0)
    model, strategy = Regressor(), LoDA(splice.LoRA(r=8, alpha=8, targets=["proj"]), general=4, specific=4)
    out = Runs(tasks, strategy, [], [], [], [])
    for i, task in enumerate(tasks):
        strategy.begin_task(model, task)
        start = _down(model, task.name)
        train(model, task, strategy.penalties(model, task))
        joint = sum(mse(model, t) for t in tasks[:i + 1]) / (i + 1)
        out.down.append((start, _down(model, task.name)))
        strategy.end_task(model, task)
        out.joint.append((joint, sum(mse(model, t) for t in tasks[:i + 1]) / (i + 1)))
        out.loda.append([mse(model, t) for t in tasks])
    model = Regressor()
    for task in tasks:  # plain LoRA of the same rank, A and B trained, merged after each task
        splice.attach(model, splice.LoRA(r=8, alpha=8, targets=["proj"]), task.name)
        train(model, task)
        splice.merge(model, task.name)
        out.lora.append([mse(model, t) for t in tasks])
    return out


def _down(model: nn.Module, name: str) -> torch.Tensor:
    return next(host[name].lora_A.detach().clone() for _, _, host in hosts(model) if name in host)


def sample_covariances(tasks: list[RegressionTask]) -> list[torch.Tensor]:
    """Each task's E[x xᵀ] as LoDA measures it (input_covariances over 8 batches)."""
    model = splice.attach(Regressor(), splice.LoRA(r=2, targets=["proj"]))
    out = []
    for task in tasks:
        moment, count = input_covariances(model, task.batches(8))["proj"]
        out.append(moment / count)
    return out


def test_d1_subspaces_are_orthonormal_and_mutually_orthogonal(runs):
    sigmas = sample_covariances(runs.tasks)
    for t in range(3):
        old = sum(sigmas[:t]) / t if t else None
        P_g, P_s = subspaces(sigmas[t], old, 4, 4)
        P = torch.cat([P_g, P_s])
        assert P.shape == (8, D) and P.dtype == torch.float64
        assert torch.allclose(P @ P.T, torch.eye(8, dtype=P.dtype), atol=1e-10)
    for start, trained in runs.down:  # the adapter's A is that basis, in fp32, and training leaves it
        assert torch.allclose(start @ start.T, torch.eye(8), atol=1e-5)
        assert torch.equal(start, trained)


def test_d2_specific_subspace_is_silent_on_old_tasks_where_a_null_space_basis_is_silent_on_the_new(runs):
    sigmas = sample_covariances(runs.tasks)
    for t in (1, 2):
        old, new = sum(sigmas[:t]) / t, sigmas[t]
        P_g, P_s = subspaces(new, old, 4, 4)
        assert energy(P_s, old) / energy(P_s, new) < 0.1  # measured 0.054 and 0.060
        null = null_space_basis(old, 4)
        assert 3 * energy(null, new) <= energy(P_s, new)  # measured 0.009 vs 2.1 and 2.7
        for row in P_g:  # each general direction carries about as much old energy as new
            assert 0.5 <= energy(row[None], old) / energy(row[None], new) <= 2  # measured 0.90-1.10


def test_d3_old_tasks_forget_at_least_twice_less_than_with_plain_lora(runs):
    def increase(matrix):  # mean change of tasks 1 and 2's MSE from after task 2 to after task 3
        return sum(matrix[2][j] - matrix[1][j] for j in range(2)) / 2

    assert increase(runs.lora) > 0
    assert 2 * increase(runs.loda) <= increase(runs.lora)  # measured -0.008 vs 0.063
    assert runs.loda[2][2] < 0.5 * runs.loda[1][2]  # and task 3 was learned (0.239 -> 0.080)


def test_d4_recalibrated_general_update_has_lower_joint_loss_than_the_trained_one(runs):
    for before, after in runs.joint[1:]:  # tasks 2 and 3 (the first has no old tasks)
        assert after < before  # measured 0.139 -> 0.129 and 0.120 -> 0.108
    assert runs.joint[0][0] == runs.joint[0][1]  # first task: no recalibration


def test_recalibrate_is_the_joint_least_squares_optimum():
    g = torch.Generator().manual_seed(1)
    k, n = 3, 50
    P_g = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=torch.float64))[0].T
    B_g = torch.randn(OUT, k, generator=g, dtype=torch.float64)
    X = [torch.randn(n * (t + 1), D, generator=g, dtype=torch.float64) for t in range(3)]  # new, old, old
    sigma = [x.T @ x / len(x) for x in X]
    # argmin Σ_t (1/n_t) ‖B P_g X_t − R_t‖², R_new = B_g P_g X_new, R_old = 0, by plain least squares
    rows = torch.cat([x @ P_g.T / len(x) ** 0.5 for x in X])
    targets = torch.cat([X[0] @ P_g.T @ B_g.T / len(X[0]) ** 0.5] + [torch.zeros(len(x), OUT) for x in X[1:]])
    expected = torch.linalg.lstsq(rows, targets.double()).solution.T
    found = recalibrate(B_g, P_g, sigma[0], sigma[1] + sigma[2], ridge=0.0)
    assert torch.allclose(found, expected, atol=1e-10)
    shrunk = recalibrate(B_g, P_g, sigma[0], sigma[1] + sigma[2], ridge=1.0)
    assert shrunk.norm() < found.norm()


def test_gao_penalty_is_the_mean_squared_change_of_old_outputs():
    tasks = stream()[:2]
    torch.manual_seed(0)
    model, strategy = Regressor(), LoDA(splice.LoRA(r=4, alpha=4, targets=["proj"]), general=3, specific=2, gao=0.7)
    assert strategy.begin_task(model, tasks[0]) == "t0" and strategy.penalties(model, tasks[0]) == []
    strategy.end_task(model, tasks[0])
    strategy.begin_task(model, tasks[1])
    adapter = next(host["t1"] for _, _, host in hosts(model))
    with torch.no_grad():
        adapter.lora_B.normal_()
    (penalty,) = strategy.penalties(model, tasks[1])
    old_x = torch.cat([b["x"] for b in tasks[0].batches(8)])
    change = adapter.scaling * old_x @ adapter.lora_A[:3].T @ adapter.lora_B[:, :3].T
    assert penalty().item() == pytest.approx(0.7 * (change ** 2).mean().item(), rel=1e-4)
    assert old_output_change(adapter.lora_B[:, :3], torch.eye(3), 1.0).item() == pytest.approx(
        (adapter.lora_B[:, :3] ** 2).sum().item() / OUT)
    penalty().backward()
    assert adapter.lora_A.grad is None and adapter.lora_B.grad[:, 3:].abs().sum() == 0
    assert adapter.lora_B.grad[:, :3].abs().sum() > 0


def test_first_task_takes_the_top_eigenvectors_and_statistics_are_what_is_stored(runs):
    sigma = sample_covariances(runs.tasks[:1])[0]
    P_g, P_s = subspaces(sigma, None, 4, 4)
    top = torch.linalg.eigvalsh(sigma).flip(-1)[:8].sum().item()
    assert energy(torch.cat([P_g, P_s]), sigma) == pytest.approx(top, rel=1e-9)
    assert set(runs.strategy.old) == {"proj"} and runs.strategy.stored_bytes(None) == D * D * 8


def test_input_covariances_leave_out_padding():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.proj = nn.Embedding(20, 6), nn.Linear(6, 3)

        def forward(self, input_ids, attention_mask=None):
            return self.proj(self.embed(input_ids))

    torch.manual_seed(0)
    model = splice.attach(Tokens(), splice.LoRA(r=2, targets=["proj"]))
    ids = torch.randint(0, 20, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    moment, count = input_covariances(model, [{"input_ids": ids, "attention_mask": mask, "labels": ids}])["proj"]
    x = model.embed(ids)[mask.bool()].double()
    assert count == 8 and torch.allclose(moment, x.T @ x)


@pytest.mark.parametrize("options, message", [
    ({"general": -1}, "general must be an integer >= 0, got -1"),
    ({"specific": 2.5}, "specific must be an integer >= 0, got 2.5"),
    ({"general": 0, "specific": 0}, "general + specific must be >= 1"),
    ({"eps": 0}, "eps must be a finite number > 0, got 0"),
    ({"ridge": float("nan")}, "ridge must be a finite number >= 0, got nan"),
    ({"gao": -1.0}, "gao must be a finite number >= 0, got -1.0"),
    ({"statistic_batches": 0}, "statistic_batches must be an integer >= 1, got 0"),
])
def test_options_are_refused_with_their_name_and_value(options, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        LoDA(splice.LoRA(r=4), **options)


def test_adapter_forms_other_than_plain_lora_are_refused():
    with pytest.raises(ConfigError, match="plain LoRA adapter .*'dora'"):
        make_strategy("loda", splice.DoRA(r=4), {})
    with pytest.raises(ConfigError, match="no option 'genral'"):
        make_strategy("loda", splice.LoRA(r=4), {"genral": 2})
    with pytest.raises(ConfigError, match="exceeds the layer's input size 32"):
        LoDA(splice.LoRA(r=4, targets=["proj"]), general=20, specific=20).begin_task(Regressor(), stream()[0])


def test_harness_runs_loda_on_two_tasks(tiny_bert_folder, task_files, tmp_path):
    tasks = [{"name": "sentiment", "data": str(task_files["sentiment"])},
             {"name": "topic", "data": str(task_files["topic"])}]
    config = SequenceConfig(
        tasks=tasks, strategy="loda", options={"general": 4, "specific": 4, "statistic_batches": 2},
        model=str(tiny_bert_folder), adapter={"method": "lora", "r": 4, "alpha": 8},
        train={"batch_size": 16, "max_steps": 60, "lr": 1e-2, "head_lr": 3e-2, "max_length": 16,
               "checkpoint_every": None, "eval_every": None, "max_eval_examples": 64},
        settings=["task_incremental"], angle_samples=2, output_dir=str(tmp_path / "run"))
    result = run_sequence(config, console=Console(quiet=True), quiet=True)
    ti = result.matrices["task_incremental"]
    assert [len(row) for row in ti] == [2, 2] and all(v is not None for row in ti for v in row)
    assert ti[0][0] > 0.9 and ti[1][1] > 0.9 and ti[1][0] > 0.85  # measured 0.97, 1.0 and 0.95
    model_hosts = [(name, host) for name, _, host in hosts(result.model)]
    assert model_hosts and all(h.merged == ["sentiment", "topic"] for _, h in model_hosts)
    for _, host in model_hosts:
        for task in ("sentiment", "topic"):
            A = host[task].lora_A.detach()
            assert A.shape == (8, 32) and torch.allclose(A @ A.T, torch.eye(8), atol=1e-5)
        assert host["topic"].scaling == pytest.approx(2.0)  # the config's alpha / r, at rank 8
    heads = sum(p.numel() for p in result.model.classifier.heads["sentiment"].parameters())
    assert result.trainable_parameters[0] == sum(h["sentiment"].lora_B.numel() for _, h in model_hosts) + heads
    assert result.stored_bytes[0] == len(model_hosts) * 32 * 32 * 8 + 4 * heads
