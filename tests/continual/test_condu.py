"""ConDU (volume 2, §2; arXiv 2503.10705): its views against references, and the functional check
of §2(d)5 on a 2-layer MLP "backbone" with synthetic tasks; then one harness run on tiny BERT.

Synthetic tasks: C classes with means μ_c in R^D; the backbone is pretrained on x = μ_y + noise.
Task k sees x = R Q_k μ_y + noise: a rotation R shared by every downstream task (their common
shift away from the pretraining data) and one of its own, Q_k, that conflicts with the others',
so one adapter carried from task to task forgets, and an expert alone is worse than the
pretrained model on a task it never saw. Experts train with label smoothing 0.2, as ConDU's code.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from test_harness import sequence
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

import splice
import splice.continual.strategies
from splice.continual import run_sequence
from splice.continual.sequence import TaskSpec
from splice.continual.strategies.base import Strategy, TaskContext
from splice.continual.strategies.condu import ConDU
from splice.continual.strategies.sequential import Sequential
from splice.core.errors import ConfigError

D, H, C = 16, 32, 6
NOISE, SHARED_TURN, TASK_TURN = 0.7, 1.0, 2.0
STEPS, LR, BATCH, ROWS = 150, 1e-2, 64, 1000
SEEDS = range(10)
QUIET = Console(quiet=True)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is faster than several fighting for a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def context(index: int) -> TaskContext:
    """Just what a strategy reads of a task (its name); the rest is the harness's."""
    return TaskContext(index, TaskSpec(name=f"task{index}", data="synthetic"), None, None, None)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, g: torch.Generator,
        smoothing: float = 0.2, params: list[nn.Parameter] | None = None) -> None:
    params = params or list(splice.trainable_parameters(model).values())
    optimizer = torch.optim.Adam(params, lr=LR)
    for _ in range(steps):
        pick = torch.randint(0, len(x), (BATCH,), generator=g)
        loss = F.cross_entropy(model(x[pick]), y[pick], label_smoothing=smoothing)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def hits(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(-1) == y


def rotation(g: torch.Generator, size: float) -> torch.Tensor:
    skew = torch.randn(D, D, generator=g)
    return torch.linalg.matrix_exp(size * (skew - skew.T) / 2 / math.sqrt(D))


Split = tuple[torch.Tensor, torch.Tensor]


def sample(g: torch.Generator, means: torch.Tensor, turn: torch.Tensor) -> Split:
    y = torch.randint(0, C, (ROWS,), generator=g)
    return means[y] @ turn.T + NOISE * torch.randn(ROWS, D, generator=g), y


def pretrained_and_tasks(seed: int) -> tuple[nn.Module, list[tuple[Split, Split]]]:
    """The pretrained MLP and 4 tasks' (train, test) splits."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    means = torch.randn(C, D, generator=g)
    model = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, C))
    fit(model, *sample(g, means, torch.eye(D)), 300, g, smoothing=0.0, params=list(model.parameters()))
    shared = rotation(g, SHARED_TURN)
    turns = [shared @ rotation(g, TASK_TURN) for _ in range(4)]
    return model, [(sample(g, means, t), sample(g, means, t)) for t in turns]


def train_sequence(strategy: Strategy, model: nn.Module, tasks: list[tuple[Split, Split]], seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    for k, (train, _) in enumerate(tasks):
        strategy.begin_task(model, context(k))
        fit(model, *train, STEPS, g)
        strategy.end_task(model, context(k))


@torch.no_grad()
def routed(model: nn.Module, tasks: list[tuple[Split, Split]], x: torch.Tensor) -> torch.Tensor:
    """ConDU's rule (as `continual.scoring`): each row to the task with the closest class prototype
    of the pretrained model's normalised features."""
    def features(inputs: torch.Tensor) -> torch.Tensor:
        return F.normalize(model[1](model[0](inputs)), dim=-1)

    prototypes = []
    for (x_train, y_train), _ in tasks:
        f = features(x_train)
        prototypes.append(F.normalize(torch.stack([f[y_train == c].mean(0) for c in range(C)]), dim=-1))
    f = features(x)
    return torch.stack([(f @ p.T).amax(dim=1) for p in prototypes], dim=1).argmax(dim=1)


@dataclass
class Outcome:
    condu_first: float  # task 1 after 3 tasks, with its task id
    sequential_first: float
    pretrained_held_out: float  # task 4, never trained
    agnostic_held_out: float  # routed among the 3 seen tasks, θ_0 mixed in
    expert_held_out: float  # routed, the routed expert alone


def functional_run(seed: int) -> Outcome:
    pretrained, tasks = pretrained_and_tasks(seed)
    seen, (x4, y4) = tasks[:3], tasks[3][1]
    config = splice.LoRA(r=4, alpha=4, targets=["0", "2"])
    naive = Sequential(config)
    naive_model = copy.deepcopy(pretrained)
    train_sequence(naive, naive_model, seen, seed)
    condu, model = ConDU(config), copy.deepcopy(pretrained)
    train_sequence(condu, model, seen, seed)
    with naive.view(naive_model, "task0"):
        sequential_first = hits(naive_model, *seen[0][1]).float().mean().item()
    with condu.view(model, "task0"):
        condu_first = hits(model, *seen[0][1]).float().mean().item()
    route = routed(model, seen, x4)
    agnostic, alone = torch.zeros_like(y4, dtype=torch.bool), torch.zeros_like(y4, dtype=torch.bool)
    for k in route.unique().tolist():
        rows = route == k
        with condu.agnostic_view(model, f"task{k}"):
            agnostic[rows] = hits(model, x4[rows], y4[rows])
        with condu.view(model, f"task{k}"):
            alone[rows] = hits(model, x4[rows], y4[rows])
    return Outcome(condu_first, sequential_first, hits(pretrained, x4, y4).float().mean().item(),
                   agnostic.float().mean().item(), alone.float().mean().item())


def test_condu_keeps_task_one_and_the_zero_shot_model_on_a_held_out_task():
    """§2(d)5, over 10 seeds; noise is 2 standard errors of the per-seed differences. Measured:
    task 1 after 3 tasks, ConDU 0.65-0.89 vs sequential 0.14-0.43 (every seed). Held-out task 4,
    agnostic ensemble minus pretrained: mean -0.003, noise 0.026 (per seed -0.07 .. +0.06); the
    routed expert alone minus the ensemble: mean -0.138, noise 0.092: θ_0 in the ensemble is what
    keeps the zero-shot accuracy, the expert alone would lose it."""
    outcomes = [functional_run(seed) for seed in SEEDS]
    for outcome in outcomes:
        assert outcome.condu_first > outcome.sequential_first + 0.1, outcome
    gaps = [o.agnostic_held_out - o.pretrained_held_out for o in outcomes]
    assert statistics.mean(gaps) >= -noise(gaps), gaps
    alone = [o.expert_held_out - o.agnostic_held_out for o in outcomes]
    assert statistics.mean(alone) < -noise(alone), alone


def noise(differences: list[float]) -> float:
    """Two standard errors of the mean of per-seed differences."""
    return 2 * statistics.stdev(differences) / math.sqrt(len(differences))


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, H), nn.ReLU(), Conv1D(C, H))  # Conv1D: the transposed layout


