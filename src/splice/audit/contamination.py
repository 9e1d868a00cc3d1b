"""Contamination tests: was this adapter trained on this evaluation set?

Every item of a *suspect* set (the evaluation set) and of a *control* set (comparable items known
to be unseen) gets five scores from the model with the adapter, and two from its base model:

- perplexity: exp of the mean negative log-likelihood (NLL) of the answer's tokens given the prompt;
- Min-K% Prob (Shi et al. 2024, arXiv 2310.16789): the mean of the lowest k% of the answer's token
  log-probabilities. A seen text has few surprising tokens, and the surprising ones say more than
  the average does;
- CDD (Dong et al. 2024, "Generalization or Memorization", arXiv 2402.15938): the peakedness of the
  output distribution, the share of N temperature samples of a continuation of the prompt that lie
  within token edit distance alpha * L of the greedy continuation;
- the base model's perplexity and Min-K% (adapters off), and the calibrated score, adapter NLL minus
  base NLL: how much the adapter lowered the answer's loss. Raw perplexity mostly measures how hard
  an item is; the difference to the base takes that out (a reference model, as Carlini et al.'s
  zlib / reference ratios do for pretraining data).

Each score's AUROC at separating suspect from control items (higher = more likely trained on)
with a bootstrap 95% interval says whether the adapter treats the evaluation set as seen. No
Memorization, No Detection (Sela 2026, arXiv 2603.03203) found CDD near chance after LoRA
fine-tuning unless training reached verbatim memorisation, while perplexity and Min-K% Prob
detected contamination wherever anything did: a CDD near 0.5 does not clear an adapter.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from splice.audit.findings import Finding
from splice.audit.lm_io import (
    adapter_session,
    check_enabled,
    check_fits,
    device_of,
    eos_ids,
    generate_greedy,
    padded,
    position_limit,
)
from splice.core import progress
from splice.core.api import disabled
from splice.core.errors import SpliceError
from splice.io.figures import pyplot, save_png

Item = tuple[str, str] | str

# Score name -> (sign that makes "higher = more likely trained on", what it is).
SCORES: dict[str, tuple[int, str]] = {
    "perplexity": (-1, "answer perplexity with the adapter"),
    "min_k": (1, "Min-K% Prob with the adapter"),
    "cdd": (1, "CDD peakedness with the adapter"),
    "base_perplexity": (-1, "answer perplexity of the base model"),
    "base_min_k": (1, "Min-K% Prob of the base model"),
    "calibrated": (-1, "adapter NLL - base NLL"),
}
# Scores of the base model alone: they separate the sets only if the sets differ for the base.
BASE_SCORES = ("base_perplexity", "base_min_k")
# CDD continues each prompt for as many tokens as its answer has, at most this many: the
# distance of every sample to the greedy output costs O(L^2) in Python, and the first tokens of a
# memorised answer already show whether the samples collapse onto it.
MAX_NEW_TOKENS = 128
MIN_ITEMS = 20  # per set, for a flag: under no contamination the rule fires on 4% of 5 vs 5 draws, per score
CDD_NOTE = ("CDD is unreliable after PEFT fine-tuning: No Memorization, No Detection (arXiv 2603.03203) found it "
            "near chance for LoRA-contaminated models unless training reached verbatim memorisation, while "
            "perplexity and Min-K% Prob detected contamination wherever anything did. A CDD AUROC near 0.5 "
            "alone does not clear an adapter.")


@dataclass
class ItemScores:
    """The scores of one item (module docstring); `calibrated` is adapter NLL - base NLL per
    answer token, negative where the adapter made the answer more likely."""

    perplexity: float
    min_k: float
    cdd: float
    base_perplexity: float
    base_min_k: float
    calibrated: float


@dataclass
class ContaminationTest:
    """The scores of both sets, each score's AUROC (suspect vs control, higher = the suspect set
    looks more trained on) with its bootstrap 95% interval, and the findings."""

    suspect: list[ItemScores]
    control: list[ItemScores]
    auroc: dict[str, float]
    interval: dict[str, tuple[float, float]]
    findings: list[Finding]

    def as_dict(self) -> dict[str, Any]:
        return {
            "suspect": [asdict(s) for s in self.suspect],
            "control": [asdict(s) for s in self.control],
            "auroc": dict(self.auroc),
            "interval": {name: list(bounds) for name, bounds in self.interval.items()},
            "findings": [f.as_dict() for f in self.findings],
        }

    def table(self) -> str:
        """One line per score: AUROC, its interval and the median score of each set; then the findings."""
        lines = [f"{'score':<16}{'AUROC':>7}  {'95% interval':<14}{'suspect':>10}{'control':>10}  meaning"]
        for name, (_, meaning) in SCORES.items():
            low, high = self.interval[name]
            lines.append(f"{name:<16}{self.auroc[name]:>7.3f}  {low:.3f}-{high:.3f}   "
                         f"{_median(self.suspect, name):>10.4g}{_median(self.control, name):>10.4g}  {meaning}")
        lines += [f"{f.severity:<8}{f.subject}: {f.message}" for f in self.findings]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """ROC curves of every score (suspect items as positives), one panel each, as a PNG."""
        roc_curve = _sklearn_metrics().roc_curve
        plt = pyplot()
        fig, axes = plt.subplots(2, 3, figsize=(11, 7))
        for ax, name in zip(axes.flat, SCORES, strict=True):
            labels, values = _labelled(self.suspect, self.control, name)
            false_pos, true_pos, _ = roc_curve(labels, values)
            ax.plot(false_pos, true_pos)
            ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
            ax.set(title=f"{name}: AUROC {self.auroc[name]:.2f}", xlabel="control flagged", ylabel="suspect flagged")
        fig.tight_layout()
        return save_png(fig, path)


def min_k_prob(token_logprobs: torch.Tensor, k: float) -> float:
    """Min-K% Prob: the mean of the lowest `k` share of the token log-probs, at least one of them
    (as Shi et al.'s code: the count is rounded down)."""
    _check_k(k)
    if token_logprobs.dim() != 1 or token_logprobs.numel() == 0:
        raise SpliceError("min_k_prob needs a non-empty 1-D tensor of log-probs, got shape "
                          f"{tuple(token_logprobs.shape)}")
    count = max(1, int(k * token_logprobs.numel() + 1e-9))  # 1e-9: 0.29 * 100 is 29, not 28.99...
    return token_logprobs.double().sort().values[:count].mean().item()


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token id sequences (insertions, deletions, substitutions).

    Written here because no well-kept dependency of ours has it for lists of ints: the common
    packages (python-Levenshtein, rapidfuzz) would be a new dependency for eight lines.
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, token in enumerate(a, 1):
        current = [i]
        for j, other in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (token != other)))
        previous = current
    return previous[-1]


