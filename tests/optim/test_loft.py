"""LoFT: at full rank its trajectory of W = W0 + s B A is AdamW's on W (the spec's exactness
test), for any betas, with weight decay, a scale and clipping; at low rank each step is AdamW's
step of the projected gradient, projected; its state checkpoints and resumes exactly; it finds
the pairs of a real adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import splice
from splice.core.errors import SpliceError
from splice.optim import LoFT, factor_pairs, optimizer_state_bytes
from splice.optim.loft import FactorPair

BETAS = [(0.0, 0.0), (0.9, 0.0), (0.0, 0.999), (0.9, 0.999)]


def _problem(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A non-quadratic regression: inputs X [n, k], targets Y [m, k], a frozen base W0."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    Y = torch.tanh(torch.randn(m, 3 * n, generator=g, dtype=torch.float64))
    W0 = 0.3 * torch.randn(m, n, generator=g, dtype=torch.float64)
    return X, Y, W0


def _loss(W: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(W @ X) - Y).pow(2).mean()


def _factors(m: int, n: int, r: int, seed: int = 1) -> tuple[nn.Parameter, nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(r, n, dtype=torch.float64) + 0.3 * torch.randn(r, n, generator=g, dtype=torch.float64)
    B = torch.eye(m, r, dtype=torch.float64) * 0.5 + 0.2 * torch.randn(m, r, generator=g, dtype=torch.float64)
    return nn.Parameter(A), nn.Parameter(B)


def _trajectories(betas: tuple[float, float], steps: int = 30, m: int = 6, n: int = 6, r: int = 6,
                  scaling: float = 2.0, weight_decay: float = 0.01, clip: float | None = None,
                  lr: float = 0.02) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """W after each step under AdamW on W and under LoFT on (A, B), from the same start. AdamW
    trains the change D of W = W0 + D (its decay pulls D to zero, as LoFT's decay of a factor
    pulls s B A to zero: both leave the frozen W0 alone)."""
    X, Y, W0 = _problem(m, n)
    A, B = _factors(m, n, r)
    D = nn.Parameter(scaling * B.detach() @ A.detach())
    adamw = torch.optim.AdamW([D], lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay)
    loft = LoFT(LoFT.groups([FactorPair(A, B, scaling)]), lr=lr, betas=betas, eps=1e-8,
                weight_decay=weight_decay, max_grad_norm=clip, damping=1e-14)
    reference, ours = [], []
    for _ in range(steps):
        adamw.zero_grad()
        _loss(W0 + D, X, Y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([D], clip)
        adamw.step()
        reference.append((W0 + D).detach().clone())
        loft.zero_grad()
        _loss(W0 + scaling * B @ A, X, Y).backward()
        loft.step()
        ours.append((W0 + scaling * B @ A).detach().clone())
    return reference, ours


def _max_relative_gap(reference: list[torch.Tensor], ours: list[torch.Tensor], W0: torch.Tensor) -> float:
    """Largest relative difference of the moved part W - W0 over the trajectory."""
    return max(float((a - b).norm() / (a - W0).norm()) for a, b in zip(reference, ours, strict=True))


@pytest.mark.parametrize("betas", BETAS)
def test_full_rank_trajectory_is_adamw_on_w(betas):
    # lr 0.005: with beta2 = 0 AdamW divides by the current |G|, which amplifies rounding near
    # G_ij = 0 (at lr 0.02 the (0.9, 0) gap grows from 1e-15 to 6e-3 in 20 steps, both ways of
    # computing it being AdamW's; at 0.005 it stays below 1e-10)
    reference, ours = _trajectories(betas, lr=0.005)
    W0 = _problem(6, 6)[2]
    assert _max_relative_gap(reference, ours, W0) <= 1e-7
    assert (reference[-1] - reference[0]).norm() > 0.05  # the weights did move


def test_full_rank_with_clipping_is_clipped_adamw():
    reference, ours = _trajectories((0.9, 0.999), clip=0.05)
    assert _max_relative_gap(reference, ours, _problem(6, 6)[2]) <= 1e-7


def test_low_rank_steps_are_adamw_steps_of_the_projected_gradient():
    """At r < min(m, n), with betas (0, 0): the B-step moves W by -lr U P_A and the A-step by
    -lr P_B U, where U is AdamW's step for the projected gradient (G P_A or P_B G)."""
    X, Y, W0 = _problem(7, 5)
    A, B = _factors(7, 5, 2)
    s, lr, eps = 1.5, 0.01, 1e-8
    optimizer = LoFT(LoFT.groups([FactorPair(A, B, s)]), lr=lr, betas=(0.0, 0.0), eps=eps, damping=1e-14)
    for update in ("B", "A"):
        W = (W0 + s * B @ A).detach()
        G = torch.autograd.functional.jacobian(lambda w: _loss(w, X, Y), W)
        Bs = s * B.detach()
        P_A = A.T @ torch.linalg.solve(A @ A.T, A).detach()
        P_B = Bs @ torch.linalg.solve(Bs.T @ Bs, Bs.T)
        projected = G @ P_A if update == "B" else P_B @ G
        U = projected / (projected.abs() + eps)
        expected = W - lr * (U @ P_A if update == "B" else P_B @ U)
        optimizer.zero_grad()
        _loss(W0 + s * B @ A, X, Y).backward()
        optimizer.step()
        torch.testing.assert_close(W0 + s * B @ A, expected, rtol=0, atol=1e-12)