def trained_expert(strategy: ConDU, model: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    """Train task `index`'s expert a few steps, leave it attached; its logits on `x`."""
    g = torch.Generator().manual_seed(index)
    strategy.begin_task(model, context(index))
    fit(model, x, torch.randint(0, C, (len(x),), generator=g), 20, g)
    with torch.no_grad():
        return model(x)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_one_task_view_is_the_expert_and_leaves_the_base_as_it_was(init):
    """One task: unify -> decouple is exact, so θ_0 + τ̂ computes what the trained expert did
    (bias changes, PiSSA's init and the Conv1D layout included); an untrained task is θ_0, and
    the base weights are as before."""
    model = tiny_model()
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base_logits = model(x)
    before = weights(model)
    strategy = ConDU(splice.LoRA(r=4, alpha=8, targets=["0", "2"], lora_bias=init == "default", init=init))
    expert = trained_expert(strategy, model, 0, x)
    strategy.end_task(model, context(0))
    assert splice.adapters(model) == {}  # only the unified form is kept
    with strategy.view(model, "task0"), torch.no_grad():
        viewed = model(x)
    assert (viewed - base_logits).abs().max() > 1e-2  # the expert did learn something
    torch.testing.assert_close(viewed, expert, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        now = model(x)
        with strategy.view(model, "task1"):  # not trained yet: θ_0
            assert torch.equal(model(x), now)
    exact = init == "default"  # PiSSA's detach puts back what it took out of W, to rounding
    torch.testing.assert_close(now, base_logits, atol=0 if exact else 1e-6, rtol=0)
    for name, value in weights(model).items():
        torch.testing.assert_close(value, before[name], atol=0 if exact else 1e-6, rtol=0)


def test_agnostic_view_averages_base_and_task_logits_and_restores_the_model_on_error():
    model = tiny_model()
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(6))
    strategy = ConDU(splice.LoRA(r=4, alpha=8, targets=["0", "2"]))
    for index in range(2):
        trained_expert(strategy, model, index, x)
        strategy.end_task(model, context(index))
    with torch.no_grad():
        base = model(x)
        with strategy.view(model, "task1"):
            task = model(x)
        with strategy.agnostic_view(model, "task1"):
            mixed = model(x)
    torch.testing.assert_close(mixed, (base + task) / 2, atol=1e-6, rtol=0)
    assert not torch.allclose(task, base, atol=1e-3)
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), strategy.agnostic_view(model, "task0"):
        raise RuntimeError("boom")
    assert "forward" not in vars(model)
    assert all(p.data_ptr() == storage[name] for name, p in model.named_parameters())  # θ_0's own tensors
    with torch.no_grad():
        assert torch.equal(model(x), base)


