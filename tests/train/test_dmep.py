"""DMEP's module-wise expert pruning as a trainer schedule (volume-1 §10 (d) 1-4; (d)5, steps per
second after pruning, is a timing: bench/bench_moe.py): an expert no token reaches is pruned
without changing outputs, parameters and optimizer state drop by exactly the pruned experts, the
balancing loss is gone after phase 2, a skewed module is pruned more than a uniform one, and a
run resumed after the pruning ends as the run that never stopped."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import assert_close
from rich.console import Console
from torch import nn
from train_helpers import Crash, CrashAt, assert_resumes_as_whole

import splice
from splice.core.errors import SpliceError
from splice.core.host import hosts
from splice.methods.moelora import MoELoRA, prune_experts, routing_stats
from splice.schedules.dmep import DMEP, keep_by_mass
from splice.train import TrainConfig, Trainer, loop

MOE = {"method": "moelora", "experts": 4, "top_k": 2, "r": 8, "aux_loss": 0.01, "targets": ["query", "value"]}


def quiet() -> Console:
    return Console(quiet=True)


def adapters_of(model: nn.Module) -> dict:
    return {module: host["default"] for module, _, host in hosts(model) if "default" in host}


@pytest.fixture
def dmep_config(tiny_classification) -> TrainConfig:
    """12 steps, pruning after step 3, keeping half the routed mass (so something is pruned)."""
    return replace(tiny_classification, adapter=MOE, schedule={"name": "dmep", "prune_at": 0.25, "keep_mass": 0.5},
                   checkpoint_every=4)


def test_pruning_an_expert_no_token_reaches_leaves_the_outputs_unchanged():
    """(d)1: the kept experts' renormalised top-k weights do not depend on an expert outside the top-k."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24))
    splice.attach(model, MoELoRA(experts=5, top_k=2, r=10, targets=["0"]))
    adapter = model[0].splice["default"]
    with torch.no_grad():
        adapter.lora_B.normal_()
        adapter.router[3] = 0.0
        adapter.router[3, 0] = -50.0  # expert 3 loses every token with x[0] >= 1
    x = torch.randn(30, 16)
    x[:, 0] = 1 + x[:, 0].abs()
    before = model(x)
    assert routing_stats(model)["0"]["utilisation"][3] == 0
    prune_experts(model, {"0": [0, 1, 2, 4]})
    assert adapter.routed == 4 and adapter.router.shape == (4, 16) and adapter.lora_A.shape == (8, 16)
    assert_close(model(x), before, rel=1e-6)
    assert splice.adapters(model)["default"].expert_counts == {"0": 4}


