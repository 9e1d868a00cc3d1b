"""Review: the aggregation rules and the payload on their own (no model, no Flower run)."""

from __future__ import annotations

import torch

from splice.federated import aggregation, payload


def test_exact_leaves_no_rank_component_that_no_gradient_can_revive():
    """When M = sum_i w_i B_i A_i has rank below r, `exact` fills the missing components with
    A_j = 0 and B_j = 0. For LoRA both factors of a component being zero is a saddle: dL/dA_j is
    proportional to B_j and dL/dB_j to A_j x, so the component never trains again, in any later
    round (fedavg never produces this; plain LoRA starts with A != 0 for the same reason). The
    product does not need them to be zero: A_j may be any direction B_j = 0 multiplies away
    (e.g. the complement of the kept right singular vectors), and B'A' = M stays exact."""
    A = torch.zeros(2, 5)
    A[0, 0] = 1.0  # clients whose update is rank 1 (a module moved along one direction only)
    B = torch.zeros(4, 2)
    B[0, 0] = 0.5
    client = {"m.lora_A": A, "m.lora_B": B}
    merged, errors = aggregation.exact([client, client], [1.0, 1.0])
    assert errors["m"] < 1e-12
    assert torch.allclose(merged["m.lora_B"] @ merged["m.lora_A"], B @ A)
    dead = [j for j in range(2) if not merged["m.lora_A"][j].any() and not merged["m.lora_B"][:, j].any()]
    assert dead == [], f"rank components {dead} have A_j = 0 and B_j = 0: zero gradient for ever"


def test_payload_round_trips_bfloat16_tensors():
    """`payload.to_record` goes through Flower's ArrayRecord, i.e. numpy, which has no bfloat16:
    `TypeError: Got unsupported ScalarType BFloat16`. An adapter (or a head) in bf16 cannot travel;
    the legacy list layout (`to_list`) fails the same way."""
    state = {"m.lora_A": torch.randn(2, 5).bfloat16(), "m.lora_B": torch.randn(4, 2).bfloat16()}
    back = payload.from_record(payload.to_record(state), state)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], state[k]) for k in state)
    listed = payload.from_list(payload.to_list(state), state)
    assert all(torch.equal(listed[k], state[k]) for k in state)
