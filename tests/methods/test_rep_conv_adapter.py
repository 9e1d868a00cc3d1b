"""RepConvAdapter: zero init, branches per host geometry, the fold (folded conv == branches in
eval mode), merging with and without a host bias, frozen base, save/load with BN statistics,
errors, and a real transfer on sklearn's digits that then merges."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from digits_helpers import accuracy, fit, with_fresh_head
from helpers import assert_close, assert_differs, logits, randomize
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

import splice
from splice.core.errors import MergeError, TargetError
from splice.core.host import hosts
from splice.methods.rep_conv_adapter import RepConvAdapter, RepConvAdapterModule

RESNET_CONVS = r".*convolution"  # every Conv2d of transformers' ResNet: 7x7/2, 3x3/1, 3x3/2, 1x1/1, 1x1/2


def make_resnet(seed: int = 0) -> ResNetForImageClassification:
    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)
    return ResNetForImageClassification(config).eval()


def images(seed: int = 0, size: tuple[int, int] = (29, 33)) -> torch.Tensor:
    return torch.randn(2, 1, *size, generator=torch.Generator().manual_seed(seed))


def adapters_of(model: nn.Module, name: str = "default") -> dict[str, RepConvAdapterModule]:
    return {module_name: host[name] for module_name, _, host in hosts(model) if name in host}


def train_statistics(model: nn.Module, steps: int = 3) -> None:
    """Non-trivial BN running statistics in every adapter (the base's own BNs are left alone):
    a few train-mode passes of shifted, scaled random inputs through each adapter."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in adapters_of(model).values():
            adapter.train()
            for _ in range(steps):
                x = torch.randn(4, adapter.info.in_features, 9, 11, generator=generator) * 2 + 0.5
                adapter.delta(x)
            adapter.eval()
    for adapter in adapters_of(model).values():
        for bn in adapter.norms():
            assert bn.num_batches_tracked == steps and bn.running_mean.abs().sum() > 0


def randomized(model: nn.Module) -> nn.Module:
    """Random conv weights and BN affines (gammas included), then trained BN statistics."""
    randomize(model)
    train_statistics(model)
    return model


def two_convs(bias: tuple[bool, bool] = (True, True)) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=bias[0]), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias[1])).eval()


# -- init and branches ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_zero_initialised_adapter_leaves_resnet_unchanged(mode):
    model = make_resnet()
    reference = copy.deepcopy(model)
    x = images()
    splice.attach(model, RepConvAdapter(targets=RESNET_CONVS))
    assert len(adapters_of(model)) == 8
    model.train(mode == "train")
    reference.train(mode == "train")
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)
    for adapter in adapters_of(model).values():
        assert not adapter.delta_weight().any() and not adapter.delta_bias().any()
        assert all(not bn.weight.any() for bn in adapter.norms())
    randomize(model)  # non-zero gammas do change the output
    model.eval()
    assert_differs(logits(model, x), logits(reference.eval(), x))


# (in, out, kernel, stride, padding) -> branches
GEOMETRIES = {
    "3x3 same": ((4, 4, 3, 1, 1), ["conv", "bn", "conv_1x1", "bn_1x1", "bn_identity"]),
    "3x3 stride 2": ((4, 6, 3, 2, 1), ["conv", "bn", "conv_1x1", "bn_1x1"]),
    "3x3 in != out": ((4, 6, 3, 1, 1), ["conv", "bn", "conv_1x1", "bn_1x1"]),
    "3x3 valid": ((4, 4, 3, 1, 0), ["conv", "bn", "conv_1x1", "bn_1x1", "bn_identity"]),
    "3x3 padding 2": ((4, 4, 3, 1, 2), ["conv", "bn", "conv_1x1", "bn_1x1", "bn_identity"]),
    "'same'": ((4, 4, 3, 1, "same"), ["conv", "bn", "conv_1x1", "bn_1x1", "bn_identity"]),
    "5x5 padding 1": ((4, 4, 5, 1, 1), ["conv", "bn", "conv_1x1", "bn_1x1", "bn_identity"]),
    "1x3 stride 2": ((4, 4, (1, 3), 2, (2, 0)), ["conv", "bn", "conv_1x1", "bn_1x1"]),
    "1x1": ((4, 4, 1, 1, 0), ["conv", "bn", "bn_identity"]),
    "1x1 stride 2": ((4, 8, 1, 2, 0), ["conv", "bn"]),
}


