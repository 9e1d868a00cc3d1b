"""BoostLoRA's rounds on a teacher-student linear model (volume-1 §9 (d)): rank grows as min(K, 8)
with rotating slices and stays 1 with a fixed one, the training error never rises, merging keeps
the forward and leaves no parameter behind, a round trains u numbers a module, and the whole
change written as a LoRA reproduces the boosted model on the original base."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import splice
from splice.boost import BoostRounds
from splice.core.errors import SpliceError
from splice.io.adapter_states import save_state

IN, OUT, TARGET_RANK = 16, 12, 8


def student(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, OUT, bias=False)).double()


def teacher_change(model: nn.Sequential, seed: int = 1) -> torch.Tensor:
    """A rank-8 change inside the top 8 singular slices of the student's W0: what rotating
    rank-1 rounds can fit exactly, one slice a round."""
    U, _, Vh = torch.linalg.svd(model[0].weight.detach(), full_matrices=False)
    c = torch.rand(TARGET_RANK, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    return (U[:, :TARGET_RANK] * c) @ Vh[:TARGET_RANK]


def whitened_inputs(n: int = 64) -> torch.Tensor:
    """Rows with XᵀX = n I: the squared error separates over singular slices."""
    Q, _ = torch.linalg.qr(torch.randn(n, IN, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    return Q * n**0.5


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Minimise the squared error over the trainable numbers (the round's v) to convergence."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.LBFGS(params, max_iter=100, tolerance_grad=1e-14, tolerance_change=1e-16,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (model(x) - y).square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def wrong_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model(x) - y).norm(dim=-1) > 1e-6 * y.norm(dim=-1)


def boost(rounds: int, rotate: bool = True, u: int = 1) -> tuple[nn.Sequential, BoostRounds, list[float]]:
    """Rounds of fit-and-merge on the rows still wrong, until none is or the rounds run out;
    the model, the engine and the squared error before each round and after the last."""
    model = student()
    x = whitened_inputs()
    y = x @ (model[0].weight.detach() + teacher_change(model)).T
    engine = BoostRounds(model, r=1, u=u, targets=["0"], rotate=rotate, max_rounds=rounds)
    errors = []
    while True:
        with torch.no_grad():
            errors.append(float((model(x) - y).square().sum()))
        failing = wrong_rows(model, x, y)
        if not failing.any() or not engine.slices_left():
            break
        engine.begin()
        assert "boost" in splice.adapters(model)
        fit(model, x[failing], y[failing])
        engine.end(keep=True)
    return model, engine, errors


@pytest.mark.parametrize("rounds", [3, 8, 11])
def test_rotating_slices_grow_the_rank_as_min_of_rounds_and_eight(rounds):
    model, engine, errors = boost(rounds)
    assert engine.ranks() == {"0": min(rounds, TARGET_RANK)}
    assert engine.kept == min(rounds, TARGET_RANK)  # at 8 the teacher is matched: no row left wrong
    if rounds > TARGET_RANK:
        assert errors[-1] < 1e-12 * errors[0]


def test_a_fixed_slice_keeps_the_rank_at_one():
    _, engine, _ = boost(5, rotate=False)
    assert engine.kept == 5
    assert engine.ranks() == {"0": 1}


def test_training_error_never_rises_over_rounds():
    _, _, errors = boost(6)
    assert all(after <= before * (1 + 1e-12) for before, after in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.5 * errors[0]


def test_a_merged_round_keeps_the_forward_and_leaves_no_parameter():
    model = student()
    names = [n for n, _ in model.named_parameters()]
    engine = BoostRounds(model, r=2, u=3, targets=["0"], max_rounds=2)
    adapters = engine.begin()
    with torch.no_grad():
        adapters["0"].v.normal_()
    x = torch.randn(5, IN, dtype=torch.float64)
    with torch.no_grad():
        before_merge = model(x)
    engine.end(keep=True)
    assert [n for n, _ in model.named_parameters()] == names and not splice.adapters(model)
    assert not any("splice" in n for n, _ in model.named_modules())
    with torch.no_grad():
        assert torch.allclose(model(x), before_merge, atol=1e-5)


def test_an_undone_round_leaves_the_weights_bit_for_bit_and_its_slice_to_the_next():
    model = student()
    weight = model[0].weight.detach().clone()
    engine = BoostRounds(model, r=1, u=1, targets=["0"], max_rounds=3)
    with torch.no_grad():
        engine.begin()["0"].v.fill_(3.0)
    engine.end(keep=False)
    assert torch.equal(model[0].weight, weight) and not splice.adapters(model)
    assert engine.offset == 0 and engine.kept == 0
    assert engine.begin()["0"].S.item() == pytest.approx(torch.linalg.svdvals(weight)[0].item(), rel=1e-6)


def test_a_round_trains_u_numbers_per_module():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 4))
    engine = BoostRounds(model, r=2, u=4, targets="all-linear", max_rounds=2)
    engine.begin()
    assert sum(p.numel() for p in splice.trainable_parameters(model).values()) == 4 * 3
    engine.end(keep=True)
    engine.begin()
    assert sum(p.numel() for p in splice.trainable_parameters(model).values()) == 4 * 3


def test_the_whole_change_as_a_lora_reproduces_the_boosted_model_on_the_original_base(tmp_path):
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 6)).double()
    original = copy.deepcopy(model)
    engine = BoostRounds(model, r=2, u=3, targets="all-linear", max_rounds=3)
    for _ in range(3):
        with torch.no_grad():
            for adapter in engine.begin().values():
                adapter.v.normal_()
        engine.end(keep=True)
    assert set(engine.ranks().values()) == {6}  # 3 rounds x r = 2
    path = save_state(engine.adapter_state(), tmp_path / "boosted")
    splice.load(original, path)
    x = torch.randn(4, 10, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(original(x), model(x), atol=1e-5)


def test_refusals_name_the_problem():
    model = student()
    splice.attach(model, splice.LoRA(r=2, targets=["0"]))
    with pytest.raises(SpliceError, match=r"must carry no adapter; attached: \['default'\]"):
        BoostRounds(model, r=1, u=1, targets=["0"])
    engine = BoostRounds(student(), r=4, u=1, targets=["0"], max_rounds=5)
    for _ in range(3):  # slices [0,4), [4,8), [8,12): 12 directions of a 12 x 16 weight
        engine.begin()
        engine.end(keep=True)
    assert not engine.slices_left()
    with pytest.raises(SpliceError, match="no BoostLoRA round left"):
        engine.begin()
    with pytest.raises(SpliceError, match="no BoostLoRA round is open"):
        engine.end(keep=True)


def test_a_restored_engine_on_a_fresh_model_equals_the_one_that_ran_bit_for_bit():
    """state() after kept and undone rounds, restore() on a fresh copy of the pretrained model:
    the same weights (the merges replayed with the merge's arithmetic), factors, slices to come."""
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 6))
    model = copy.deepcopy(pretrained)
    engine = BoostRounds(model, r=2, u=3, targets="all-linear", max_rounds=4)
    for keep in (True, False, True):
        with torch.no_grad():
            for adapter in engine.begin().values():
                adapter.v.normal_()
        engine.end(keep=keep)
    tensors, meta = engine.state()
    again = BoostRounds(copy.deepcopy(pretrained), r=2, u=3, targets="all-linear", max_rounds=4)
    again.restore(tensors, meta)
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
    assert (again.kept, again.started, again.offset) == (2, 3, 4) and again.ranks() == engine.ranks()
    next_one, expected = again.begin(), engine.begin()
    assert all(torch.equal(next_one[m].U, expected[m].U) and torch.equal(next_one[m].P, expected[m].P)
               for m in expected)
    with pytest.raises(SpliceError, match="fresh BoostRounds"):
        again.restore(tensors, meta)
