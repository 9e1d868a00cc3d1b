"""Contamination tests: Min-K%, edit distance and CDD on hand-made inputs, perplexity by hand,
batched == one by one, and the AUROC of a LoRA that memorised half of 40 sums vs one trained on
nothing."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from helpers import make_gpt2, make_llama, randomize

import splice
from splice.audit.contamination import (
    SCORES,
    cdd_peakedness,
    contamination_test,
    edit_distance,
    item_scores,
    min_k_prob,
)
from splice.core.errors import SpliceError

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"]  # lm_head: a frozen random head caps the logits


class CharTokenizer:
    """One token per character (ids 3...), a BOS (1) in front when asked for special tokens."""

    chars = "0123456789+= abcdefghijklmnopqrstuvwxyz"
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [3 + self.chars.index(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


TOKENIZER = CharTokenizer()


def sums(n: int = 40, seed: int = 0) -> list[tuple[str, str]]:
    """`n` distinct items "a+b=" -> "a+b" with two-digit terms and sums, shuffled."""
    rng = random.Random(seed)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n:
        pairs.add((rng.randint(10, 49), rng.randint(10, 49)))
    items = [(f"{a}+{b}=", str(a + b)) for a, b in sorted(pairs)]
    rng.shuffle(items)
    return items


def memorise(model: torch.nn.Module, items: list[tuple[str, str]], steps: int = 200) -> float:
    """Train the active adapter on the answers of `items` (all the same length); the last loss."""
    ids = torch.tensor([TOKENIZER(p)["input_ids"] + TOKENIZER(a, add_special_tokens=False)["input_ids"]
                        for p, a in items])
    labels = ids.clone()
    labels[:, : -len(items[0][1])] = -100
    optimizer = torch.optim.AdamW(splice.trainable_parameters(model).values(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


@pytest.fixture(scope="module")
def memorised():
    """A LoRA trained on the first 20 of 40 sums until it reproduces them, and its test."""
    items = sums()
    model = make_llama()
    splice.attach(model, splice.LoRA(r=8, targets=TARGETS))
    assert memorise(model, items[:20]) < 0.05
    return model, contamination_test(model, TOKENIZER, items[:20], items[20:], cdd_samples=8)


def test_min_k_prob_is_the_mean_of_the_lowest_share():
    logprobs = torch.tensor([-0.1, -3.0, -0.5, -2.0, -1.0])
    assert min_k_prob(logprobs, 0.4) == pytest.approx(-2.5)  # the 2 lowest: -3, -2
    assert min_k_prob(logprobs, 1.0) == pytest.approx(-6.6 / 5)
    assert min_k_prob(logprobs, 0.1) == pytest.approx(-3.0)  # 0.5 token rounds down, but one at least
    assert min_k_prob(torch.arange(100.0), 0.29) == pytest.approx(14.0)  # 29 tokens (0..28), not 28


@pytest.mark.parametrize("k", [0, -0.1, 1.5])
def test_min_k_prob_refuses_k_outside_0_1(k):
    with pytest.raises(SpliceError, match=rf"k .*must be in \(0, 1\], got {k}"):
        min_k_prob(torch.tensor([-1.0]), k)


def test_edit_distance_on_known_pairs():
    assert edit_distance([11, 9, 20, 20, 9, 14], [19, 9, 20, 20, 9, 14, 7]) == 2  # kitten -> sitteng
    assert edit_distance(list(b"kitten"), list(b"sitting")) == 3
    assert edit_distance([], [1, 2, 3]) == 3 == edit_distance([1, 2, 3], [])
    assert edit_distance([1, 2, 3], [3, 2, 1]) == 2
    assert edit_distance([1, 2, 3, 4], [2, 3, 4, 5]) == 2  # one deletion, one insertion
    assert edit_distance([5, 5], [5, 5]) == 0


def test_cdd_peakedness_counts_samples_within_alpha_times_the_longest_output():
    greedy = list(range(10))
    same, one_off, other = list(range(10)), [0, 1, 2, 3, 4, 5, 6, 7, 8, 99], list(range(50, 60))
    assert cdd_peakedness(greedy, [same, one_off, other], alpha=0.1) == pytest.approx(2 / 3)  # within 1 token
    assert cdd_peakedness(greedy, [same, one_off, other], alpha=0.05) == pytest.approx(1 / 3)  # within 0.5
    # a 20-token sample makes L = 20: alpha 0.05 now allows one edit, and the long sample is 10 away
    assert cdd_peakedness(greedy, [same, one_off, list(range(20))], alpha=0.05) == pytest.approx(2 / 3)
    assert cdd_peakedness(greedy, [other], alpha=1.0) == 1.0


def test_perplexity_and_min_k_are_the_answer_tokens_nll_by_hand():
    model = make_llama()
    items = [("12+7=", "19"), "12+7=19"]
    pair, text = item_scores(model, TOKENIZER, items, cdd_samples=2)
    ids = TOKENIZER("12+7=19")["input_ids"]
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    token_logprobs = torch.stack([logprobs[i - 1, ids[i]] for i in range(1, len(ids))])
    answer = token_logprobs[-2:]  # "19" given "<bos>12+7="
    assert pair.perplexity == pytest.approx(math.exp(-answer.mean().item()), rel=1e-5)
    assert pair.min_k == pytest.approx(answer.min().item(), rel=1e-5)  # 20% of 2 tokens: the lowest one
    assert text.perplexity == pytest.approx(math.exp(-token_logprobs.mean().item()), rel=1e-5)
    assert text.min_k == pytest.approx(token_logprobs.sort().values[0].item(), rel=1e-5)  # 20% of 7: one
    # no adapter: the base is the model itself
    assert (pair.base_perplexity, pair.base_min_k, pair.calibrated) == (pair.perplexity, pair.min_k, 0.0)


def test_batched_scores_equal_one_by_one():
    model = make_llama()
    splice.attach(model, splice.LoRA(r=4, targets=TARGETS))
    randomize(model, scale=0.3)
    items = [("1+2=", "3"), ("12+30=", "42"), "abc def", ("7=", "seven"), ("10+10+10=", "30")]
    settings = dict(cdd_samples=6, cdd_temperature=2.0, cdd_alpha=0.8, new_tokens=4, seed=3)
    batched = item_scores(model, TOKENIZER, items, batch_size=3, **settings)
    alone = [item_scores(model, TOKENIZER, [item], batch_size=1, **settings)[0] for item in items]
    assert len({s.cdd for s in batched}) > 1  # the samples differ between items: the equality below means something
    assert all(s.calibrated != 0 for s in batched)
    for together, single in zip(batched, alone, strict=True):
        assert together.cdd == single.cdd
        for name in SCORES:
            assert getattr(together, name) == pytest.approx(getattr(single, name), rel=1e-5, abs=1e-6)


def test_cdd_ignores_the_models_own_generation_settings():
    model = make_llama()
    splice.attach(model, splice.LoRA(r=4, targets=TARGETS))
    randomize(model, scale=0.3)
    items = [("1+2=", "3"), ("12+30=", "42"), ("7=", "seven"), ("10+10+10=", "30")]
    settings = dict(cdd_samples=6, cdd_temperature=2.0, cdd_alpha=0.8, new_tokens=4, seed=3)
    plain = [s.cdd for s in item_scores(model, TOKENIZER, items, **settings)]
    model.generation_config.update(do_sample=True, temperature=0.1, top_k=2, repetition_penalty=50.0)
    assert [s.cdd for s in item_scores(model, TOKENIZER, items, **settings)] == plain
    assert [s.cdd for s in item_scores(model, TOKENIZER, items, **{**settings, "seed": 0})] != plain


def test_memorised_adapter_is_flagged(memorised):
    _, test = memorised
    for name in ("perplexity", "min_k", "calibrated"):
        assert test.auroc[name] > 0.9
        low, high = test.interval[name]
        assert 0.5 < low <= test.auroc[name] <= high <= 1.0
    flagged = {f.subject for f in test.findings if f.severity == "flag"}
    assert {"perplexity", "min_k", "calibrated"} <= flagged
    assert not flagged & {"base_perplexity", "base_min_k"}  # the base model never saw either set
    notes = [f for f in test.findings if f.severity == "note"]
    assert [(f.check, f.subject) for f in notes] == [("contamination", "auroc"), ("contamination", "cdd")]
    assert notes[0].message.startswith("20 suspect vs 20 control items, AUROC (95% interval): perplexity ")
    assert "unreliable after PEFT" in notes[1].message


def test_adapter_trained_on_nothing_is_not_flagged():
    items = sums()
    model = make_llama()
    splice.attach(model, splice.LoRA(r=8, targets=TARGETS))  # B = 0: the adapter changes nothing
    test = contamination_test(model, TOKENIZER, items[:20], items[20:], cdd_samples=4)
    assert not [f for f in test.findings if f.severity != "note"]
    assert test.auroc["calibrated"] == 0.5 and test.interval["calibrated"] == (0.5, 0.5)  # all 0: ties
    assert test.auroc["perplexity"] == test.auroc["base_perplexity"]
    for name in ("perplexity", "min_k"):
        assert abs(test.auroc[name] - 0.5) < 0.2


def test_scoring_restores_active_adapters_grad_flags_and_mode():
    model = make_llama()
    splice.attach(model, splice.LoRA(r=4, targets=TARGETS), "a")
    splice.attach(model, splice.LoRA(r=4, targets=TARGETS), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    splice.activate(model, "b")
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with_a = item_scores(model, TOKENIZER, [("1+2=", "3")], adapter="a", cdd_samples=2)
    assert splice.active_adapters(model) == ["b"] and model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    model.eval()
    with_b = item_scores(model, TOKENIZER, [("1+2=", "3")], cdd_samples=2)
    splice.activate(model, "a")
    assert item_scores(model, TOKENIZER, [("1+2=", "3")], cdd_samples=2) == with_a != with_b
    splice.deactivate(model)
    item_scores(model, TOKENIZER, [("1+2=", "3")], adapter="a", cdd_samples=2)
    assert splice.active_adapters(model) == []


def test_refuses_a_disabled_model_and_items_longer_than_its_positions_by_name():
    model = make_gpt2()  # 64 positions
    splice.attach(model, splice.LoRA(r=4, targets=["c_attn"]))
    with splice.disabled(model), pytest.raises(SpliceError, match=r"item_scores called inside splice.disabled"):
        item_scores(model, TOKENIZER, [("1+2=", "3")], cdd_samples=2)
    with pytest.raises(SpliceError, match=r"items\[1\] \(prompt 5 tokens\) continued by new_tokens=60 needs 65 "
                                          r"positions, but the model has 64"):
        item_scores(model, TOKENIZER, [("1=", "3"), ("1+2=", "3")], cdd_samples=2, new_tokens=60)


def test_a_long_prompt_and_a_long_answer_that_fit_apart_but_not_together_are_continued_apart():
    """52 + 2 tokens and 3 + 40 fit GPT-2's 64 positions; one batch continuing both prompts by 40
    tokens would need 92: the batch's CDD continuations are made item by item, as alone."""
    model = make_gpt2()
    splice.attach(model, splice.LoRA(r=4, targets=["c_attn"]))
    randomize(model, scale=0.3)
    items = [("1" * 50 + "=", "12"), ("1=", "2" * 40)]
    settings = dict(cdd_samples=3, cdd_temperature=2.0, cdd_alpha=0.5, seed=1)
    together = item_scores(model, TOKENIZER, items, batch_size=2, **settings)
    alone = [item_scores(model, TOKENIZER, [item], batch_size=1, **settings)[0] for item in items]
    for both, single in zip(together, alone, strict=True):
        assert both.cdd == single.cdd
        assert both.calibrated == pytest.approx(single.calibrated, rel=1e-5, abs=1e-6)


