"""Robustness patches (Elytra, volume-2 §14): volume-2's CPU tests on a digits CNN (patch off is
bit-identical to the base; PGD accuracy up >= 10 points, clean accuracy down <= 5 on held-out
digits; base checksum unchanged), patches side by side and routed, the PGD-AT step's modes,
embedding-space PGD on a tiny BERT, seeding and refusals."""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from helpers import VOCAB, assert_differs, logits, make_bert, randomize_module, text_batch
from torch import nn
from transformers import GPT2Config, GPT2ForSequenceClassification

import splice
from splice.core.errors import DataError, SpliceError
from splice.core.heads import head_module
from splice.core.host import hosts
from splice.robust import EmbeddingPGD, LinfPGD, PatchResult, adversarial_patch, attacked_accuracy, clean_accuracy
from splice.robust.attacks import model_logits

EPS = 0.1  # on digits in [0, 1] the base keeps about a quarter of its accuracy under PGD at this radius
TRAINING_THREAT = LinfPGD(eps=EPS, step_size=EPS / 4, steps=5)
PGD10 = LinfPGD(eps=EPS, step_size=EPS / 4, steps=10)  # a stronger attack than the patch trained against


def base_checksum(model: nn.Module) -> str:
    """SHA-256 of every base tensor (adapters, which live under `.splice.`, left out)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".splice." not in name:
            digest.update(name.encode())
            digest.update(tensor.detach().numpy().tobytes())
    return digest.hexdigest()


def patch_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {f"{module}.{key}": value.detach().clone() for module, _, host in hosts(model) if name in host
            for key, value in host[name].state_dict().items()}


@dataclass
class Patched:
    """The digits CNN after two patches: "linf10" (eps 0.1, 3 epochs) then "linf5" (eps 0.05, short)."""

    model: nn.Module
    test: tuple[torch.Tensor, torch.Tensor]
    base_logits: torch.Tensor
    base_checksum: str
    pgd10_before: float
    result: PatchResult
    linf10_after_training: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def patched(trained_digits) -> Patched:
    base, train, test = trained_digits
    model = copy.deepcopy(base)
    base_logits, checksum = logits(model, test[0]), base_checksum(model)
    pgd10_before = attacked_accuracy(model, test, PGD10)
    result = adversarial_patch(model, train, TRAINING_THREAT, name="linf10", eval_data=test, epochs=3, lr=1e-2,
                               progress=False)
    trained = patch_tensors(model, "linf10")
    adversarial_patch(model, (train[0][:128], train[1][:128]), LinfPGD(eps=EPS / 2, step_size=EPS / 8, steps=2),
                      name="linf5", eval_data=(test[0][:64], test[1][:64]), epochs=1, lr=1e-2, progress=False)
    return Patched(model, test, base_logits, checksum, pgd10_before, result, trained)


# ---------------------------------------------------------------------- volume-2 §14 (d)


def test_patch_off_computes_the_base_bit_for_bit(patched):
    model, x = patched.model, patched.test[0]
    splice.activate(model, "linf10")
    assert_differs(logits(model, x), patched.base_logits)  # the patch does change the outputs
    with splice.disabled(model):
        assert torch.equal(logits(model, x), patched.base_logits)
    splice.deactivate(model)
    assert torch.equal(logits(model, x), patched.base_logits)


def test_patch_raises_pgd_accuracy_by_10_points_losing_at_most_5_clean(patched, trained_digits):
    result, model, test = patched.result, patched.model, patched.test
    base = trained_digits[0]
    # before = the base, measured exactly as attacked_accuracy / clean_accuracy measure it (same seed)
    assert result.attacked_accuracy_before == attacked_accuracy(base, test, TRAINING_THREAT)
    assert result.clean_accuracy_before == clean_accuracy(base, test)
    assert result.attacked_accuracy_before < 0.4
    assert result.attacked_accuracy_after - result.attacked_accuracy_before >= 0.10
    assert result.clean_accuracy_before - result.clean_accuracy_after <= 0.05
    # and against a stronger PGD than the patch trained on (10 steps instead of 5)
    splice.activate(model, "linf10")
    assert attacked_accuracy(model, test, PGD10) - patched.pgd10_before >= 0.10
    assert result.steps == 3 * math.ceil(1200 / 64) and len(result.losses) == 3
    assert result.as_dict()["threat"] == repr(TRAINING_THREAT)


def test_base_checksum_unchanged_and_only_the_patch_trained(patched):
    model = patched.model
    assert base_checksum(model) == patched.base_checksum
    # LoRA r=8 on every conv and the head (conv1 1->8, conv2 8->8, conv3 8->16 with 3x3 kernels; head 16->10)
    expected = 8 * (1 * 9 + 8) + 8 * (8 * 9 + 8) + 8 * (8 * 9 + 16) + 8 * (16 + 10)
    assert patched.result.trainable_parameters == expected
    assert sorted(name for name, _, host in hosts(model) if "linf10" in host) == ["conv1", "conv2", "conv3", "head"]


def test_patches_coexist_each_selected_by_activate_and_per_row_by_route(patched):
    model, x = patched.model, patched.test[0][:6]
    assert splice.adapters(model).keys() == {"linf10", "linf5"}
    for key, value in patch_tensors(model, "linf10").items():  # training linf5 left linf10 as it was
        assert torch.equal(value, patched.linf10_after_training[key])
    alone = {}
    for name in ("linf10", "linf5"):
        splice.activate(model, name)
        alone[name] = logits(model, x)
    alone[None] = patched.base_logits[:6]
    assert_differs(alone["linf10"], alone["linf5"])
    ids = ["linf10", "linf5", None, "linf5", "linf10", None]
    with splice.route(model, ids):
        routed = logits(model, x)
    for row, name in enumerate(ids):
        torch.testing.assert_close(routed[row], alone[name][row], rtol=1e-5, atol=1e-6)


def test_linf_pgd_stays_in_the_ball_and_bounds_raises_the_loss_and_follows_its_generator(trained_digits):
    model, (x, y), _ = trained_digits
    x, y = x[:64], y[:64]
    runs = [PGD10.perturb(model, x, y, generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    change = (runs[0] - x).abs()
    assert change.max().item() <= EPS + 1e-6 and runs[0].min() >= 0.0 and runs[0].max() <= 1.0
    assert (change > EPS - 1e-6).float().mean() > 0.3  # sign steps push many pixels to the ball's faces
    with torch.no_grad():
        assert F.cross_entropy(model(runs[0]), y) > F.cross_entropy(model(x), y) + 1.0


# ---------------------------------------------------------------------- the PGD-AT step


class ModeRecorder(nn.Module):
    """A linear classifier that records, for every forward, whether the model was training."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.body(x)