def cdd_peakedness(greedy: list[int], samples: list[list[int]], alpha: float) -> float:
    """The share of `samples` within edit distance alpha * L of the `greedy` output, L the length
    of the longest output (greedy included), as Dong et al.'s reference code; higher = more peaked."""
    if not samples:
        raise SpliceError("cdd_peakedness needs at least one sample")
    longest = max(len(s) for s in [greedy, *samples])
    return sum(edit_distance(greedy, s) <= alpha * longest for s in samples) / len(samples)


def item_scores(
    model: nn.Module, tokenizer: Any, items: Sequence[Item], *, adapter: str | None = None, k: float = 0.2,
    cdd_samples: int = 20, cdd_temperature: float = 0.8, cdd_alpha: float = 0.05, new_tokens: int | None = None,
    batch_size: int = 8, seed: int = 0,
) -> list[ItemScores]:
    """The scores of every item (module docstring) for a causal LM.

    An item is a (prompt, answer) pair, scored on the answer's tokens given the prompt, or a
    plain string, scored on all its tokens after the first (its CDD continues that first token
    alone, so it says little: prefer pairs). The tokenizer is called as `tokenizer(text,
    add_special_tokens=...)["input_ids"]`: the prompt (or string) with special tokens (a BOS),
    the answer without. `adapter` is made the only active adapter for the duration (None: the
    adapters active now); the base scores are computed with every adapter off. Active adapters,
    `requires_grad` flags and every submodule's train/eval mode are as before afterwards.
    Refused (SpliceError): a call inside `splice.disabled(model)` (the adapter's scores would be
    the base's), and an item (with its CDD continuation) longer than the model's positions.

    CDD samples `cdd_samples` continuations at `cdd_temperature` plus the greedy one, each
    `new_tokens` long (default: the answer's length in tokens, at most MAX_NEW_TOKENS), cut at
    the model's EOS. Each item draws from its own generator, seeded from `seed` and its prompt,
    so its samples are the same whatever the batch it is in.
    """
    return _item_scores(model, tokenizer, items, "items", adapter=adapter, k=k, cdd_samples=cdd_samples,
                        cdd_temperature=cdd_temperature, cdd_alpha=cdd_alpha, new_tokens=new_tokens,
                        batch_size=batch_size, seed=seed)


