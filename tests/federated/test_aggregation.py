"""Aggregation rules against their definitions: FedAvg is the weighted mean (bit for bit with one
client); `exact` re-factors Σ w_i B_i A_i, losslessly at rank "sum"; the separate rule's bias is
measured; layouts of Linear, Conv and Embedding factors survive."""

from __future__ import annotations

import pytest
import torch

from splice.core.errors import IncompatibleAdaptersError, ShapeMismatchError, SpliceError
from splice.federated.aggregation import exact, fedavg, lora_pairs, separation_error

FC, CONV, EMB = "fc.splice.default", "conv.splice.default", "emb.splice.default"


def client(seed: int, r: int = 2, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """A client's trainable tensors: LoRA on a Linear (in 6, out 5), a Conv2d (in 3, out 4, 3x3) and
    an Embedding (10 x 7), plus a classifier head."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return {
        f"{FC}.lora_A": randn(r, 6), f"{FC}.lora_B": randn(5, r),
        f"{CONV}.lora_A": randn(r, 3, 3, 3), f"{CONV}.lora_B": randn(4, r, 1, 1),
        f"{EMB}.lora_A": randn(r, 10), f"{EMB}.lora_B": randn(7, r),
        "classifier.weight": randn(3, 7), "classifier.bias": randn(3),
    }


def delta(state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """B̂ Â in float64."""
    return state[f"{prefix}.lora_B"].flatten(1).double() @ state[f"{prefix}.lora_A"].flatten(1).double()


def averaged_delta(states: list[dict[str, torch.Tensor]], weights: list[float], prefix: str) -> torch.Tensor:
    total = sum(weights)
    return sum(w / total * delta(s, prefix) for w, s in zip(weights, states, strict=True))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_fedavg_is_the_weighted_mean_of_every_tensor() -> None:
    states = [client(0, dtype=torch.float32), client(1, dtype=torch.float32), client(2, dtype=torch.float32)]
    merged = fedavg(states, [10, 30, 60])
    assert list(merged) == list(states[0])
    for key, value in merged.items():
        hand = (0.1 * states[0][key].double() + 0.3 * states[1][key].double() + 0.6 * states[2][key].double())
        assert value.dtype == torch.float32 and value.shape == states[0][key].shape
        torch.testing.assert_close(value, hand.float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_one_client_is_given_back_bit_for_bit(dtype: torch.dtype) -> None:
    state = client(0, dtype=dtype)
    state["classifier.bias"][0] = -0.0
    merged = fedavg([state], [37])
    for key, value in state.items():
        assert merged[key].dtype == dtype and torch.equal(bits(merged[key]), bits(value))
        assert merged[key].data_ptr() != value.data_ptr()  # a new tensor, not the client's
    tensors, errors = exact([state], [37])
    assert torch.equal(bits(tensors["classifier.bias"]), bits(state["classifier.bias"]))
    for prefix in (FC, CONV, EMB):
        assert errors[prefix] < 1e-12
        tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 5e-2)
        torch.testing.assert_close(delta(tensors, prefix), delta(state, prefix), rtol=tolerance, atol=tolerance)


def test_mismatched_clients_are_refused_with_key_and_shapes() -> None:
    a, b = client(0), client(1)
    del b["classifier.bias"]
    b["extra"] = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(IncompatibleAdaptersError, match=r"client 1's tensors differ from client 0's: "
                                                        r"missing \['classifier.bias'\], extra \['extra'\]"):
        fedavg([a, b], [1, 1])
    with pytest.raises(IncompatibleAdaptersError,
                       match=r"client 1's 'fc.splice.default.lora_A' has shape \(3, 6\), client 0's \(2, 6\)"):
        fedavg([client(0), client(1, r=3)], [1, 1])
    wide = client(1)
    wide[f"{FC}.lora_A"] = torch.zeros(2, 8, dtype=torch.float64)
    with pytest.raises(ShapeMismatchError, match=r"'fc.splice.default.lora_A' has shape \(2, 8\), client 0's \(2, 6\)"):
        exact([client(0), wide], [1, 1], rank="sum")
    broken = client(1)
    broken[f"{FC}.lora_B"] = torch.zeros(5, 3, dtype=torch.float64)
    with pytest.raises(ShapeMismatchError, match=r"client 0's 'fc.splice.default.lora_A' has shape \(2, 6\) and "
                                                 r"'fc.splice.default.lora_B' \(5, 3\)"):
        exact([broken], [1])


@pytest.mark.parametrize(("states", "weights", "message"), [
    ([], [], "no client states"),
    ([client(0)], [1, 2], "2 weights for 1 clients"),
    ([client(0), client(1)], [1, -1], "non-negative"),
    ([client(0), client(1)], [0, 0], "not all zero"),
    ([client(0), client(1)], [1, float("nan")], "finite"),
    ([client(0), {**client(1), "classifier.bias": torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64)}],
     [1, 1], "client 1's 'classifier.bias' holds 1 NaN"),
    ([{**client(0), "classifier.bias": torch.zeros(3, dtype=torch.int64)}], [1],
     "client 0's 'classifier.bias' has dtype int64"),
])
def test_bad_weights_and_tensors_are_refused(states, weights, message: str) -> None:
    with pytest.raises(SpliceError, match=message):
        fedavg(states, weights)


def test_lora_pairs_pairs_factors_and_refuses_orphans() -> None:
    assert lora_pairs(client(0)) == {p: (f"{p}.lora_A", f"{p}.lora_B") for p in (FC, CONV, EMB)}
    assert lora_pairs(["head.weight"]) == {}
    with pytest.raises(SpliceError, match=r"'x.splice.a.lora_A' has no 'x.splice.a.lora_B'; "
                                          r"'y.splice.a.lora_B' has no 'y.splice.a.lora_A'"):
        lora_pairs(["x.splice.a.lora_A", "y.splice.a.lora_B", "z.splice.a.lora_A", "z.splice.a.lora_B"])


def test_exact_at_rank_sum_reproduces_the_averaged_change() -> None:
    states, weights = [client(0), client(1), client(2)], [5.0, 2.0, 3.0]
    tensors, errors = exact(states, weights, rank="sum")
    for prefix, (out, inner) in {FC: (5, 6), CONV: (4, 27), EMB: (7, 10)}.items():
        k = min(6, out, inner)
        assert tensors[f"{prefix}.lora_A"].shape[0] == k and tensors[f"{prefix}.lora_B"].shape[:2] == (out, k)
        torch.testing.assert_close(delta(tensors, prefix), averaged_delta(states, weights, prefix),
                                   rtol=0, atol=1e-10)
        assert errors[prefix] < 1e-12
    plain = fedavg(states, weights)
    for key in ("classifier.weight", "classifier.bias"):
        assert torch.equal(tensors[key], plain[key])


def test_exact_at_the_clients_rank_gives_identical_clients_back() -> None:
    states = [client(4), client(4), client(4)]
    tensors, errors = exact(states, [1, 2, 3])
    for prefix in (FC, CONV, EMB):
        for factor in ("lora_A", "lora_B"):
            assert tensors[f"{prefix}.{factor}"].shape == states[0][f"{prefix}.{factor}"].shape
        torch.testing.assert_close(delta(tensors, prefix), delta(states[0], prefix), rtol=0, atol=1e-10)
        assert errors[prefix] < 1e-12
    assert all(value < 1e-15 for value in separation_error(states, [1, 2, 3]).values())
    assert all(value == 0 for value in separation_error(states, [1, 1, 2]).values())  # 1/4 + 1/4 + 1/2: exact


def test_conv_factors_keep_their_layout() -> None:
    states = [client(0, r=2, dtype=torch.float32), client(1, r=2, dtype=torch.float32)]
    for rank, k in ((None, 2), ("sum", 4), (3, 3)):
        tensors, _ = exact(states, [1, 1], rank=rank)
        assert tensors[f"{CONV}.lora_A"].shape == (k, 3, 3, 3) and tensors[f"{CONV}.lora_B"].shape == (4, k, 1, 1)
        assert tensors[f"{CONV}.lora_A"].dtype == torch.float32 and tensors[f"{CONV}.lora_A"].is_contiguous()
    tensors, _ = exact(states, [1, 1], rank="sum")
    torch.testing.assert_close(delta(tensors, CONV), averaged_delta(states, [1, 1], CONV).float().double(),
                               rtol=1e-5, atol=1e-5)


def orthogonal_clients() -> list[dict[str, torch.Tensor]]:
    """Two rank-2 updates on an 8x8 Linear in orthogonal row and column spaces (dims 0-1 and 2-3),
    with singular values (3, 1) and (2, 1)."""
    eye = torch.eye(8, dtype=torch.float64)
    return [{f"{FC}.lora_A": eye[:2].clone(), f"{FC}.lora_B": eye[:, :2] * torch.tensor([3.0, 1.0]).double()},
            {f"{FC}.lora_A": eye[2:4].clone(), f"{FC}.lora_B": eye[:, 2:4] * torch.tensor([2.0, 1.0]).double()}]


def test_exact_at_rank_r_loses_what_does_not_fit() -> None:
    states = orthogonal_clients()
    tensors, errors = exact(states, [1, 1])
    # M has singular values 1.5, 1, 0.5, 0.5: rank 2 keeps 1.5 and 1
    expected = (0.5**2 + 0.5**2) ** 0.5 / (1.5**2 + 1 + 0.5**2 + 0.5**2) ** 0.5
    assert errors[FC] == pytest.approx(expected, rel=1e-12)
    M = averaged_delta(states, [1, 1], FC)
    assert float((delta(tensors, FC) - M).norm() / M.norm()) == pytest.approx(expected, rel=1e-12)
    _, lossless = exact(states, [1, 1], rank="sum")
    assert lossless[FC] < 1e-12
    # the separate rule: (B_1 + B_2)/2 (A_1 + A_2)/2 halves each client's change and adds cross terms
    B = (states[0][f"{FC}.lora_B"] + states[1][f"{FC}.lora_B"]) / 2
    A = (states[0][f"{FC}.lora_A"] + states[1][f"{FC}.lora_A"]) / 2
    separate = separation_error(states, [1, 1])[FC]
    assert separate == pytest.approx(float((B @ A - M).norm() / M.norm()), rel=1e-12) and separate > 0.5


def test_separation_error_of_differing_clients_matches_its_definition() -> None:
    states, weights = [client(0), client(1)], [1.0, 3.0]
    plain = fedavg(states, weights)
    errors = separation_error(states, weights)
    for prefix in (FC, CONV, EMB):
        M = averaged_delta(states, weights, prefix)
        assert errors[prefix] == pytest.approx(float((delta(plain, prefix) - M).norm() / M.norm()), rel=1e-10)
        assert errors[prefix] > 0.1


def test_clients_of_different_ranks() -> None:
    states, weights = [client(0, r=2), client(1, r=4)], [1, 1]
    tensors, errors = exact(states, weights, rank="sum")
    assert tensors[f"{FC}.lora_A"].shape == (5, 6) and errors[FC] < 1e-12  # 2 + 4 capped at min(5, 6)
    torch.testing.assert_close(delta(tensors, FC), averaged_delta(states, weights, FC), rtol=0, atol=1e-10)
    with pytest.raises(SpliceError, match=r"module 'fc.splice.default' has ranks \[2, 4\] on the clients; "
                                          r"pass rank=<int> or rank='sum'"):
        exact(states, weights)
    with pytest.raises(IncompatibleAdaptersError, match="has shape"):
        separation_error(states, weights)


def test_rank_above_the_matrix_size_is_padded_with_unused_components() -> None:
    """The spare component has B's column zero (the product is M) and a unit row of A (not a
    zero pair, which no gradient would leave)."""
    states = [{"h.splice.a.lora_A": torch.randn(4, 5, dtype=torch.float64),
               "h.splice.a.lora_B": torch.randn(3, 4, dtype=torch.float64)}]
    tensors, errors = exact(states, [1])
    assert tensors["h.splice.a.lora_A"].shape == (4, 5) and tensors["h.splice.a.lora_B"].shape == (3, 4)
    assert not tensors["h.splice.a.lora_B"][:, 3].any()
    assert float(tensors["h.splice.a.lora_A"][3].norm()) == pytest.approx(1.0)
    torch.testing.assert_close(delta(tensors, "h.splice.a"), delta(states[0], "h.splice.a"), rtol=0, atol=1e-10)
    assert errors["h.splice.a"] < 1e-12


def test_zero_updates_have_zero_error() -> None:
    state = {k: torch.zeros_like(v) for k, v in client(0).items()}
    tensors, errors = exact([state, state], [1, 1])
    assert all(e == 0 for e in errors.values())
    assert all(not t.any() for k, t in tensors.items() if not k.endswith(".lora_A"))  # B (and the rest) zero
    assert all(not delta(tensors, p).any() for p in lora_pairs(tensors))
    assert all(e == 0 for e in separation_error([state, state], [1, 1]).values())


@pytest.mark.parametrize("rank", [0, -1, 2.0, True, "max"])
def test_bad_rank_is_refused(rank) -> None:
    with pytest.raises(SpliceError, match="rank must be a positive integer, 'sum' or None"):
        exact([client(0)], [1], rank=rank)
