"""Federated runs on Flower's simulation engine with the tiny task: one client and one round is
plain training bit for bit; several clients aggregate, account every byte and report; SecAgg+
and Flower's differential-privacy wrappers work with splice's clients; Med-DualLoRA uploads
only its global adapter and keeps a personal one per client."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splice.assets import DatasetSplits
from splice.federated import run_federated
from splice.train import Trainer
from splice.train.run_setup import load_run


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "global-adapter" / "adapter_model.safetensors"))


def update_norm(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> float:
    return torch.sqrt(sum(((after[k].double() - before[k].double()) ** 2).sum() for k in after)).item()


def plain_training(config, folder: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The same local training outside Flower: the trainer on all training rows, saved alike;
    the number of those rows."""
    train_config = dataclasses.replace(config.train_config(), output_dir=str(folder / "plain-run"))
    setup = load_run(train_config, "global")
    splits = DatasetSplits(train=setup.splits.train, validation=[], test=[], task=setup.splits.task,
                           label_names=setup.splits.label_names)
    trainer = Trainer(setup.model, setup.tokenizer, train_config, adapter_name="global", splits=splits)
    while not trainer.done:
        trainer.step()
    trainer.save(folder / "plain")
    return load_file(str(folder / "plain" / "adapter_model.safetensors")), len(splits.train)


def test_one_client_one_round_is_plain_training(make_config, tmp_path):
    config = make_config(clients=1, local_steps=4)
    handler = signal.getsignal(signal.SIGTERM)
    result = run_federated(config)
    assert signal.getsignal(signal.SIGTERM) is handler  # Ray's driver handler is not left behind
    federated = adapter_tensors(Path(config.output_dir))
    plain, rows = plain_training(config, tmp_path)
    assert federated.keys() == plain.keys()
    for key in plain:
        assert torch.equal(federated[key], plain[key]), key
    assert result.rounds[1]["train"]["0"]["num-examples"] == rows


def test_four_clients_non_iid_exact_aggregation_report_and_bytes(make_config):
    config = make_config(clients=4, rounds=2, aggregation="exact", partition={"scheme": "dirichlet", "alpha": 0.3})
    result = run_federated(config)
    rounds = result.rounds
    assert [r["round"] for r in rounds] == [0, 1, 2]
    sizes = [c["rows"] for c in result.results["partition"]["clients"]]
    assert len(sizes) == 4 and sum(sizes) == sum(r["train"][c]["num-examples"] for r in rounds[1:2] for c in r["train"])
    for record in rounds[1:]:
        assert sorted(record["train"]) == ["0", "1", "2", "3"]
        assert sorted(record["evaluate"]) == ["0", "1", "2", "3"]
        assert "accuracy" in record["global"]
        # the exact rule re-factors the mean of B A; the separate rule's bias is measured next to it
        assert record["aggregation"]["separation_error_mean"] > 0
        assert 0 <= record["aggregation"]["refactor_error_max"] < 1
        # every upload holds the adapter and head tensors (float32) plus a little framing
        adapter_bytes = 4 * sum(t.numel() for t in adapter_tensors(Path(config.output_dir)).values())
        for client in "0123":
            assert adapter_bytes < record["uplink_bytes"][client] < adapter_bytes * 1.05 + 4096
            # downlink: the training broadcast and the evaluation broadcast
            assert 2 * adapter_bytes < record["downlink_bytes"][client] < 2 * (adapter_bytes * 1.05 + 4096)
    assert result.results["cumulative_uplink_bytes"][-1] == sum(sum(r["uplink_bytes"].values()) for r in rounds)
    folder = Path(config.output_dir)
    for name in ("results.json", "results.md", "curves.png", "bytes.png", "federate.yaml"):
        assert (folder / "report" / name).stat().st_size > 0
    assert json.loads((folder / "global-adapter" / "adapter_config.json").read_text())["r"] == 4


