"""Modules trained in full (`train_also`, PEFT's `modules_to_save`): each adapter owns its copy.

Regression tests for the differential test against HF PEFT (issue 12, defect 1): a second
adapter's head used to overwrite the first one's, and an adapter without a head ran with
whichever head was loaded last.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_differs, randomize, randomize_module
from torch import nn

import splice
from splice.core.errors import SpliceError


class Net(nn.Module):
    """PEFT's custom-model test shape: a body and a head `lin1` that adapters may train in full."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 16)
        self.lin1 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(6, 8, generator=torch.Generator().manual_seed(1))


def two_heads(model: nn.Module) -> dict[str, nn.Module]:
    """Adapters a and b, each with random factors and its own random lin1; c without a head."""
    heads = {}
    for i, name in enumerate("ab"):
        splice.attach(model, splice.LoRA(r=2, targets=["lin0"], train_also=["lin1"]), name)
        randomize(model, name, seed=i)
        randomize_module(model.lin1, seed=10 + i)
        heads[name] = model.lin1
    splice.attach(model, splice.LoRA(r=2, targets=["lin0"]), "c")
    randomize(model, "c", seed=3)
    return heads


def alone(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    splice.activate(model, name)
    return model(x)


def test_each_adapter_keeps_its_own_head_and_activate_switches_them(net, x):
    base = net(x)
    original = net.lin1.weight.detach().clone()
    two_heads(net)
    a, b = alone(net, "a", x), alone(net, "b", x)
    assert_differs(a, b)
    assert torch.equal(alone(net, "a", x), a)  # switching back gives a's head again, not b's
    splice.activate(net, "c")  # no head of its own: the original module
    assert torch.equal(net.lin1.weight, original)
    lora_only = net(x)
    splice.deactivate(net)
    assert torch.equal(net(x), base)
    with splice.disabled(splice.activate(net, "a")):
        assert torch.equal(net(x), base)
    assert torch.equal(net(x), a)
    assert_differs(lora_only, a)


def test_a_new_adapters_head_starts_from_the_original_not_from_another_adapters(net):
    original = {k: v.clone() for k, v in net.lin1.state_dict().items()}
    splice.attach(net, splice.LoRA(r=2, targets=["lin0"], train_also=["lin1"]), "a")
    randomize_module(net.lin1, seed=4)
    splice.attach(net, splice.LoRA(r=2, targets=["lin0"], train_also=["lin1"]), "b")
    for key, value in net.lin1.state_dict().items():
        assert torch.equal(value, original[key])


def test_only_the_active_adapters_head_trains(net, x):
    two_heads(net)
    splice.activate(net, "b")
    trainable = splice.trainable_parameters(net)
    assert {k for k in trainable if ".splice." not in k} == {"lin1.weight", "lin1.bias"}
    a_head = {k: v.detach().clone() for k, v in splice.io.adapter_state(net, "a").head_tensors.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=0.1)
    net(x).sum().backward()
    optimizer.step()
    assert all(torch.equal(v, a_head[k]) for k, v in splice.io.adapter_state(net, "a").head_tensors.items())
    assert not torch.equal(net.lin1.weight, a_head["lin1.weight"])
    assert set(dict(net.lin1.named_parameters())) == {"weight", "bias"}  # the module gained no children


def test_two_active_adapters_with_their_own_head_are_refused_and_nothing_changes(net, x):
    two_heads(net)
    splice.activate(net, "a")
    before = net(x)
    with pytest.raises(SpliceError, match="each train their own 'lin1'"):
        splice.activate(net, ["a", "b"])
    assert splice.active_adapters(net) == ["a"] and torch.equal(net(x), before)
    splice.activate(net, ["a", "c"])  # one head owner plus a head-less adapter is fine
    assert torch.equal(net.lin1.weight, splice.io.adapter_state(net, "a").head_tensors["lin1.weight"])


def test_route_gives_every_row_its_own_adapters_head(net, x):
    two_heads(net)
    ids = ["a", "b", None, "c", "b", "a"]
    expected = torch.cat([alone(net, i, x[r:r + 1]) if i else _base(net, x[r:r + 1]) for r, i in enumerate(ids)])
    for active in ("a", "b", "c"):  # whichever head is bound, each row gets its own
        splice.activate(net, active)
        for grouped in (True, False):
            with splice.route(net, ids, grouped=grouped), torch.no_grad():
                assert_close(net(x), expected, rel=1e-6)


def test_route_trains_each_rows_head(net, x):
    two_heads(net)
    splice.activate(net, ["a", "c"])
    ids = ["a", "b", "a", "c", "b", None]
    with splice.route(net, ids):
        net(x).pow(2).sum().backward()
    grads = {name: splice.core.heads.head_module(net, "lin1", name).weight.grad for name in "ab"}
    assert grads["a"] is not None and grads["a"].abs().sum() > 0
    assert grads["b"] is None  # b is not active, so it does not train (route does not change that)


def test_route_refuses_heads_of_different_shapes(net, x):
    splice.attach(net, splice.LoRA(r=2, targets=["lin0"], train_also=["lin1"]), "a")
    splice.attach(net, splice.LoRA(r=2, targets=["lin0"], train_also=["lin1"]), "b")
    splice.core.heads.head_module(net, "lin1", "b").weight = nn.Parameter(torch.zeros(5, 16))
    splice.core.heads.head_module(net, "lin1", "b").bias = nn.Parameter(torch.zeros(5))
    splice.activate(net, "a")
    with splice.route(net, ["a", "b"] * 3), pytest.raises(SpliceError, match="separate batches"):
        net(x)


def test_detach_gives_the_original_back_and_unload_keeps_the_active_head(net, x):
    base = net(x)
    two_heads(net)
    for name in "abc":
        splice.detach(net, name)
    assert torch.equal(net(x), base) and "splice_heads" not in dict(net.named_children())
    two_heads(net)
    expected = alone(net, "b", x)
    head = net.lin1.weight.detach().clone()
    plain = splice.unload(net)
    assert_close(plain(x), expected, rel=1e-6)
    assert torch.equal(plain.lin1.weight, head) and "splice_heads" not in dict(plain.named_children())
    assert set(plain.state_dict()) == {"lin0.weight", "lin0.bias", "lin1.weight", "lin1.bias"}


def test_copies_follow_the_model_to_another_dtype(net, x):
    two_heads(net)
    net.double()
    for name in "ab":
        assert splice.core.heads.head_module(net, "lin1", name).weight.dtype == torch.float64
    splice.activate(net, "a")
    assert net(x.double()).dtype == torch.float64


@pytest.mark.parametrize("form", ["peft", "splice"])
def test_saved_heads_are_each_adapters_own(net, x, tmp_path, form):
    two_heads(net)
    outputs = {name: alone(net, name, x) for name in "ab"}
    for name in "ab":
        splice.save(net, tmp_path / name, name, format=form)
    torch.manual_seed(0)
    other = Net()
    for name in "ab":
        splice.load(other, tmp_path / name, name)
    for name in "ab":
        assert torch.equal(alone(other, name, x), outputs[name])


def test_peft_switches_the_same_heads(net, x, tmp_path):
    peft = pytest.importorskip("peft")
    two_heads(net)
    outputs = {name: alone(net, name, x) for name in "abc"}
    for name in "abc":
        splice.save(net, tmp_path / name, name)
    torch.manual_seed(0)
    model = peft.PeftModel.from_pretrained(Net(), tmp_path / "a", adapter_name="a")
    for name in "bc":
        model.load_adapter(tmp_path / name, adapter_name=name)
    model.eval()
    for name in "abc":
        model.set_adapter(name)
        assert_close(model(x), outputs[name], rel=1e-6)


def _base(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with splice.disabled(model):
        return model(x)