def small_set(rows: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(rows, 4, generator=generator), torch.randint(0, 3, (rows,), generator=generator)


def test_attack_runs_in_eval_mode_update_in_train_mode_then_the_mode_is_restored():
    torch.manual_seed(0)
    model = ModeRecorder().eval()
    data = small_set()
    adversarial_patch(model, data, LinfPGD(eps=0.1, step_size=0.05, steps=3), name="p", eval_data=data, epochs=2,
                      batch_size=4, clean_weight=0.5, progress=False)
    measure = [False] * (2 + 2 * 4)  # clean, then the attack's 3 steps and the attacked forward; 2 batches
    step = [False] * 3 + [True, True]  # the attack in eval mode; attacked and clean forwards in train mode
    assert model.modes == measure + step * 4 + measure  # 2 epochs of 2 batches
    assert not model.training


def test_same_seed_same_patch_and_the_callers_generator_untouched(trained_digits):
    base, train, _ = trained_digits
    subset = (train[0][:96], train[1][:96])
    threat = LinfPGD(eps=EPS, step_size=EPS / 2, steps=2)
    runs = []
    for seed in (3, 3, 4):
        model = copy.deepcopy(base)
        state = torch.get_rng_state()
        result = adversarial_patch(model, subset, threat, name="p", epochs=1, batch_size=32, lr=1e-2, seed=seed,
                                   progress=False)
        assert torch.equal(torch.get_rng_state(), state)
        runs.append((result.as_dict(), patch_tensors(model, "p")))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    assert not all(torch.equal(runs[0][1][k], runs[2][1][k]) for k in runs[0][1])


class OverflowsInTraining(ModeRecorder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * (math.inf if self.training else 1.0)


def test_nonfinite_loss_raises_detaches_the_patch_and_reactivates_the_adapters_before():
    torch.manual_seed(0)
    model = OverflowsInTraining()
    splice.attach(model, splice.LoRA(r=2, targets=["body"]), "earlier")
    with pytest.raises(SpliceError, match=r"adversarial_patch 'p': the training loss at step 1 is (nan|inf)"):
        adversarial_patch(model, small_set(), LinfPGD(eps=0.1), name="p", epochs=1, progress=False)
    assert list(splice.adapters(model)) == ["earlier"]
    assert splice.active_adapters(model) == ["earlier"]


class NormNet(nn.Module):
    """A small image classifier with a BatchNorm: its running statistics are base state too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((-2, -1)))


def test_the_bases_running_statistics_stay_frozen_while_a_batchnorm_the_patch_trains_in_full_updates():
    torch.manual_seed(0)
    model = NormNet().train()
    data = (torch.rand(16, 1, 6, 6), torch.randint(0, 3, (16,)))
    base_stats = {k: v.clone() for k, v in model.bn.state_dict().items()}
    adversarial_patch(model, data, LinfPGD(eps=0.05, step_size=0.02, steps=1), name="p",
                      adapter=splice.LoRA(r=2, targets=["conv", "head"], train_also=["bn"]), epochs=1, batch_size=8,
                      progress=False)
    own = head_module(model, "bn", "p")
    assert not torch.equal(own.running_mean, base_stats["running_mean"])  # the patch's copy trained, in train mode
    assert own.num_batches_tracked.item() == 2
    with splice.disabled(model):  # the original BatchNorm: untouched
        assert all(torch.equal(v, base_stats[k]) for k, v in model.bn.state_dict().items())
    assert model.training and model.bn.training  # the modes as they were


# ---------------------------------------------------------------------- text: embedding-space PGD


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_embedding_pgd_raises_the_loss_more_than_noise_of_its_size_and_stays_in_the_ball(norm):
    model = make_bert()
    randomize_module(model.classifier, scale=1.0)  # the init's 0.02 leaves every logit near 0, every loss near log 2
    batch = text_batch()
    labels, keep = batch.pop("labels"), batch["attention_mask"][..., None]
    threat = EmbeddingPGD(eps=0.3, step_size=0.075, steps=5, norm=norm)
    clean = model.get_input_embeddings()(batch["input_ids"]).detach()
    rms = model.get_input_embeddings().weight.detach().pow(2).mean().sqrt().item()
    radius = 0.3 * rms * (math.sqrt(32) if norm == "l2" else 1.0)  # relative to the embeddings' RMS (32 wide)
    delta = threat.perturb(model, batch, labels) - clean
    size = delta.norm(dim=-1) if norm == "l2" else delta.abs().amax(-1)
    assert size.max().item() <= radius * (1 + 1e-5)
    assert torch.equal(delta[1, -3:], torch.zeros_like(delta[1, -3:]))  # padding is not perturbed
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    noise = (noise / noise.norm(dim=-1, keepdim=True) if norm == "l2" else noise.sign()) * radius * keep

    def loss(change: torch.Tensor) -> float:
        with torch.no_grad():
            return F.cross_entropy(model_logits(model, threat.attacked(batch, clean + change)), labels).item()

    assert loss(torch.zeros_like(clean)) == pytest.approx(F.cross_entropy(logits(model, **batch), labels).item())
    assert loss(delta) > loss(torch.zeros_like(clean)) + 0.1
    assert loss(delta) > loss(noise) + 0.1  # a point of the ball's surface at random does not do it


def test_text_patch_trains_on_dict_batches_through_inputs_embeds():
    model = make_bert()
    before = {n: p.clone() for n, p in model.named_parameters()}
    batches = [text_batch(), text_batch(rows=3, length=6)]
    result = adversarial_patch(model, batches, EmbeddingPGD(eps=0.2, step_size=0.1, steps=2), name="text",
                               epochs=2, lr=1e-2, progress=False)
    assert result.steps == 4
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if ".splice." not in n)
    patched_modules = {name.rsplit(".", 1)[-1] for name, _, host in hosts(model) if "text" in host}
    assert patched_modules == {"query", "key", "value", "dense", "classifier"}  # every Linear; no embeddings
    assert any(p.abs().max() > 0 for n, p in splice.trainable_parameters(model).items() if "lora_B" in n)


def gpt2_classifier_batch(left: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A tiny GPT-2 classifier (it finds each row's last real token from input_ids) and a batch of
    rows of 10, 6, 4 and 8 tokens, padded on the left or the right."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=2,
                        pad_token_id=0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    model = GPT2ForSequenceClassification(config).eval()
    ids, mask = torch.zeros(4, 10, dtype=torch.long), torch.zeros(4, 10, dtype=torch.long)
    for row, length in enumerate([10, 6, 4, 8]):
        place = slice(10 - length, 10) if left else slice(0, length)
        ids[row, place], mask[row, place] = torch.randint(3, VOCAB, (length,)), 1
    return model, {"input_ids": ids, "attention_mask": mask}


def test_embedding_pgd_refuses_a_right_padded_batch_the_model_pools_by_input_ids_and_takes_it_left_padded():
    threat = EmbeddingPGD(eps=1e-4, step_size=1e-5, steps=1, random_start=False)
    model, batch = gpt2_classifier_batch(left=False)
    with pytest.raises(SpliceError, match=r"GPT2ForSequenceClassification classifies this padded batch "
                                          r"otherwise .* decoder classifiers \(GPT-2, Llama\) .*pad them on the left"):
        threat.perturb(model, batch, torch.zeros(4, dtype=torch.long))
    model, batch = gpt2_classifier_batch(left=True)
    with torch.no_grad():
        clean = model_logits(model, batch)
        attacked = model_logits(model, threat.attacked(batch, threat.perturb(model, batch, clean.argmax(-1))))
    assert (attacked - clean).abs().max().item() < 1e-2 * clean.abs().max().item()


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("make", "message"), [
    (lambda: EmbeddingPGD(eps=0.1, step_size=0.1, norm="l1"), "norm must be 'linf' or 'l2', got 'l1'"),
    (lambda: EmbeddingPGD(eps=0.0, step_size=0.1), "EmbeddingPGD eps must be a positive number, got 0.0"),
    (lambda: LinfPGD(eps=-0.1), "LinfPGD eps must be a positive number, got -0.1"),
    (lambda: LinfPGD(step_size=float("nan")), "LinfPGD step_size must be a positive number, got nan"),
    (lambda: LinfPGD(steps=0), "LinfPGD steps must be an integer >= 1, got 0"),
    (lambda: LinfPGD(bounds=(1.0, 0.0)), r"bounds must be \(low, high\) with low < high, got \(1.0, 0.0\)"),
])
def test_threat_settings_refused(make, message):
    with pytest.raises(SpliceError, match=message):
        make()


@pytest.mark.parametrize(("data", "threat", "message"), [
    ((torch.rand(8, 4), torch.zeros(7, dtype=torch.long)), LinfPGD(), "inputs have 8 rows but labels 7"),
    ((torch.rand(8, 4), torch.zeros(8, 1, dtype=torch.long)), LinfPGD(), r"1-D tensor of class indices, got \(8, 1\)"),
    ((torch.rand(8, 4) * 2, torch.zeros(8, dtype=torch.long)), LinfPGD(), r"outside bounds \(0.0, 1.0\)"),
    ([{"input_ids": torch.ones(8, 3, dtype=torch.long), "labels": torch.zeros(8, dtype=torch.long)}], LinfPGD(),
     "LinfPGD perturbs tensors"),
    ((torch.rand(8, 4), torch.zeros(8, dtype=torch.long)), EmbeddingPGD(eps=0.1, step_size=0.1),
     "EmbeddingPGD perturbs the embeddings of text batches"),
    ([{"input_ids": torch.ones(8, 3, dtype=torch.long)}], LinfPGD(), "a dict batch needs 'labels'"),
    (iter([(torch.rand(8, 4), torch.zeros(8, dtype=torch.long))]), LinfPGD(), "data is a one-pass iterator"),
])
def test_data_of_the_wrong_shape_refused_and_nothing_attached(data, threat, message):
    model = ModeRecorder()
    with pytest.raises(DataError, match=message):
        adversarial_patch(model, data, threat, name="p", progress=False)
    assert splice.adapters(model) == {}


def test_patch_settings_refused():
    model = ModeRecorder()
    data = small_set()
    with pytest.raises(SpliceError, match=r"clean_weight must be in \[0, 1\], got 1.5"):
        adversarial_patch(model, data, LinfPGD(), name="p", clean_weight=1.5)
    with pytest.raises(SpliceError, match="epochs must be an integer >= 1, got 0"):
        adversarial_patch(model, data, LinfPGD(), name="p", epochs=0)
    adversarial_patch(model, data, LinfPGD(steps=1), name="p", epochs=1, progress=False)
    with pytest.raises(SpliceError, match="adapter 'p' is already attached"):
        adversarial_patch(model, data, LinfPGD(steps=1), name="p", epochs=1, progress=False)
    with pytest.raises(SpliceError, match="needs a model whose get_input_embeddings"):
        EmbeddingPGD(eps=0.1, step_size=0.1).perturb(model, text_batch(), torch.zeros(4, dtype=torch.long))
