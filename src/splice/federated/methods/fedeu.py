"""FedEU (Zhang et al., arXiv 2603.07468): evidential-uncertainty federated PEFT. Each client
trains its classification head as an evidential model (Sensoy et al. 2018) and reports how
uncertain it remains on its own training rows; the server trusts confident clients more.

Evidential deep learning reads the K logits of a row as evidence for a Dirichlet over the class
probabilities:

    e = softplus(logits),   α = e + 1,   S = Σ_k α_k,   u = K / S ∈ (0, 1]

(u = 1: no evidence at all). A client trains with the EDL loss

    L = Σ_k y_k (ψ(S) − ψ(α_k)) + λ_t KL(Dir(α̃) ‖ Dir(1)),   α̃ = y + (1 − y) ⊙ α,

the expected cross-entropy under Dir(α) plus a penalty on evidence for the wrong classes,
annealed over rounds: λ_t = kl_weight · min(1, t / anneal_rounds). After local training it
reports U_c, the mean u over the top_k fraction of its most uncertain training rows (at most
`uncertainty_rows` of them, a no-grad pass). The server's top-k uncertainty-guided weighting
(TUW) weighs client c's upload by

    w_c = n_c · exp(−(U_c − min_j U_j) / T)      ("exp", the default)   or   n_c / U_c ("inverse"),

normalised by the aggregation rule; subtracting min_j U_j changes nothing after normalisation
and makes equal uncertainties give FedAvg's sample-count weights exactly. A client whose labels
are noise cannot gather evidence on its own rows, so its U_c is high and its weight small.

The spec's formulas are inferred (abstract only; standard EDL), and the paper's segmentation
pixels are rows of a classification task here; its client-specific feature embedding (CFE) is
not implemented. Prediction stays the argmax of the logits, which is the argmax of α (softplus
is monotone), so evaluation and accuracy are computed as for any classifier; the reported
evaluation loss remains the cross-entropy of the logits.

Options: `kl_weight` (1.0), `anneal_rounds` (10), `top_k` (0.2), `uncertainty_rows` (256),
`temperature` (0.1), `weighting` ("exp" or "inverse").
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from splice.assets import Row
from splice.core.errors import ConfigError, SpliceError
from splice.federated.methods.base import FederatedMethod, Objective
from splice.train.data import collator

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from splice.federated.client import LocalRun
    from splice.federated.config import FederatedConfig

UNCERTAINTY = "uncertainty"  # the train metric a client reports and the server weighs by
WEIGHTINGS = ("exp", "inverse")


# -- evidential deep learning ----------------------------------------------------------------------

def dirichlet(logits: torch.Tensor) -> torch.Tensor:
    """α = softplus(logits) + 1 (in float32, or the logits' wider dtype): each row's Dirichlet parameters."""
    return F.softplus(logits.to(torch.promote_types(logits.dtype, torch.float32))) + 1.0


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Per row, u = K / S with S = Σ_k α_k and α = softplus(logits) + 1: in (0, 1] for finite
    logits, 1 exactly when there is no evidence (every logit very negative, softplus = 0), and
    smaller the more evidence the row gathers. `logits`: (..., K); the result: (...)."""
    alpha = dirichlet(logits)
    return logits.shape[-1] / alpha.sum(-1)


def kl_to_uniform(alpha: torch.Tensor) -> torch.Tensor:
    """KL(Dir(α) ‖ Dir(1)) per row, in closed form:

        log Γ(S) − Σ_k log Γ(α_k) − log Γ(K) + Σ_k (α_k − 1)(ψ(α_k) − ψ(S)),   S = Σ_k α_k.

    Zero when α = 1 (no evidence); the EDL loss applies it to the evidence of wrong classes."""
    strength = alpha.sum(-1)
    classes = alpha.shape[-1]
    return (torch.lgamma(strength) - torch.lgamma(alpha).sum(-1) - math.lgamma(classes)
            + ((alpha - 1.0) * (torch.digamma(alpha) - torch.digamma(strength).unsqueeze(-1))).sum(-1))


def evidential_loss(logits: torch.Tensor, labels: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """The EDL loss of Sensoy et al. (2018), mean over the batch:

        Σ_k y_k (ψ(S) − ψ(α_k)) + λ KL(Dir(α̃) ‖ Dir(1)),   α̃ = y + (1 − y) ⊙ α,

    with α = softplus(logits) + 1, y the one-hot labels and λ = `kl_weight`. The first term is
    the cross-entropy expected under Dir(α); the second removes evidence for the wrong classes
    (α̃ keeps only those; the true class is set to 1). `logits`: (B, K), `labels`: (B,) ints."""
    alpha = dirichlet(logits)
    onehot = F.one_hot(labels, alpha.shape[-1]).to(alpha.dtype)
    strength = alpha.sum(-1, keepdim=True)
    fit = (onehot * (torch.digamma(strength) - torch.digamma(alpha))).sum(-1)
    if kl_weight == 0:
        return fit.mean()
    wrong = onehot + (1.0 - onehot) * alpha
    return (fit + kl_weight * kl_to_uniform(wrong)).mean()


def annealed_kl_weight(kl_weight: float, server_round: int, anneal_rounds: int) -> float:
    """λ_t = kl_weight · min(1, t / anneal_rounds): the KL term grows in over the first rounds, so
    early training may gather evidence before wrong-class evidence is punished in full."""
    return kl_weight * min(1.0, server_round / anneal_rounds)


def top_k_mean(values: torch.Tensor, fraction: float) -> float:
    """The mean of the largest ceil(fraction · n) of `values` (at least one): U_c of a client
    from its rows' u, the uncertainty of its hardest rows rather than of all of them."""
    if values.numel() == 0:
        raise SpliceError("FedEU: a client's uncertainty needs at least one training row")
    k = max(1, math.ceil(fraction * values.numel()))
    return values.flatten().topk(k).values.mean().item()


def classification_objective(kl_weight: float) -> Objective:
    """A Trainer objective: the EDL loss of the model's logits with weight `kl_weight` on the KL."""
    def objective(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return evidential_loss(logits, batch["labels"], kl_weight)
    return objective


@torch.no_grad()
def row_uncertainties(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Row],
                      batch_size: int, max_length: int) -> torch.Tensor:
    """u of every row (classification rows), in eval mode on the model's device; the model's
    train/eval mode is restored afterwards (a client goes on training next round)."""
    device = next(model.parameters()).device
    loader = DataLoader(list(rows), batch_size=batch_size, collate_fn=collator("classification", tokenizer, max_length))
    was_training = model.training
    model.eval()
    try:
        values = []
        for batch in loader:
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            values.append(uncertainty(model(**inputs).logits).cpu())
    finally:
        model.train(was_training)
    return torch.cat(values) if values else torch.empty(0)


def uncertainty_weights(counts: Sequence[float], uncertainties: Sequence[float], temperature: float,
                        weighting: str = "exp") -> list[float]:
    """TUW's unnormalised weights: n_c · exp(−(U_c − min U) / T) ("exp") or n_c / U_c
    ("inverse"). With equal U_c, "exp" gives n_c exactly (a factor of exp(0) = 1): FedAvg."""
    if weighting == "inverse":
        return [float(n) / max(float(u), 1e-12) for n, u in zip(counts, uncertainties, strict=True)]
    low = min(uncertainties)
    return [float(n) * math.exp(-(float(u) - low) / temperature) for n, u in zip(counts, uncertainties, strict=True)]


# -- the method ---------------------------------------------------------------------------------------

class FedEU(FederatedMethod):
    """FedEU: EDL training at the clients, aggregation weighted by each client's top-k uncertainty."""

    name: ClassVar[str] = "fedeu"
    OPTIONS: ClassVar[dict[str, Any]] = {"kl_weight": 1.0, "anneal_rounds": 10, "top_k": 0.2,
                                         "uncertainty_rows": 256, "temperature": 0.1, "weighting": "exp"}
    sequences: ClassVar[bool] = False

    def check(self, config: FederatedConfig) -> None:
        if config.privacy is not None:
            raise ConfigError("FedEU weighs the uploads by uncertainty, and Flower's DP noise bounds an unweighted "
                              "mean: FedEU with privacy is not supported")
        if config.task != "classification":
            raise ConfigError(f"method fedeu trains an evidential classification head; task {config.task} has "
                              "none: use task: classification")
        if config.secure is not None:
            raise ConfigError("method fedeu weighs each upload by its client's uncertainty, but secure aggregation "
                              "runs Flower's legacy SecAgg+ workflow, which weighs by row counts only (and hides "
                              "each upload): drop secure or use another method")
        options = self.options
        _number(options, "kl_weight", lambda v: v >= 0, ">= 0")
        _number(options, "top_k", lambda v: 0 < v <= 1, "in (0, 1]")
        _number(options, "temperature", lambda v: v > 0, "> 0")
        _integer(options, "anneal_rounds", 1)
        _integer(options, "uncertainty_rows", 1)
        if options["weighting"] not in WEIGHTINGS:
            raise ConfigError(f"options.weighting must be one of {', '.join(WEIGHTINGS)}, got {options['weighting']!r}")

    def objective(self, run: LocalRun, server_round: int) -> Objective:
        """The EDL loss with this round's annealed KL weight."""
        return classification_objective(annealed_kl_weight(self.options["kl_weight"], server_round,
                                                           self.options["anneal_rounds"]))

    def train_metrics(self, run: LocalRun, client: int) -> dict[str, float]:
        """U_c after local training: the top-k mean u over (a seeded sample of at most
        `uncertainty_rows` of) the client's training rows."""
        return {UNCERTAINTY: top_k_mean(self.client_uncertainties(run, client), self.options["top_k"])}

    def client_uncertainties(self, run: LocalRun, client: int) -> torch.Tensor:
        """u of the rows client `client` is scored on (its first round's sample is its every round's)."""
        rows = run.shards.train[client]
        limit = self.options["uncertainty_rows"]
        if len(rows) > limit:
            picked = sorted(random.Random(run.config.seed + client).sample(range(len(rows)), limit))
            rows = [rows[i] for i in picked]
        config = run.train_config
        return row_uncertainties(run.model, run.tokenizer, rows, config.batch_size, config.max_length)

    def weights(self, metrics: Sequence[Mapping[str, float]]) -> list[float]:
        """n_c · exp(−(U_c − min U) / T), or n_c / U_c: confident clients weigh more."""
        missing = [i for i, m in enumerate(metrics) if UNCERTAINTY not in m]
        if missing:
            raise SpliceError(f"FedEU: upload {missing[0]} came without its client's {UNCERTAINTY!r} metric")
        return uncertainty_weights([m["num-examples"] for m in metrics], [m[UNCERTAINTY] for m in metrics],
                                   self.options["temperature"], self.options["weighting"])


def _number(options: Mapping[str, Any], key: str, ok: Callable[[float], bool], rule: str) -> None:
    """Refuse a non-number (bools too) or one that breaks `rule`."""
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
        raise ConfigError(f"options.{key} must be a number {rule}, got {value!r}")


def _integer(options: Mapping[str, Any], key: str, low: int) -> None:
    """Refuse a non-integer (bools too) or one below `low`."""
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"options.{key} must be an integer >= {low}, got {value!r}")
