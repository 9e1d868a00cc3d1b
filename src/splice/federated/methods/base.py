"""What a federated method changes of FedAvg-LoRA, as hooks whose defaults are plain FedAvg's:
a method overrides only what its paper changes (its local objective, what a client keeps to
itself, what it uploads, how the server weighs the uploads).

The client's hooks run in every client process (`splice.federated.client.LocalRun` calls them),
the server's in the ServerApp; both sides build the method from the run's config, so a method
holds no state that must travel except what its hooks put in messages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from flwr.app import ArrayRecord

from splice.core.errors import ConfigError, SpliceError
from splice.core.validation import did_you_mean, yaml_number
from splice.federated import payload

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from splice.federated.client import LocalRun
    from splice.federated.config import FederatedConfig
    from splice.federated.server import ServerRun
    from splice.train.callbacks import Callback

Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class FederatedMethod:
    """FedAvg-LoRA: clients train the global adapter with the model's loss and upload it whole;
    the server weighs each upload by the client's number of training rows.

    A subclass names its `options` (the config's `options` mapping, checked here: an unknown key
    is refused) with their defaults in `OPTIONS`.
    """

    name: ClassVar[str] = "fedavg"
    OPTIONS: ClassVar[dict[str, Any]] = {}
    sequences: ClassVar[bool] = True  # runs a task sequence (`FederatedConfig.tasks`)

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        unknown = [key for key in config.options if key not in self.OPTIONS]
        if unknown:
            hint = did_you_mean(unknown[0], self.OPTIONS) if self.OPTIONS else f"; method {self.name} takes none"
            raise ConfigError(f"options: unknown key {unknown[0]!r} for method {self.name}{hint}")
        self.options = {**self.OPTIONS, **{key: yaml_number(value) for key, value in config.options.items()}}
        if config.tasks is not None and not self.sequences:
            raise ConfigError(f"method {self.name} trains one task; with tasks use fedavg (FedAvg, sequentially) "
                              "or prism")
        self.check(config)

    def check(self, config: FederatedConfig) -> None:
        """Refuse what the method cannot run with (raise ConfigError)."""

    # -- at a client ---------------------------------------------------------------------------

    def prepare(self, run: LocalRun) -> None:
        """Change the client process's model once, after the global adapter is attached."""

    def attach_held(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """Attach to a client's or the server's model what the server holds beyond the global
        adapter (and a sequence's heads) and no client trains (PRISM's frozen blocks); their
        parameters by name."""
        return {}

    def task_selected(self, model: torch.nn.Module, index: int) -> None:
        """A client's or the server's model turns to task `index` of a sequence."""

    def save_held(self, model: torch.nn.Module, folder: Path) -> None:
        """Save, in the run folder, what `attach_held` attached (with the final values loaded)."""

    def receive(self, run: LocalRun, extras: Mapping[str, torch.Tensor]) -> None:
        """Take what the server broadcast beside the model's tensors (`payload.EXTRA`)."""

    def callbacks(self, run: LocalRun) -> list[Callback]:
        """Trainer callbacks of a client's local training (PRISM's projection after each step)."""
        return []

    def answer_query(self, run: LocalRun, client: int) -> ArrayRecord:
        """A client's answer to the server's query between tasks (only methods that ask)."""
        raise SpliceError(f"method {self.name} asks its clients nothing between tasks")

    def companions(self) -> list[str]:
        """Other adapters trained along with the global one (never uploaded)."""
        return []

    def objective(self, run: LocalRun, server_round: int) -> Objective | None:
        """The local training loss of round `server_round` in place of the model's own (None: the model's)."""
        return None

    def private_state(self, run: LocalRun) -> dict[str, torch.Tensor]:
        """What a client keeps between rounds and never sends (kept in its Flower node state)."""
        return {}

    def restore_private(self, run: LocalRun, state: Mapping[str, torch.Tensor] | None) -> None:
        """Put a client's kept state back before it trains or evaluates (None: its first round)."""

    def upload(self, run: LocalRun, state: dict[str, torch.Tensor], received: dict[str, torch.Tensor]) -> ArrayRecord:
        """What the client sends: the trained global tensors, whole."""
        return payload.to_record(state)

    def train_metrics(self, run: LocalRun, client: int) -> dict[str, float]:
        """Numbers the client reports with its upload, beyond the training loss and row count."""
        return {}

    def evaluate_metrics(self, run: LocalRun, client: int) -> dict[str, float]:
        """Numbers a client's evaluation reports beyond its model's metrics."""
        return {}

    def last_round(self, run: LocalRun, client: int) -> None:
        """After the client's last round of training: save what is its own."""

    # -- at the server -------------------------------------------------------------------------

    def begin_task(self, server: ServerRun, index: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The held state task `index` of a sequence starts from (the state the last task left)."""
        return state

    def extras(self) -> dict[str, torch.Tensor]:
        """What the server broadcasts beside the model's tensors with every message."""
        return {}

    def end_task(self, server: ServerRun, grid: Grid, index: int, state: dict[str, torch.Tensor]) -> None:
        """After task `index`'s last round (PRISM: the query round that extends the bases)."""

    def aggregated(self, server: ServerRun, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Diagnostics of an aggregated state, recorded with the round's aggregation numbers."""
        return {}

    def decode(self, record: ArrayRecord, broadcast: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A client's upload as the global tensors it trained (`broadcast`: what it was sent)."""
        return payload.from_record(record, broadcast)

    def weights(self, metrics: Sequence[Mapping[str, float]]) -> list[float]:
        """The aggregation weight of each upload, from the metrics it came with."""
        return [float(m["num-examples"]) for m in metrics]
