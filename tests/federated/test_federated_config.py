"""A federated config is checked before anything loads: every bad key or value is refused with
the file, the key and what was expected."""

from __future__ import annotations

import pytest
import torch

from splice.core.errors import ConfigError, SpliceError
from splice.federated import FederatedConfig, payload


def test_defaults_and_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: bbc_news\nclients: 5\npartition: {scheme: dirichlet, alpha: 0.3}\n")
    config = FederatedConfig.from_yaml(path, rounds=7, clients=None)
    assert (config.clients, config.rounds, config.partition.alpha) == (5, 7, 0.3)
    assert config.output_dir == "runs/federated-bbc-news-fedavg-fedavg"
    assert config.train_config().max_steps == config.local_steps
    assert config.sampled == 5 and FederatedConfig(clients=10, fraction=0.25).sampled == 2


def test_sfed_scale_takes_the_clients_of_a_round():
    adapter = {"method": "lora", "r": 16, "alpha": 16, "scaling": "sfed"}
    n = [FederatedConfig(clients=8, fraction=0.5, adapter=adapter).train_config().adapter["num_clients"],
         FederatedConfig(clients=8, adapter={**adapter, "num_clients": 3}).train_config().adapter["num_clients"]]
    assert n == [4, 3]
    scale = FederatedConfig(clients=8, adapter=adapter).train_config().adapter_config().scaling_for("x")
    assert scale == pytest.approx(16 * (8 / 16) ** 0.5, rel=1e-12)


@pytest.mark.parametrize(("text", "message"), [
    ("clientz: 4\n", "unknown key 'clientz'; did you mean 'clients'?"),
    ("clients: 0\n", "clients must be >= 1"),
    ("clients: four\n", "clients must be"),
    ("fraction: 1.5\n", "fraction must be in (0, 1]"),
    ("aggregation: median\n", "aggregation must be"),
    ("partition: {scheme: dirichlet, alfa: 0.1}\n", "partition: unknown key 'alfa'; did you mean 'alpha'?"),
    ("partition: {scheme: dirichlet, alpha: 0}\n", "partition.alpha must be > 0"),
    ("partition: dirichlet\n", "partition must be a mapping"),
    ("train: {max_steps: 10}\n", "train.max_steps is set by the federated run itself"),
    ("train: {batchsize: 10}\n", "train.batchsize is not a training field"),
    ("options: {local_adapter: {method: lora}}\n", "unknown key 'local_adapter' for method fedavg"),
    ("method: dual\noptions: {local_adapter: {method: lora, r: 0}}\n", "rank r must be >= 1"),
    ("method: fedprox\n", "method must be one of fedavg, dual"),
    ("aggregation: exact\nsecure: {}\n", "use aggregation: fedavg with secure"),
    ("secure: {num_shares: 2}\n", "num_shares >= 3"),
    ("clients: 3\nsecure: {num_shares: 4, reconstruction_threshold: 2}\n", "exceeds the clients sampled per round (3"),
    ("secure: {}\nprivacy: {}\n", "secure and privacy together"),
    ("privacy: {side: both}\n", "privacy.side must be"),
    ("task: causal_lm\nmodel: smollm2\ndata: arithmetic\npartition: {scheme: dirichlet}\n", "has no labels"),
])
def test_bad_values_are_refused_with_file_and_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        FederatedConfig.from_yaml(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_received_tensors_must_be_the_adapters():
    expected = {"a.lora_A": torch.zeros(2, 3), "a.lora_B": torch.zeros(4, 2)}
    state = {"a.lora_A": torch.ones(2, 3), "a.lora_B": torch.ones(4, 2)}
    back = payload.from_record(payload.to_record(state), expected)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert all(torch.equal(a, b) for a, b in zip(payload.from_list(payload.to_list(state), expected).values(),
                                                  [state[k] for k in sorted(state)], strict=True))
    with pytest.raises(SpliceError, match=r"missing \['a.lora_B'\]"):
        payload.check_state({"a.lora_A": torch.ones(2, 3)}, expected)
    with pytest.raises(SpliceError, match=r"'a.lora_A' with shape \(3, 3\); the adapter's is \(2, 3\)"):
        payload.check_state({"a.lora_A": torch.ones(3, 3), "a.lora_B": torch.ones(4, 2)}, expected)
    with pytest.raises(SpliceError, match="holds 1 arrays; this client's adapter has 2"):
        payload.from_list([torch.ones(2, 3).numpy()], expected)