def _item_scores(
    model: nn.Module, tokenizer: Any, items: Sequence[Item], name: str, *, adapter: str | None, k: float,
    cdd_samples: int, cdd_temperature: float, cdd_alpha: float, new_tokens: int | None, batch_size: int, seed: int,
) -> list[ItemScores]:
    """`item_scores`, its errors naming the items as `name` (the caller's argument)."""
    _check_settings(k, cdd_samples, cdd_temperature, cdd_alpha, new_tokens, batch_size)
    check_enabled(model, "item_scores", "the adapter's scores would be the base's (calibrated 0 for every item)")
    encoded = _encode_all(tokenizer, items, name)
    _check_lengths(model, encoded, name, new_tokens)
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    scores: list[ItemScores] = []
    with adapter_session(model, adapter):
        for batch in progress.track(batches, "contamination scores"):
            logprobs = _answer_logprobs(model, batch)
            _check_finite(logprobs, name, len(scores), "with the adapter")
            with disabled(model):
                base = _answer_logprobs(model, batch)
            _check_finite(base, name, len(scores), "of the base model (every adapter off)")
            cdd = _cdd_scores(model, tokenizer, batch, cdd_samples, cdd_temperature, cdd_alpha, new_tokens, seed)
            scores += [_scores_of(*scored, k) for scored in zip(logprobs, base, cdd, strict=True)]
    return scores


def contamination_test(
    model: nn.Module, tokenizer: Any, suspect: Sequence[Item], control: Sequence[Item], *,
    adapter: str | None = None, k: float = 0.2, cdd_samples: int = 20, cdd_temperature: float = 0.8,
    cdd_alpha: float = 0.05, new_tokens: int | None = None, batch_size: int = 8, auroc_threshold: float = 0.65,
    bootstrap: int = 1000, seed: int = 0,
) -> ContaminationTest:
    """Whether the adapter was trained on the `suspect` items, judged against `control` items
    (comparable ones it never saw): each score's AUROC at telling them apart (`item_scores` for
    the scores and the other arguments), with a percentile 95% interval from `bootstrap`
    resamples of both sets (seeded by `seed`).

    With at least MIN_ITEMS (20) items in each set (fewer: a warning, nothing flagged), an adapter
    score whose AUROC is at least `auroc_threshold` with an interval above 0.5 is a flag; a
    base-model score that does so is a warning that the control set is not comparable
    (the adapter's raw scores are confounded; the calibrated one is not). A note on CDD's
    weakness after PEFT is always added.
    """
    _check_probability("auroc_threshold", auroc_threshold)
    _check_positive("bootstrap", bootstrap)
    for name, items in (("suspect", suspect), ("control", control)):
        _encode_all(tokenizer, items, name)  # refuse a bad item before any scoring
    settings = dict(adapter=adapter, k=k, cdd_samples=cdd_samples, cdd_temperature=cdd_temperature,
                    cdd_alpha=cdd_alpha, new_tokens=new_tokens, batch_size=batch_size, seed=seed)
    seen = _item_scores(model, tokenizer, suspect, "suspect", **settings)
    unseen = _item_scores(model, tokenizer, control, "control", **settings)
    auroc, interval = {}, {}
    for name in SCORES:
        labels, values = _labelled(seen, unseen, name)
        auroc[name] = float(_sklearn_metrics().roc_auc_score(labels, values))
        interval[name] = _bootstrap_interval(values[labels == 1], values[labels == 0], bootstrap, seed)
    findings = _findings(auroc, interval, auroc_threshold, len(seen), len(unseen))
    return ContaminationTest(seen, unseen, auroc, interval, findings)


