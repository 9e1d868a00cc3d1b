"""What a federated run measured, round by round: every client's training loss and evaluation,
the global evaluation, the bytes of every message each way per client, and the aggregation's
errors; kept by the server as the run goes and written as JSON."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Round:
    """One round's numbers. Clients are keyed by their partition id (as a string, for JSON)."""

    round: int
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    global_metrics: dict[str, float] = field(default_factory=dict)
    traffic: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # type -> direction -> client
    aggregation: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # client -> why it is not in the round
    seconds: float = 0.0
    task: str | None = None  # a sequence's task under training

    def count(self, message_type: str, direction: str, client: str, size: int) -> None:
        """Add one message's bytes (`direction`: uplink or downlink)."""
        by_client = self.traffic.setdefault(message_type, {}).setdefault(direction, defaultdict(int))
        by_client[client] += size

    def bytes(self, direction: str, message_type: str | None = None) -> dict[str, int]:
        """Bytes per client in one direction, of one message type or all."""
        total: dict[str, int] = defaultdict(int)
        for kind, directions in self.traffic.items():
            if message_type is None or kind == message_type:
                for client, size in directions.get(direction, {}).items():
                    total[client] += size
        return dict(total)

    @property
    def uplink(self) -> dict[str, int]:
        return self.bytes("uplink")

    @property
    def downlink(self) -> dict[str, int]:
        return self.bytes("downlink")

    def client_mean(self, key: str, source: str = "evaluate") -> float | None:
        """The unweighted mean over clients of one metric (the "mean per-client" number)."""
        values = [m[key] for m in getattr(self, source).values() if key in m and not math.isnan(m[key])]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "train": self.train, "evaluate": self.evaluate, "global": self.global_metrics,
                "uplink_bytes": self.uplink, "downlink_bytes": self.downlink,
                "bytes_by_type": {kind: {d: dict(c) for d, c in directions.items()}
                                  for kind, directions in self.traffic.items()},
                "aggregation": self.aggregation, "failures": self.failures, "seconds": self.seconds,
                **({"task": self.task} if self.task is not None else {})}


@dataclass
class History:
    """Every round (round 0: the initial global evaluation) and the message sizes per node."""

    rounds: list[Round] = field(default_factory=list)
    node_clients: dict[int, int] = field(default_factory=dict)  # Flower node id -> partition id
    # a task sequence: after task t, the global accuracy on each task j <= t (None for j > t)
    matrix: list[list[float | None]] = field(default_factory=list)

    def round(self, number: int) -> Round:
        """Round `number`'s record (created on first use)."""
        while len(self.rounds) <= number:
            self.rounds.append(Round(len(self.rounds)))
        return self.rounds[number]

    def client_of(self, node_id: int) -> str:
        """A node's partition id once it has said it (its first reply), else `node-<id>`."""
        client = self.node_clients.get(node_id)
        return str(client) if client is not None else f"node-{node_id}"

    def relabel(self) -> None:
        """Bytes counted before a node's first reply, moved under its partition id."""
        for record in self.rounds:
            for counts in (c for directions in record.traffic.values() for c in directions.values()):
                for key in [k for k in counts if k.startswith("node-")]:
                    client = self.node_clients.get(int(key[5:]))
                    if client is not None:
                        counts[str(client)] += counts.pop(key)

    def cumulative_bytes(self) -> tuple[list[int], list[int]]:
        """Uplink and downlink bytes summed over clients, cumulative over rounds."""
        up, down, total_up, total_down = [], [], 0, 0
        for record in self.rounds:
            total_up += sum(record.uplink.values())
            total_down += sum(record.downlink.values())
            up.append(total_up)
            down.append(total_down)
        return up, down

    def to_dict(self) -> dict[str, Any]:
        self.relabel()
        up, down = self.cumulative_bytes()
        return {"rounds": [r.to_dict() for r in self.rounds], "cumulative_uplink_bytes": up,
                "cumulative_downlink_bytes": down, **({"accuracy_matrix": self.matrix} if self.matrix else {})}
