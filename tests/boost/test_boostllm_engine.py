"""BoostLLM's engine with a generic backbone (volume-1 §4 (d)): a frozen random 2-layer MLP over
standardised features of sklearn's wine table, LoRA on its linear layers, two views of each row.
Earlier rounds stay bit-identical, the training log-loss never rises at η ≤ 1, the routed
prediction is F_0 + η Σ f_m, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import splice
from splice.boost.boostllm import BoostLLM, BoostLLMSettings
from splice.boost.tabular import draw_shots, load_table
from splice.core.errors import SpliceError

HIDDEN = 24


def mlp_backbone(inputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, 32), nn.Tanh(), nn.Linear(32, HIDDEN), nn.Tanh())


def encode(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(inputs["x"])


def wine_booster(rounds: int = 3, shrinkage: float = 0.5,
                 **settings) -> tuple[BoostLLM, list[int], list[int], list[int]]:
    """Two views: the standardised features, and the same features with noise (stands in for
    the tree-path view)."""
    table = load_table("wine")
    x = torch.tensor(table.features(), dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    split = draw_shots(table, shots=48, seed=0)
    booster = BoostLLM(mlp_backbone(x.shape[1]), encode, [{"x": x}, {"x": noisy}], table.labels, classes=3,
                       hidden=HIDDEN, settings=BoostLLMSettings(**{
                           "rounds": rounds, "shrinkage": shrinkage, "r": 2, "alpha": 4, "steps": 15, "lr": 1e-2,
                           "head_lr": 5e-2, **settings}))
    return booster, split.train.tolist(), split.validation.tolist(), split.test.tolist()


def test_earlier_rounds_stay_bit_identical_as_new_rounds_train():
    booster, train, validation, _ = wine_booster(rounds=1)
    booster.fit(train, validation)
    for m in range(1, 3):
        before = {k: v.clone() for k, v in booster.model.state_dict().items()}
        heads = [{k: v.clone() for k, v in head.state_dict().items()} for head in booster.heads]
        record = booster.add_round()
        assert record.round == m and record.best_step > 0  # the new round did train
        after = booster.model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())  # every earlier adapter, the base
        for head, saved in zip(booster.heads, heads, strict=False):
            assert all(torch.equal(head.state_dict()[k], v) for k, v in saved.items())
    assert booster.names == ["round0", "round1", "round2"]
    assert not splice.trainable_parameters(booster.model)  # every round frozen once done


@pytest.mark.parametrize("shrinkage", [0.3, 1.0])
def test_training_log_loss_never_rises_over_rounds(shrinkage):
    booster, train, _, _ = wine_booster(rounds=4, shrinkage=shrinkage)
    history = booster.fit(train)  # no validation: each round keeps its last state
    losses = [history.prior_train_loss, *[r.train_loss for r in history.rounds]]
    assert all(after <= before + 1e-6 for before, after in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.5 * losses[0]


def test_the_routed_prediction_is_the_prior_plus_the_shrunk_sum_of_the_rounds():
    booster, train, validation, test = wine_booster(rounds=3)
    history = booster.fit(train, validation)
    routed = booster.predict_logits(test, batch_size=17)
    with torch.no_grad():
        explicit = booster.prior + sum(booster.settings.shrinkage * booster.round_logits(test, m) for m in range(3))
    assert torch.allclose(routed, explicit, atol=1e-5)
    assert history.rounds[-1].validation_loss < history.prior_validation_loss
    accuracy = float((routed.argmax(-1) == booster.labels[test]).float().mean())
    assert accuracy > 0.8  # wine, 48 shots: the prior alone gets 0.40


def test_a_round_that_does_not_help_validation_changes_nothing():
    booster, train, validation, _ = wine_booster(rounds=1, lr=0.0, head_lr=0.0)
    history = booster.fit(train, validation)
    assert history.rounds[0].best_step == 0
    assert history.rounds[0].validation_loss == pytest.approx(history.prior_validation_loss, abs=1e-6)


def test_bad_settings_and_inputs_are_refused():
    with pytest.raises(SpliceError, match=r"shrinkage must be in \(0, 1\], got 1.5"):
        BoostLLMSettings(shrinkage=1.5)
    with pytest.raises(SpliceError, match="rounds must be >= 1"):
        BoostLLMSettings(rounds=0)
    model = mlp_backbone(3)
    with pytest.raises(SpliceError, match="one input per row"):
        BoostLLM(model, encode, [{"x": torch.zeros(4, 3)}], [0, 1, 0], classes=2, hidden=HIDDEN)
    splice.attach(model, splice.LoRA(r=2, targets="all-linear"))
    with pytest.raises(SpliceError, match=r"the model carries \['default'\]"):
        BoostLLM(model, encode, [{"x": torch.zeros(3, 3)}], [0, 1, 0], classes=2, hidden=HIDDEN)