def single_host(geometry: tuple) -> nn.Sequential:
    channels_in, channels_out, kernel, stride, padding = geometry
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(channels_in, channels_out, kernel, stride=stride, padding=padding)).eval()
    splice.attach(model, RepConvAdapter(targets=["0"]))
    return randomized(model)


@pytest.mark.parametrize("case", GEOMETRIES)
def test_branches_follow_the_host_geometry(case):
    geometry, branches = GEOMETRIES[case]
    adapter = single_host(geometry)[0].splice["default"]
    assert [name for name, _ in adapter.named_children()] == branches


@pytest.mark.parametrize("case", GEOMETRIES)
def test_folded_conv_equals_the_branches_in_eval_mode(case):
    model = single_host(GEOMETRIES[case][0])
    host, adapter = model[0], model[0].splice["default"]
    x = torch.randn(1, host.in_channels, 13, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        branches = adapter.delta(x)
        folded = adapter.folded()(x)
        assert branches.shape == host._conv_forward(x, host.weight, host.bias).shape
        assert branches.abs().max() > 0.1
        torch.testing.assert_close(folded, branches, atol=1e-5, rtol=0)
        # delta_weight/delta_bias are that conv's kernel and bias in the host's geometry.
        by_host = F.conv2d(x, adapter.delta_weight(), adapter.delta_bias(), stride=host.stride, padding=host.padding)
        torch.testing.assert_close(by_host, branches, atol=1e-5, rtol=0)


def test_fold_keeps_the_batch_norm_eps_for_tiny_variances():
    model = single_host(GEOMETRIES["3x3 same"][0])
    adapter = model[0].splice["default"]
    for bn in adapter.norms():
        bn.running_var.uniform_(1e-6, 1e-4)  # comparable to eps = 1e-5
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert_close(adapter.folded()(x), adapter.delta(x), rel=1e-5)


def test_branches_are_repvgg_sums_of_batch_norms():
    model = single_host((4, 4, 3, 1, 1))
    adapter = model[0].splice["default"]
    x = torch.randn(2, 4, 6, 7)

    def bn(bn: nn.BatchNorm2d, h: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)

    with torch.no_grad():
        expected = (bn(adapter.bn, F.conv2d(x, adapter.conv.weight, padding=1))
                    + bn(adapter.bn_1x1, F.conv2d(x, adapter.conv_1x1.weight)) + bn(adapter.bn_identity, x))
        assert_close(adapter.delta(x), expected, rel=1e-6)
        assert_close(logits(model, x), F.conv2d(x, model[0].weight, model[0].bias, padding=1) + expected, rel=1e-6)


# -- merging -------------------------------------------------------------------------------


def test_merge_into_convs_with_bias_is_exact_and_unmerge_restores_them():
    model = two_convs()
    base = copy.deepcopy(model.state_dict())
    splice.attach(model, RepConvAdapter(targets=["0", "2"]))  # the second host has stride 2
    randomized(model)
    x = torch.randn(2, 4, 9, 8)
    before = logits(model, x)
    splice.merge(model)
    assert all(host.merged == ["default"] for _, _, host in hosts(model))
    assert not torch.equal(model[2].bias, base["2.bias"])
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    splice.unmerge(model)
    for key, value in base.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    splice.merge(model)
    splice.detach(model, "default")  # detaching a merged adapter gives the base back too
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, base[key], atol=1e-6, rtol=0)


def test_merge_refuses_a_bias_change_for_a_host_without_bias():
    model = two_convs(bias=(True, False))
    splice.attach(model, RepConvAdapter(targets=["0", "2"]))
    randomized(model)
    weights = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 4, 9, 8)
    before = logits(model, x)
    assert model[2].splice["default"].delta_bias().abs().max() > 1e-3
    with pytest.raises(MergeError, match="changes the bias"):
        splice.merge(model, "default")
    assert all(not host.merged for _, _, host in hosts(model))
    # The first conv could take its part; `splice.merge` rolls it back (by subtraction: to
    # rounding), the second conv is refused before it changes.
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)
    assert torch.equal(model[2].weight, weights["2.weight"])
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(MergeError, match="Conv2d has none"):  # on its own, the refusal changes nothing
        model[2].splice.merge(model[2], "default")
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    # The inference form still exists: base conv + folded conv.
    adapter, hidden = model[2].splice["default"], torch.relu(model[0](x))
    with torch.no_grad():
        torch.testing.assert_close(model[2](hidden), F.conv2d(hidden, model[2].weight, stride=2, padding=1)
                                   + adapter.folded()(hidden), atol=1e-5, rtol=0)