def test_other_parameters_take_torch_adamw_steps():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, 3))
    q = nn.Parameter(p.detach().clone())
    ours = LoFT([{"params": [p]}], lr=0.1, weight_decay=0.05, betas=(0.8, 0.95))
    theirs = torch.optim.AdamW([q], lr=0.1, weight_decay=0.05, betas=(0.8, 0.95))
    for step in range(5):
        for param, optimizer in ((p, ours), (q, theirs)):
            optimizer.zero_grad()
            (param.sin() * (step + 1)).sum().backward()
            optimizer.step()
    torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_state_dict_resumes_the_same_trajectory():
    X, Y, W0 = _problem(6, 4)
    A, B = _factors(6, 4, 3)

    def step(optimizer: LoFT, A: nn.Parameter, B: nn.Parameter) -> None:
        optimizer.zero_grad()
        _loss(W0 + B @ A, X, Y).backward()
        optimizer.step()

    optimizer = LoFT(LoFT.groups([FactorPair(A, B, 1.0)]), lr=0.05)
    for _ in range(3):
        step(optimizer, A, B)
    saved = copy.deepcopy(optimizer.state_dict())
    A2, B2 = nn.Parameter(A.detach().clone()), nn.Parameter(B.detach().clone())
    resumed = LoFT(LoFT.groups([FactorPair(A2, B2, 1.0)]), lr=0.05)
    resumed.load_state_dict(saved)
    for _ in range(4):
        step(optimizer, A, B)
        step(resumed, A2, B2)
    assert torch.equal(A, A2) and torch.equal(B, B2)


def test_alternates_b_first_then_a():
    X, Y, W0 = _problem(6, 4)
    A, B = _factors(6, 4, 3)
    optimizer = LoFT(LoFT.groups([FactorPair(A, B, 1.0)]), lr=0.05)
    moved = []
    for _ in range(4):
        before = (A.detach().clone(), B.detach().clone())
        optimizer.zero_grad()
        _loss(W0 + B @ A, X, Y).backward()
        optimizer.step()
        moved.append(("A" if not torch.equal(A, before[0]) else "") + ("B" if not torch.equal(B, before[1]) else ""))
    assert moved == ["B", "A", "B", "A"]


def test_finds_the_pairs_of_a_lora_adapter_and_adamw_for_the_head(bert):
    splice.attach(bert, splice.LoRA(r=4, alpha=8, targets=["query", "value"], train_also=["classifier"]))
    pairs = factor_pairs(bert)
    assert len(pairs) == 4 and all(pair.scaling == 2.0 for pair in pairs)
    optimizer = LoFT.for_model(bert, lr=1e-3)
    paired = [group for group in optimizer.param_groups if group["pair"]]
    rest = [p for group in optimizer.param_groups if not group["pair"] for p in group["params"]]
    assert len(paired) == 4
    assert {id(p) for p in rest} == {id(p) for p in bert.classifier.parameters()}
    bert.train()
    ids = torch.randint(0, 90, (4, 10))
    bert(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    optimizer.step()
    state = optimizer.state[pairs[0].A]
    r, n = pairs[0].A.shape
    assert state["row_products"].shape == (n, r, r)
    assert optimizer_state_bytes(optimizer) > 0


def test_refuses_a_model_without_low_rank_adapter(bert):
    splice.attach(bert, splice.DiaBlo(blocks=4, targets=["query"]))
    with pytest.raises(SpliceError, match="no low-rank adapter"):
        LoFT.for_model(bert, lr=1e-3)


def test_refuses_bad_settings():
    A, B = _factors(5, 4, 2)
    with pytest.raises(SpliceError, match="betas"):
        LoFT(LoFT.groups([FactorPair(A, B, 1.0)]), betas=(1.0, 0.9))
    with pytest.raises(SpliceError, match=r"\[A \(r x in\), B \(out x r\)\]"):
        LoFT([{"params": [B, A], "pair": True}])
