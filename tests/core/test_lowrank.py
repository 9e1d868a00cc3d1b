"""The lean low-rank autograd: same forward as the plain formula, exact gradients, less saved."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import logits, randomize
from torch import nn

import splice
from splice.core.lowrank import LowRank, _LeanLowRank, dropout_mask, low_rank_delta

IN, OUT, R, S = 12, 10, 3, 0.7

SHAPES = {"1d": (IN,), "2d": (7, IN), "3d": (2, 5, IN)}  # nn.Linear takes a single vector too


def factors(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x-independent A [R, IN] and B [OUT, R] that require grad."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(R, IN, generator=g, dtype=dtype).requires_grad_()
    B = torch.randn(OUT, R, generator=g, dtype=dtype).requires_grad_()
    return A, B


def inputs(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()


def plain(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float = S) -> torch.Tensor:
    return F.linear(F.linear(x, A), B) * s


def saved_bytes(fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run fn() and collect every tensor autograd saves for the backward."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# -- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gradcheck_float64(shape, p):
    A, B = factors(torch.float64)
    x = inputs(shape, torch.float64)
    torch.manual_seed(1234)
    keep = dropout_mask(x, p) if p else None
    fn = lambda x, A, B: _LeanLowRank.apply(x, A, B, S, p, keep)  # noqa: E731
    if p:  # the fixed mask really drops entries, so the check covers the mask in backward
        assert not keep.all()
        assert not torch.allclose(fn(x, A, B), plain(x, A, B))
    assert torch.autograd.gradcheck(fn, (x, A, B))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gradients_equal_plain_autograd(shape):
    A, B = factors()
    x = inputs(shape)
    w = torch.randn(*shape[:-1], OUT, generator=torch.Generator().manual_seed(5))
    lean = torch.autograd.grad((_LeanLowRank.apply(x, A, B, S, 0.0, None) * w).sum(), (x, A, B))
    ref = torch.autograd.grad((plain(x, A, B) * w).sum(), (x, A, B))
    for got, want in zip(lean, ref, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (got - want).abs().max()


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_is_bit_identical_to_the_plain_formula(shape):
    A, B = factors()
    x = inputs(shape)
    assert torch.equal(low_rank_delta(x, LowRank(A, B, S), training=True), plain(x, A, B))
    assert torch.equal(_LeanLowRank.apply(x, A, B, S, 0.0, None), plain(x, A, B))


def test_no_grad_path_gives_the_same_values():
    A, B = factors()
    x = inputs(SHAPES["3d"])
    lean = low_rank_delta(x, LowRank(A, B, S), training=True)
    assert lean.grad_fn is not None and "LeanLowRank" in type(lean.grad_fn).__name__
    with torch.no_grad():
        fast = low_rank_delta(x, LowRank(A, B, S), training=True)
    assert fast.grad_fn is None
    assert torch.equal(fast, lean)
    # ... also when nothing requires grad (grad mode on)
    assert torch.equal(low_rank_delta(x.detach(), LowRank(A.detach(), B.detach(), S), training=True), lean)


def test_input_without_grad_gives_grads_for_the_factors_only():
    A, B = factors()
    x = inputs(SHAPES["3d"]).detach()
    out = low_rank_delta(x, LowRank(A, B, S), training=True)
    out.square().sum().backward()
    assert x.grad is None
    gA, gB = torch.autograd.grad(plain(x, A, B).square().sum(), (A, B))
    assert torch.allclose(A.grad, gA, atol=1e-6) and torch.allclose(B.grad, gB, atol=1e-6)


def test_frozen_A_gets_no_grad_and_B_still_does():
    A, B = factors()
    A.requires_grad_(False)
    x = inputs(SHAPES["2d"])
    low_rank_delta(x, LowRank(A, B, S), training=True).sum().backward()
    assert A.grad is None
    assert torch.allclose(B.grad, torch.autograd.grad(plain(x, A, B).sum(), B)[0], atol=1e-6)
    assert torch.allclose(x.grad, torch.autograd.grad(plain(x, A, B).sum(), x)[0], atol=1e-6)


# -- what is saved for the backward ----------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lean_path_saves_x_A_B_the_rank_r_hidden_and_a_byte_mask(p):
    """No full-size float tensor of its own: the input (shared with the base layer), the factors,
    the [N, r] hidden and, with dropout, a one-byte mask instead of a dropped fp32 copy."""
    A, B = factors()
    x = inputs((4, 6, IN))
    _, saved = saved_bytes(lambda: low_rank_delta(x, LowRank(A, B, S, p), training=True))
    shared = [t.data_ptr() for t in (x, A, B)]
    own = [t for t in saved if t.data_ptr() not in shared]
    assert set(shared) <= {t.data_ptr() for t in saved}
    expected = [(torch.float32, (4, 6, R))] + ([(torch.uint8, (4, 6, IN))] if p else [])
    assert len(own) == len(expected) and {(t.dtype, tuple(t.shape)) for t in own} == set(expected)
    hidden = 4 * 6 * R * 4  # the [N, r] intermediate, fp32
    assert nbytes(saved) == nbytes([x, A, B]) + hidden + (x.numel() if p else 0)

    def plain_dropout():
        return plain(F.dropout(x, p, training=True), A, B)

    _, saved_plain = saved_bytes(plain_dropout)
    extra = nbytes(saved_plain) - (nbytes([x, A, B]) + hidden)  # x itself or its dropped copy counted
    # plus, with dropout, the mask (bool or float, by backend)
    assert extra in ((0,) if p == 0 else (x.numel(), 4 * x.numel()))
    if p == 0:  # plain autograd saves the same then
        assert nbytes(saved) == nbytes(saved_plain)
    else:  # a bool mask in place of a dropped fp32 copy (and plain's own mask)
        assert nbytes(saved) <= nbytes(saved_plain) - 3 * x.numel()


def test_lean_path_keeps_a_half_precision_input_in_its_own_dtype():
    """A bf16 activation with fp32 factors is saved as bf16, not as an fp32 copy."""
    A, B = factors()
    x = inputs((4, 6, IN)).to(torch.bfloat16).detach().requires_grad_()
    out, saved = saved_bytes(lambda: low_rank_delta(x, LowRank(A, B, S), training=True))
    assert out.dtype == torch.float32
    assert nbytes(saved) == nbytes([x, A, B]) + 4 * 6 * R * 4  # and the fp32 rank-r hidden
    assert any(t.dtype == torch.bfloat16 and t.data_ptr() == x.data_ptr() for t in saved)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and A.grad.dtype == torch.float32
    gx, gA = torch.autograd.grad(plain(x.float(), A, B).sum(), (x, A))
    assert torch.allclose(A.grad, gA, atol=1e-5)
    assert torch.equal(x.grad, gx)


# -- autocast ------------------------------------------------------------------------------


def test_bf16_autocast_on_cpu_runs_and_grads_keep_the_parameter_dtype():
    A, B = factors()
    x = inputs(SHAPES["3d"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = low_rank_delta(x, LowRank(A, B, S), training=True)
        with torch.no_grad():
            ref = plain(x, A, B)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    out.float().square().sum().backward()
    assert (x.grad.dtype, A.grad.dtype, B.grad.dtype) == (torch.float32,) * 3
    # the backward ran in bf16 like the forward, and agrees with the fp32 gradients to bf16 accuracy
    A32, B32 = A.detach().requires_grad_(), B.detach().requires_grad_()
    x32 = x.detach().requires_grad_()
    full = torch.autograd.grad(plain(x32, A32, B32).square().sum(), (x32, A32, B32))
    for got, want in zip((x.grad, A.grad, B.grad), full, strict=True):
        assert torch.allclose(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())
        assert not torch.equal(got, want)  # computed in bf16, not silently in fp32


# -- dropout through a LoRA adapter ----------------------------------------------------------


def dropout_lora(p: float = 0.4) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT))
    splice.attach(model, splice.LoRA(r=R, alpha=2.1, dropout=p, targets=["0"]))
    randomize(model, scale=0.5)
    return model


def test_lora_dropout_is_active_in_training_and_off_in_eval():
    model = dropout_lora()
    x = torch.randn(6, IN)
    model.train()
    first, second = model(x), model(x)
    assert first.grad_fn is not None and not torch.allclose(first, second)
    model.eval()
    adapter = model[0].splice["default"]
    expected = F.linear(x, model[0].weight, model[0].bias) + plain(x, adapter.lora_A, adapter.lora_B, adapter.scaling)
    assert torch.equal(model(x), model(x))
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_lora_dropout_gradient_uses_the_forward_mask():
    """Backward regenerates the forward's mask from its seed: check against a hand computation."""
    p = 0.4
    model = dropout_lora(p).train()
    adapter = model[0].splice["default"]
    x = torch.randn(6, IN, generator=torch.Generator().manual_seed(3)).requires_grad_()
    w = torch.randn(6, OUT, generator=torch.Generator().manual_seed(4))

    torch.manual_seed(11)  # the dropped input this seed gives, read off through identity factors
    eye = torch.eye(IN)
    dropped = low_rank_delta(x, LowRank(eye, eye, 1.0, p), training=True).detach()
    kept = dropped != 0
    assert 0 < kept.sum() < kept.numel()
    assert torch.allclose(dropped[kept], x.detach()[kept] / (1 - p))

    torch.manual_seed(11)
    out = model(x)
    s, A, B = adapter.scaling, adapter.lora_A.detach(), adapter.lora_B.detach()
    base = F.linear(x.detach(), model[0].weight, model[0].bias)
    assert torch.allclose(out, base + s * dropped @ A.T @ B.T, atol=1e-6)  # forward used that mask
    (out * w).sum().backward()
    grad_hidden = s * w @ B  # [N, r]
    assert torch.allclose(adapter.lora_A.grad, grad_hidden.T @ dropped, atol=1e-6)
    assert torch.allclose(adapter.lora_B.grad, s * w.T @ (dropped @ A.T), atol=1e-6)
    grad_x = w @ model[0].weight + kept * (grad_hidden @ A) / (1 - p)
    assert torch.allclose(x.grad, grad_x, atol=1e-6)
    # without the mask the gradient would differ, so the checks above see the mask
    assert not torch.allclose(adapter.lora_A.grad, grad_hidden.T @ x.detach(), atol=1e-3)


