"""Review: config values that Flower (or the maths) cannot run with must be refused when the
config is read, naming the key, not accepted and left to fail (or to do the wrong thing silently)
rounds later inside the ServerApp."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from splice.core.errors import ConfigError
from splice.federated import FederatedConfig, aggregation

SECURE = {"num_shares": 3, "reconstruction_threshold": 2}


def test_secure_threshold_equal_to_num_shares_is_refused_as_flower_does():
    # Flower's SecAggPlusWorkflow._check_init_params: "`reconstruction_threshold` must be less than
    # `num_shares`" (ValueError, raised in the ServerApp after the model has loaded); config.py
    # accepts 2 <= threshold <= num_shares
    with pytest.raises(ConfigError, match="secure"):
        FederatedConfig(clients=4, secure={"num_shares": 3, "reconstruction_threshold": 3})


def test_secure_with_fewer_than_two_sampled_clients_is_refused():
    # SecAggPlusWorkflow.setup_stage: "The number of samples should be greater than 1." -> the fit
    # round is cancelled (returns False), every round, and the run "finishes" with the initial adapter
    with pytest.raises(ConfigError, match="secure"):
        FederatedConfig(clients=3, fraction=0.34, secure=SECURE)


def test_secure_num_shares_is_checked_against_the_sampled_clients_not_all_clients():
    # only `sampled` clients take part in a round's protocol; config.py compares with `clients`
    with pytest.raises(ConfigError, match="secure"):
        FederatedConfig(clients=10, fraction=0.3, secure={"num_shares": 5, "reconstruction_threshold": 2})


@pytest.mark.parametrize("bad", [{"clipping_range": 0.0}, {"clipping_range": -1.0}, {"quantization_range": 0}])
def test_secure_ranges_must_be_positive(bad):
    # flwr.common.secure_aggregation.quantization.quantize: target_range / (2 * clipping_range) and
    # np.clip(x, -c, c): c = 0 is a ZeroDivisionError inside every client's secaggplus_mod; c < 0
    # clips every value to one constant, so the aggregate is garbage, silently. quantization_range 0
    # is refused by Flower only when the ServerApp builds its workflow, after the model loaded
    with pytest.raises(ConfigError, match="secure"):
        FederatedConfig(clients=4, secure={**SECURE, **bad})


def test_privacy_with_exact_aggregation_is_refused():
    """Flower's DP wrappers clip each client's (A, B) and add noise of std sigma*C/m to the
    aggregate, which is a valid Gaussian mechanism only when the aggregate moves by at most C/m
    per client. `exact` releases SVD factors of sum_i w_i B_i A_i: a change of one client's
    factors far below C can rotate (or flip) the released factors by O(1)."""
    base = {"m.lora_A": torch.eye(2, 4, dtype=torch.float64), "m.lora_B": torch.eye(3, 2, dtype=torch.float64)}
    one = {**base, "m.lora_B": base["m.lora_B"] * torch.tensor([1.0, 1.0 - 1e-6], dtype=torch.float64)}
    other = {**base, "m.lora_B": base["m.lora_B"] * torch.tensor([1.0 - 1e-6, 1.0], dtype=torch.float64)}
    change_in = max((one[k] - other[k]).norm().item() for k in one)
    out_one, _ = aggregation.exact([one, base], [1, 1])
    out_other, _ = aggregation.exact([other, base], [1, 1])
    change_out = (out_one["m.lora_A"] - out_other["m.lora_A"]).norm().item()
    assert change_in < 1e-5 and change_out > 0.5  # the released factors' sensitivity is unbounded
    with pytest.raises(ConfigError, match="privacy"):
        FederatedConfig(aggregation="exact", privacy={"side": "server", "noise_multiplier": 1.0,
                                                      "clipping_norm": 1.0})


def test_sfed_num_clients_follows_the_clients_when_the_config_is_replaced():
    # __post_init__ writes the derived N into `adapter`, so a config made from another one (the
    # deployment's `portable`, a sweep with dataclasses.replace, or results' federate.yaml re-run
    # with --clients) keeps the old N although nobody set it
    adapter = {"method": "lora", "r": 16, "alpha": 16, "scaling": "sfed"}
    config = FederatedConfig(clients=8, adapter=adapter)
    assert config.train_config().adapter["num_clients"] == 8
    assert dataclasses.replace(config, clients=16).train_config().adapter["num_clients"] == 16
