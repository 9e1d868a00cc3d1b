"""Review: byte accounting on the SecAgg+ path (one simulation). The issue asks for "every
message's exact serialized size, per client and round"; the Message-API path learns each node's
partition id from its first reply (`record_client(..., node_id)`) and `History.relabel` moves the
bytes under it. The legacy SecAgg+ path records the clients' metrics with node_id None (Flower's
fit_metrics_aggregation_fn sees no node ids), so no node is ever mapped and results.json keeps
its bytes under random `node-<id>` keys: no per-client numbers, and not comparable across runs."""

from __future__ import annotations

from splice.federated import run_federated


def test_secure_run_counts_bytes_per_client(make_config):
    config = make_config(name="secure-bytes", secure={"num_shares": 3, "reconstruction_threshold": 2})
    result = run_federated(config)
    record = result.rounds[1]
    assert sorted(record["train"]) == ["0", "1", "2"]  # the clients' own metrics are there
    assert sorted(record["uplink_bytes"]) == ["0", "1", "2"], sorted(record["uplink_bytes"])
    assert sorted(record["downlink_bytes"]) == ["0", "1", "2"], sorted(record["downlink_bytes"])