def test_lora_on_a_linear_host_takes_the_lean_path():
    model = nn.Sequential(nn.Linear(IN, OUT))
    splice.attach(model, splice.LoRA(r=R, targets=["0"]))
    randomize(model)
    x = torch.randn(3, IN)
    adapter = model[0].splice["default"]
    out, saved = saved_bytes(lambda: adapter.delta(x))
    assert "LeanLowRank" in type(out.grad_fn).__name__
    assert nbytes(saved) == nbytes([x, adapter.lora_A, adapter.lora_B]) + 3 * R * 4  # + the [3, r] hidden
    base = F.linear(x, model[0].weight, model[0].bias)
    assert torch.allclose(logits(model, x), base + out, atol=1e-6)


@pytest.mark.parametrize("rows", [8, 128])  # both orientations of the thin product
def test_in_place_add_under_bf16_autocast_into_an_fp32_output(rows):
    """A 4-bit layer returns the input's dtype (fp32) under bf16 autocast, while the thin product
    x Aᵀ comes out in bf16: the in-place add must still add the delta (it crashed on the dtypes)."""
    from splice.core.lowrank import add_low_rank_

    torch.manual_seed(0)
    x, A, B = torch.randn(rows, 32), torch.randn(4, 32), torch.randn(16, 4)
    output = torch.randn(rows, 16)
    expected = output + 0.5 * (x @ A.T) @ B.T
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        add_low_rank_(output, x, LowRank(A, B, 0.5))
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, expected, rtol=0.05, atol=0.3)
    assert not torch.allclose(output, expected - 0.5 * (x @ A.T) @ B.T, atol=1.0)  # the delta is there