def test_stored_bytes_count_the_vector_one_bit_per_mask_entry_and_the_scales():
    model = tiny_model()
    strategy = ConDU(splice.LoRA(r=4, alpha=8, targets=["0", "2"]))
    entries = D * H + H * C  # the two layers' weight changes (no bias change)
    for index in range(3):
        trained_expert(strategy, model, index, torch.randn(8, D))
        strategy.end_task(model, context(index))
        tasks = index + 1
        assert strategy.stored_bytes(model) == 4 * entries + tasks * (math.ceil(D * H / 8) + math.ceil(H * C / 8)) \
            + 8 * tasks


def test_refuses_what_it_cannot_keep_as_a_task_vector_before_training():
    with pytest.raises(ConfigError, match="train_also"):
        ConDU(splice.LoRA(targets=["0"], train_also=["2"]))
    model = tiny_model()
    with pytest.raises(ConfigError, match="weight change"):
        ConDU(splice.LoReFT(targets=["0"])).begin_task(model, context(0))
    tied = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
    tied[2].weight = tied[0].weight
    with pytest.raises(ConfigError, match="shared"):
        ConDU(splice.LoRA(targets=["0"])).begin_task(tied, context(0))
    assert splice.adapters(model) == {} and splice.adapters(tied) == {}


@torch.no_grad()
def greedy_reference(model: nn.Module, strategy: ConDU, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Ensemble decoding without any cache: each step, the mean of θ_0's and the task model's
    next-token logits on the whole sequence so far."""
    for _ in range(steps):
        base = model(ids).logits[:, -1]
        with strategy.view(model, "task0"):
            task = model(ids).logits[:, -1]
        ids = torch.cat([ids, ((base + task) / 2).argmax(-1, keepdim=True)], dim=1)
    return ids


def test_agnostic_generation_is_ensemble_decoding(tiny_llama_folder):
    """`generate` in the agnostic view (with its key/value cache, the zero-shot pass keeping a twin)
    gives the tokens of step-by-step decoding on averaged logits, recomputed from scratch."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_folder).eval()
    model.generation_config.eos_token_id = None
    strategy = ConDU(splice.LoRA(r=4, alpha=8))
    strategy.begin_task(model, context(0))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in splice.trainable_parameters(model).values():
            param.normal_(0, 0.5)  # a far-from-base expert, no training needed
    strategy.end_task(model, context(0))
    ids = torch.randint(1000, 3000, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), strategy.agnostic_view(model, "task0"):
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(generated, greedy_reference(model, strategy, ids, 6))
    with torch.no_grad():
        alone = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                               pad_token_id=0)
    assert not torch.equal(generated, alone)  # the task model's half did change the decoding


def test_harness_runs_condu_in_both_settings(tiny_bert_folder, task_files, tmp_path):
    """Measured: task-incremental [[1.0, 0.59], [1.0, 1.0]] (the first task rebuilt from the unified
    vector loses nothing), task-agnostic [[0.95, -], [0.95, 1.0]]."""
    config = sequence(tiny_bert_folder, task_files, tmp_path, "condu")
    config = dataclasses.replace(config, adapter={"method": "lora", "r": 4, "alpha": 8, "targets": ["query", "value"]},
                                 train={**config.train, "max_steps": 80})
    result = run_sequence(config, console=QUIET, quiet=True)
    ti, ta = result.matrices["task_incremental"], result.matrices["task_agnostic"]
    assert ti[0][0] > 0.9 and ti[1][1] > 0.9
    assert ti[1][0] >= ti[0][0] - 0.05
    assert ta[0][1] is None and ta[1][0] > 0.8 and ta[1][1] > 0.8  # distinct vocabularies: routed home
    assert splice.adapters(result.model) == {}  # experts dropped: only the unified form is kept
    entries = 2 * 2 * 32 * 32  # LoRA's query and value in 2 layers of width 32
    heads = [sum(p.numel() * p.element_size() for p in result.model.classifier.heads[name].parameters())
             for name in ("sentiment", "topic")]
    assert result.stored_bytes[0] == 4 * entries + entries // 8 + 8 + heads[0]
    assert result.stored_bytes[1] - result.stored_bytes[0] == entries // 8 + 8 + heads[1]  # a mask, a scale, a head
    pretrained = AutoModelForSequenceClassification.from_pretrained(tiny_bert_folder)
    trained = dict(result.model.named_parameters())
    for name, value in pretrained.base_model.named_parameters():  # θ_0 never changed
        assert torch.equal(trained[f"{result.model.base_model_prefix}.{name}"], value), name
