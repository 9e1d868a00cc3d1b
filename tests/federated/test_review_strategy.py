"""Review: the server's strategy on hand-made Flower replies (no simulation): which client a
refusal names, what the report keeps of a failed client, the DP wrappers' sensitivity under
splice's weights, and whether the sampled clients of a round are a function of the seed."""

from __future__ import annotations

import json
import math
import random
import time

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.supercore.task_identity import TaskIdentity

from splice.core.errors import SpliceError
from splice.federated import payload
from splice.federated.server import AdapterStrategy, ServerRun


def reply(src_node: int, content: RecordDict | None = None, error: Error | None = None) -> Message:
    """A client's reply to a train instruction, as the Grid hands it to the strategy."""
    metadata = Metadata(run_id=1, message_id=f"reply-{src_node}", src_node_id=src_node, dst_node_id=0,
                        reply_to_message_id="instruction", group_id="", created_at=time.time(), ttl=3600.0,
                        message_type="train")
    if error is not None:
        return Message(error=error, metadata=metadata)
    return Message(content=content, metadata=metadata)


def upload(src_node: int, client: int, state: dict[str, torch.Tensor], rows: int = 10) -> Message:
    metrics = MetricRecord({"client": client, "num-examples": rows, "train_loss": 1.0})
    return reply(src_node, RecordDict({payload.ARRAYS: payload.to_record(state), payload.METRICS: metrics}))


def moved(state: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    return {k: v + by for k, v in state.items()}


def test_a_non_finite_upload_is_left_out_naming_its_client(make_config):
    """Clients 3 and 7 of 8 reply (fraction < 1, or others failed); client 7's upload holds a NaN.
    It is left out of the round (the global adapter is client 3's), and the report names client 7
    (its partition id, not its position among the replies); all uploads bad is an error."""
    server = ServerRun(make_config(clients=8))
    strategy = AdapterStrategy(server)
    good, bad = moved(server.initial, 0.01), moved(server.initial, 0.02)
    key = next(iter(bad))
    bad[key] = bad[key].clone()
    bad[key].view(-1)[0] = math.nan
    arrays, _ = strategy.aggregate_train(1, [upload(103, 3, good), upload(107, 7, bad)])
    after = payload.from_record(arrays)
    assert all(torch.equal(after[k], good[k]) for k in good)
    assert "non-finite" in server.history.round(1).failures["7"]
    with pytest.raises(SpliceError, match=r"no upload could be used \(clients \['7'\]: 7: non-finite values"):
        strategy.aggregate_train(2, [upload(107, 7, bad)])


def test_a_failed_clients_error_is_kept_in_the_report(make_config):
    """A client whose training raised (its reply is an error) is dropped from the round; the only
    trace is a Flower INFO log line, which run_federated hides (the flwr logger at WARNING). The
    run's history (results.json) must say that the client failed, and why."""
    server = ServerRun(make_config(clients=2))
    strategy = AdapterStrategy(server)
    replies = [upload(100, 0, moved(server.initial, 0.01)),
               reply(101, error=Error(code=0, reason="client 1, round 1: diverged at step 2"))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None  # the round went on with client 0
    assert "diverged at step 2" in json.dumps(server.history.to_dict())


def test_server_side_dp_noise_covers_one_clients_influence(make_config):
    """Flower's server-side fixed clipping adds noise of std sigma * C / m (m sampled clients), the
    Gaussian mechanism for an aggregate that one client moves by at most C / m: an unweighted mean.
    AdapterStrategy weighs by row counts (FedEU: by uncertainty), so a client holding most rows
    moves the aggregate by about C: the noise (and the privacy the config promises) is m times
    too small. (Flower's own accounted path refuses unequal weights: `_validate_uniform_weights`.)"""
    clip = 1.0
    config = make_config(clients=2, privacy={"side": "server", "noise_multiplier": 0.0, "clipping_norm": clip})
    server = ServerRun(config)
    inner = AdapterStrategy(server)
    dp = DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=0.0, clipping_norm=clip,
                                                    num_sampled_clients=config.sampled)
    inner.broadcast = server.initial

    def aggregate(first: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dp.current_arrays = payload.to_record(server.initial)
        replies = [upload(100, 0, first, rows=1000), upload(101, 1, moved(server.initial, 1e-4), rows=1)]
        return payload.from_record(dp.aggregate_train(1, replies)[0])

    # (an exactly zero update would divide by zero in Flower's clipping: compute_clip_model_update)
    with_big, without = aggregate(moved(server.initial, 10.0)), aggregate(moved(server.initial, 1e-9))
    shift = math.sqrt(sum(float(((with_big[k].double() - without[k].double()) ** 2).sum()) for k in with_big))
    assert shift <= clip / config.sampled * (1 + 1e-6), f"one client moved the aggregate by {shift:.3f}"


def test_the_clients_sampled_in_a_round_follow_the_seed(make_config, monkeypatch):
    """fraction < 1: Flower's FedAvg.configure_train samples with `random.sample` on Python's
    global RNG; whatever else draws from it (Ray, a library, a previous run in the process)
    changes which clients train. Two servers of one config, given the same nodes, must sample
    the same clients."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)

    class Nodes:
        def get_node_ids(self) -> list[int]:
            return list(range(100, 110))

    config = make_config(clients=10, fraction=0.5)
    picks = []
    for other_draws in (0, 1, 2):
        server = ServerRun(config)
        for _ in range(other_draws):
            random.random()  # someone else's use of the global RNG
        messages = AdapterStrategy(server).configure_train(1, payload.to_record(server.initial), ConfigRecord(),
                                                           Nodes())
        picks.append(sorted(m.metadata.dst_node_id for m in messages))
    assert picks[0] == picks[1] == picks[2], picks


def test_two_nodes_claiming_one_partition_are_refused(make_config):
    """Deployment with the user's SuperNodes: two started with partition-id=0 (and none with 1)
    both train client 0's shard; aggregate_train averages both uploads (client 0's data counted
    twice, client 1's never) and record_client lets the second overwrite the first's metrics,
    so the report shows nothing wrong."""
    server = ServerRun(make_config(clients=2))
    strategy = AdapterStrategy(server)
    replies = [upload(100, 0, moved(server.initial, 0.01)), upload(101, 0, moved(server.initial, 0.02))]
    with pytest.raises(SpliceError, match="partition"):
        strategy.aggregate_train(1, replies)
