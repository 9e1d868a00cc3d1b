"""What travels between the server and the clients: adapter tensors in Flower records (by name,
in the Message API; as an ordered list in the legacy layout SecAgg+ speaks), and the exact size
of every message.

Sizes are those of the message's protobuf serialization (`flwr.common.serde.message_to_proto`:
metadata and content), the form Flower puts on the wire between SuperLink and SuperNodes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.serde import message_to_proto
from flwr.compat.common import recorddict_compat as legacy

from splice.core.errors import SpliceError

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
LEGACY_FIT = "fitins.parameters"
LEGACY_EVALUATE = "evaluateins.parameters"
EXTRA = "extra/"  # names of what a method broadcasts beside the model's tensors (PRISM's bases)
KEEP = "keep-for-task"  # a message's config: keep what it carries that is constant within this task
HELD = "held-for-task"  # a message's config: what is constant within this task was left out (kept at the node)


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors as an ArrayRecord, in name order (so both sides agree on the legacy list order);
    bfloat16, which numpy (and so Flower) lacks, travels as float32 (exact; the receiver casts back)."""
    return ArrayRecord({name: _numpy_able(state[name]) for name in sorted(state)})


def from_record(record: ArrayRecord, expected: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a record; with `expected`, the same names and shapes are required."""
    state = record.to_torch_state_dict()
    return state if expected is None else checked(state, expected)


def checked(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with `expected`'s names and shapes required, in `expected`'s dtypes."""
    check_state(state, expected)
    return {name: tensor.to(expected[name].dtype) for name, tensor in state.items()}


def split_extras(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's tensors and a method's extras (names under `EXTRA`, the prefix removed)."""
    model = {name: t for name, t in state.items() if not name.startswith(EXTRA)}
    extras = {name.removeprefix(EXTRA): t for name, t in state.items() if name.startswith(EXTRA)}
    return model, extras


def with_extras(state: Mapping[str, torch.Tensor], extras: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensors and a method's extras in one state (the extras' names prefixed)."""
    return {**state, **{EXTRA + name: t for name, t in extras.items()}}


def to_list(state: Mapping[str, torch.Tensor]) -> list[np.ndarray]:
    """The legacy layout: arrays in name order, names dropped."""
    return [_numpy_able(state[name]).numpy() for name in sorted(state)]


def from_list(arrays: list[np.ndarray], expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Arrays in the legacy layout back under `expected`'s names (name order), shapes checked."""
    names = sorted(expected)
    if len(arrays) != len(names):
        raise SpliceError(f"the message holds {len(arrays)} arrays; this client's adapter has {len(names)} tensors")
    state = {name: torch.from_numpy(np.array(array, copy=True)).to(expected[name].dtype)
             for name, array in zip(names, arrays, strict=True)}
    check_state(state, expected)
    return state


def _numpy_able(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().cpu().contiguous()
    return tensor.float() if tensor.dtype == torch.bfloat16 else tensor


def check_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors that are not the adapter's: missing or unknown names, other shapes."""
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unknown:
        raise SpliceError(f"the received tensors do not match this adapter: missing {missing[:3]}, "
                          f"unknown {unknown[:3]} (is every client running the same adapter config?)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise SpliceError(f"received {name!r} with shape {tuple(tensor.shape)}; the adapter's is "
                              f"{tuple(expected[name].shape)}")


def is_legacy(message: Message) -> bool:
    """Whether the message is in the legacy layout (a SecAgg+ or DefaultWorkflow server)."""
    return LEGACY_FIT in message.content.array_records or LEGACY_EVALUATE in message.content.array_records


def legacy_fit(message: Message) -> tuple[list[np.ndarray], dict]:
    fitins = legacy.recorddict_to_fitins(message.content, keep_input=True)
    return parameters_to_ndarrays(fitins.parameters), dict(fitins.config)


def legacy_evaluate(message: Message) -> tuple[list[np.ndarray], dict]:
    ins = legacy.recorddict_to_evaluateins(message.content, keep_input=True)
    return parameters_to_ndarrays(ins.parameters), dict(ins.config)


def legacy_parameters(state: Mapping[str, torch.Tensor]):
    """The legacy `Parameters` of a state (name order)."""
    return ndarrays_to_parameters(to_list(state))


def message_bytes(message: Message) -> int:
    """The exact size of the message as Flower serializes it (protobuf: metadata and content)."""
    return message_to_proto(message).ByteSize()
