"""FedEU (spec 16c): the evidential loss and uncertainty as written (closed-form KL, gradients by
hand and by a direct implementation), u in (0, 1] and 1 without evidence, TUW equal to FedAvg
when the uncertainties are equal, the random-label client weighted least, the config refused
where the method cannot run, and one tiny Flower run that reports every client's uncertainty."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from torch.distributions import Dirichlet, kl_divergence

from splice.core.errors import ConfigError, SpliceError
from splice.federated import FederatedConfig, aggregation, run_federated
from splice.federated.methods import FederatedMethod, FedEU
from splice.federated.methods.fedeu import (
    annealed_kl_weight,
    evidential_loss,
    kl_to_uniform,
    row_uncertainties,
    top_k_mean,
    uncertainty,
    uncertainty_weights,
)
from splice.train import tasks

CLASSES = ("negative", "neutral", "positive")
WORDS = {0: ["bad", "awful", "poor", "dull"], 1: ["table", "chair", "door", "wall"],
         2: ["good", "great", "fine", "lovely"]}


# -- the evidential quantities -------------------------------------------------------------------

def test_fedeu_uncertainty_in_unit_interval_and_one_without_evidence():
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(64, 3) * scale for scale in (0.1, 1.0, 10.0, 100.0)])
    u = uncertainty(logits)
    assert u.shape == (256,) and bool(((u > 0) & (u <= 1)).all())
    # logits -> -inf: evidence softplus -> 0, alpha = 1, S = K, u = 1
    assert torch.equal(uncertainty(torch.full((2, 5), -1e4)), torch.ones(2))
    # more evidence for any class, less uncertainty
    assert uncertainty(torch.tensor([[5.0, 0.0, 0.0]])) < uncertainty(torch.tensor([[1.0, 0.0, 0.0]]))


def test_fedeu_kl_closed_form_matches_torch_distributions():
    torch.manual_seed(1)
    alpha = torch.rand(6, 4, dtype=torch.float64) * 5 + 0.5
    direct = kl_divergence(Dirichlet(alpha), Dirichlet(torch.ones_like(alpha)))
    assert torch.allclose(kl_to_uniform(alpha), direct, atol=1e-10)
    assert torch.allclose(kl_to_uniform(torch.ones(2, 3, dtype=torch.float64)), torch.zeros(2, dtype=torch.float64))


def test_fedeu_loss_gradient_by_hand_for_one_example():
    """kl_weight 0: L = ψ(S) − ψ(α_y), so dL/dz_j = sigmoid(z_j) (ψ'(S) − [j = y] ψ'(α_j))."""
    z = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([2])
    evidential_loss(z, y, 0.0).backward()
    alpha = torch.nn.functional.softplus(z.detach()) + 1
    strength = alpha.sum()
    onehot = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    hand = torch.sigmoid(z.detach()) * (torch.polygamma(1, strength) - onehot * torch.polygamma(1, alpha))
    assert torch.allclose(z.grad, hand, atol=1e-12)
    value = torch.digamma(strength) - torch.digamma(alpha[0, 2])
    assert torch.allclose(evidential_loss(z.detach(), y, 0.0), value, atol=1e-12)


def test_fedeu_loss_and_gradient_match_a_direct_implementation():
    torch.manual_seed(2)
    logits = torch.randn(5, 4, dtype=torch.float64) * 2
    labels = torch.tensor([0, 3, 1, 1, 2])
    mine = logits.clone().requires_grad_(True)
    loss = evidential_loss(mine, labels, 0.7)
    loss.backward()
    direct_z = logits.clone().requires_grad_(True)
    alpha = torch.nn.functional.softplus(direct_z) + 1
    y = torch.nn.functional.one_hot(labels, 4).double()
    fit = torch.digamma(alpha.sum(-1)) - torch.digamma(alpha.gather(1, labels[:, None]).squeeze(1))
    tilde = y + (1 - y) * alpha
    direct = (fit + 0.7 * kl_divergence(Dirichlet(tilde), Dirichlet(torch.ones_like(tilde)))).mean()
    direct.backward()
    assert torch.allclose(loss, direct, atol=1e-10)
    assert torch.allclose(mine.grad, direct_z.grad, atol=1e-10)


def test_fedeu_annealing_and_top_k():
    assert [annealed_kl_weight(0.5, t, 4) for t in (1, 2, 4, 9)] == [0.125, 0.25, 0.5, 0.5]
    values = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    assert top_k_mean(values, 0.4) == pytest.approx(0.8)  # the top 2 of 5
    assert top_k_mean(values, 0.01) == pytest.approx(0.9)  # at least one
    assert top_k_mean(values, 1.0) == pytest.approx(0.5)
    with pytest.raises(SpliceError, match="at least one training row"):
        top_k_mean(torch.empty(0), 0.2)


# -- top-k uncertainty-guided weighting ------------------------------------------------------------

def test_fedeu_equal_uncertainties_give_fedavg_weights_exactly():
    metrics = [{"num-examples": n, "uncertainty": 0.37, "train_loss": 1.0} for n in (17, 40, 3, 25)]
    fedavg = FederatedMethod(FederatedConfig()).weights(metrics)
    assert FedEU(FederatedConfig(method="fedeu")).weights(metrics) == fedavg
    torch.manual_seed(3)
    states = [{"w": torch.randn(3, 4)} for _ in metrics]
    fedeu_mean = aggregation.fedavg(states, FedEU(FederatedConfig(method="fedeu")).weights(metrics))
    assert torch.equal(fedeu_mean["w"], aggregation.fedavg(states, fedavg)["w"])
    inverse = FedEU(FederatedConfig(method="fedeu", options={"weighting": "inverse"})).weights(metrics)
    assert [w / sum(inverse) for w in inverse] == pytest.approx([w / sum(fedavg) for w in fedavg])


def test_fedeu_weights_fall_with_uncertainty():
    weights = uncertainty_weights([10, 10, 20], [0.2, 0.3, 0.2], temperature=0.1)
    assert weights == pytest.approx([10.0, 10.0 * torch.e ** -1, 20.0])
    assert uncertainty_weights([10, 10], [0.2, 0.4], 0.1, "inverse") == pytest.approx([50.0, 25.0])
    with pytest.raises(SpliceError, match="without its client's 'uncertainty'"):
        FedEU(FederatedConfig(method="fedeu")).weights([{"num-examples": 3}])


def _rows(count: int, seed: int, shuffle_labels: bool) -> list[dict]:
    """Three-word rows whose words name their label; with `shuffle_labels`, labels drawn at random."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.randrange(3)
        rows.append({"text": " ".join(rng.choice(WORDS[label]) for _ in range(3)),
                     "label": rng.randrange(3) if shuffle_labels else label})
    return rows


