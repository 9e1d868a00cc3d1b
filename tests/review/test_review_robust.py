"""Review of the robustness patches (Elytra: `splice.robust.attacks`, `splice.robust.patch`):
each test here fails on the reviewed code for a real reason and passes once it is fixed."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import VOCAB, make_bert, randomize_module, text_batch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    BatchEncoding,
    GPT2Config,
    GPT2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import splice
from splice.core.errors import DataError, SpliceError
from splice.core.host import hosts
from splice.robust import EmbeddingPGD, LinfPGD, adversarial_patch, attacked_accuracy, clean_accuracy, patch_targets
from splice.robust.attacks import model_logits


def small_set(rows: int = 16, width: int = 4, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(rows, width, generator=generator), torch.randint(0, classes, (rows,), generator=generator)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".splice." not in k
            and not k.startswith("splice_heads")}


# ---------------------------------------------------------------------- training: what the patch changes


def test_a_patch_on_the_embeddings_is_trained_by_the_adversarial_loss():
    """attacks.py:174-183 (EmbeddingPGD.perturb) computes the clean embeddings under
    `torch.no_grad()` and returns `clean + delta` with no graph, so in `patch_loss` the
    adversarial loss never reaches the embedding layer: a patch whose adapter targets the word
    embeddings (a LoRA on them, or `train_also=["word_embeddings"]`) gets no gradient there from
    PGD-AT (with clean_weight=0 its embedding factors never move). Correct: the attacked
    embeddings are `embed(input_ids) + delta.detach()` with the embedding forward inside the
    training graph, so every layer of the patch learns from the adversarial loss."""
    model = make_bert()
    randomize_module(model.classifier, scale=1.0)
    adapter = splice.LoRA(r=2, targets=["word_embeddings", "classifier"])
    adversarial_patch(model, [text_batch()], EmbeddingPGD(eps=0.2, step_size=0.1, steps=2), name="p",
                      adapter=adapter, epochs=2, lr=1e-2, clean_weight=0.0, progress=False)
    embedding_A = next(host["p"].lora_A for name, _, host in hosts(model) if name.endswith("word_embeddings"))
    assert embedding_A.abs().max().item() > 0, "the embedding factor A (zero at init) never received a gradient"


class SpectralNet(nn.Module):
    """A classifier with a spectrally normalised layer (power-iteration vectors are buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def test_training_a_patch_leaves_every_base_buffer_and_the_base_output_bit_identical():
    """patch.py:192-195 / 214-221: during PGD-AT every base module except those with `running_*`
    buffers runs in train mode, so any other base state that a train-mode forward updates is
    overwritten. A spectrally normalised layer (torch.nn.utils.parametrizations.spectral_norm, common
    in robust / Lipschitz models) runs a power iteration and rewrites its `_u`/`_v` buffers on
    every training forward: after `adversarial_patch` the base checksum differs and the model with
    the patch off no longer computes what it did (volume-2 §14 (d) (1) and (3)). Correct: the base's
    state is left bit-identical (keep such base modules in eval mode, or restore base buffers)."""
    torch.manual_seed(0)
    model = SpectralNet().eval()
    x, y = small_set()
    with torch.no_grad():
        before_logits = model(x).clone()
    before = base_state(model)
    adversarial_patch(model, (x, y), LinfPGD(eps=0.05, step_size=0.02, steps=1), name="p",
                      adapter=splice.LoRA(r=2, targets=["head"]), epochs=1, batch_size=8, progress=False)
    after = base_state(model)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == [], f"base buffers changed by the patch's training: {changed}"
    with splice.disabled(model), torch.no_grad():
        assert torch.equal(model(x), before_logits)


# ---------------------------------------------------------------------- user state after a failure


def test_a_nonfinite_attack_after_training_detaches_the_patch_and_reactivates_the_adapters_before():
    """patch.py:138-151: the docstring promises that a non-finite loss raises with the patch
    detached again and the adapters active before active again, but only training is inside the
    `try`; the final measurement (`after = accuracies(...)`) is outside it. A last step that makes
    the patch overflow (here lr=1e30: the step-1 loss is finite, the updated weights are not)
    raises from the attack's loss in `after`, and the half-made patch stays attached and active
    while "earlier" is left switched off. Correct: the same clean-up as for a failure in training."""
    model = mlp()
    splice.attach(model, splice.LoRA(r=2, targets=["0"]), "earlier")
    x, y = small_set(rows=8)
    with pytest.raises(SpliceError, match="nan|inf"):
        adversarial_patch(model, (x, y), LinfPGD(eps=0.05, step_size=0.02, steps=1), name="p", epochs=1,
                          batch_size=8, lr=1e30, progress=False)
    assert list(splice.adapters(model)) == ["earlier"]
    assert splice.active_adapters(model) == ["earlier"]


class OverflowsInTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x))) * (math.inf if self.training else 1.0)


