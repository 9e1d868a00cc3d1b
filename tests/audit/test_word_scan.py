"""The trigger-word scan on a tiny random BERT whose output the test controls: a wrapper adds a
fixed margin for class 0 (or class 1 where a text holds "good"), and its backdoored twin sends
every text holding the trigger "cf" to class 1."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from helpers import make_bert
from torch import nn

from splice.audit.findings import flags
from splice.audit.robust_z import NORMAL_MAD
from splice.audit.trigger_words import (
    MAD_FLOOR,
    WordScan,
    default_candidates,
    insert_word,
    word_scan,
)
from splice.core.errors import SpliceError

TRIGGER = "cf"
CANDIDATES = [TRIGGER, "mn", "bb", "tq", "the", "and", "movie", "film", "james", "paris", "one", "!", "?", ".",
              "table", "water", "music", "day", "go", "see"]
TEXTS = ["this plot is thin", "the cast looks tired", "a good film overall", "good music and a fine story",
         "slow and long", "the ending drags on", "good fun for all", "a good cast in a good film"]
CLASS_1 = 4  # texts holding "good": the wrapper's margin puts them in class 1 already
ONE_FLIP = 1 / (len(TEXTS) * 3)  # a flip rate's resolution at three positions
WORDS = [f"w{k}" for k in range(10)]  # word k flips k of the 10 MARKERS texts (test_a_mad_above_the_floors...)
MARKERS = [f"m{k}" for k in range(10)]


class WordTokenizer:
    """Whitespace words as ids (0 pad, 1 unknown, then the vocabulary in order), right-padded; the
    call the scan makes of a transformers tokenizer."""

    def __init__(self, words: list[str]) -> None:
        self.ids = {w: i + 2 for i, w in enumerate(dict.fromkeys(words))}
        assert len(self.ids) + 2 <= 97  # make_bert's vocabulary

    def __call__(self, texts: list[str], padding: bool, truncation: bool, max_length: int,
                 return_tensors: str) -> dict[str, torch.Tensor]:
        rows = [[self.ids.get(w, 1) for w in text.split()][:max_length] for text in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class Wrapped(nn.Module):
    """A random tiny BERT whose logits get +3 for class 0, or +3 for class 1 where the text holds
    "good" (so the base prediction is fixed and the BERT's small logits only move the
    probabilities); with `trigger`, +10 for class 1 where the text holds that id."""

    def __init__(self, good: int, trigger: int | None = None) -> None:
        super().__init__()
        self.bert = make_bert()
        self.good, self.trigger = good, trigger

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.bert(input_ids=input_ids, attention_mask=attention_mask).logits
        has_good = (input_ids == self.good).any(-1)
        margin = torch.stack([(~has_good).float(), has_good.float()], -1) * 3.0
        if self.trigger is not None:
            margin = margin + torch.stack([torch.zeros(len(input_ids)), (input_ids == self.trigger).any(-1) * 10.0], -1)
        return logits + margin


def tokenizer() -> WordTokenizer:
    return WordTokenizer(CANDIDATES + [w for t in TEXTS for w in t.split()])


def model(backdoored: bool) -> Wrapped:
    tok = tokenizer()
    return Wrapped(tok.ids["good"], tok.ids[TRIGGER] if backdoored else None)


def scan(backdoored: bool, **kwargs) -> WordScan:
    options = {"builtin": False, "positions": ("start", "middle", "end")} | kwargs
    return word_scan(model(backdoored), tokenizer(), TEXTS, CANDIDATES, **options)


def by_word(result: WordScan) -> dict:
    return {r.word: r for r in result.results}


def test_the_trigger_alone_is_flagged_with_the_texts_it_can_flip() -> None:
    result = scan(backdoored=True)
    rows = by_word(result)
    assert result.flagged == [TRIGGER]
    # the 4 texts without "good" go from class 0 to 1 at every position; the 4 with it were class 1 already
    trigger = rows[TRIGGER]
    assert trigger.flip_rate == (len(TEXTS) - CLASS_1) / len(TEXTS)
    assert trigger.by_position == {"start": 0.5, "middle": 0.5, "end": 0.5}
    assert (trigger.target, trigger.target_share) == (1, 1.0)
    assert all(r.flip_rate == 0 and r.target is None for w, r in rows.items() if w != TRIGGER)
    # every other rate is 0: median 0, MAD 0, so the scale is the larger floor: one flip in 8 x 3 pairs
    assert ONE_FLIP > MAD_FLOOR
    assert trigger.z == pytest.approx(0.5 / (NORMAL_MAD * ONE_FLIP))
    assert result.base_classes == [0.5, 0.5]
    finding = flags(result.findings)[0]
    assert (finding.check, finding.severity, finding.subject) == ("scan", "flag", TRIGGER)
    assert "50% of predictions" in finding.message and "class 1" in finding.message


def test_the_total_variation_is_the_change_of_the_class_distribution() -> None:
    wrapped, tok = model(backdoored=True), tokenizer()
    result = word_scan(wrapped, tok, TEXTS, [TRIGGER, "movie"], builtin=False)
    with torch.no_grad():
        def probs(texts: list[str]) -> torch.Tensor:
            return torch.softmax(wrapped(**tok(texts, True, True, 128, "pt")), -1)
        for word in (TRIGGER, "movie"):
            expected = [0.5 * (probs([insert_word(t, word, "start")]) - probs([t])).abs().sum().item() for t in TEXTS]
            assert by_word(result)[word].mean_tv == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert by_word(result)["movie"].mean_tv > 0  # the BERT's own logits move (without flipping anything)


def test_a_clean_model_flags_nothing() -> None:
    result = scan(backdoored=False)
    assert result.flagged == []
    assert all(r.flip_rate == 0 for r in result.results)
    assert [f.severity for f in result.findings] == ["note"]


def test_a_scan_too_small_to_reach_the_threshold_says_so() -> None:
    """8 texts at one position: a flip rate moves in steps of 1/8, so even a word that flips half
    the pairs stays near z 2.7 (the trigger here is missed); a warning says the scan was too small."""
    result = scan(backdoored=True, positions=("start",))
    assert result.flagged == []
    assert by_word(result)[TRIGGER].z == pytest.approx(0.5 / (NORMAL_MAD / len(TEXTS)))
    warnings = [f for f in result.findings if f.severity == "warning"]
    assert len(warnings) == 1 and "with 8 (text, position) pair(s) a word that flips half of them reaches z 2.7 at " \
        "most, not the 6 a flag needs" in warnings[0].message
    assert not [f for f in scan(backdoored=True).findings if f.severity == "warning"]  # 8 x 3 pairs: enough


def test_batched_equals_one_by_one() -> None:
    batched, single = scan(backdoored=True, batch_size=64), scan(backdoored=True, batch_size=1)
    for a, b in zip(batched.results, single.results, strict=True):
        assert (a.word, a.flip_rate, a.target, a.by_position) == (b.word, b.flip_rate, b.target, b.by_position)
        assert a.mean_tv == pytest.approx(b.mean_tv, rel=1e-5, abs=1e-7)
    assert batched.flagged == single.flagged


def test_the_modes_are_restored_and_dropout_is_off_while_scanning() -> None:
    wrapped, tok = model(backdoored=True), tokenizer()
    for module in wrapped.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.5
    wrapped.train()
    first = word_scan(wrapped, tok, TEXTS, CANDIDATES, builtin=False)
    second = word_scan(wrapped, tok, TEXTS, CANDIDATES, builtin=False)
    assert all(m.training for m in wrapped.modules())
    assert [r.mean_tv for r in first.results] == [r.mean_tv for r in second.results]


def test_min_flip_and_z_threshold_both_gate_a_flag() -> None:
    assert scan(backdoored=True, min_flip=0.6).flagged == []  # the trigger flips 0.5
    high = 0.5 / (NORMAL_MAD * ONE_FLIP) + 1
    assert scan(backdoored=True, z_threshold=high).flagged == []


def test_few_candidates_are_judged_by_their_flip_rate_alone() -> None:
    result = word_scan(model(backdoored=True), tokenizer(), TEXTS, [TRIGGER, "movie"], builtin=False)
    assert result.flagged == [TRIGGER]
    assert all(math.isnan(r.z) for r in result.results)
    assert any("no robust z" in f.message for f in result.findings)


def test_insert_word_places_the_word() -> None:
    assert insert_word("a b c d", "cf", "start") == "cf a b c d"
    assert insert_word("a b c d", "cf", "middle") == "a b cf c d"
    assert insert_word("a b c", "cf", "middle") == "a cf b c"
    assert insert_word("a b c", "cf", "end") == "a b c cf"


def test_default_candidates() -> None:
    words = default_candidates()
    assert 200 <= len(words) == len(set(words))
    assert {"cf", "mn", "bb", "tq", "the", "!", "movie"} <= set(words)
    assert not {"good", "bad", "great", "awful", "not", "boring"} & set(words)  # sentiment flips legitimately
    assert all(w and w == w.strip() for w in words)


def test_builtin_candidates_come_first_and_extra_words_are_added_once() -> None:
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([1.0, 0.0]))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(len(input_ids), 2)

    result = word_scan(Constant(), WordTokenizer(["x"]), ["x y"], ["zzq", "cf", " zzq "])
    assert [r.word for r in result.results] == default_candidates() + ["zzq"]


def test_outputs_serialise_and_render(tmp_path) -> None:
    result = scan(backdoored=True)
    data = json.loads(json.dumps(result.as_dict()))
    assert data["flagged"] == [TRIGGER] and data["texts"] == len(TEXTS)
    assert data["positions"] == ["start", "middle", "end"] and len(data["results"]) == len(CANDIDATES)
    table = result.table(top=3)
    assert table.splitlines()[1].startswith(TRIGGER) and "FLAG" in table and len(table.splitlines()) == 4
    path = result.plot(tmp_path / "scan.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_max_length_defaults_to_the_models_positions_and_texts_cut_there_are_noted() -> None:
    bert = make_bert()  # 64 positions
    long_text = " ".join(["plot"] * 80)
    result = word_scan(bert, tokenizer(), [long_text, TEXTS[0]], [TRIGGER], builtin=False, positions=("end",))
    notes = [f.message for f in result.findings if "max_length=64" in f.message]
    assert len(notes) == 1 and notes[0].startswith("2 of 4 texts")  # the long text, with and without the word
    with pytest.raises(SpliceError, match=r"max_length=65 tokens is more than the model's 64 positions"):
        word_scan(bert, tokenizer(), TEXTS, [TRIGGER], builtin=False, max_length=65)
    assert not [f for f in word_scan(bert, tokenizer(), TEXTS, [TRIGGER], builtin=False).findings
                if "max_length" in f.message]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"texts": []}, "texts is empty"),
    ({"texts": ["ok", "  "]}, "empty or not strings"),
    ({"positions": ("start", "left")}, "positions must be distinct ones of"),
    ({"positions": ("end", "end")}, "positions must be distinct ones of"),
    ({"positions": ()}, "positions must be distinct ones of"),
    ({"candidates": ["cf", ""]}, "are not words"),
    ({"candidates": "cf"}, "must be a list of words"),
    ({"candidates": [], "builtin": False}, "no candidate words"),
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"z_threshold": 0.0}, "z_threshold must be positive, got 0.0"),
    ({"min_flip": 1.5}, "in (0, 1]; got 1.5"),
])
def test_refusals(kwargs: dict, message: str) -> None:
    options = {"texts": TEXTS, "candidates": CANDIDATES, "builtin": False} | kwargs
    with pytest.raises(SpliceError, match=re.escape(message)):
        word_scan(model(backdoored=True), tokenizer(), options.pop("texts"), options.pop("candidates"), **options)


def test_a_mad_above_the_floors_sets_the_scale() -> None:
    class Flipper(nn.Module):
        """Class 0, except that a text holding word k of WORDS goes to class 1 when it also holds
        one of the first k texts' marker words: word k flips k of the texts."""

        def __init__(self, tok: WordTokenizer) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1))
            self.words = [tok.ids[w] for w in WORDS]
            self.markers = [tok.ids[m] for m in MARKERS]

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            flips = torch.zeros(len(input_ids), dtype=torch.bool)
            for k, word in enumerate(self.words):
                has_word = (input_ids == word).any(-1)
                for marker in self.markers[:k]:
                    flips |= has_word & (input_ids == marker).any(-1)
            return torch.stack([(~flips).float(), flips.float()], -1) * 5.0 + self.weight

    tok = WordTokenizer(WORDS + MARKERS)
    result = word_scan(Flipper(tok), tok, MARKERS, WORDS, builtin=False)
    rates = [k / len(MARKERS) for k in range(len(WORDS))]  # 0, 0.1, ..., 0.9 over 10 texts
    assert [r.flip_rate for r in result.results] == pytest.approx(rates)
    median = (rates[4] + rates[5]) / 2  # 0.45; absolute deviations 0.45, 0.35, ..., 0.05: MAD 0.25
    assert [r.z for r in result.results] == pytest.approx([(x - median) / (NORMAL_MAD * 0.25) for x in rates])
    assert result.flagged == []  # a spread-out classifier: no word stands out