def test_a_nan_adapter_is_refused_naming_the_set_and_item():
    """A NaN in the adapter makes every score of an item NaN; sklearn's AUROC would fail on it
    without saying why, and a silently dropped item would bias the test."""
    model = make_llama()
    splice.attach(model, splice.LoRA(r=4, targets=TARGETS))
    with torch.no_grad():
        model.lm_head.splice.default.lora_B.fill_(float("nan"))
    with pytest.raises(SpliceError, match=r"answer log-probs with the adapter are not finite \(NaN or inf\) for "
                                          r"suspect\[0\] and 1 more item\(s\)"):
        contamination_test(model, TOKENIZER, [("1+1=", "2"), ("1+2=", "3")], [("1+3=", "4")], cdd_samples=2)


@pytest.mark.parametrize(("suspect", "message"), [
    ([], r"suspect is empty"),
    ("12+7=19", r"suspect must be a list of items .* got str"),
    ([("1=", "1"), 5], r"suspect\[1\] must be a string or a \(prompt, answer\) pair of strings, got int 5"),
    ([("1=",)], r"suspect\[0\] must be a string or a \(prompt, answer\) pair of strings, got tuple"),
    ([("1=", 1)], r"suspect\[0\] must be .* got tuple \('1=', 1\)"),
    ([("1=", "")], r"suspect\[0\] \('1=', ''\) has no token to score"),
])
def test_bad_sets_are_refused_by_name(suspect, message):
    with pytest.raises(SpliceError, match=message):
        contamination_test(make_llama(), TOKENIZER, suspect, [("1+1=", "2")])