def test_a_failed_patch_leaves_every_requires_grad_flag_as_it_was():
    """patch.py:147-149: on failure `attaching` restores every parameter's `requires_grad`, then
    `activate(model, previous)` re-derives them (freeze everything, unfreeze active adapters), so
    a flag the user had set is lost: here the base head the user trains next to adapter
    "earlier" ends up frozen after a failed `adversarial_patch`. Correct: a failed call leaves
    the user's requires_grad flags exactly as they were (restore them after reactivating)."""
    torch.manual_seed(0)
    model = OverflowsInTraining()
    splice.attach(model, splice.LoRA(r=2, targets=["body"]), "earlier")
    model.head.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(SpliceError, match="training loss at step 1"):
        adversarial_patch(model, small_set(rows=8), LinfPGD(eps=0.1), name="p", epochs=1, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_a_shuffled_data_loader_leaves_the_callers_random_generator_untouched():
    """patch.py:132-137: `check_data` iterates the data (every batch, to check it) *before* the
    `seeded(seed, ...)` block, so a DataLoader with shuffle=True draws its shuffling seed from the
    caller's global generator: `torch.get_rng_state()` differs after the call, against the
    docstring ("the caller's random generators are left as they were"). Correct: any iteration
    of the data (the checks included) happens inside the forked, seeded generator."""
    x, y = small_set()
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    model = mlp()
    state = torch.get_rng_state()
    adversarial_patch(model, loader, LinfPGD(eps=0.05, step_size=0.02, steps=1), name="p", epochs=1, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------- EmbeddingPGD: the clean point


def gpt2_classifier() -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=2,
                        pad_token_id=0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    return GPT2ForSequenceClassification(config).eval()


def test_embedding_pgd_refuses_a_right_padded_decoder_batch_given_without_attention_mask():
    """attacks.py:196 (_check_embeddings_path) only looks for right padding through the
    attention mask and returns when there is none. A GPT-2 classifier finds each row's last
    real token from input_ids (pad_token_id), but from inputs_embeds takes the last position, so
    a right-padded batch without a mask is attacked (and scored) at padding positions: a
    perturbation of 1e-4 of the embedding scale moves the logits by more than their own size.
    Correct: refuse (as with a mask) whenever the ids path and the embeddings path disagree,
    e.g. run the check whenever there is no mask, or compare always."""
    model = gpt2_classifier()
    ids = torch.zeros(4, 10, dtype=torch.long)
    for row, length in enumerate([10, 6, 4, 8]):
        ids[row, :length] = torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(row))
    batch = {"input_ids": ids}
    threat = EmbeddingPGD(eps=1e-4, step_size=1e-5, steps=1, random_start=False)
    with torch.no_grad():
        clean = model_logits(model, batch)
    with pytest.raises(SpliceError, match="classifies this padded batch otherwise"):
        threat.perturb(model, batch, clean.argmax(-1))


def test_embedding_pgd_on_a_left_padded_roberta_batch_starts_from_what_the_model_sees():
    """attacks.py:186 and 196: a model that derives position ids from input_ids (RoBERTa,
    XLM-R: padding tokens get no position) gives the real tokens of a left-padded row other
    positions when called with `inputs_embeds`; the class doc even advises left padding, and the
    check is skipped for it (last column unmasked). So an attack of radius ~0 changes the logits
    by a fifth of their size: attacked accuracy measures another model input than the clean one.
    Correct: the attacked call reproduces the clean classification at delta = 0 (pass the
    position ids the model derives from input_ids) or the batch is refused."""
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=40, max_position_embeddings=64, num_labels=2, pad_token_id=1)
    model = RobertaForSequenceClassification(config).eval()
    ids, mask = torch.ones(4, 10, dtype=torch.long), torch.zeros(4, 10, dtype=torch.long)
    for row, length in enumerate([10, 6, 4, 8]):
        ids[row, 10 - length:] = torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(row))
        mask[row, 10 - length:] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    threat = EmbeddingPGD(eps=1e-6, step_size=1e-7, steps=1, random_start=False)
    with torch.no_grad():
        clean = model_logits(model, batch)
    with pytest.raises(SpliceError, match=r"classifies this padded batch otherwise .* RoBERTa-like encoders number "
                                          r"positions from input_ids \(pad them on the right\)"):
        threat.perturb(model, batch, clean.argmax(-1))
    right = {"input_ids": ids.clone(), "attention_mask": mask.clone()}
    for row, length in enumerate([10, 6, 4, 8]):  # the same rows padded on the right: attacked as they are
        right["input_ids"][row] = torch.cat([ids[row, 10 - length:], ids[row, : 10 - length]])
        right["attention_mask"][row] = torch.cat([mask[row, 10 - length:], mask[row, : 10 - length]])
    with torch.no_grad():
        clean = model_logits(model, right)
    perturbed = threat.perturb(model, right, clean.argmax(-1))
    with torch.no_grad():
        attacked = model_logits(model, threat.attacked(right, perturbed))
    assert (attacked - clean).abs().max().item() <= 1e-3 * clean.abs().max().item()