def _train_client(model_dir: str, rows: list[dict], steps: int) -> tuple[torch.nn.Module, object]:
    """The tiny BERT (same seeded head at every client) trained on `rows` with FedEU's objective."""
    torch.manual_seed(0)
    settings = SimpleNamespace(model=model_dir, task="classification", quantize=None, max_length=16)
    model, tokenizer = tasks.load_model(settings, CLASSES)
    objective = FedEU(FederatedConfig(method="fedeu")).objective(None, server_round=5)  # reads no run
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    order = random.Random(1)
    model.train()
    for _ in range(steps):
        batch = [rows[i] for i in order.sample(range(len(rows)), 16)]
        encoded = tokenizer([r["text"] for r in batch], padding=True, return_tensors="pt")
        loss = objective(model, {**encoded, "labels": torch.tensor([r["label"] for r in batch])})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, tokenizer


def test_fedeu_random_label_client_gets_the_smallest_weight(tiny_bert):
    """Spec (d): three clients with true labels and one with random labels, each trained alone
    from the same start; each client's U_c through the method's own hook; the noisy one's
    aggregation weight is the smallest."""
    method = FedEU(FederatedConfig(method="fedeu"))
    shards = [_rows(64, seed, shuffle_labels=seed == 3) for seed in range(4)]
    metrics = []
    for client, rows in enumerate(shards):
        model, tokenizer = _train_client(str(tiny_bert), rows, steps=40)
        run = SimpleNamespace(model=model, tokenizer=tokenizer, shards=SimpleNamespace(train=shards),
                              config=method.config, train_config=SimpleNamespace(batch_size=16, max_length=16))
        metrics.append({"num-examples": len(rows), **method.train_metrics(run, client)})
        assert model.training  # the no-grad pass put train mode back
    weights = method.weights(metrics)
    uncertainties = [m["uncertainty"] for m in metrics]
    print("U_c:", [round(u, 4) for u in uncertainties], "weights:", [round(w, 6) for w in weights])
    assert all(0 < u <= 1 for u in uncertainties)
    assert max(uncertainties) == uncertainties[3]
    assert min(weights) == weights[3] and weights[3] < min(weights[:3])


def test_fedeu_row_uncertainties_restore_eval_mode_too(tiny_bert):
    settings = SimpleNamespace(model=str(tiny_bert), task="classification", quantize=None, max_length=16)
    model, tokenizer = tasks.load_model(settings, CLASSES)
    model.eval()
    u = row_uncertainties(model, tokenizer, _rows(5, 0, False), batch_size=2, max_length=16)
    assert u.shape == (5,) and not model.training


# -- the config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "message"), [
    ({"task": "causal_lm", "model": "smollm2", "data": "arithmetic"}, "evidential classification head"),
    ({"secure": {}}, "legacy SecAgg+ workflow"),
    ({"options": {"top_k": 0}}, "options.top_k must be a number in (0, 1]"),
    ({"options": {"top_k": 1.5}}, "options.top_k must be a number in (0, 1]"),
    ({"options": {"temperature": 0}}, "options.temperature must be a number > 0"),
    ({"options": {"kl_weight": -1}}, "options.kl_weight must be a number >= 0"),
    ({"options": {"anneal_rounds": 0}}, "options.anneal_rounds must be an integer >= 1"),
    ({"options": {"uncertainty_rows": 2.5}}, "options.uncertainty_rows must be an integer >= 1"),
    ({"options": {"weighting": "softmax"}}, "options.weighting must be one of exp, inverse"),
    ({"options": {"topk": 0.1}}, "unknown key 'topk' for method fedeu; did you mean 'top_k'?"),
])
def test_fedeu_config_refusals(settings, message):
    with pytest.raises(ConfigError) as err:
        FederatedConfig(method="fedeu", **settings)
    assert message in str(err.value)


# -- one tiny Flower run ------------------------------------------------------------------------------

def test_fedeu_simulation_reports_uncertainty(make_config):
    config = make_config(name="fedeu", method="fedeu", options={"uncertainty_rows": 32})
    result = run_federated(config)
    train = result.rounds[1]["train"]
    assert sorted(train) == ["0", "1", "2"]
    for client in train.values():
        assert 0 < client["uncertainty"] <= 1
    assert "accuracy" in result.rounds[1]["global"]
