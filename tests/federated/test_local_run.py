"""A client's round is a function of what it is given, not of the worker that runs it: one
process serves many clients in turn (Flower's simulation workers), dropout included."""

from __future__ import annotations

import torch
from helpers import save_tiny_bert

from splice.federated.client import LocalRun


def test_a_clients_round_does_not_depend_on_the_clients_before_it(make_config, tmp_path):
    folder = save_tiny_bert(tmp_path / "bert-dropout", dropout=0.1)
    config = make_config(model=str(folder), train={"batch_size": 8, "max_length": 16, "lr": 5e-3})
    busy, fresh = LocalRun(config), LocalRun(config)
    start = {k: v.clone() for k, v in busy.global_state.items()}
    busy.train(0, 1)  # another client first, in the same process
    busy.copy_in(start)
    after_other, _ = busy.train(2, 1)
    fresh.copy_in(start)
    alone, _ = fresh.train(2, 1)
    assert all(torch.equal(after_other[k], alone[k]) for k in alone)
    assert any(not torch.equal(alone[k], start[k]) for k in alone)  # it did train
