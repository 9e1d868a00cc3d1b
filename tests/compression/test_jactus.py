"""JACTUS joint compression and adaptation, and the FactorizedLinear layer it deploys.

Tiny random models for the exactness and bookkeeping checks; a planted-direction linear toy for
the method's claim (the union keeps a direction the task needs that truncated SVD drops); one
real-weights run on MiniLM.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import VOCAB, make_bert
from torch import nn

import splice
from splice.compression.factorized import FactorizedLinear, factorized_modules, load_factorized, save_factorized
from splice.compression.jactus import allocate_ranks, calibrate, jactus, layer_cost, union_bases
from splice.core.errors import AdapterFileError, OutputExistsError, ShapeMismatchError, SpliceError, TargetError


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))).Q


def bert_batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Token batches with labels and some padding (the last positions of row 0 are masked)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (3, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (3,), generator=g)})
    return out


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ---------------------------------------------------------------------------- FactorizedLinear


def test_factorized_forward_is_u_c_vt_plus_bias_and_only_the_core_trains():
    U, V = orthonormal(7, 3, 0), orthonormal(5, 3, 1)
    layer = FactorizedLinear(U, torch.randn(3, 3), V, torch.randn(7))
    x = torch.randn(2, 4, 5)
    expected = x @ (layer.U @ layer.core @ layer.V.T).T + layer.bias
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.dense_weight(), layer.U @ layer.core @ layer.V.T)
    assert (layer.rank, layer.weight_parameters) == (3, 7 * 3 + 5 * 3 + 9)
    layer(x).square().sum().backward()
    assert layer.core.grad is not None and layer.core.grad.abs().sum() > 0
    assert layer.U.grad is None and layer.V.grad is None and layer.bias.grad is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_factorized_computes_in_the_input_dtype(dtype):
    layer = FactorizedLinear(orthonormal(6, 2, 0), torch.randn(2, 2), orthonormal(4, 2, 1), torch.randn(6))
    x = torch.randn(3, 4, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    reference = x.double() @ layer.dense_weight().double().T + layer.bias.double()
    torch.testing.assert_close(y.double(), reference, atol=0.1 if dtype == torch.bfloat16 else 1e-6, rtol=0.05)


def test_factorized_refuses_mismatched_factors():
    with pytest.raises(ShapeMismatchError, match="core"):
        FactorizedLinear(torch.randn(6, 2), torch.randn(3, 3), torch.randn(4, 2))


# ------------------------------------------------------------------------------- calibration


class Projection(nn.Module):
    """x [B, T, 5] -> Linear -> [B, T, 3]: covariances computable by hand."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_calibration_covariances_equal_hand_computed_ones_without_padding_rows():
    model = Projection()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        mask = torch.ones(2, 4)
        mask[1, 2:] = 0
        batches.append({"x": torch.randn(2, 4, 5, generator=g), "t": torch.randn(2, 4, 3, generator=g),
                        "attention_mask": mask})

    def loss_fn(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:  # dL/dy = (y - t) * mask
        return 0.5 * ((m(b["x"]) - b["t"]).square() * b["attention_mask"][..., None]).sum()

    stats = calibrate(model, batches, ["proj"], loss_fn=loss_fn)["proj"]
    keep = torch.cat([b["attention_mask"].reshape(-1) for b in batches]).bool()
    x = torch.cat([b["x"].reshape(-1, 5) for b in batches]).double()[keep]
    with torch.no_grad():
        grads = torch.cat([(model(b["x"]) - b["t"]).reshape(-1, 3) for b in batches]).double()[keep]
    assert stats.rows == 12
    torch.testing.assert_close(stats.input_cov, x.T @ x / 12)
    torch.testing.assert_close(stats.grad_cov, grads.T @ grads / 12)


def test_calibration_leaves_the_model_bit_identical_without_grads_and_in_its_mode():
    model = make_bert().train()
    model.classifier.requires_grad_(True)  # a trainable head must not receive a .grad either
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate(model, bert_batches(), "all-linear", train_also=["classifier"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_calibration_without_a_loss_says_how_to_give_one():
    batch = {k: v for k, v in bert_batches(1)[0].items() if k != "labels"}
    with pytest.raises(SpliceError, match="loss_fn"):
        calibrate(make_bert(), [batch])


# ------------------------------------------------------------------------ bases (spec test 1)


@pytest.mark.parametrize("weighting", ["none", "input"])
def test_bases_are_orthonormal_and_hold_the_weight_subspace(weighting):
    model = make_bert()
    batches = bert_batches()
    stats = calibrate(model, batches, "all-linear", train_also=["classifier"])
    weights = linear_weights(model)
    report = jactus(model, stats, budget=0.8, task_rank=3, weighting=weighting, train_also=["classifier"])
    for row in report.layers:
        layer = model.get_submodule(row.name)
        W = weights[row.name].double()
        U, V = layer.U.double(), layer.V.double()
        eye = torch.eye(row.rank, dtype=torch.float64)
        torch.testing.assert_close(U.T @ U, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(V.T @ V, eye, atol=1e-5, rtol=0)
        k1 = row.rank - row.task_directions
        assert row.task_directions == min(3, row.rank // 2, min(W.shape) - row.rank)
        if weighting == "none":
            P, _, Qh = torch.linalg.svd(W)
            U_W, V_W = P[:, :k1], Qh[:k1].T
            assert (V_W - V @ (V.T @ V_W)).norm() < 1e-4
        else:  # top left singular vectors of W C_x^{1/2}
            eigenvalues, E = torch.linalg.eigh(stats[row.name].input_cov)
            U_W = torch.linalg.svd(W @ (E * eigenvalues.clamp_min(0).sqrt()))[0][:, :k1]
        assert (U_W - U @ (U.T @ U_W)).norm() < 1e-4, row.name
        torch.testing.assert_close(layer.core.double(), U.T @ W @ V, atol=1e-5, rtol=0)


# ------------------------------------------------------------------- allocation (spec test 2)


def test_allocator_stays_within_budget_and_is_monotone_in_it():
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (32, 32), "b": (32, 80), "c": (80, 32), "d": (16, 48)}
    gains = {n: torch.rand(min(s), generator=g).sort(descending=True).values ** 3 for n, s in shapes.items()}
    total = sum(n * m for n, m in shapes.values())
    previous = None
    for budget in [0.15, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.5, 2.5, 4.0]:
        ranks = allocate_ranks(gains, shapes, budget)
        assert sum(layer_cost(*shapes[n], k) for n, k in ranks.items()) <= budget * total
        assert all(1 <= k <= min(shapes[n]) for n, k in ranks.items())
        if previous is not None:
            assert all(ranks[n] >= previous[n] for n in shapes), (budget, ranks, previous)
        previous = ranks
    assert previous == {n: min(s) for n, s in shapes.items()}  # a large budget reaches full rank
    with pytest.raises(SpliceError, match="rank 1"):
        allocate_ranks(gains, shapes, 0.01)


def test_jactus_report_counts_what_the_model_stores_and_trains():
    model = make_bert()
    report = jactus(model, bert_batches(), budget=0.8, train_also=["classifier"])
    layers = factorized_modules(model)
    assert set(layers) == set(report.ranks) and len(layers) == 2 * 6 + 1  # 6 per layer and the pooler
    assert report.params_after == sum(m.weight_parameters for m in layers.values())
    assert report.params_after <= 0.8 * report.params_before
    assert report.retained_fraction == pytest.approx(report.params_after / report.params_before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.core" for n in layers} | {"classifier.weight", "classifier.bias"}
    assert sum(p.numel() for n, p in model.named_parameters() if n.endswith(".core")) == report.core_parameters
    assert "budget 80%" in str(report)


def test_allocation_does_not_depend_on_a_layers_scale():
    """Gains are shares of each layer's energy: a layer whose weight is 10x larger keeps its rank."""
    batches = bert_batches()
    reference = jactus(make_bert(), batches, budget=0.6, train_also=["classifier"]).ranks
    model = make_bert()
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.value.weight.mul_(10)
    assert jactus(model, batches, budget=0.6, train_also=["classifier"]).ranks == reference


def test_full_rank_reproduces_the_dense_layers():
    model = make_bert()
    original = copy.deepcopy(model)
    weights = linear_weights(model)
    batch = bert_batches(1)[0]
    report = jactus(model, [batch], budget=3.0, task_rank=4, train_also=["classifier"])
    for row in report.layers:
        assert row.rank == min(row.in_features, row.out_features) and row.task_directions == 0
        torch.testing.assert_close(model.get_submodule(row.name).dense_weight(), weights[row.name],
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, batch), logits(original, batch), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------- the planted direction (spec 3)


D, SIGNAL_RANK = 32, 4


def planted_task(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W = rank-4 signal + noise; the task adds u* v*ᵀ, with v* and u* W's weakest singular
    directions (outside any truncation of W), and its inputs vary most along v*."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, SIGNAL_RANK, generator=g) @ torch.randn(SIGNAL_RANK, D, generator=g) / 2
    W += 0.01 * torch.randn(D, D, generator=g)
    P, _, Qh = torch.linalg.svd(W)
    u_star, v_star = P[:, -1], Qh[-1]
    X = torch.randn(512, D, generator=g) + 3 * torch.randn(512, 1, generator=g) * v_star
    Y = X @ W.T + 2 * (X @ v_star)[:, None] * u_star
    model = nn.Sequential(nn.Linear(D, D, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(W)
    return model, X, Y, u_star, v_star


def mse(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch["x"]), batch["y"])


def tune_core(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, steps: int = 300) -> float:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(model(X), Y).backward()
        optimizer.step()
    with torch.no_grad():
        return F.mse_loss(model(X), Y).item()


def test_planted_direction_is_kept_by_jactus_and_lost_by_truncation():
    model, X, Y, u_star, v_star = planted_task()
    batches = [{"x": X[i : i + 128], "y": Y[i : i + 128]} for i in range(0, 512, 128)]
    with torch.no_grad():
        start = F.mse_loss(model(X), Y).item()
    truncated = copy.deepcopy(model)

    report = jactus(model, batches, budget=0.8, task_rank=1, loss_fn=mse)
    layer = model[0]
    assert report.ranks == {"0": 10} and report.layers[0].task_directions == 1
    assert (layer.V.T @ v_star).norm() > 0.99 and (layer.U.T @ u_star).norm() > 0.99
    # Least squares over the core: the best any tuning of it can do.
    Z = (X @ layer.V).double()
    core_t = torch.linalg.lstsq(Z, (Y @ layer.U).double()).solution
    floor = F.mse_loss((Z @ core_t @ layer.U.double().T).float(), Y).item()
    tuned = tune_core(model, X, Y)
    assert floor < 0.01 * start and tuned < 1.5 * floor, (start, floor, tuned)

    # Negative control: truncated SVD at the same rank (task_rank=0) has no trace of v*, and
    # tuning its core cannot learn the task.
    jactus(truncated, batches, budget=0.8, task_rank=0, loss_fn=mse)
    assert (truncated[0].V.T @ v_star).norm() < 0.05
    assert tune_core(truncated, X, Y) > 0.9 * start

    # Why the union is not cut back by an SVD of C₀ = Uᵀ W V (the volume's optional step): W is
    # small exactly on the task directions, so the top-10 of a 10 + 4 union drops them again.
    stats = calibrate(planted_task()[0], batches, loss_fn=mse)["0"]
    W = planted_task()[0][0].weight.detach().double()
    U, V, _ = union_bases(W, stats, 14, 4, "none")
    _, _, Qh = torch.linalg.svd(U.T @ W @ V)
    assert ((V @ Qh[:10].T).T @ v_star.double()).norm() < 0.05


# --------------------------------------------------------------------------------- save / load


def test_saved_then_loaded_equals_the_trained_model(tmp_path):
    model = make_bert()
    jactus(model, bert_batches(), budget=0.7, train_also=["classifier"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    save_factorized(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "factorized_config.json").read_text())
    assert config["format"] == "splice-factorized" and config["trained"] == ["classifier.weight", "classifier.bias"]
    ranks = {n: m.rank for n, m in factorized_modules(model).items()}
    assert {n: m["rank"] for n, m in config["modules"].items()} == ranks

    fresh = load_factorized(make_bert(), tmp_path / "out")
    batch = bert_batches(1, seed=3)[0]
    assert torch.equal(logits(fresh, batch), logits(model, batch))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}

    with pytest.raises(OutputExistsError, match="overwrite"):
        save_factorized(model, tmp_path / "out")
    save_factorized(model, tmp_path / "out", overwrite=True)


def test_load_refuses_foreign_corrupt_and_mismatched_files(tmp_path):
    model = make_bert()
    jactus(model, bert_batches(), budget=0.7, train_also=["classifier"])
    good = save_factorized(model, tmp_path / "good")

    lora = make_bert()
    splice.attach(lora, splice.LoRA(r=2, targets=["query"]))
    splice.save(lora, tmp_path / "lora")
    with pytest.raises(AdapterFileError, match="factorized_config.json"):
        load_factorized(make_bert(), tmp_path / "lora")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "factorized_config.json").write_text(json.dumps({"format": "splice", "format_version": 1}))
    (foreign / "factorized_model.safetensors").write_bytes((good / "factorized_model.safetensors").read_bytes())
    with pytest.raises(AdapterFileError, match="not a splice-factorized file"):
        load_factorized(make_bert(), foreign)

    broken = json.loads((good / "factorized_config.json").read_text())
    next(iter(broken["modules"].values())).pop("rank")
    (foreign / "factorized_config.json").write_text(json.dumps(broken))
    with pytest.raises(AdapterFileError, match="positive integer rank"):
        load_factorized(make_bert(), foreign)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "factorized_config.json").write_text((good / "factorized_config.json").read_text())
    (corrupt / "factorized_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterFileError, match="corrupt"):
        load_factorized(make_bert(), corrupt)

    wider = make_bert(hidden=48)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match=r"'bert\.encoder\.layer\.0\.[a-z.]+'.*\[32, 32\].*\[48, 48\]"):
        load_factorized(wider, good)
    assert not factorized_modules(wider)  # nothing was loaded partially
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())


# ------------------------------------------------------------------------------------- targets


def test_a_target_that_matches_nothing_lists_existing_names():
    with pytest.raises(TargetError, match="query"):
        jactus(make_bert(), bert_batches(), targets=["qeury"])


def test_non_linear_targets_are_refused_by_name():
    with pytest.raises(TargetError, match=r"Linear layers only.*word_embeddings \(Embedding\)"):
        jactus(make_bert(), bert_batches(), targets=["word_embeddings", "query"])


def test_budget_and_options_are_validated():
    with pytest.raises(SpliceError, match="weighting"):
        jactus(make_bert(), bert_batches(), weighting="fisher")
    with pytest.raises(SpliceError, match="budget"):
        jactus(make_bert(), bert_batches(), budget=0.0)


# ---------------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_jactus_on_minilm_is_exact_at_full_rank_close_at_80_percent_and_its_cores_learn(minilm):
    """MiniLM's last layer (5 Linear layers) compressed from 16 Rotten Tomatoes reviews; compared on
    the hidden states the head reads (a fresh head's logits are too small to say much)."""
    from transformers import AutoTokenizer

    rows = splice.assets.rotten_tomatoes().train[:32]
    tokenizer = AutoTokenizer.from_pretrained(splice.assets.minilm_path())

    def encode(part: list[dict]) -> dict[str, torch.Tensor]:
        batch = dict(tokenizer([r["text"] for r in part], padding=True, truncation=True, max_length=32,
                               return_tensors="pt"))
        return batch | {"labels": torch.tensor([r["label"] for r in part])}

    def hidden(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.bert(input_ids=train["input_ids"], attention_mask=train["attention_mask"]).last_hidden_state

    calibration, train = [encode(rows[:8]), encode(rows[8:16])], encode(rows[16:])
    where = {"targets": ["query", "value", "dense"], "layers": [5], "train_also": ["classifier"]}
    stats = calibrate(minilm, calibration, **where)
    reference = hidden(minilm)

    full = copy.deepcopy(minilm)
    report = jactus(full, stats, budget=2.8, **where)
    assert len(report.layers) == 5
    assert all(r.rank == min(r.in_features, r.out_features) for r in report.layers)  # 2.8x affords full rank
    assert (hidden(full) - reference).norm() < 1e-4 * reference.norm()

    report = jactus(minilm, stats, budget=0.8, **where)
    assert report.retained_fraction <= 0.8
    assert (hidden(minilm) - reference).norm() < 0.5 * reference.norm()  # measured 0.39
    minilm.classifier.requires_grad_(False)  # the cores alone must lower the loss
    optimizer = torch.optim.AdamW([p for p in minilm.parameters() if p.requires_grad], lr=1e-3)
    minilm.train()
    losses = []
    for _ in range(8):
        loss = minilm(**train).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.05, losses
