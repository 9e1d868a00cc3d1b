"""Which rows of a task the model gets right, and which task an example belongs to when no task
id is given.

Correctness is per row, so the task-agnostic setting can answer each row through the task it
was routed to: a classification row counts as right only if it went to a task with its own
task's head (another head answers in another label space) and that head's class is its label; a generated
answer counts when it matches, whichever task's view produced it.

Routing by prototype (ConDU's rule, Gao et al. 2026; the default): features are the mean-pooled
last hidden states of the frozen pretrained model, L2-normalised; a classification task's
prototypes are its classes' normalised mean features, a generation task's one prototype its mean
feature; a row goes to the seen task whose best prototype is closest in cosine. Features depend only on the row and the
pretrained model, so they are computed once, before any training changes the weights. Routing
by confidence (classification; volume 2, §1's other rule for CoRe) sends a row to the seen task
whose own view and head predict it with the largest class probability.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from splice.assets import Row
from splice.continual.heads import TaskHeads, select
from splice.continual.strategies.base import TaskContext
from splice.core import progress
from splice.train import tasks as train_tasks


def eval_split(task: TaskContext, split: str) -> str:
    """The split the accuracy matrix reads for `task`: `split`, or validation where the data has
    no test rows (a file, whose validation rows are its own or a seeded 10% of it)."""
    return "validation" if split == "test" and not task.splits.test else split


def eval_rows(task: TaskContext, split: str) -> list[Row]:
    """The rows of the accuracy matrix for `task` (its `max_eval_examples` first rows of the split)."""
    rows = task.splits.test if eval_split(task, split) == "test" else task.splits.validation
    limit = task.config.max_eval_examples
    return rows[:limit] if limit else rows


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def confidence(model: nn.Module, task: TaskContext, rows: list[Row], heads: TaskHeads, head_of: str) -> torch.Tensor:
    """Per row, the largest class probability the model (as it is now) gives through task `head_of`'s head."""
    model.eval()
    select(model, heads, head_of)
    device = device_of(model)
    return torch.cat([model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits.float()
                      .softmax(-1).amax(-1).cpu()
                      for batch in DataLoader(rows, batch_size=task.config.batch_size, collate_fn=task.collate)])


@torch.no_grad()
def correct_rows(model: nn.Module, tokenizer, task: TaskContext, rows: list[Row],
                 heads: TaskHeads | None, head_of: str | None = None) -> torch.Tensor:
    """Per row, whether the model (as it is now) answers it right; classification through the
    head of task `head_of` (default: the row's own task)."""
    if not rows:
        return torch.zeros(0, dtype=torch.bool)
    model.eval()
    if task.config.task == "causal_lm":
        return torch.tensor(train_tasks.exact_match_hits(model, tokenizer, rows, task.config.batch_size))
    head = head_of or task.name
    select(model, heads, head)
    device, hits = device_of(model), []
    for batch in DataLoader(rows, batch_size=task.config.batch_size, collate_fn=task.collate):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        hits.append((logits.argmax(-1) == batch["labels"]).cpu() if heads.owner(head) == heads.owner(task.name)
                    else torch.zeros(len(batch["labels"]), dtype=torch.bool))
    return torch.cat(hits)


class Prototypes:
    """Each eval row's cosine score against every task (its best prototype), from the pretrained model."""

    def __init__(self, model: nn.Module, tokenizer, contexts: Sequence[TaskContext], split: str,
                 rows_per_task: int = 256) -> None:
        protos = [_prototypes(model, tokenizer, c, rows_per_task) for c in contexts]
        self.scores = []
        for context in progress.track(contexts, "prototype scores"):
            feats = features(model, tokenizer, context, eval_rows(context, split))
            self.scores.append(torch.stack([(feats @ p.T).amax(dim=1) for p in protos], dim=1))

    def choice(self, task: int, seen: int) -> torch.Tensor:
        """For each eval row of task `task`, the index of its closest task among the first `seen`."""
        return self.scores[task][:, :seen].argmax(dim=1)


def _prototypes(model: nn.Module, tokenizer, context: TaskContext, count: int) -> torch.Tensor:
    rows = context.splits.train[:count]
    feats = features(model, tokenizer, context, rows)
    if context.config.task == "causal_lm":
        return F.normalize(feats.mean(dim=0, keepdim=True), dim=-1)
    labels = torch.tensor([r["label"] for r in rows])
    return F.normalize(torch.stack([feats[labels == c].mean(dim=0) for c in labels.unique()]), dim=-1)


@torch.no_grad()
def features(model: nn.Module, tokenizer, context: TaskContext, rows: list[Row]) -> torch.Tensor:
    """Normalised mean-pooled last hidden states [rows, hidden] of the texts (prompts) of `rows`."""
    model.eval()
    key = "prompt" if context.config.task == "causal_lm" else "text"
    device, out = device_of(model), []
    for start in range(0, len(rows), context.config.batch_size):
        texts = [r[key] for r in rows[start : start + context.config.batch_size]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                           max_length=context.config.max_length, return_token_type_ids=False).to(device)
        hidden = _backbone(model)(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"][..., None].float()
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1).cpu())
    return torch.cat(out)


def _backbone(model: nn.Module) -> nn.Module:
    """The transformer under a task head (`model.base_model`: BERT's `bert`, a decoder's `model`)."""
    return getattr(model, "base_model", model)
