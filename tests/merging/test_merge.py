"""merge_adapters: every rule against its definition on the true weight changes, for LoRA,
rsLoRA, DoRA, lora_bias, per-module ranks, conv and embedding layers; PEFT loads the result."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import splice
from splice.core.adapter_state import AdapterState
from splice.io.adapter_states import adapter_state
from splice.io.peft_format import attach_state
from splice.merging import merge_adapters


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.conv = nn.Conv1d(12, 12, 3, padding=1)
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.fc2(torch.relu(self.fc1(h)))


def base() -> Net:
    torch.manual_seed(0)
    return Net()


def trained(config: splice.AdapterConfig, seed: int) -> Net:
    model = splice.attach(base(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in splice.trainable_parameters(model).values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def weights_after(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model parameters with the active adapter merged in (float64)."""
    merged = splice.unload(copy.deepcopy(model))
    return {k: v.double() for k, v in merged.state_dict().items()}


def change(model: nn.Module) -> dict[str, torch.Tensor]:
    reference = base().state_dict()
    return {k: v - reference[k].double() for k, v in weights_after(model).items()}


def merged_change(state: AdapterState) -> dict[str, torch.Tensor]:
    return change(attach_state(base(), state, "mix"))


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5, msg=key)


def combination(models: list[nn.Module], weights: list[float]) -> dict[str, torch.Tensor]:
    changes = [change(m) for m in models]
    return {k: sum(w * c[k] for w, c in zip(weights, changes, strict=True)) for k in changes[0]}


LORA = dict(targets=["emb", "conv", "fc1", "fc2"])


@pytest.fixture(scope="module")
def adapters() -> list[nn.Module]:
    return [
        trained(splice.LoRA(r=4, alpha=8, **LORA), 1),
        trained(splice.LoRA(r=2, alpha=3, rslora=True, rank_pattern={"fc1": 5}, **LORA), 2),
        trained(splice.LoRA(r=3, alpha=6, targets=["conv", "fc1"]), 3),
    ]


@pytest.mark.parametrize("method", ["cat", "linear", "task_arithmetic"])
def test_exact_rules_are_the_weighted_sum_of_weight_changes(adapters, method):
    weights = [0.5, -0.3, 1.2]
    result = merge_adapters(adapters, method, weights=weights)
    assert_close(merged_change(result.state), combination(adapters, weights))
    assert max(result.errors.values()) < 1e-9


def test_cat_has_the_sum_of_ranks_and_linear_the_numerical_rank(adapters):
    twice = merge_adapters([adapters[0], adapters[0]], "cat", weights=[0.5, 0.5])
    assert twice.state.modules["fc1"].rank == 8
    compact = merge_adapters([adapters[0], adapters[0]], "linear", weights=[0.5, 0.5])
    assert compact.state.modules["fc1"].rank == 4
    assert_close(merged_change(compact.state), change(adapters[0]))


def test_merging_one_adapter_returns_it(adapters):
    for method in ("cat", "linear", "svd", "task_arithmetic"):
        result = merge_adapters([adapters[1]], method, weights=[1.0])
        assert_close(merged_change(result.state), change(adapters[1]))
    alone = merge_adapters([adapters[0]], "cat", weights=[1.0])
    original = adapter_state(adapters[0])
    for name, update in alone.state.modules.items():
        torch.testing.assert_close(update.matrix(), original.modules[name].matrix())


def test_weights_sum_rules(adapters):
    """Identical adapters whose weights sum to 1 give the adapter; scaling the weights scales the change."""
    same = merge_adapters([adapters[0]] * 3, "linear", weights=[0.2, 0.3, 0.5])
    assert_close(merged_change(same.state), change(adapters[0]))
    default = merge_adapters(adapters[:2], "linear")  # default weights: the mean
    assert default.weights == [0.5, 0.5]
    arithmetic = merge_adapters(adapters[:2], "task_arithmetic")  # default weights: the sum
    assert arithmetic.weights == [1.0, 1.0]
    doubled = {k: 2 * v for k, v in merged_change(default.state).items()}
    assert_close(merged_change(arithmetic.state), doubled)


def test_svd_truncates_to_the_target_rank_optimally(adapters):
    result = merge_adapters(adapters, "svd", weights=[1, 1, 1], rank=2)
    assert {u.rank for u in result.state.modules.values()} == {2}
    exact = combination(adapters, [1, 1, 1])["fc1.weight"]
    got = merged_change(result.state)["fc1.weight"]
    s = torch.linalg.svdvals(exact)
    expected = (s[2:].square().sum() / s.square().sum()).sqrt().item()
    measured = ((got - exact).norm() / exact.norm()).item()
    assert measured == pytest.approx(expected, rel=1e-4)
    assert result.errors["fc1"] == pytest.approx(expected, rel=1e-4)


def test_default_svd_rank_is_the_largest_input_rank(adapters):
    result = merge_adapters(adapters, "svd")
    assert result.state.modules["fc1"].rank == 5  # the rsLoRA adapter's rank_pattern