def test_a_skewed_module_is_pruned_more_than_a_uniform_one():
    """(d)4: one router planted so one expert dominates, one random router on the same tokens."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    splice.attach(model, MoELoRA(experts=8, top_k=2, r=8, targets=["0", "1"]))
    skewed = model[0].splice["default"]
    with torch.no_grad():
        skewed.router.mul_(0.01)
        skewed.router[5, 0] = 20.0
        model[0].weight.copy_(torch.eye(16))  # so that layer 1 sees the same spread of tokens
    x = torch.randn(400, 16)
    x[:, 0] = x[:, 0].abs() + 0.5
    model(x)
    stats = routing_stats(model)
    keep = {m: keep_by_mass(torch.tensor(s["utilisation"]), 8, 2, 0.9) for m, s in stats.items()}
    assert stats["0"]["top_share"] > 0.45 and stats["1"]["top_share"] < 0.3
    assert len(keep["0"]) < len(keep["1"]) and 5 in keep["0"]
    assert keep_by_mass(None, 8, 2, 0.9) == list(range(8))
    assert keep_by_mass(torch.tensor([0.0, 10, 0, 0, 0, 0, 0, 1]), 8, 2, 0.9) == [1, 7]  # at least top_k


def test_a_dmep_run_removes_exactly_the_pruned_experts_and_their_optimizer_state(dmep_config):
    """(d)2 and (d)3, in a real run of the trainer; the saved adapter loads pruned and equal."""
    trainer = Trainer.from_config(dmep_config, console=quiet())
    model = trainer.plain_model
    trainer.step()
    trainer.step()
    params_before = sum(p.numel() for p in trainer.trained.values())
    state_before = sum(v.numel() for s in trainer.optimizer.state.values() for v in s.values() if v.dim())
    model.train()
    trainer.step()  # step 3: phase 2
    record = json.loads((Path(dmep_config.output_dir) / "dmep.json").read_text())
    assert record["step"] == 3
    removed = {m: 4 - a.routed for m, a in adapters_of(model).items()}
    assert sum(removed.values()) > 0 and all(a.routed >= 2 for a in adapters_of(model).values())
    per_expert = 2 * (32 + 32) + 32  # r_e (in + out) factor entries and one router row, 32-wide layers
    params_after = sum(p.numel() for p in trainer.trained.values())
    state_after = sum(v.numel() for s in trainer.optimizer.state.values() for v in s.values() if v.dim())
    assert params_before - params_after == per_expert * sum(removed.values())
    assert state_before - state_after == 2 * per_expert * sum(removed.values())  # exp_avg and exp_avg_sq
    assert all(p.numel() == sum(v.numel() for v in trainer.optimizer.state[p].values() if v.dim()) / 2
               for p in trainer.trained.values() if p in trainer.optimizer.state)
    batch = trainer.next_batch()
    model(**{k: v for k, v in batch.items() if k != "labels"})
    assert splice.auxiliary_loss(model) is None  # phase 3: the balancing loss is off
    while trainer.step() is not None:
        pass
    result = trainer.finish()
    loaded = splice.load(_fresh(dmep_config), result.paths["adapter"])
    assert splice.adapters(loaded)["default"].expert_counts == splice.adapters(model)["default"].expert_counts
    ids = torch.randint(1000, 2000, (2, 6))
    model.eval()
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def _fresh(config: TrainConfig) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(config.model, num_labels=2).eval()


def test_a_run_resumed_after_the_pruning_ends_as_the_run_that_never_stopped(dmep_config, tmp_path):
    assert_resumes_as_whole(dmep_config, tmp_path, crash_at=8)  # the checkpoint of step 8 holds the pruned shapes


def test_a_run_resumed_from_the_checkpoint_of_the_pruning_step_finishes(tiny_classification, tmp_path):
    """The callbacks run before the step's checkpoint: the checkpoint of the pruning step holds
    the pruned shapes, which the resumed run prunes to again before loading it."""
    config = replace(tiny_classification, adapter=MOE, checkpoint_every=4, output_dir=str(tmp_path / "crashed"),
                     schedule={"name": "dmep", "prune_at": 1 / 3, "keep_mass": 0.5})  # prunes at step 4
    with pytest.raises(Crash):  # dies at step 5: the newest checkpoint is step 4's
        Trainer.from_config(config, callbacks=[CrashAt(5)], console=quiet()).fit()
    assert json.loads((Path(config.output_dir) / "dmep.json").read_text())["step"] == 4
    assert loop.resume(Path(config.output_dir), console=quiet()).status == "finished"


def test_steps_that_evaluate_still_count_their_training_tokens(tiny_classification, tmp_path):
    config = replace(tiny_classification, adapter=MOE, eval_every=1, checkpoint_every=None, max_steps=4,
                     output_dir=str(tmp_path / "run"), schedule={"name": "dmep", "prune_at": 0.5, "keep_mass": 0.5})
    trainer = Trainer.from_config(config, console=quiet())
    for _ in range(2):
        trainer.step()
    record = json.loads((Path(config.output_dir) / "dmep.json").read_text())
    assert all(sum(shares) == pytest.approx(1.0) for shares in record["usage"].values())  # none empty


def test_bad_schedules_are_refused_naming_the_key(tiny_classification):
    with pytest.raises(SpliceError, match="prune_at is a share"):
        DMEP(prune_at=1.5)
    with pytest.raises(SpliceError, match=r"no option \['keep'\]; its options: \['keep_mass', 'prune_at'\]"):
        replace(tiny_classification, schedule={"name": "dmep", "keep": 2})
    with pytest.raises(SpliceError, match="schedule name 'nope' is not known"):
        replace(tiny_classification, schedule={"name": "nope"})
    with pytest.raises(SpliceError, match="prunes a MoELoRA's experts; adapter 'default' is LoRA"):
        Trainer.from_config(replace(tiny_classification, schedule={"name": "dmep"}), console=quiet()).step()
