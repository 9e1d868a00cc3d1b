"""CoRe (continual ReFT): per-task LoReFT interventions, frozen once their task ends (so nothing
is forgotten with the task id), and the overlap penalty λ Σ ‖R_t R_iᵀ‖²_F."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from test_harness import sequence

import splice
from splice.continual import run_sequence
from splice.continual.sequence import TaskSpec
from splice.continual.strategies import make_strategy
from splice.continual.strategies.base import TaskContext
from splice.core.errors import ConfigError
from splice.core.host import hosts

QUIET = Console(quiet=True)
REFT = {"method": "loreft", "r": 2, "positions": "f1+l1"}


def overlaps(model, new: str, old: str) -> float:
    return sum(((a.R @ b.R.T) ** 2).sum().item() for _, _, h in hosts(model) if new in h
               for a in h[new].interventions.values() for b in h[old].interventions.values())


def test_core_keeps_each_task_exactly(tiny_bert_folder, task_files, tmp_path):
    config = sequence(tiny_bert_folder, task_files, tmp_path, "core", options={"overlap": 1.0},
                      settings=["task_incremental"], angle_samples=2, adapter=dict(REFT))
    result = run_sequence(config, console=QUIET, quiet=True)
    ti = result.matrices["task_incremental"]
    assert ti[1][0] == ti[0][0]  # task 0's interventions and head are untouched by task 1
    assert "skipped" in result.switches[0]  # a ReFT form has no weight to take gradients at
    assert result.stored_bytes[1] > result.stored_bytes[0]  # one intervention set per task


def test_core_penalty_is_lambda_times_the_squared_overlaps(bert):
    reft = splice.config_from_dict(REFT)
    strategy = make_strategy("core", reft, {"overlap": 0.7})
    for name in ("a", "b"):
        splice.attach(bert, reft, name)
    strategy.trained = ["a"]
    (penalty,) = strategy.penalties(bert, TaskContext(1, TaskSpec(name="b", data="unused"), None, None, None))
    assert penalty().item() == pytest.approx(0.7 * overlaps(bert, "b", "a"), rel=1e-5)
    # minimising it alone drives the new subspaces orthogonal to the old ones, R staying orthonormal
    params = [p for p in splice.trainable_parameters(bert).values()]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    start = penalty().item()
    for _ in range(100):
        optimizer.zero_grad()
        penalty().backward()
        optimizer.step()
    assert penalty().item() < 1e-3 * start
    for _, _, h in hosts(bert):
        for i in h["b"].interventions.values():
            assert torch.allclose(i.R @ i.R.T, torch.eye(2), atol=1e-5)


def test_core_refuses_a_weight_adapter():
    with pytest.raises(ConfigError, match="method: loreft"):
        make_strategy("core", splice.LoRA(r=2), {})