def _scores_of(logprobs: torch.Tensor, base: torch.Tensor, cdd: float, k: float) -> ItemScores:
    nll, base_nll = -logprobs.double().mean().item(), -base.double().mean().item()
    return ItemScores(perplexity=math.exp(nll), min_k=min_k_prob(logprobs, k), cdd=cdd,
                      base_perplexity=math.exp(base_nll), base_min_k=min_k_prob(base, k), calibrated=nll - base_nll)


def _check_finite(logprobs: list[torch.Tensor], name: str, first: int, which: str) -> None:
    """Refuse a NaN or infinite answer log-prob: every score of the item would be NaN or inf, and
    the AUROC over them meaningless."""
    bad = [first + i for i, row in enumerate(logprobs) if not torch.isfinite(row).all()]
    if bad:
        raise SpliceError(f"item_scores: the answer log-probs {which} are not finite (NaN or inf) for {name}[{bad[0]}]"
                          + (f" and {len(bad) - 1} more item(s)" if len(bad) > 1 else "")
                          + ": the adapter or the model overflows or holds NaN (a corrupted file?); nothing can be "
                          "scored")


def _check_lengths(model: nn.Module, encoded: list[tuple[list[int], list[int]]], name: str,
                   new_tokens: int | None) -> None:
    """Refuse an item longer than the model's positions: scored, prompt + answer; continued for
    CDD, prompt + `new_tokens` (default: at most the answer's length, covered by the first)."""
    needs = [(f"{name}[{i}] (prompt {len(prompt)} + answer {len(answer)} tokens)", len(prompt) + len(answer))
             for i, (prompt, answer) in enumerate(encoded)]
    if new_tokens is not None:
        needs += [(f"{name}[{i}] (prompt {len(prompt)} tokens) continued by new_tokens={new_tokens}",
                   len(prompt) + new_tokens) for i, (prompt, _) in enumerate(encoded)]
    check_fits(model, needs, "item_scores")


def _encode_all(tokenizer: Any, items: Sequence[Item], name: str) -> list[tuple[list[int], list[int]]]:
    if isinstance(items, str | tuple) or not isinstance(items, Sequence):
        raise SpliceError(f"{name} must be a list of items (strings or (prompt, answer) pairs), got "
                          f"{type(items).__name__}")
    if not items:
        raise SpliceError(f"{name} is empty: a contamination test needs items to score")
    return [_encode(tokenizer, item, f"{name}[{i}]") for i, item in enumerate(items)]