@pytest.mark.parametrize(("setting", "message"), [
    ({"k": 0}, r"k .* must be in \(0, 1\], got 0"),
    ({"cdd_samples": 0}, r"cdd_samples must be a positive integer, got 0"),
    ({"cdd_temperature": 0.0}, r"cdd_temperature must be > 0, got 0.0"),
    ({"cdd_alpha": 2}, r"cdd_alpha must be in \[0, 1\], got 2"),
    ({"new_tokens": 0}, r"new_tokens must be a positive integer, got 0"),
    ({"auroc_threshold": 1.5}, r"auroc_threshold must be in \[0, 1\], got 1.5"),
])
def test_bad_settings_are_refused_by_name(setting, message):
    with pytest.raises(SpliceError, match=message):
        contamination_test(make_llama(), TOKENIZER, [("1+1=", "2")], [("1+2=", "3")], **setting)


def test_report_as_json_table_and_png(memorised, tmp_path):
    _, test = memorised
    report = json.loads(json.dumps(test.as_dict()))
    assert set(report["auroc"]) == set(SCORES) == set(report["interval"])
    assert len(report["suspect"]) == len(report["control"]) == 20
    assert report["suspect"][0]["perplexity"] == test.suspect[0].perplexity
    assert {f["severity"] for f in report["findings"]} == {"flag", "note"}
    lines = test.table().splitlines()
    assert all(any(line.startswith(name + " ") for line in lines) for name in SCORES)
    path = test.plot(tmp_path / "roc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