def test_secure_aggregation_gives_the_plain_mean(make_config, plain_three):
    config = make_config(name="secure", secure={"num_shares": 3, "reconstruction_threshold": 2})
    result = run_federated(config)
    plain, secure = adapter_tensors(Path(plain_three.output_dir)), adapter_tensors(Path(config.output_dir))
    # SecAgg+ quantizes to 2^22 levels over [-8, 8]: the masked sum is the plain one up to that
    for key in plain:
        assert torch.allclose(secure[key], plain[key], atol=1e-4), key
    assert max((secure[k] - plain[k]).abs().max().item() for k in plain) > 0  # it did go through the protocol
    # the protocol's key exchange costs messages of its own: more downlink than the plain run
    plain_down = json.loads((Path(plain_three.output_dir) / "report" / "results.json").read_text())
    assert result.results["cumulative_downlink_bytes"][-1] > plain_down["cumulative_downlink_bytes"][-1]


@pytest.mark.parametrize("side", ["server", "client"])
def test_differential_privacy_clips_each_update(make_config, side, tmp_path):
    clip = 1e-3
    config = make_config(name=f"dp-{side}", privacy={"side": side, "noise_multiplier": 0.0, "clipping_norm": clip})
    run_federated(config)
    start = make_config(name="start", rounds=1, local_steps=1)
    initial = {n: p.detach() for n, p in load_run(dataclasses.replace(start.train_config(),
                                                                      output_dir=str(tmp_path / "x")),
                                                  "global").model.named_parameters() if ".splice.global." in n}
    after = adapter_tensors(Path(config.output_dir))
    lora = {k: v for k, v in after.items() if "lora_" in k}
    assert lora and len(lora) == len(initial)
    # each client's whole update is clipped to norm 1e-3, so their mean moves at most that far
    moved = update_norm({k: after[k] for k in sorted(lora)},
                        dict(zip(sorted(lora), [initial[n] for n in sorted(initial)], strict=True)))
    assert 0 < moved <= clip * (1 + 1e-4)


def test_dual_lora_uploads_only_global_and_keeps_local(make_config, plain_three):
    config = make_config(name="dual", method="dual", rounds=2)
    result = run_federated(config)
    plain = json.loads((Path(plain_three.output_dir) / "report" / "results.json").read_text())
    # round 1 of both runs: the same training uploads (the local adapter never travels), up to the
    # metadata's random node ids, whose varint encoding may take a byte more or less
    dual_up = result.rounds[1]["bytes_by_type"]["train"]["uplink"]
    plain_up = plain["rounds"][1]["bytes_by_type"]["train"]["uplink"]
    assert dual_up.keys() == plain_up.keys() and all(abs(dual_up[c] - plain_up[c]) <= 4 for c in dual_up)
    locals_ = [load_file(str(Path(config.output_dir) / "clients" / f"client-{c}" / "local-adapter" /
                             "adapter_model.safetensors")) for c in range(3)]
    key = next(k for k in locals_[0] if "lora_B" in k)
    assert all(t[key].abs().sum() > 0 for t in locals_)
    assert not torch.equal(locals_[0][key], locals_[1][key])
    for client in "012":
        assert "global_accuracy" in result.rounds[2]["evaluate"][client]


def test_dual_lora_with_a_silent_local_adapter_is_fedavg(make_config, plain_three):
    """Med-DualLoRA's spec test (2): a local adapter that contributes nothing (both factors zero,
    so zero gradients too) leaves the procedure FedAvg-LoRA, bit for bit."""
    config = make_config(name="dual-silent", method="dual",
                         options={"local_adapter": {"method": "lora", "r": 4, "alpha": 8, "init": "zeros"}})
    run_federated(config)
    plain, dual = adapter_tensors(Path(plain_three.output_dir)), adapter_tensors(Path(config.output_dir))
    assert plain.keys() == dual.keys()
    for key in plain:
        assert torch.equal(dual[key], plain[key]), key
