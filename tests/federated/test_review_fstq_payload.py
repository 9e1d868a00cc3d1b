"""Review: FED-FSTQ's upload as the server receives it: a malformed payload must be refused by
the method's decode with a clear message, and a byte budget must hold or be refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from splice.core.errors import SpliceError
from splice.federated import token_fisher as tf
from splice.federated.methods import make_method
from splice.federated.methods.fstq import PAYLOAD


def tensors() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    received = {"x.lora_A": torch.randn(4, 16), "x.lora_B": torch.randn(16, 4) * 0.1}
    state = {name: t + 0.01 * torch.randn_like(t) for name, t in received.items()}
    return received, state


@pytest.mark.parametrize("scale_bits", [0x7E00, 0x7C00])  # float16 NaN, +inf
def test_decode_refuses_a_payload_with_a_non_finite_scale(make_config, scale_bits):
    """decode_delta checks the payload's length and level map, not its float16 scales: a NaN or
    inf scale decodes to a NaN/inf update, which reaches aggregation (and aborts the whole run
    there, naming the client by its position among the replies)."""
    method = make_method(make_config(method="fstq", options={"keep_ratio": 1.0}))
    received, state = tensors()
    raw = method.upload(None, state, received)[PAYLOAD].numpy().copy()
    rows = sum(tf.row_view(tuple(received[n].shape))[0] for n in received)
    first_scale = tf.packed_bytes(rows, tf.index_bits(method.levels))
    raw[first_scale: first_scale + 2] = np.array([scale_bits], dtype=np.uint16).view(np.uint8)
    with pytest.raises(SpliceError):
        decoded = method.decode(ArrayRecord({PAYLOAD: torch.from_numpy(raw)}), received)
        assert all(t.isfinite().all() for t in decoded.values())  # (what it gives instead)


def test_a_byte_budget_is_met_or_refused(make_config):
    """options.budget_bytes is a cap on the upload; below the smallest payload (header plus every
    row at the lowest level) encode_delta silently returns a larger payload: here 16 bytes asked,
    50 sent, every round, with nothing in the metrics or the log saying the cap was broken."""
    budget = 16
    method = make_method(make_config(method="fstq", options={"keep_ratio": 1.0, "budget_bytes": budget}))
    received, state = tensors()
    try:
        record = method.upload(None, state, received)
    except SpliceError:
        return
    assert record[PAYLOAD].numpy().size <= budget, f"{record[PAYLOAD].numpy().size} bytes for a {budget}-byte budget"