def _encode(tokenizer: Any, item: Item, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one item: the answer is what is scored, given the prompt."""
    if isinstance(item, str):
        ids = list(tokenizer(item, add_special_tokens=True)["input_ids"])
        prompt, answer = ids[:1], ids[1:]
    elif isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(part, str) for part in item):
        prompt = list(tokenizer(item[0], add_special_tokens=True)["input_ids"])
        answer = list(tokenizer(item[1], add_special_tokens=False)["input_ids"])
    else:
        raise SpliceError(f"{where} must be a string or a (prompt, answer) pair of strings, got "
                          f"{type(item).__name__} {item!r:.80}")
    if not prompt or not answer:
        raise SpliceError(f"{where} {item!r:.80} has no token to score: a string needs two tokens or more, a pair "
                          "a prompt and an answer of one token or more")
    return prompt, answer


def _answer_logprobs(model: nn.Module, batch: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """The log-prob of each answer token given everything before it, one right-padded forward
    pass for the batch (padding comes after every scored token, so it changes none)."""
    device = device_of(model)
    ids, mask = padded([prompt + answer for prompt, answer in batch], 0, left=False, device=device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    found = []
    for row, (prompt, answer) in enumerate(batch):
        predicted = logits[row, len(prompt) - 1 : len(prompt) - 1 + len(answer)].float().log_softmax(-1)
        found.append(predicted.gather(-1, torch.tensor(answer, device=device)[:, None])[:, 0].cpu())
    return found


def _cdd_scores(model: nn.Module, tokenizer: Any, batch: list[tuple[list[int], list[int]]], samples: int,
                temperature: float, alpha: float, new_tokens: int | None, seed: int) -> list[float]:
    """Each item's CDD peakedness. The batch is continued together where its longest prompt and
    longest continuation fit in the model's positions together, else item by item (each fits on
    its own, `_check_lengths`); an item's samples are the same either way (its own generator)."""
    lengths = [new_tokens or min(len(answer), MAX_NEW_TOKENS) for _, answer in batch]
    prompts = [prompt for prompt, _ in batch]
    limit = position_limit(model)
    together = limit is None or max(map(len, prompts)) + max(lengths) <= limit
    groups = [list(range(len(batch)))] if together else [[i] for i in range(len(batch))]
    outputs: dict[int, list[list[int]]] = {}
    for group in groups:
        found = _continuations(model, tokenizer, [prompts[i] for i in group], samples, temperature,
                               max(lengths[i] for i in group), seed)
        outputs.update(zip(group, found, strict=True))
    return [cdd_peakedness(outputs[i][0][:length], [row[:length] for row in outputs[i][1:]], alpha)
            for i, length in enumerate(lengths)]


class _Sampler:
    """A logits processor for greedy `generate` that samples most rows itself.

    The batch holds each prompt `rows` times: the first row of each is left to greedy decoding,
    the others get a token drawn at `temperature` from the prompt's own generator (every other
    logit set to -inf, so greedy decoding picks it). `generate` samples from one global random
    stream for the whole batch, which would make an item's samples depend on its batch."""

    def __init__(self, generators: list[torch.Generator], rows: int, temperature: float) -> None:
        self.generators, self.rows, self.temperature = generators, rows, temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for i, generator in enumerate(self.generators):
            sampled = slice(i * self.rows + 1, (i + 1) * self.rows)
            probs = (scores[sampled].float() / self.temperature).softmax(-1)
            picks = torch.multinomial(probs, 1, generator=generator)
            scores[sampled] = torch.full_like(scores[sampled], -math.inf).scatter_(-1, picks, 0.0)
        return scores


def _continuations(model: nn.Module, tokenizer: Any, prompts: list[list[int]], samples: int, temperature: float,
                   new_tokens: int, seed: int) -> list[list[list[int]]]:
    """For each prompt, its greedy continuation then `samples` sampled ones, each cut at EOS.

    Decoding is greedy whatever the model's generation config says (`lm_io.GREEDY`); the sampled
    rows get their tokens from `_Sampler`."""
    from transformers import LogitsProcessorList

    device, rows = device_of(model), samples + 1
    eos = eos_ids(model)
    pad = next((i for i in (getattr(tokenizer, "pad_token_id", None), *sorted(eos)) if i is not None), 0)
    ids, mask = padded([prompt for prompt in prompts for _ in range(rows)], pad, left=True, device=device)
    sampler = _Sampler([_generator(seed, prompt, device) for prompt in prompts], rows, temperature)
    new = generate_greedy(model, ids, mask, new_tokens, pad, logits_processor=LogitsProcessorList([sampler])).tolist()
    return [[_until(new[i * rows + j], eos) for j in range(rows)] for i in range(len(prompts))]


def _until(tokens: list[int], eos: set[int]) -> list[int]:
    return next((tokens[:i] for i, token in enumerate(tokens) if token in eos), tokens)


def _generator(seed: int, prompt: list[int], device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(json.dumps([seed, prompt]).encode()))