def test_lora_bias_is_merged_with_its_scale():
    with_bias = [trained(splice.LoRA(r=2, alpha=4, targets=["fc1", "fc2"], lora_bias=True), s) for s in (4, 5)]
    for m in with_bias:
        assert torch.count_nonzero(m.fc1.splice["default"].lora_bias) > 0
    weights = [0.6, 0.9]
    for method in ("cat", "linear"):
        result = merge_adapters(with_bias, method, weights=weights)
        assert_close(merged_change(result.state), combination(with_bias, weights))
    full_rank = merge_adapters(with_bias, "ties", weights=weights, density=1.0, rank=12)
    biases = torch.stack([change(m)["fc1.bias"] for m in with_bias])  # the bias column goes through TIES too
    sign = torch.where(biases.sum(0) >= 0, 1.0, -1.0).double()
    agree = biases * sign > 0
    expected = (biases * torch.tensor(weights, dtype=torch.float64)[:, None] * agree).sum(0) / agree.sum(0).clamp_min(1)
    torch.testing.assert_close(merged_change(full_rank.state)["fc1.bias"], expected, atol=1e-6, rtol=1e-6)


def test_dora_merge_is_exact_and_stays_dora():
    doras = [trained(splice.DoRA(r=2, alpha=4, targets=["fc1", "fc2"]), s) for s in (6, 7)]
    lora = trained(splice.LoRA(r=3, targets=["fc1"]), 8)
    weights = [0.5, 0.3, 0.4]
    result = merge_adapters([*doras, lora], "linear", weights=weights, base=base())
    assert result.state.dora and all(u.magnitude is not None for u in result.state.modules.values())
    assert_close(merged_change(result.state), combination([*doras, lora], weights))
    with pytest.raises(splice.SpliceError, match="base model"):
        merge_adapters(doras, "linear")


def test_elementwise_rules_on_dense_changes(adapters):
    """TIES at density 1 and full rank = the disjoint mean of the changes; DARE is seeded."""
    weights = [1.0, 1.0, 1.0]
    ties = merge_adapters(adapters, "ties", weights=weights, density=1.0, rank=24)
    changes = [change(m)["fc1.weight"] for m in adapters]
    stack = torch.stack(changes)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).double()
    agree = stack * sign > 0
    expected = (stack * agree).sum(0) / agree.sum(0).clamp_min(1)
    torch.testing.assert_close(merged_change(ties.state)["fc1.weight"], expected, atol=1e-5, rtol=1e-5)
    first = merge_adapters(adapters, "dare_linear", density=0.5, seed=3)
    again = merge_adapters(adapters, "dare_linear", density=0.5, seed=3)
    other = merge_adapters(adapters, "dare_linear", density=0.5, seed=4)
    assert torch.equal(first.state.modules["fc1"].A, again.state.modules["fc1"].A)
    assert not torch.equal(first.state.modules["fc1"].A, other.state.modules["fc1"].A)


def test_magnitude_prune_keeps_the_largest_entries(adapters):
    result = merge_adapters([adapters[0]], "magnitude_prune", weights=[1.0], density=0.25, rank=24)
    full = change(adapters[0])["fc1.weight"]
    got = merged_change(result.state)["fc1.weight"]
    kept = got.abs() > 1e-6
    assert kept.sum().item() == pytest.approx(0.25 * full.numel(), abs=2)
    assert full.abs()[kept].min() >= full.abs()[~kept].max() - 1e-6


def test_saved_merge_loads_in_splice_and_hf_peft(tmp_path, adapters):
    from peft import PeftModel

    result = merge_adapters(adapters[:2], "linear", weights=[0.7, 0.2])
    path = result.save(tmp_path / "merged")
    ranks = {n: u.rank for n, u in result.state.modules.items()}
    assert len(set(ranks.values())) > 1  # per-module ranks go through rank_pattern
    ids = torch.randint(0, 20, (3, 7))
    ours = splice.load(base(), path)
    peft_model = PeftModel.from_pretrained(base(), str(path))
    torch.testing.assert_close(peft_model(ids), ours(ids), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        expected = attach_state(base(), result.state)(ids)
    torch.testing.assert_close(ours(ids), expected)


def test_bad_input_is_refused(adapters):
    with pytest.raises(splice.SpliceError, match="one weight per adapter"):
        merge_adapters(adapters, "linear", weights=[1.0])
    with pytest.raises(splice.SpliceError, match="unknown merge method"):
        merge_adapters(adapters, "average")
    with pytest.raises(splice.SpliceError, match="cat is exact"):
        merge_adapters(adapters, "cat", rank=2)
    with pytest.raises(splice.SpliceError, match="density"):
        merge_adapters(adapters, "ties", density=0.0)
    wide = nn.Sequential()
    wide.add_module("fc1", nn.Linear(12, 30))
    other = splice.attach(wide, splice.LoRA(r=2, targets=["fc1"]))
    with pytest.raises(splice.ShapeMismatchError, match="fc1"):
        merge_adapters([adapters[0], other], "linear")


@pytest.mark.parametrize("density", [0.33, 0.5, 1.0])
def test_ties_and_magnitude_rules_match_hf_peft_merge_utils(density):
    """Trimming and sign election on the unweighted vectors, weights in the disjoint mean (PEFT's order)."""
    from peft.utils import merge_utils

    from splice.merging import task_vectors

    generator = torch.Generator().manual_seed(0)
    taus = torch.randn(3, 31, 20, generator=generator, dtype=torch.float64)
    weights = torch.tensor([0.7, 0.5, -0.2], dtype=torch.float64)
    torch.testing.assert_close(task_vectors.ties(taus, weights, density),
                               merge_utils.ties(list(taus.clone()), weights, density))
    torch.testing.assert_close(task_vectors.magnitude(taus, weights, density),
                               merge_utils.magnitude_prune(list(taus.clone()), weights, density))
