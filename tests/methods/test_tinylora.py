"""TinyLoRA: the change lives in its singular slice of the base weight, costs u numbers a layer,
gets the gradient the formula says, and refuses a slice the weight does not have."""

from __future__ import annotations

import pytest
import torch
from helpers import make_bert, make_gpt2
from torch import nn

import splice
from splice.core.errors import SpliceError
from splice.core.host import hosts
from splice.methods.tinylora import TinyLoRAAdapter


def linear_with_tinylora(n: int = 12, m: int = 9, r: int = 2, u: int = 3, offset: int = 0,
                         seed: int = 0) -> tuple[nn.Sequential, TinyLoRAAdapter]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, m))
    splice.attach(model, splice.TinyLoRA(r=r, u=u, offset=offset, targets=["0"]))
    adapter = model[0].splice["default"]
    with torch.no_grad():
        adapter.v.normal_()
    return model, adapter


def test_the_change_lies_in_its_singular_slice_of_the_base_weight():
    model, adapter = linear_with_tinylora(r=2, offset=3)
    W = model[0].weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    change = adapter.delta_weight().double()
    J = slice(3, 5)
    # its column space is U_J's, its row space V_J's: projecting on them gives it all back
    assert torch.allclose(U[:, J] @ U[:, J].T @ change @ Vh[J].T @ Vh[J], change, atol=1e-6)
    assert torch.linalg.matrix_rank(change, rtol=1e-5).item() == 2  # float32 factors: round-off below that
    # and it is U_J Σ_J R V_Jᵀ with R = Σ v_i P_i, up to the SVD's sign of each direction
    R = torch.einsum("i,ijk->jk", adapter.v.detach().double(), adapter.P.double())
    signs = torch.sign((U[:, J] * adapter.U.double()).sum(0))
    expected = (U[:, J] * signs * S[J]) @ R @ (signs[:, None] * Vh[J])
    assert torch.allclose(change, expected, atol=1e-5)


def test_forward_equals_the_weight_change_and_merging_keeps_outputs():
    model, adapter = linear_with_tinylora()
    x = torch.randn(4, 12)
    with splice.disabled(model):
        plain = model(x)
    out = model(x)
    assert torch.allclose(out, plain + x @ adapter.delta_weight().T, atol=1e-6)
    splice.merge(model)
    assert torch.allclose(model(x), out, atol=1e-5)


def test_only_v_trains_u_numbers_a_layer_and_its_gradient_is_the_projection_of_dl_dw():
    model, adapter = linear_with_tinylora(n=10, m=7, r=3, u=5)
    trainable = splice.trainable_parameters(model)
    assert {k: p.numel() for k, p in trainable.items()} == {"0.splice.default.v": 5}
    x, target = torch.randn(6, 10), torch.randn(6, 7)
    loss = (model(x) - target).square().sum()
    loss.backward()
    # dL/dW of the layer's output, then dL/dv_i = <U Σ P_i Vᵀ, dL/dW>
    W_eff = (model[0].weight + adapter.delta_weight()).detach().requires_grad_(True)
    (torch.nn.functional.linear(x, W_eff, model[0].bias) - target).square().sum().backward()
    directions = torch.einsum("or,r,irs,sn->ion", adapter.U, adapter.S, adapter.P, adapter.Vh)
    expected = torch.einsum("ion,on->i", directions, W_eff.grad)
    assert torch.allclose(adapter.v.grad, expected, rtol=1e-4, atol=1e-5)
    assert model[0].weight.grad is None


def test_layers_get_their_own_fixed_basis_and_the_file_keeps_it(tmp_path):
    model = make_bert()
    splice.attach(model, splice.TinyLoRA(r=2, u=3, targets=["query", "value"], seed=4))
    adapters = [host["default"] for _, _, host in hosts(model)]
    assert not torch.equal(adapters[0].P, adapters[1].P)
    with torch.no_grad():
        for a in adapters:
            a.v.normal_()
    ids = torch.randint(1, 50, (2, 7))
    before = model(input_ids=ids).logits
    splice.save(model, tmp_path / "tiny")
    again = make_bert()
    with torch.no_grad():  # another base: the file's basis, not this weight's, must be used
        for name, p in again.named_parameters():
            if name.endswith("query.weight"):
                p.mul_(2.0)
    splice.load(again, tmp_path / "tiny")
    loaded = [host["default"] for _, _, host in hosts(again)]
    for a, b in zip(adapters, loaded, strict=True):
        for key in ("U", "S", "Vh", "P", "v"):
            assert torch.equal(getattr(a, key), getattr(b, key))
    fresh = make_bert()
    splice.load(fresh, tmp_path / "tiny")
    assert torch.allclose(fresh(input_ids=ids).logits, before, atol=1e-6)


def test_conv1d_hosts_take_the_slice_of_the_canonical_weight():
    model = make_gpt2()
    splice.attach(model, splice.TinyLoRA(r=1, u=1, targets=["c_fc"]))
    name, base, host = next(hosts(model))
    W = base.weight.detach().T.double()  # Conv1D stores [in, out]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert torch.allclose(host["default"].S.double(), S[:1], rtol=1e-5)
    assert (host["default"].U.double().T @ U[:, :1]).abs().item() == pytest.approx(1.0, abs=1e-5)


def test_bad_settings_and_a_slice_past_the_weights_rank_are_refused():
    with pytest.raises(SpliceError, match="u must be >= 1"):
        splice.TinyLoRA(u=0)
    with pytest.raises(SpliceError, match="offset must be >= 0"):
        splice.TinyLoRA(offset=-1)
    model = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(SpliceError, match=r"slice \[3, 5\) exceeds the 4 singular directions of '0'"):
        splice.attach(model, splice.TinyLoRA(r=2, offset=3, targets=["0"]))
    with pytest.raises(SpliceError, match="TinyLoRA basis of shapes"):
        linear_with_tinylora()[1].set_basis(torch.zeros(9, 1), torch.zeros(1), torch.zeros(1, 12))
