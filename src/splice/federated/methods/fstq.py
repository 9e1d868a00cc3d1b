"""FED-FSTQ (Li et al., arXiv 2604.25421): Fisher-guided token selection and mixed-precision
quantisation of the clients' uploads, with the server's rule unchanged (FedAvg).

Only the paper's abstract and a third-party summary were readable (spec: volume 1, section 11);
what a client uplinks is not stated there. This module makes the spec's option (i): the local
loss is restricted to the informative tokens, and the LoRA update is uploaded quantised at a
bit-width per row. Every choice below that the sources do not state is marked [inferred].

At a client, each round (causal LM):

    F_i   = ||dL/de_i||^2 * N^2                   the embedding-gradient hook of every training
                                                  backward (`token_fisher.FisherHook`); N the
                                                  batch's kept targets, so F is the sum-loss's
    s_v  <- beta s_v + (1 - beta) mean F(v)       EMA per vocabulary id v (`ema_update`)
    keep  = top ceil(rho n) targets of each sequence by s_{label}   (`topk_mask`)
    L     = the model's own loss on labels with the dropped targets set to -100

  [inferred] EMA across steps: one score per vocabulary id (positions differ from batch to
    batch; ids recur), the client's private state (kept between rounds, never uploaded). A
    target's mask comes from the EMA *before* its own batch (the hook fires in that batch's
    backward, after the loss was chosen): no second backward pass.
  [inferred] Attribution: target j (predicted from position j-1, the model shifts labels) is
    scored by F_{j-1}, the Fisher of the input that predicts it, and the observation updates
    the EMA of its id only when j was kept: a dropped target's F would measure other targets'
    loss, and its score would decay for having been dropped. An id never observed scores +inf
    (it is kept, so measured, once); ties go to the earlier position. Prompt and padding are
    never targets. `keep_ratio: 1.0` keeps every target: the model's own loss, bit for bit.
    The hook sees what the trainer backpropagates (auxiliary losses included; under fp16 loss
    scaling, scaled): scores compare within a run, not across precisions.
  [inferred] Classification has no tokens to drop: only `keep_ratio: 1.0` (the quantised
    uploads still apply).

Upload [inferred]: the update Delta = trained - received of every global tensor, cut into rows
along its longer side (LoRA: one row per rank component of A and of B), each row quantised
(symmetric by default: 0 is exact, scale max|x| / (2^(b-1) - 1), a float16 scale per row) at a
bit-width from `levels` (default 2, 4, 8). Bits go greedily where they remove the most squared
error of Delta (row importance n m^2, n values of range m; the token Fisher already chose what
Delta learned) within `mean_bits` code bits per value (default 4) or a `budget_bytes` cap. The
ArrayRecord holds one uint8 array, `fstq.payload`: the level map, the scales and the packed
codes; its size is `token_fisher.payload_bytes`, so Flower's message sizes (what
`history` counts) shrink with it. The server decodes received broadcast + dequantised Delta
and aggregates the states with the run's rule. Not exact at any level: the error of each value
is at most half its row's step (8 bits: max|x| / 254).

Refused [inferred]: `privacy` (Flower's DP wrappers clip and noise a reply's raw arrays, which
are packed bytes here) and `secure` (SecAgg+ sums raw arrays and runs Flower's legacy path,
which uploads whole tensors). `aggregation: exact` is allowed: it re-factors the mean of the
decoded B A, and decoding happens before aggregation.

Options: keep_ratio (0.3 for a causal LM, 1.0 otherwise), beta (0.9), mean_bits (4) or
budget_bytes (bytes of the payload; not with mean_bits), levels ([2, 4, 8]), quantizer
("symmetric" or "affine").
Metrics per client and round: fstq_kept_fraction (kept / completion targets), fstq_upload_bytes
(the payload), fstq_mean_bits (code bits per value), fstq_delta_error (||Delta_hat - Delta|| /
||Delta||).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from flwr.app import ArrayRecord

from splice.core.errors import ConfigError, SpliceError
from splice.federated import token_fisher as tf
from splice.federated.methods.base import FederatedMethod, Objective
from splice.train.data import IGNORE_INDEX

if TYPE_CHECKING:
    from splice.federated.client import LocalRun
    from splice.federated.config import FederatedConfig

PAYLOAD = "fstq.payload"
EMA = "fstq.token_ema"


class FedFSTQ(FederatedMethod):
    """FED-FSTQ: the loss on the Fisher-selected tokens, and uploads quantised to mixed bits."""

    name: ClassVar[str] = "fstq"
    OPTIONS: ClassVar[dict[str, Any]] = {"keep_ratio": 0.3, "beta": 0.9, "mean_bits": 4.0, "budget_bytes": None,
                                         "levels": [2, 4, 8], "quantizer": "symmetric"}
    sequences: ClassVar[bool] = False

    def check(self, config: FederatedConfig) -> None:
        options = self.options
        if config.privacy is not None:
            raise ConfigError("method fstq cannot run with privacy: Flower's DP wrappers clip and noise the raw "
                              "arrays of each reply, and fstq's reply is packed low-bit codes")
        if config.secure is not None:
            raise ConfigError("method fstq cannot run with secure: SecAgg+ sums the raw arrays of the replies (the "
                              "sum of packed codes means nothing) and its legacy path uploads whole tensors")
        if config.task != "causal_lm" and "keep_ratio" not in config.options:
            options["keep_ratio"] = 1.0  # no tokens to drop: the default keeps them all
        ratio = options["keep_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise ConfigError(f"options.keep_ratio must be in (0, 1], got {ratio!r}")
        if config.task != "causal_lm" and ratio != 1.0:
            raise ConfigError(f"options.keep_ratio {ratio} drops tokens from a causal LM's loss; a {config.task} "
                              "task has none to drop: use keep_ratio 1.0 (the uploads are still quantised)")
        beta = options["beta"]
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ConfigError(f"options.beta must be in [0, 1), got {beta!r}")
        try:
            self.levels = tf.check_levels(options["levels"])
        except SpliceError as err:
            raise ConfigError(f"options.{err}") from None
        self._check_budget(config)
        if options["quantizer"] not in ("symmetric", "affine"):
            raise ConfigError(f"options.quantizer must be symmetric or affine, got {options['quantizer']!r}")
        self.symmetric = options["quantizer"] == "symmetric"

    def _check_budget(self, config: FederatedConfig) -> None:
        budget, mean = self.options["budget_bytes"], self.options["mean_bits"]
        if budget is not None:
            if "mean_bits" in config.options:
                raise ConfigError("options: give mean_bits or budget_bytes, not both")
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise ConfigError(f"options.budget_bytes must be a positive integer, got {budget!r}")
        elif isinstance(mean, bool) or not isinstance(mean, (int, float)) or \
                not min(self.levels) <= mean <= max(self.levels):
            raise ConfigError(f"options.mean_bits must be a number in [{min(self.levels)}, {max(self.levels)}] "
                              f"(the levels), got {mean!r}")

    # -- at a client: the token objective --------------------------------------------------------

    def prepare(self, run: LocalRun) -> None:
        self.vocab_size = int(run.model.get_input_embeddings().num_embeddings) if run.config.task == "causal_lm" else 0
        self.ema: torch.Tensor | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.received: dict[str, torch.Tensor] | None = None
        self.kept = self.targets = 0
        if run.config.task == "causal_lm":
            self.hook = tf.FisherHook(run.model, self._observe)

    def objective(self, run: LocalRun, server_round: int) -> Objective | None:
        return self._token_loss if run.config.task == "causal_lm" else None

    def _token_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's loss on the kept targets: the top keep_ratio of each sequence's completion
        targets by their id's EMA score (the others' labels set to -100)."""
        labels = batch["labels"]
        valid = labels != IGNORE_INDEX
        valid[:, 0] = False  # position 0 is predicted by nothing (the model shifts labels)
        table = self._table(labels.device)
        keep = tf.topk_mask(tf.lookup(table, labels.clamp(min=0)), self.options["keep_ratio"], valid)
        self.kept += int(keep.sum())
        self.targets += int(valid.sum())
        self.pending = (labels, keep)
        # keep_ratio 1: only labels[:, 0] may change, which no position predicts: the plain loss, bit for bit
        return model(**{**batch, "labels": labels.masked_fill(~keep, IGNORE_INDEX)}).loss

    def _observe(self, scores: torch.Tensor) -> None:
        """The backward pass's F [B, L] into the EMA: target j's observation is F_{j-1} * N^2,
        for kept targets only (N: the batch's kept targets)."""
        if self.pending is None:
            return
        labels, keep = self.pending
        self.pending = None
        observed = scores[:, :-1] * float(keep.sum()) ** 2
        kept = keep[:, 1:]
        batch = tf.vocab_mean(labels[:, 1:][kept], observed[kept], self.vocab_size)
        self.ema = tf.ema_update(self._table(scores.device), batch, float(self.options["beta"]))

    def _table(self, device: torch.device) -> torch.Tensor:
        if self.ema is None:
            self.ema = torch.full((self.vocab_size,), float("nan"))
        return self.ema.to(device)

    def private_state(self, run: LocalRun) -> dict[str, torch.Tensor]:
        return {EMA: self.ema.detach().to("cpu", copy=True)} if self.ema is not None else {}

    def restore_private(self, run: LocalRun, state: Mapping[str, torch.Tensor] | None) -> None:
        """This client's EMA table (None: no token observed yet), and the received global tensors
        (the model holds them now) for the round's upload metrics."""
        self.ema = None if state is None or EMA not in state else state[EMA].detach().clone()
        self.received = run.state_of(run.GLOBAL)
        self.kept = self.targets = 0

    # -- at a client: the upload -----------------------------------------------------------------

    def encode(self, state: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]) -> tf.Encoded:
        """The update Delta = state - received as one packed payload."""
        delta = {name: state[name].float() - received[name].float() for name in state}
        budget = self.options["budget_bytes"]
        return tf.encode_delta(delta, levels=self.levels, symmetric=self.symmetric,
                               mean_bits=None if budget is not None else float(self.options["mean_bits"]),
                               budget_bytes=budget)

    def upload(self, run: LocalRun, state: dict[str, torch.Tensor], received: dict[str, torch.Tensor]) -> ArrayRecord:
        return ArrayRecord({PAYLOAD: self.encode(state, received).payload})

    def train_metrics(self, run: LocalRun, client: int) -> dict[str, float]:
        state = run.state_of(run.GLOBAL)
        received = self.received if self.received is not None else state
        encoded = self.encode(state, received)
        delta = {name: state[name].float() - received[name].float() for name in state}
        decoded = tf.decode_delta(encoded.payload, delta, levels=self.levels, symmetric=self.symmetric)
        error = sum(float((decoded[n] - delta[n]).pow(2).sum()) for n in delta) ** 0.5
        norm = sum(float(delta[n].pow(2).sum()) for n in delta) ** 0.5
        sizes = encoded.sizes.double()
        return {"fstq_kept_fraction": self.kept / self.targets if self.targets else 1.0,
                "fstq_upload_bytes": float(encoded.payload.numel()),
                "fstq_mean_bits": float((encoded.bits * sizes).sum() / sizes.sum()) if sizes.numel() else 0.0,
                "fstq_delta_error": error / norm if norm > 0 else 0.0}

    # -- at the server ---------------------------------------------------------------------------

    def decode(self, record: ArrayRecord, broadcast: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """received broadcast + the dequantised Delta, in the broadcast's dtypes."""
        if list(record.keys()) != [PAYLOAD]:
            raise SpliceError(f"an fstq upload holds one array {PAYLOAD!r}, got {list(record.keys())[:3]} (is every "
                              "client running method fstq?)")
        payload = torch.from_numpy(record[PAYLOAD].numpy().copy())
        delta = tf.decode_delta(payload, broadcast, levels=self.levels, symmetric=self.symmetric)
        return {name: (broadcast[name].float() + delta[name]).to(broadcast[name].dtype) for name in broadcast}
