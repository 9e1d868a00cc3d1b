"""Review: a client's side in-process (LocalRun, the ClientApp's train and evaluate functions on
hand-made messages): skipped steps, a client that is not sampled in the last round, and more
clients than evaluation rows."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from splice.core.errors import SpliceError
from splice.federated import payload
from splice.federated.client import LocalRun, _evaluate, _train
from splice.federated.shards import eval_rows, make_shards

TRAIN = {"batch_size": 8, "max_length": 16, "lr": 5e-3, "group_by_length": False}


def instruction(run: LocalRun, kind: str, server_round: int, node: int = 5) -> Message:
    """What the server's FedAvg sends: the global arrays and a config with the round."""
    metadata = Metadata(run_id=1, message_id=f"{kind}-{server_round}", src_node_id=0, dst_node_id=node,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0, message_type=kind)
    content = RecordDict({payload.ARRAYS: payload.to_record(run.global_state),
                          payload.CONFIG: ConfigRecord({"server-round": server_round})})
    return Message(content=content, metadata=metadata)


def node_context(client: int, clients: int) -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": client, "num-partitions": clients},
                   state=RecordDict(), run_config={})


def test_skipped_steps_do_not_crash_the_round(make_config):
    """train.on_nonfinite: skip is a settable training field: a skipped step's history entry has
    loss None, and LocalRun.train sums the losses: TypeError ('int' + 'NoneType'), an error that
    names nothing. Here the received adapter holds NaN, so every step is skipped: the client must
    refuse with a SpliceError (or report a finite mean of the steps it did take)."""
    run = LocalRun(make_config(train={**TRAIN, "on_nonfinite": "skip"}))
    bad = {k: v.clone() for k, v in run.global_state.items()}
    bad[next(k for k in bad if "lora_A" in k)].fill_(math.nan)
    run.copy_in(bad)
    try:
        _, metrics = run.train(0, 1)
    except SpliceError:
        return
    assert math.isfinite(metrics["train_loss"])


def test_dual_saves_every_clients_local_adapter_when_it_misses_the_last_round(make_config):
    """fraction < 1: client 0 trains in round 1 but is not sampled in round 2 (the last). Its local
    adapter (its personal part, never uploaded) exists only in its node state; the run must still
    leave it in clients/client-0/local-adapter. Every client evaluates in the last round (fraction
    of evaluation 1.0, the round in the message's config), so the client can save it there."""
    config = make_config(method="dual", clients=3, rounds=2, fraction=0.34)
    run = LocalRun(config)
    context = node_context(0, 3)
    _train(instruction(run, "train", 1), context, run)
    _evaluate(instruction(run, "evaluate", 2), context, run)  # the last round: not sampled for training
    assert (Path(config.output_dir) / "clients" / "client-0" / "local-adapter").is_dir()


def test_more_clients_than_evaluation_rows_gives_some_clients_no_test_rows(make_config):
    """The word file has 192 training rows and 48 evaluation rows (no test split). 60 clients can
    each hold training rows, and a client without test rows is provided for (LocalRun.evaluate
    answers num-examples 0, aggregate_evaluate leaves it out). But make_shards splits the
    evaluation rows with partition.iid, which refuses "60 clients but only 48 rows", a message
    about the training data the user cannot act on."""
    config = make_config(clients=60)
    run = LocalRun(make_config(name="small"))
    assert len(run.splits.train) >= 60 > len(eval_rows(run.splits, None))
    shards = make_shards(config, run.splits)
    assert len(shards.train) == len(shards.test) == 60
    assert all(shards.train) and sum(len(t) for t in shards.test) == len(eval_rows(run.splits, None))


@pytest.mark.parametrize("node_config", [{}, {"partition-id": 3, "num-partitions": 3}])
def test_a_node_without_a_valid_partition_id_is_refused_clearly(make_config, node_config):
    """On the deployment engine the SuperNodes are the user's (`--superlink`): one started without
    --node-config partition-id=I, or with I >= clients, fails with KeyError('partition-id') or an
    IndexError from the shard list; the reply's error (dropped by the server with an INFO log line)
    must say which setting is wrong."""
    config = make_config(clients=3)
    run = LocalRun(config)
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    with pytest.raises(SpliceError, match="partition-id"):
        _train(instruction(run, "train", 1), context, run)