def test_merge_into_a_biasless_resnet_when_the_folded_bias_is_zero():
    """ResNet's convs have no bias: merging works while the fold has none (betas and running
    means zero), on 7x7/2, 3x3/2 and 1x1/2 hosts alike."""
    model = make_resnet()
    base = copy.deepcopy(model.state_dict())
    splice.attach(model, RepConvAdapter(targets=RESNET_CONVS))
    randomize(model)
    for adapter in adapters_of(model).values():
        for bn in adapter.norms():
            bn.bias.data.zero_()
    x = images()
    before = logits(model, x)
    assert_differs(before, logits(make_resnet(), x))
    splice.merge(model)
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    splice.unmerge(model)
    for key, value in base.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-6, rtol=0)


# -- training, saving, errors -------------------------------------------------------------


def test_gradients_reach_only_the_adapter():
    model = make_resnet()
    splice.attach(model, RepConvAdapter(targets=RESNET_CONVS))
    model.train()
    F.cross_entropy(model(images()).logits, torch.tensor([1, 2])).backward()
    trainable = splice.trainable_parameters(model)
    assert trainable and all(".splice.default." in name for name in trainable)
    for name, param in model.named_parameters():
        if ".splice." in name:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    # Zero gammas still learn (the gradient is the normalised branch output).
    for adapter in adapters_of(model).values():
        assert all(bn.weight.grad.abs().sum() > 0 for bn in adapter.norms())


def test_save_load_round_trip_keeps_the_batch_norm_statistics(tmp_path):
    model = make_resnet()
    splice.attach(model, RepConvAdapter(targets=RESNET_CONVS))
    randomized(model)
    x = images()
    expected = logits(model, x)
    path = splice.save(model, tmp_path / "adapter")
    loaded = splice.load(make_resnet(), path)
    assert_close(logits(loaded, x), expected, rel=1e-6)
    for name, adapter in adapters_of(loaded).items():
        original = adapters_of(model)[name].state_dict()
        assert any(key.endswith("running_var") for key in original)
        for key, value in adapter.state_dict().items():
            assert torch.equal(value, original[key]), (name, key)
    assert splice.adapters(loaded)["default"] == RepConvAdapter(targets=list(adapters_of(model)))


def test_unsupported_hosts_are_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(TargetError, match=r"RepConvAdapter needs an nn.Conv2d host; '2' is a linear layer"):
        splice.attach(model, RepConvAdapter(targets=["0", "2"]))
    assert not list(hosts(model))  # nothing half-attached
    with pytest.raises(TargetError, match=r"'0' is a Conv1d layer"):
        splice.attach(nn.Sequential(nn.Conv1d(3, 4, 3)), RepConvAdapter(targets=["0"]))
    with pytest.raises(TargetError, match=r"odd kernel.*'0' has kernel_size=\(3, 2\)"):
        splice.attach(nn.Sequential(nn.Conv2d(3, 4, (3, 2))), RepConvAdapter(targets=["0"]))


# -- real data: digits 0-4 -> 5-9 ---------------------------------------------------------


def test_adapter_transfers_a_frozen_digits_cnn_and_merges_into_it(digits):
    state, (train_x, train_y), (test_x, test_y) = digits
    probe = with_fresh_head(state)  # the frozen backbone with only a new head trained
    probe.requires_grad_(False)
    probe.head.requires_grad_(True)
    fit(probe, list(probe.head.parameters()), train_x, train_y, epochs=100)
    probe_accuracy = accuracy(probe, test_x, test_y)

    model = with_fresh_head(state)
    splice.attach(model, RepConvAdapter(targets=["conv1", "conv2", "conv3"], train_also=["head"]))
    fit(model, list(splice.trainable_parameters(model).values()), train_x, train_y, epochs=30)
    adapted = logits(model, test_x)
    adapted_accuracy = (adapted.argmax(-1) == test_y).float().mean().item()
    # Measured: probe 0.72, adapter 0.96 (chance 0.2).
    assert adapted_accuracy >= 0.9, (probe_accuracy, adapted_accuracy)
    assert adapted_accuracy >= probe_accuracy + 0.15, (probe_accuracy, adapted_accuracy)

    splice.merge(model)  # the trained branches fold into the (biased) convs: one conv each
    torch.testing.assert_close(logits(model, test_x), adapted, atol=1e-4, rtol=1e-5)
    assert accuracy(model, test_x, test_y) == adapted_accuracy
    assert not torch.equal(model.conv1.weight, state["conv1.weight"])