def _labelled(suspect: list[ItemScores], control: list[ItemScores], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels (1 = suspect) and score values signed so that higher = more likely trained on."""
    sign = SCORES[name][0]
    values = np.array([sign * getattr(s, name) for s in [*suspect, *control]], dtype=float)
    return np.r_[np.ones(len(suspect)), np.zeros(len(control))], values


def _bootstrap_interval(suspect: np.ndarray, control: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile 95% interval of the AUROC over resamples (with replacement) of each set.

    The AUROC is the share of (suspect, control) pairs the score orders right, ties counting
    half (the Mann-Whitney form of what `roc_auc_score` computes). A resample only weights the
    pairs by how often each item was drawn, so all resamples are two matrix products; calling
    `roc_auc_score` a thousand times per score costs seconds (about 2 ms a call). Every score
    uses the same resamples (one seed), so their intervals are comparable.
    """
    pairs = (suspect[:, None] > control[None, :]) + 0.5 * (suspect[:, None] == control[None, :])
    rng = np.random.default_rng(seed)
    drawn_suspect = rng.multinomial(len(suspect), np.full(len(suspect), 1 / len(suspect)), size=resamples)
    drawn_control = rng.multinomial(len(control), np.full(len(control), 1 / len(control)), size=resamples)
    aurocs = ((drawn_suspect @ pairs) * drawn_control).sum(1) / (len(suspect) * len(control))
    low, high = np.quantile(aurocs, [0.025, 0.975])
    return float(low), float(high)


def _findings(auroc: dict[str, float], interval: dict[str, tuple[float, float]], threshold: float,
              suspect: int, control: int) -> list[Finding]:
    found = [Finding("contamination", "note", "auroc", f"{suspect} suspect vs {control} control items, AUROC "
                     "(95% interval): " + ", ".join(f"{name} {value:.2f} ({interval[name][0]:.2f}-"
                                                   f"{interval[name][1]:.2f})" for name, value in auroc.items()))]
    if min(suspect, control) < MIN_ITEMS:
        found.append(Finding("contamination", "warning", "items", f"too few items to judge: {suspect} suspect vs "
                             f"{control} control (at least {MIN_ITEMS} each): on so few an AUROC and its bootstrap "
                             "interval clear the flag rule by chance (1 vs 1: half the time), so nothing is "
                             "flagged; give more items"))
        found.append(Finding("contamination", "note", "cdd", CDD_NOTE))
        return found
    for name, value in auroc.items():
        low, high = interval[name]
        if value < threshold or low <= 0.5:
            continue
        evidence = (f"{name} AUROC {value:.3f} (95% interval {low:.3f}-{high:.3f}; {suspect} suspect vs {control} "
                    f"control items) >= {threshold}")
        if name in BASE_SCORES:
            found.append(Finding("contamination", "warning", name, f"the base model alone separates the sets: "
                                 f"{evidence}. The control items are not comparable with the suspect ones (or the "
                                 "base model saw the suspect set): the adapter's raw scores are confounded, trust "
                                 "the calibrated score"))
        else:
            found.append(Finding("contamination", "flag", name, f"the adapter treats the suspect set as seen: "
                                 f"{evidence}. Evidence that it was trained on the suspect set"))
    found.append(Finding("contamination", "note", "cdd", CDD_NOTE))
    return found


def _median(scores: list[ItemScores], name: str) -> float:
    return float(np.median([getattr(s, name) for s in scores]))


def _check_settings(k: float, samples: int, temperature: float, alpha: float, new_tokens: int | None,
                    batch_size: int) -> None:
    _check_k(k)
    _check_probability("cdd_alpha", alpha)
    _check_positive("cdd_samples", samples)
    _check_positive("batch_size", batch_size)
    if new_tokens is not None:
        _check_positive("new_tokens", new_tokens)
    if not temperature > 0:
        raise SpliceError(f"cdd_temperature must be > 0, got {temperature!r}")


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpliceError(f"{name} must be a positive integer, got {value!r}")


def _check_k(k: float) -> None:
    if not 0 < k <= 1:
        raise SpliceError(f"k (the share of lowest token log-probs Min-K% averages) must be in (0, 1], got {k!r}")


def _check_probability(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise SpliceError(f"{name} must be in [0, 1], got {value!r}")


def _sklearn_metrics() -> Any:
    """`sklearn.metrics`, imported on first use (scikit-learn comes with the `audit` extra)."""
    try:
        from sklearn import metrics
    except ImportError as err:
        raise ImportError("contamination tests need scikit-learn: pip install 'splice[audit]'") from err
    return metrics
