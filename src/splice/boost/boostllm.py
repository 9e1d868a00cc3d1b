"""BoostLLM: gradient boosting whose weak learners are adapters of one frozen model (Wang, Chen,
Den, Chang, arXiv 2605.06117; volume-1 §4), for few-shot tables read as text.

    F_0(x)   = log of the training classes' frequencies (add-one smoothed): the prior
    round m: freeze every earlier adapter and head; attach a fresh LoRA θ_m and a zero head h_m
             f_m(x) = h_m(mean over the views v of H_θm(v(x)))   (views: the row's features as
                      sentences, and the path a decision tree takes for it)
             minimise CE(softmax(F_{m-1}(x) + η f_m(x)), y) over the training rows, keeping the
             state of lowest validation log-loss (step 0, where f_m = 0, included: a round that
             does not help leaves F as it was)
    predict: F_M = F_0 + η Σ_m f_m, every round's adapter in one routed pass per batch
             (`splice.route`: each row copied once per round and view), not M forwards

With a zero head, f_m starts at 0, so each round starts from the previous one's loss and fits the
functional gradient y - p_{m-1} through the additive logits: no reweighting of rows is needed.
`shrinkage` (η ≤ 1) and the per-round keeping of the best validation state are the
"stabilisation" the paper names.

The engine is model-agnostic: `encode(model, inputs) -> [rows, hidden]` turns one view's inputs
into representations (an LLM's pooled last hidden states, `splice.boost.tabular_llm`; a plain
MLP's hidden layer in the tests). The rounds run their own small loop rather than the trainer:
a round's batch is several views of each row plus the earlier rounds' logits, and its head
lives outside the model, which the trainer's one-text-per-row collation and its model-owned
heads do not express.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_cosine_schedule_with_warmup

import splice
from splice.core import progress
from splice.core.errors import SpliceError
from splice.core.validation import check_config_fields

Inputs = dict[str, torch.Tensor]  # one view of some rows: tensors whose first dimension is the row
Encode = Callable[[nn.Module, Inputs], torch.Tensor]


@dataclass
class BoostLLMSettings:
    """How the rounds train.

    Attributes:
        rounds: M, the most rounds (weak learners).
        shrinkage: η in (0, 1], the weight of each round's logits.
        r, alpha, targets, dropout: each round's LoRA (`splice.LoRA`'s fields).
        steps: optimizer steps per round.
        lr, head_lr: learning rates of the round's LoRA and of its head.
        batch_size: training rows per step (each with all its views).
        eval_every: steps between validation log-losses (and at the last step).
        max_grad_norm: gradient clipping (None: off).
        seed: seeds heads, row order and LoRA initialisation.
    """

    rounds: int = 3
    shrinkage: float = 0.5
    r: int = 8
    alpha: float = 16.0
    targets: str | list[str] = "all-linear"
    dropout: float = 0.0
    steps: int = 40
    lr: float = 1e-3
    head_lr: float = 1e-2
    batch_size: int = 8
    eval_every: int = 5
    max_grad_norm: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_config_fields(self, SpliceError)
        problems = [f"{name} must be >= 1, got {value}" for name, value in
                    (("rounds", self.rounds), ("r", self.r), ("steps", self.steps), ("batch_size", self.batch_size),
                     ("eval_every", self.eval_every)) if value < 1]
        if not 0.0 < self.shrinkage <= 1.0:
            problems.append(f"shrinkage must be in (0, 1], got {self.shrinkage}")
        problems += [f"{name} must be >= 0, got {value}" for name, value in (("lr", self.lr), ("head_lr", self.head_lr))
                     if not value >= 0]
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if problems:
            raise SpliceError("boostllm: " + "; ".join(problems))


@dataclass
class LLMRound:
    """One round: its losses and how long it took."""

    round: int
    steps: int
    best_step: int  # the kept state's step (0: the round changed nothing)
    train_loss: float  # log-loss of F_m on the training rows
    validation_loss: float | None
    validation_accuracy: float | None
    seconds: float


@dataclass
class BoostLLMHistory:
    """Log-loss of F_0 and of every round, on the training and validation rows."""

    prior_train_loss: float
    prior_validation_loss: float | None
    rounds: list[LLMRound] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BoostLLM:
    """Boosting rounds of LoRA + head on `model` (frozen), over rows given as `views`.

    `views`: for each view, the inputs of every row of the table (first dimension: the row);
    rows are named by their index there. `labels`: every row's class (only the training and
    validation rows' are read). `encode(model, inputs)` gives [rows, hidden].
    """

    def __init__(self, model: nn.Module, encode: Encode, views: Sequence[Inputs], labels: Sequence[int],
                 classes: int, hidden: int, settings: BoostLLMSettings | None = None) -> None:
        if splice.adapters(model):
            raise SpliceError(f"BoostLLM attaches its own adapters, one a round; the model carries "
                              f"{sorted(splice.adapters(model))}")
        if not views:
            raise SpliceError("BoostLLM needs at least one view of the rows")
        sizes = {len(next(iter(v.values()))) for v in views}
        if len(sizes) != 1 or sizes != {len(labels)}:
            raise SpliceError(f"every view needs one input per row ({len(labels)} labels); views hold {sorted(sizes)}")
        self.model, self.encode, self.views = model, encode, list(views)
        self.labels = torch.as_tensor(list(labels))
        self.classes, self.hidden = classes, hidden
        self.settings = settings or BoostLLMSettings()
        self.heads = nn.ModuleList()
        self.prior = torch.zeros(classes)
        self.history: BoostLLMHistory | None = None
        self._rows: dict[str, list[int]] = {}
        self._logits: dict[str, torch.Tensor] = {}  # F of the training and validation rows so far
        for p in model.parameters():
            p.requires_grad_(False)

    @property
    def names(self) -> list[str]:
        """The rounds' adapter names, in order."""
        return [f"round{m}" for m in range(len(self.heads))]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- fitting --------------------------------------------------------------------------

    def fit(self, train: Sequence[int], validation: Sequence[int] = ()) -> BoostLLMHistory:
        """F_0 from the training labels, then `settings.rounds` rounds; the losses per round."""
        train, validation = list(train), list(validation)
        if not train:
            raise SpliceError("BoostLLM needs training rows")
        if self.heads:
            raise SpliceError("this BoostLLM is fitted already; add rounds with add_round()")
        counts = torch.bincount(self.labels[train], minlength=self.classes).double()
        self.prior = ((counts + 1) / (counts.sum() + self.classes)).log().float()
        self._rows = {"train": train, "validation": validation}
        self._logits = {split: self.prior.expand(len(rows), -1).clone() for split, rows in self._rows.items()}
        self.history = BoostLLMHistory(self._loss(self._logits["train"], train),
                                       self._loss(self._logits["validation"], validation) if validation else None)
        for _ in progress.track(range(self.settings.rounds), "boosting rounds"):
            self.add_round()
        return self.history

    def add_round(self) -> LLMRound:
        """One more round on the rows `fit` was given; its record (also in `history`)."""
        if self.history is None:
            raise SpliceError("fit() first: a round boosts on top of F_0 and the earlier rounds")
        record = self._round(self._rows["train"], self._rows["validation"], self._logits)
        self.history.rounds.append(record)
        return record

    def _round(self, train: list[int], validation: list[int], logits: dict[str, torch.Tensor]) -> LLMRound:
        """Round m: train adapter m and head m on top of `logits` (F_{m-1}), keep the state of
        lowest validation log-loss, freeze it, and add η f_m into `logits`."""
        s, m, started = self.settings, len(self.heads), time.perf_counter()
        name = f"round{m}"
        torch.manual_seed(s.seed * 1_000 + m)
        splice.attach(self.model, splice.LoRA(r=s.r, alpha=s.alpha, dropout=s.dropout, targets=s.targets), name)
        head = nn.Linear(self.hidden, self.classes).to(self.device)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.heads.append(head)
        lora = list(splice.trainable_parameters(self.model).values())
        optimizer = torch.optim.AdamW([{"params": lora, "lr": s.lr}, {"params": head.parameters(), "lr": s.head_lr}],
                                      weight_decay=0.0)
        # the trainer's warmup share; a round of a few steps gets none (a warmup starts at lr 0)
        schedule = get_cosine_schedule_with_warmup(optimizer, int(0.06 * s.steps), s.steps)
        trained = [*lora, *head.parameters()]
        try:
            best = (self._validation_loss(validation, logits["validation"], m), 0, _snapshot(trained))
            best = self._train_round(train, validation, logits, m, optimizer, schedule, trained, best)
        except Exception:  # a failed round leaves no half-trained adapter or head behind
            splice.detach(self.model, name)
            del self.heads[m]
            raise
        _restore(trained, best[2])
        splice.freeze(self.model, name)
        head.requires_grad_(False)
        for split, rows in (("train", train), ("validation", validation)):
            if rows:
                logits[split] += s.shrinkage * self._round_logits_no_grad(rows, m).cpu()
        accuracy = None
        if validation:
            accuracy = float((logits["validation"].argmax(-1) == self.labels[validation]).float().mean())
        return LLMRound(m, s.steps, best[1], self._loss(logits["train"], train),
                        self._loss(logits["validation"], validation) if validation else None, accuracy,
                        time.perf_counter() - started)

    def _train_round(self, train: list[int], validation: list[int], logits: dict[str, torch.Tensor], m: int,
                     optimizer: torch.optim.Optimizer, schedule: Any, trained: list[nn.Parameter],
                     best: tuple[float | None, int, list[torch.Tensor]]) -> tuple[float | None, int,
                                                                                 list[torch.Tensor]]:
        """Round m's steps; the kept state (lowest validation log-loss, else the last)."""
        s = self.settings
        order = _row_order(train, s.batch_size, s.steps, s.seed * 1_000 + m)
        position = {row: k for k, row in enumerate(train)}
        for step, rows in enumerate(order, start=1):
            self.model.train()
            index = torch.tensor([position[i] for i in rows])
            scores = logits["train"][index].to(self.device) + s.shrinkage * self.round_logits(rows, m)
            loss = F.cross_entropy(scores, self.labels[rows].to(self.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(trained, s.max_grad_norm)
                if not torch.isfinite(norm):
                    raise SpliceError(f"BoostLLM round {m}, step {step}: the gradient norm is {norm.item()}; lower "
                                      "lr or head_lr")
            if not torch.isfinite(loss):
                raise SpliceError(f"BoostLLM round {m}, step {step}: the loss is {loss.item()}; lower lr or head_lr")
            optimizer.step()
            schedule.step()
            if validation and (step % s.eval_every == 0 or step == s.steps):
                value = self._validation_loss(validation, logits["validation"], m)
                if value < best[0]:
                    best = (value, step, _snapshot(trained))
        if not validation:  # nothing to choose on: the last state
            best = (None, s.steps, _snapshot(trained))
        return best

    def _validation_loss(self, rows: list[int], prior: torch.Tensor, m: int) -> float | None:
        if not rows:
            return None
        scores = prior.to(self.device) + self.settings.shrinkage * self._round_logits_no_grad(rows, m)
        return self._loss(scores, rows)

    def _loss(self, scores: torch.Tensor, rows: list[int]) -> float:
        return float(F.cross_entropy(scores.float().cpu(), self.labels[rows]))

    # -- logits -----------------------------------------------------------------------------

    def round_logits(self, rows: Sequence[int], m: int) -> torch.Tensor:
        """f_m of `rows` [rows, classes]: round m's adapter alone active, its head on the mean of
        the views' representations (with gradients when its parameters train)."""
        splice.activate(self.model, f"round{m}")
        hidden = torch.stack([self.encode(self.model, _take(view, rows, self.device)) for view in self.views])
        return self.heads[m](hidden.mean(dim=0))

    @torch.no_grad()
    def _round_logits_no_grad(self, rows: Sequence[int], m: int) -> torch.Tensor:
        self.model.eval()
        return torch.cat([self.round_logits(chunk, m) for chunk in _chunks(list(rows), self.settings.batch_size)])

    @torch.no_grad()
    def predict_logits(self, rows: Sequence[int], batch_size: int | None = None) -> torch.Tensor:
        """F_M of `rows` [rows, classes] = F_0 + η Σ_m f_m, all rounds in one routed pass per
        batch: each view of each row once per round, row copies routed to that round's adapter."""
        self.model.eval()
        rounds, out = self.names, []
        for chunk in _chunks(list(rows), batch_size or self.settings.batch_size):
            copies = [_take(view, chunk, self.device) for _ in rounds for view in self.views]
            ids = [name for name in rounds for _ in self.views for _ in chunk]
            with splice.route(self.model, ids):
                hidden = self.encode(self.model, _concat(copies))
            hidden = hidden.view(len(rounds), len(self.views), len(chunk), -1).mean(dim=1)
            total = self.prior.to(self.device).expand(len(chunk), -1).clone()
            for m, head in enumerate(self.heads):
                total += self.settings.shrinkage * head(hidden[m])
            out.append(total.cpu())
        return torch.cat(out) if out else torch.zeros(0, self.classes)

    def predict_proba(self, rows: Sequence[int]) -> torch.Tensor:
        return self.predict_logits(rows).softmax(dim=-1)


def _row_order(rows: list[int], batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of `rows`: seeded shuffles, one after another (a batch may span two)."""
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        stream += [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
    size = min(batch_size, len(rows))
    return [stream[k * size:(k + 1) * size] for k in range(steps)]


def _chunks(rows: list[int], size: int) -> list[list[int]]:
    return [rows[start:start + size] for start in range(0, len(rows), size)]


def _take(view: Inputs, rows: Sequence[int], device: torch.device) -> Inputs:
    """`rows` of a view, on `device`; right-padded sequences cut to the longest of these rows (the
    view is padded to the table's longest row: a batch of short rows would compute its padding)."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    taken = {key: value[index] for key, value in view.items()}
    mask = taken.get("attention_mask")
    if mask is not None and mask.dim() == 2 and len(mask):
        width = max(1, int(mask.sum(1).max()))
        if bool(mask[:, width:].any()):  # not right-padded: keep every column
            width = mask.shape[1]
        taken = {key: value[:, :width] if value.dim() >= 2 and value.shape[1] == mask.shape[1] else value
                 for key, value in taken.items()}
    return {key: value.to(device) for key, value in taken.items()}


def _concat(parts: list[Inputs]) -> Inputs:
    """Inputs of several row sets as one batch; sequences of different lengths are right-padded
    with zeros (an attention mask of 0 there: the encoder pools over real tokens only)."""
    keys = parts[0].keys()
    out = {}
    for key in keys:
        tensors = [p[key] for p in parts]
        if tensors[0].dim() >= 2 and len({t.shape[1] for t in tensors}) > 1:
            width = max(t.shape[1] for t in tensors)
            tensors = [F.pad(t, (0, width - t.shape[1])) for t in tensors]
        out[key] = torch.cat(tensors)
    return out


def _snapshot(parameters: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parameters]


def _restore(parameters: list[nn.Parameter], state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, saved in zip(parameters, state, strict=True):
            p.copy_(saved)

