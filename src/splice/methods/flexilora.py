"""Flexi-LoRA: nested LoRA ranks with a rank chosen per example from its complexity
(Li, Su, Zhou, Fu, Collier, arXiv 2605.01959; the nested-rank form follows DyLoRA, arXiv 2210.07558).

Every targeted layer holds one LoRA of the largest rank r_max of a ladder r_1 < ... < r_K. An
example of rank ρ uses the leading slice only,

    ΔW_ρ x = s_ρ B[:, :ρ] A[:ρ] x,    s_ρ = alpha / ρ  (or alpha / sqrt(ρ)),

computed as a per-row weight on the r_max bottleneck (s_ρ on the first ρ entries, 0 on the
rest), so one batch mixes ranks without a per-row loop. The compute is that of a rank-r_max
LoRA; what the ladder buys is that easy inputs only use (and only train) the leading
components, hard ones all of them.

The rank comes from a rule c(x) of the input, the same at training and at inference (the
paper's "consistency" point: training does not sample ranks uniformly, as DyLoRA does):

- "length": the number of prompt tokens (attended and, for causal-LM training, unsupervised).
- "entropy": the base model's mean next-token entropy (nats) over the prompt positions; this
  costs one extra forward of the base model per batch, without gradients (a forward pre-hook
  on the model runs it with every adapter switched off and dropout off). Causal LMs only.
- "router": a small learned router on the mean-pooled (over attended tokens) input of the
  first targeted layer, detached, so it sees the frozen embeddings when nothing upstream is
  adapted. Its parameters live in that layer's adapter (saved and loaded with it). Training
  picks a rank by straight-through Gumbel-softmax and adds the budget penalty
  `budget_weight * |E[ρ(x)] / r_max - budget|` (batch mean of the router's expected rank) to
  `splice.auxiliary_loss(model)`; evaluation takes the router's argmax, deterministically.

The heuristic scores are binned into the ladder by `bins`. The rule runs once per forward (the
first targeted layer to run computes it; the others reuse it), and a cached decoding step
(generation) reuses the ranks its prompt got. `fixed_ranks` overrides the rule, e.g. to
evaluate with a mismatched one; `last_ranks` tells what the last forward chose.

Because the change depends on the input there is no single weight change: the adapter cannot
be merged or exported as a plain LoRA, except at one chosen rank (`delta_weight_at`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from splice.core.api import adapters, disabled
from splice.core.config import Adapter, AdapterConfig
from splice.core.errors import SpliceError
from splice.core.host import hosts
from splice.core.inputs import BatchInputs, InputsRecorder
from splice.core.layers import LayerInfo
from splice.core.registry import register_method

Scorer = Literal["length", "entropy", "router"]


@register_method
@dataclass
class FlexiLoRA(AdapterConfig):
    """Hyperparameters of a Flexi-LoRA adapter.

    Attributes:
        ranks: the rank ladder r_1 < ... < r_K; every layer stores factors of rank r_max = r_K.
        alpha: scale numerator of every rank.
        rank_scaling: "rank" scales rank ρ by alpha / ρ (DyLoRA, LoRA's rule), "sqrt" by
            alpha / sqrt(ρ) (rsLoRA's), which gives the higher ranks larger steps.
        dropout: dropout on the adapter's input only.
        scorer: the rule that picks each example's rank: "length", "entropy" or "router" (see
            the module docstring).
        bins: K - 1 increasing cut points that bin a heuristic score into the ladder: a score
            at or above the k-th cut point (and below the next) gets ranks[k]. None: prompt
            lengths 16, 64, 256, ... tokens ("length"), or entropies evenly spaced from 1 to
            4 nats ("entropy"). Not used by the router.
        budget: the router's target mean active rank as a fraction of r_max (the digest
            reports ~30% of a static LoRA's).
        budget_weight: λ, the weight of the router's budget penalty.
        router_hidden: width of the router's hidden layer (GELU); 0 is a linear router.
    """

    method: ClassVar[str] = "flexilora"
    reads_inputs: ClassVar[bool] = True
    ranks: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    alpha: float = 16
    rank_scaling: Literal["rank", "sqrt"] = "rank"
    dropout: float = 0.0
    scorer: Scorer = "length"
    bins: list[float] | None = None
    budget: float = 0.3
    budget_weight: float = 0.1
    router_hidden: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ranks = list(self.ranks)
        if not self.ranks or any(not isinstance(r, int) or r < 1 for r in self.ranks):
            raise SpliceError(f"FlexiLoRA ranks must be a non-empty list of positive ints, got {self.ranks}")
        if any(a >= b for a, b in pairwise(self.ranks)):
            raise SpliceError(f"FlexiLoRA ranks must be strictly increasing, got {self.ranks}")
        if self.rank_scaling not in ("rank", "sqrt"):
            raise SpliceError(f"FlexiLoRA rank_scaling must be 'rank' or 'sqrt', got {self.rank_scaling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpliceError(f"FlexiLoRA dropout must be in [0, 1), got {self.dropout}")
        if self.scorer not in ("length", "entropy", "router"):
            raise SpliceError(f"FlexiLoRA scorer must be length, entropy or router, got {self.scorer!r}")
        if self.bins is not None:
            self.bins = [float(b) for b in self.bins]
            if self.scorer == "router":
                raise SpliceError("FlexiLoRA bins bin a heuristic score; the router scorer takes none")
            if len(self.bins) != len(self.ranks) - 1:
                raise SpliceError(f"FlexiLoRA needs {len(self.ranks) - 1} bins (cut points) for "
                                  f"{len(self.ranks)} ranks, got {len(self.bins)}: {self.bins}")
            if any(a >= b for a, b in pairwise(self.bins)):
                raise SpliceError(f"FlexiLoRA bins must be strictly increasing, got {self.bins}")
        if not 0.0 < self.budget <= 1.0:
            raise SpliceError(f"FlexiLoRA budget is a fraction of r_max in (0, 1], got {self.budget}")
        if self.budget_weight < 0 or self.router_hidden < 0:
            raise SpliceError("FlexiLoRA budget_weight and router_hidden must be >= 0")

    def cut_points(self) -> list[float]:
        """The bins in use: `bins`, or the scorer's defaults for this ladder."""
        if self.bins is not None:
            return self.bins
        cuts = len(self.ranks) - 1
        if self.scorer == "length":
            return [16.0 * 4**k for k in range(cuts)]
        return torch.linspace(1.0, 4.0, cuts).tolist()

    def scaling(self, rank: int) -> float:
        return self.alpha / (math.sqrt(rank) if self.rank_scaling == "sqrt" else rank)

    def build(self, info: LayerInfo, module_name: str, base: nn.Module) -> FlexiLoRAAdapter:
        if info.kind != "linear":
            raise SpliceError(f"FlexiLoRA adapts Linear layers; {module_name!r} is a {info.kind} layer")
        return FlexiLoRAAdapter(info, self)

    def on_attach(self, model: nn.Module, name: str) -> Callable[[], None] | None:
        """Gives the new adapters their shared state, the router to the first one, and for the
        entropy scorer the model pre-hook that scores each batch."""
        built = [(module_name, host[name]) for module_name, _, host in hosts(model) if name in host]
        state = RankState(name, built[0][0])
        for _, adapter in built:
            adapter.state = state
        if self.scorer == "router":
            first = built[0][1]
            width, levels = first.info.in_features, len(self.ranks)
            router = (nn.Linear(width, levels) if not self.router_hidden else
                      nn.Sequential(nn.Linear(width, self.router_hidden), nn.GELU(),
                                    nn.Linear(self.router_hidden, levels)))
            first.router = router.to(first.lora_A)
        if self.scorer != "entropy":
            return None
        scorer = EntropyScorer(self, state, built[0][1].inputs_recorder)
        hook = model.register_forward_pre_hook(scorer, with_kwargs=True)
        return hook.remove


@dataclass
class RankState:
    """What the adapters of one attached Flexi-LoRA share (one per model and adapter name)."""

    name: str
    router_module: str  # the targeted layer whose adapter holds the router
    fixed: torch.Tensor | None = None  # [rows, K] one-hot, set by `fixed_ranks`
    last: torch.Tensor | None = None  # [rows, K] the last forward's choice, detached

    @property
    def key(self) -> tuple[str, str]:
        """Where a forward's choice is kept in `BatchInputs.memo`."""
        return ("flexilora", self.name)

    def publish(self, inputs: BatchInputs | None, choice: torch.Tensor) -> None:
        if inputs is not None:
            inputs.memo[self.key] = choice
        self.last = choice.detach()


def bin_scores(config: FlexiLoRA, scores: torch.Tensor) -> torch.Tensor:
    """[rows] scores -> [rows, K] one-hot ladder choice: the number of cut points <= score."""
    cuts = torch.tensor(config.cut_points(), dtype=torch.float32, device=scores.device)
    index = torch.bucketize(scores.float(), cuts, right=True)
    return F.one_hot(index, len(config.ranks)).float()


class EntropyScorer:
    """Model forward pre-hook: the base model's mean next-token entropy over each row's prompt,
    binned into the ladder and left in the batch's memo for the adapters.

    It runs after `InputsRecorder`'s pre-hook (registered by `attach` before `on_attach`), so
    the recorder's `current()` is this call's batch. The base forward calls `model.forward` directly,
    which skips the model's own hooks: no recursion, and the recorded batch stays this one.
    """

    def __init__(self, config: FlexiLoRA, state: RankState, recorder: InputsRecorder) -> None:
        self.config, self.state, self.recorder = config, state, recorder

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        inputs = self.recorder.current()
        if self.state.fixed is not None or inputs is None or inputs.decoding:
            return  # decoding steps reuse the prompt's ranks
        if inputs.input_ids is None:
            raise SpliceError("FlexiLoRA's entropy scorer needs the model called with input_ids")
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            with torch.no_grad(), disabled(model):
                output = model.forward(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
        finally:
            for module, mode in modes.items():
                module.training = mode
        logits = getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.shape[:2] != inputs.input_ids.shape:
            raise SpliceError(f"FlexiLoRA's entropy scorer needs a causal LM with per-token logits "
                              f"[rows, seq, vocab]; {type(model).__name__} gives none")
        log_probs = logits.float().log_softmax(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        prompt = inputs.prompt_mask().to(entropy.dtype)
        score = (entropy * prompt).sum(1) / prompt.sum(1).clamp_min(1)
        self.state.publish(inputs, bin_scores(self.config, score))


class FlexiLoRAAdapter(Adapter):
    """delta(x) = B (w(x) * A dropout(x)), w(x)[j] = s_ρ(x) for j < ρ(x), else 0."""

    def __init__(self, info: LayerInfo, config: FlexiLoRA) -> None:
        super().__init__()
        self.info, self.config = info, config
        r_max = config.ranks[-1]
        self.lora_A = nn.Parameter(torch.empty(r_max, info.in_features))
        self.lora_B = nn.Parameter(torch.zeros(info.out_features, r_max))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        table = torch.zeros(len(config.ranks), r_max)
        for k, rank in enumerate(config.ranks):
            table[k, :rank] = config.scaling(rank)
        self.register_buffer("table", table, persistent=False)  # [K, r_max]: row k is w at ranks[k]
        self.router: nn.Module | None = None  # only on the first targeted layer, scorer="router"
        self.state: RankState | None = None  # set by `FlexiLoRA.on_attach`

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.choice(x).to(device=x.device, dtype=self.table.dtype)
        if x.shape[0] != choice.shape[0]:
            raise SpliceError(
                f"FlexiLoRA {self.state.name!r} chose ranks for {choice.shape[0]} rows but a layer "
                f"input has {x.shape[0]}: it needs the whole batch, row for row (it cannot run on a "
                "subset of rows, e.g. in splice.route beside other adapters)")
        weight = choice @ self.table
        x = x.to(self.lora_A.dtype)
        if self.training and self.config.dropout:
            x = F.dropout(x, self.config.dropout)
        hidden = F.linear(x, self.lora_A)
        hidden = hidden * weight.view(weight.shape[0], *(1,) * (x.dim() - 2), -1)
        return F.linear(hidden, self.lora_B)

    def choice(self, x: torch.Tensor) -> torch.Tensor:
        """This forward's [rows, K] one-hot rank choice (straight-through for the router),
        computed by the first adapter that runs and reused by the others."""
        state = self.state
        if state.fixed is not None:
            state.last = state.fixed
            return state.fixed
        inputs = self.batch_inputs()
        if inputs is not None and state.key in inputs.memo:
            return inputs.memo[state.key]
        if inputs is not None and inputs.decoding:
            if state.last is None or state.last.shape[0] != x.shape[0]:
                raise SpliceError(f"FlexiLoRA {state.name!r}: a cached decoding step, but no prompt "
                                  "forward of the same rows chose their ranks")
            return state.last
        choice = self._score(inputs, x)
        state.publish(inputs, choice)
        return choice

    def _score(self, inputs: BatchInputs | None, x: torch.Tensor) -> torch.Tensor:
        scorer = self.config.scorer
        if scorer == "length":
            prompt = inputs.prompt_mask() if inputs is not None else None
            if prompt is None:
                raise SpliceError("FlexiLoRA's length scorer needs the model called with input_ids "
                                  "or an attention_mask [rows, seq]; or use fixed_ranks")
            return bin_scores(self.config, prompt.sum(1))
        if scorer == "router":
            if self.router is None:
                raise SpliceError(f"FlexiLoRA {self.state.name!r}: the router sits in the adapter of "
                                  f"{self.state.router_module!r}, which must run before the other "
                                  "targeted layers in each forward")
            return self._route(inputs, x)
        raise SpliceError(f"FlexiLoRA {self.state.name!r}: no entropy scores for this forward; the "
                          "model's forward pre-hook computes them, so call the model itself")

    def _route(self, inputs: BatchInputs | None, x: torch.Tensor) -> torch.Tensor:
        features = x.detach().to(self.lora_A.dtype)
        mask = inputs.attention_mask if inputs is not None else None
        if features.dim() == 3 and mask is not None and mask.shape == features.shape[:2]:
            mask = mask.to(features.dtype).unsqueeze(-1)
            features = (features * mask).sum(1) / mask.sum(1).clamp_min(1)
        elif features.dim() > 2:
            features = features.flatten(1, -2).mean(1)
        logits = self.router(features)
        if not self.training:
            return F.one_hot(logits.argmax(-1), len(self.config.ranks)).float()
        if torch.is_grad_enabled() and inputs is not None:
            ladder = torch.tensor(self.config.ranks, dtype=logits.dtype, device=logits.device)
            fraction = (logits.softmax(-1) @ ladder).mean() / ladder[-1]
            inputs.add_aux_loss(self.config.budget_weight * (fraction - self.config.budget).abs(), self.owner)
        return F.gumbel_softmax(logits, tau=1.0, hard=True)

    def delta_weight_at(self, rank: int) -> torch.Tensor:
        """s_ρ B[:, :ρ] A[:ρ], the weight change every input of rank ρ gets (e.g. to export)."""
        if rank not in self.config.ranks:
            raise SpliceError(f"rank {rank} is not on the ladder {self.config.ranks}")
        return self.lora_B[:, :rank] @ self.lora_A[:rank] * self.config.scaling(rank)


def _state(model: nn.Module, name: str | None) -> tuple[FlexiLoRA, RankState]:
    attached = {n: c for n, c in adapters(model).items() if isinstance(c, FlexiLoRA)}
    if name is None:
        if len(attached) != 1:
            raise SpliceError(f"{len(attached)} FlexiLoRA adapters attached {sorted(attached)}; pass name=")
        name = next(iter(attached))
    if name not in attached:
        raise SpliceError(f"no FlexiLoRA adapter named {name!r}; attached: {sorted(attached)}")
    adapter = next(host[name] for _, _, host in hosts(model) if name in host)
    return attached[name], adapter.state


@contextmanager
def fixed_ranks(model: nn.Module, ranks: Sequence[int] | torch.Tensor, name: str | None = None) -> Iterator[None]:
    """Within the block, row i of every batch uses rank `ranks[i]` (a rank on the ladder),
    whatever the scorer says: for tests, or to evaluate under another rule."""
    config, state = _state(model, name)
    values = [int(r) for r in ranks]
    off = sorted({r for r in values if r not in config.ranks})
    if off:
        raise SpliceError(f"ranks {off} are not on the ladder {config.ranks}")
    index = torch.tensor([config.ranks.index(r) for r in values], dtype=torch.long)
    previous, state.fixed = state.fixed, F.one_hot(index, len(config.ranks)).float()
    try:
        yield
    finally:
        state.fixed = previous


def last_ranks(model: nn.Module, name: str | None = None) -> torch.Tensor | None:
    """The rank each row got in the model's last forward, or None before any."""
    config, state = _state(model, name)
    if state.last is None:
        return None
    return torch.tensor(config.ranks)[state.last.argmax(-1).cpu()]