def test_embedding_pgd_takes_a_tokenizers_batch_encoding():
    """attacks.py:150 and 256: `check` and `model_logits` test `isinstance(inputs, dict)`, so the
    batch a tokenizer returns (a `BatchEncoding`, a Mapping but not a dict) is refused with a
    self-contradictory message ("dicts with 'input_ids' ... got a dict with ['attention_mask',
    'input_ids']"), and `model_logits` would pass it positionally. The whole-set paths accept any
    Mapping. Correct: any Mapping of tensors is a text batch."""
    model = make_bert()
    encoding = BatchEncoding({"input_ids": torch.randint(1, VOCAB, (3, 5)),
                              "attention_mask": torch.ones(3, 5, dtype=torch.long)})
    labels = torch.zeros(3, dtype=torch.long)
    threat = EmbeddingPGD(eps=0.1, step_size=0.05, steps=1)
    perturbed = threat.perturb(model, encoding, labels)
    assert perturbed.shape == (3, 5, 32)


# ---------------------------------------------------------------------- accuracies and labels


def test_clean_accuracy_refuses_non_finite_outputs():
    """attacks.py:361-368: clean_accuracy takes argmax of the logits with no finiteness check
    (attacked_accuracy raises on the same model through the attack's loss): a model whose
    outputs are all NaN scores 1.0 here, since argmax of a NaN row is 0 and every label is 0.
    Correct: non-finite outputs raise, as every other measurement in the module does."""
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    x, _ = small_set(rows=8)
    with pytest.raises(SpliceError, match="nan|NaN"):
        clean_accuracy(model, (x, torch.zeros(8, dtype=torch.long)))


def test_negative_labels_are_refused_as_data():
    """attacks.py:333-334 (check_labels) checks only that labels are a 1-D integer tensor, so
    labels of -100 (the Hugging Face 'ignore' index) pass: cross-entropy silently drops those rows
    from the attack and the patch's loss while the accuracies count them as wrong, and a batch
    of only -100 labels gives a NaN loss reported as "a learning rate too high". Correct: labels
    are class indices, so a negative label is a DataError naming it."""
    x, y = small_set(rows=8)
    y = y.clone()
    y[:] = -100
    with pytest.raises(DataError):
        attacked_accuracy(mlp(), (x, y), LinfPGD(eps=0.05, step_size=0.02, steps=1))


# ---------------------------------------------------------------------- targets


class TinyEncoder(nn.Module):
    """A ViT-like block: nn.TransformerEncoderLayer (torchvision's ViT uses nn.MultiheadAttention)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


def test_every_layer_the_default_patch_targets_takes_part_in_the_forward():
    """patch.py:94-104 (patch_targets) selects every nn.Linear, including
    nn.MultiheadAttention's `out_proj`, whose forward is never called (MHA passes
    `out_proj.weight` to F.multi_head_attention_forward): the default patch puts a LoRA there
    that never gets a gradient and never changes the output, and counts it in
    `trainable_parameters`. Correct: the default targets only layers whose forward runs
    (leave such `out_proj` layers out, or refuse them)."""
    torch.manual_seed(0)
    model = TinyEncoder()
    x = torch.rand(16, 5, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    assert patch_targets(model)  # the default targets
    adversarial_patch(model, (x, y), LinfPGD(eps=0.05, step_size=0.02, steps=1), name="p", epochs=1,
                      batch_size=8, lr=1e-2, progress=False)
    untrained = sorted(name for name, _, host in hosts(model) if "p" in host
                       and host["p"].lora_B.abs().max().item() == 0)
    assert untrained == [], f"patched layers that never trained: {untrained}"
