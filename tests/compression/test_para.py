"""PARA: exact decomposition, targets, allocation, every adapter source, PEFT files, real weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import assert_close, assert_differs, logits, make_bert, make_convnet, randomize
from rich.table import Table
from safetensors.torch import save_file
from torch import nn

import splice
from splice.compression.para import compress, module_svd, plot_sweep, sweep
from splice.core.adapter_state import AdapterState, ModuleUpdate
from splice.core.errors import AdapterFileError, OutputExistsError, SpliceError
from splice.core.host import hosts
from splice.io.peft_format import attach_state

# -- helpers ---------------------------------------------------------------------------------


def planted(out: int, inp: int, sigmas: list[float], scale: float = 1.0, seed: int = 0) -> ModuleUpdate:
    """A linear update s B A whose singular values are exactly `sigmas` (random singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    r = len(sigmas)
    U = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(inp, r, generator=g, dtype=torch.float64))[0]
    root = torch.tensor(sigmas, dtype=torch.float64).sqrt() / math.sqrt(scale)
    return ModuleUpdate((root[:, None] * V.T).float(), (U * root).float(), scale)


def random_update(out: int, inp: int, r: int, scale: float = 2.0, seed: int = 0, kernel: tuple[int, ...] = ()
                  ) -> ModuleUpdate:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, inp, *kernel, generator=g)
    B = torch.randn(out, r, *(1,) * len(kernel), generator=g)
    return ModuleUpdate(A, B, scale, "conv" if kernel else "linear")


def mixed_state() -> AdapterState:
    """Modules of different shapes and spectra (so their costs and σ differ)."""
    return AdapterState({
        "a": random_update(24, 40, 8, scale=2.0, seed=0),
        "b": random_update(16, 16, 8, scale=0.5, seed=1),
        "c": random_update(40, 12, 6, scale=1.0, seed=2),
        "d": random_update(8, 5, 4, scale=1.0, seed=3, kernel=(3, 3)),
    })


def consistent(result) -> None:
    """The kept set is exactly {σ ≥ τ} in every module (ties kept or dropped together)."""
    for name, m in result.modules.items():
        s = m.singular_values
        score = s if result.normalize == "none" else s / (s[0] if result.normalize == "max" else s.norm())
        assert m.rank_after == int((score >= result.threshold).sum()), name


# -- (d)1-3: the decomposition is the SVD, exactly ---------------------------------------------


@pytest.mark.parametrize("out, inp, r, kernel", [(24, 40, 8, ()), (40, 24, 8, ()), (6, 40, 8, ()), (12, 5, 6, (3, 3))])
def test_qr_then_small_svd_is_the_svd_of_the_dense_delta(out, inp, r, kernel):
    update = random_update(out, inp, r, scale=2.5, kernel=kernel)
    svd = module_svd(update)
    dense = torch.linalg.svdvals(update.matrix())
    n = svd.S.numel()
    assert n == min(out, inp * math.prod(kernel), r)
    torch.testing.assert_close(svd.S, dense[:n], rtol=1e-5, atol=0)
    assert (dense[n:] < 1e-10 * dense[0]).all()  # the dense delta has no other direction
    torch.testing.assert_close(svd.U @ torch.diag(svd.S) @ svd.Vh, update.matrix(), rtol=0,
                               atol=1e-12 * dense[0].item())
    torch.testing.assert_close(svd.U.T @ svd.U, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(svd.Vh @ svd.Vh.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_threshold_zero_and_full_rank_reproduce_every_delta():
    state = mixed_state()
    for result in (compress(state, threshold=0.0), compress(state, rank=64), compress(state, budget=1.0),
                   compress(state, energy=1.0)):
        for name, update in state.modules.items():
            new = result.state.modules[name]
            assert new.scaling == 1.0 and new.A.dtype == update.A.dtype
            assert new.A.shape[1:] == update.A.shape[1:] and new.B.shape[2:] == update.B.shape[2:]
            expected = update.matrix()
            torch.testing.assert_close(new.matrix(), expected, rtol=0, atol=1e-6 * expected.abs().max().item())
        assert result.retained_energy == pytest.approx(1.0)
        assert max(result.errors.values()) < 1e-12


def test_truncation_error_is_the_dropped_singular_values_and_the_best_possible():
    state = mixed_state()
    result = compress(state, budget=0.4)
    assert len(set(result.ranks_after.values())) > 1  # the global threshold gave modules different ranks
    consistent(result)
    for name, update in state.modules.items():
        k = result.ranks_after[name]
        delta = update.matrix()
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        kept = result.state.modules[name].matrix() if k else torch.zeros_like(delta)
        error = (delta - kept).norm().item()
        assert error == pytest.approx(S[k:].square().sum().sqrt().item(), rel=1e-5)  # Eckart-Young
        assert error == pytest.approx(result.errors[name] * delta.norm().item(), rel=1e-5)
        # the kept part is the dense truncated SVD itself, not just as good
        best = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
        torch.testing.assert_close(kept, best, rtol=0, atol=1e-5 * S[0].item())


# -- (d)4: planted ranks -----------------------------------------------------------------------


class ThreeLayers(nn.Module):
    """Three linear layers, each with its own output: a 3-layer linear teacher whose layers are
    identifiable. (Stacked, x -> W3 W2 W1 x, only the product is determined by the data: a
    trained r=16 LoRA then spreads the change over all three layers, see the report.)"""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


def test_planted_ranks_are_recovered_at_95_percent_energy():
    d, ranks, noise = 32, (1, 4, 8), 0.1
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    student = ThreeLayers(d)
    teacher = ThreeLayers(d)
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        for layer, k in zip(teacher.layers, ranks, strict=True):
            U = torch.linalg.qr(torch.randn(d, k, generator=g))[0]
            V = torch.linalg.qr(torch.randn(d, k, generator=g))[0]
            layer.weight += U @ V.T
    splice.attach(student, splice.LoRA(r=16, alpha=16, targets=["layers.0", "layers.1", "layers.2"]))
    optimizer = torch.optim.Adam(splice.trainable_parameters(student).values(), lr=1e-2)
    X, X_test = torch.randn(4096, d, generator=g), torch.randn(4096, d, generator=g)
    with torch.no_grad():
        Y = teacher(X) + noise * torch.randn(4096, 3 * d, generator=g)
        Y_test = teacher(X_test) + noise * torch.randn(4096, 3 * d, generator=g)
    for _ in range(600):
        rows = torch.randint(0, len(X), (256,), generator=g)
        loss = (student(X[rows]) - Y[rows]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    result = compress(student, energy=0.95)
    found = [result.ranks_after[f"layers.{i}"] for i in range(3)]
    assert all(abs(f - k) <= 1 for f, k in zip(found, ranks, strict=True)), found
    assert result.reduction >= 0.60
    compressed = ThreeLayers(d)
    compressed.load_state_dict({k: v for k, v in student.state_dict().items() if ".splice." not in k})
    attach_state(compressed, result.state)
    mse_before = (logits(student, X_test) - Y_test).square().mean().item()
    mse_after = (logits(compressed, X_test) - Y_test).square().mean().item()
    assert mse_before < 0.012  # the LoRA did learn the teacher (noise floor 0.01)
    assert abs(mse_after - mse_before) < 0.01 * mse_before, (mse_before, mse_after)


# -- (d)5 and sources: PEFT files, models, forms -------------------------------------------------


def trained_bert(config: splice.LoRA, seed: int = 0) -> nn.Module:
    model = make_bert()
    splice.attach(model, config)
    randomize(model, seed=seed)
    return model


def test_output_is_a_peft_directory_with_rank_pattern_that_hf_peft_loads_alike(tmp_path, ids):
    from peft import PeftModel

    model = trained_bert(splice.LoRA(r=8, alpha=16, targets=["query", "key", "value"], train_also=["classifier"]))
    weak = "bert.encoder.layer.1.attention.self.key"
    with torch.no_grad():
        host = dict((n, h) for n, _, h in hosts(model))[weak]
        host["default"].lora_B.mul_(1e-4)  # far below every other module: dropped by the global threshold
        nn.init.normal_(model.classifier.weight)  # a trained head, kept as it is
    result = compress(model, budget=0.4, out=tmp_path / "small")
    assert result.path == tmp_path / "small" and weak in result.dropped
    assert 1 < len(set(r for r in result.ranks_after.values() if r))

    config = json.loads((tmp_path / "small" / "adapter_config.json").read_text())
    kept = {n: r for n, r in result.ranks_after.items() if r}
    assert sorted(config["target_modules"]) == sorted(kept)  # the dropped module is not re-created
    for name, rank in kept.items():
        assert config["rank_pattern"].get(name, config["r"]) == rank
        assert config["alpha_pattern"].get(name, config["lora_alpha"]) == rank  # scale 1 = alpha / r
    assert not config["use_rslora"]
    assert weak not in config["rank_pattern"]

    expected = logits(attach_state(make_bert(), result.state), ids)
    assert_differs(expected, logits(make_bert(), ids))
    peft_model = PeftModel.from_pretrained(make_bert(), tmp_path / "small").eval()
    lora_modules = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                    if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert lora_modules == set(kept)
    torch.testing.assert_close(logits(peft_model, ids), expected, atol=1e-5, rtol=0)
    reloaded = splice.load(make_bert(), tmp_path / "small")
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-6, rtol=0)
    for key, value in result.original.head_tensors.items():  # the trained head is kept as it was
        assert torch.equal(result.state.head_tensors[key], value)


@pytest.mark.parametrize("config", [
    splice.LoRA(r=8, alpha=16, rslora=True, targets=["query", "value"]),
    splice.LoRA(r=8, alpha=16, lora_bias=True, targets=["query", "value"]),
    splice.LoRA(r=6, alpha=12, targets=["query", "value"], rank_pattern={"value": 3}, alpha_pattern={"value": 9}),
], ids=["rslora", "lora-bias", "rank-pattern"])
def test_full_rank_is_exact_and_a_saved_compression_reloads(config, ids, tmp_path):
    model = trained_bert(config)
    full = compress(model, threshold=0.0)
    assert_close(logits(attach_state(make_bert(), full.state), ids), logits(model, ids))
    small = compress(model, rank=2)
    assert set(small.ranks_after.values()) == {2}
    small.save(tmp_path / "small")
    expected = logits(attach_state(make_bert(), small.state), ids)
    assert_close(logits(splice.load(make_bert(), tmp_path / "small"), ids), expected)
    assert_differs(expected, logits(model, ids))


def test_conv_and_embedding_lora(conv_inputs, tmp_path):
    model = make_convnet()
    splice.attach(model, splice.LoRA(r=4, alpha=8, targets=["embed", "conv1", "conv2", "head"]))
    randomize(model)
    full = compress(model, threshold=0.0)
    assert_close(logits(attach_state(make_convnet(), full.state), *conv_inputs), logits(model, *conv_inputs))
    assert {n: m.kind for n, m in full.modules.items()} == {"embed": "embedding", "conv1": "conv",
                                                            "conv2": "conv", "head": "linear"}
    small = compress(model, rank=2, out=tmp_path / "small")
    conv2 = small.state.modules["conv2"]
    assert conv2.A.shape == (2, 3, 3, 3) and conv2.B.shape == (6, 2, 1, 1)
    embed = small.state.modules["embed"]
    assert embed.A.shape == (2, 97) and embed.B.shape == (8, 2)
    for name, update in splice.io.adapter_state(model).modules.items():  # the best rank-2 approximation each
        U, S, Vh = torch.linalg.svd(update.matrix(), full_matrices=False)
        torch.testing.assert_close(small.state.modules[name].matrix(), U[:, :2] * S[:2] @ Vh[:2], rtol=0,
                                   atol=1e-5 * S[0].item())
    expected = logits(attach_state(make_convnet(), small.state), *conv_inputs)
    assert_close(logits(splice.load(make_convnet(), tmp_path / "small"), *conv_inputs), expected)


@pytest.mark.parametrize("form", [splice.DiaBlo(blocks=4, targets=["query", "value"]),
                                  splice.TTLoRA(r=3, alpha=6, targets=["query", "value"])],
                         ids=["diablo", "ttlora"])
def test_a_model_with_a_non_lora_form_is_compressed_through_its_weight_change(form, ids):
    model = make_bert()
    splice.attach(model, form)
    randomize(model, scale=0.5)
    full = compress(model, threshold=0.0)
    assert_close(logits(attach_state(make_bert(), full.state), ids), logits(model, ids), rel=1e-4)
    half = compress(model, budget=0.5)
    assert half.factor_parameters_after <= 0.5 * half.factor_parameters_before
    assert 0 < half.retained_energy < 1


def test_dora_keeps_its_magnitudes_and_is_exact_at_full_rank(ids):
    model = make_bert()
    splice.attach(model, splice.DoRA(r=4, alpha=8, targets=["query", "value"]))
    with torch.no_grad():
        for i, (_, _, host) in enumerate(hosts(model)):
            adapter = host["default"]
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
            adapter.lora_magnitude_vector.mul_(1.2)
    full = compress(model, threshold=0.0)
    assert_close(logits(attach_state(make_bert(), full.state), ids), logits(model, ids), rel=1e-4)
    nothing = compress(model, threshold=1e9)  # would drop every direction: DoRA modules keep one each
    assert set(nothing.ranks_after.values()) == {1}
    for name, update in full.original.modules.items():
        assert torch.equal(nothing.state.modules[name].magnitude, update.magnitude)


# -- targets and allocation ----------------------------------------------------------------------


def test_budget_is_respected_and_monotone():
    state = mixed_state()
    before = compress(state, budget=1.0).factor_parameters_before
    assert before == sum(u.A.numel() + u.B.numel() for u in state.modules.values())
    previous = None
    for budget in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0):
        result = compress(state, budget=budget)
        consistent(result)
        assert result.factor_parameters_after <= budget * before
        if previous is not None:
            assert result.factor_parameters_after >= previous.factor_parameters_after
            assert result.retained_energy >= previous.retained_energy
            assert all(result.ranks_after[n] >= previous.ranks_after[n] for n in state.modules)
        previous = result
    assert previous.ranks_after == {n: module_svd(u).S.numel() for n, u in state.modules.items()}


def test_energy_target_keeps_the_fewest_directions_that_reach_it():
    state = mixed_state()
    for fraction in (0.5, 0.8, 0.95):
        result = compress(state, energy=fraction)
        consistent(result)
        total = sum(m.singular_values.square().sum().item() for m in result.modules.values())
        assert result.retained_energy >= fraction
        assert result.retained_energy - result.threshold ** 2 / total < fraction  # one fewer would miss it


def test_global_and_per_module_allocation_differ_on_unequal_spectra():
    state = AdapterState({"strong": planted(32, 32, [10 * 0.7 ** i for i in range(8)], scale=2.0, seed=0),
                          "weak": planted(32, 32, [0.9 ** i for i in range(8)], seed=1)})
    pooled = compress(state, budget=0.5)
    alone = compress(state, budget=0.5, allocation="per-module")
    assert alone.ranks_after == {"strong": 4, "weak": 4}  # half of each module's own parameters
    assert pooled.ranks_after != alone.ranks_after
    assert pooled.ranks_after["strong"] > pooled.ranks_after["weak"]
    assert pooled.factor_parameters_after <= alone.factor_parameters_after
    assert pooled.retained_energy > alone.retained_energy  # pooling keeps the largest σ over all
    # per-module energy: each module keeps its own 90%
    per_energy = compress(state, energy=0.9, allocation="per-module")
    assert all(m.retained_energy >= 0.9 for m in per_energy.modules.values())
    # normalising by each module's σ₁ puts the weak module's slow decay first
    normalized = compress(state, budget=0.5, normalize="max")
    consistent(normalized)
    assert normalized.ranks_after["weak"] > pooled.ranks_after["weak"]
    assert compress(state, budget=0.5, normalize="frobenius").ranks_after["weak"] > pooled.ranks_after["weak"]


def diagonal(n: int, sigmas: list[float]) -> ModuleUpdate:
    """An update whose singular values are exactly `sigmas` (B holds them on its diagonal)."""
    r = len(sigmas)
    return ModuleUpdate(torch.eye(r, n), torch.eye(n, r) * torch.tensor(sigmas), 1.0)


def test_ties_at_the_threshold_go_together():
    state = AdapterState({"a": diagonal(16, [3.0, 2.0, 1.0, 1.0]), "b": diagonal(16, [1.0, 1.0, 0.5])})
    assert module_svd(state.modules["b"]).S[1] == 1.0  # exact ties
    # budget for 4 directions: 3, 2 and two of the four 1.0s would fit; the tie at 1.0 is dropped whole
    result = compress(state, budget=4 / 7)
    consistent(result)
    assert result.ranks_after == {"a": 2, "b": 0} and result.dropped == ["b"]
    assert "b" not in result.state.modules


def test_rank_target_caps_at_each_module_rank():
    state = mixed_state()
    result = compress(state, rank=5)
    assert result.ranks_after == {"a": 5, "b": 5, "c": 5, "d": 4}
    assert result.threshold is None


# -- reports, sweep, errors ----------------------------------------------------------------------


def test_report_summary_json_and_refusing_to_overwrite(tmp_path):
    result = compress(mixed_state(), budget=0.5, out=tmp_path / "out")
    assert isinstance(result.summary(), Table) and result.summary().row_count == 4
    data = json.loads(json.dumps(result.to_dict(top_k=3)))
    assert data["factor_parameters_after"] == result.factor_parameters_after
    assert len(data["modules"][0]["singular_values"]) == 3
    assert "fewer" in result.headline()
    with pytest.raises(OutputExistsError, match="overwrite"):
        compress(mixed_state(), budget=0.5, out=tmp_path / "out")
    compress(mixed_state(), budget=0.25, out=tmp_path / "out", overwrite=True)


def test_sweep_evaluates_each_budget_and_plots(tmp_path):
    state = mixed_state()
    seen: list[AdapterState] = []

    def evaluate(candidate: AdapterState) -> float:
        seen.append(candidate)
        return sum(u.matrix().norm().item() ** 2 for u in candidate.modules.values())

    points = sweep(state, [1.0, 0.5, 0.25, 0.1], evaluate=evaluate)
    assert list(points) == [1.0, 0.5, 0.25, 0.1] and len(seen) == 4
    total = sum(u.matrix().norm().item() ** 2 for u in state.modules.values())
    for point in points.values():  # the metric here is the kept energy itself
        assert point.metric == pytest.approx(point.retained_energy * total, rel=1e-5)
        assert point.parameters == point.result.parameters_after
    params = [p.parameters for p in points.values()]
    assert params == sorted(params, reverse=True)
    path = plot_sweep(points, tmp_path / "sweep.png", metric="energy", reference=total)
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SpliceError, match="evaluate"):
        plot_sweep(sweep(state, [0.5]), tmp_path / "none.png")


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0.5, "energy": 0.9}, "exactly one"),
    ({}, "exactly one"),
    ({"budget": 0.0}, r"\(0, 1\]"),
    ({"budget": 1.5}, r"\(0, 1\]"),
    ({"energy": -0.1}, r"\(0, 1\]"),
    ({"rank": 0}, ">= 1"),
    ({"rank": 2.5}, "whole number"),
    ({"threshold": -1.0}, ">= 0"),
    ({"threshold": float("nan")}, "finite"),
    ({"budget": 0.5, "allocation": "layer"}, "allocation must be one of"),
    ({"budget": 0.5, "normalize": "l2"}, "normalize must be one of"),
    ({"threshold": 1e9}, "keeps no direction"),
    ({"budget": 1e-4}, "too small"),
])
def test_bad_targets_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(SpliceError, match=message):
        compress(mixed_state(), **kwargs)


def test_an_untrained_adapter_has_nothing_to_keep():
    zero = AdapterState({"a": ModuleUpdate(torch.randn(4, 8), torch.zeros(8, 4), 2.0)})
    for kwargs in ({"budget": 0.5}, {"energy": 0.9}):
        with pytest.raises(SpliceError, match="weight change is zero"):
            compress(zero, **kwargs)
    assert compress(zero, threshold=0.0).ranks_after == {"a": 4}  # kept as it is: exact


def test_a_directory_that_is_not_an_adapter_is_refused(tmp_path):
    with pytest.raises(AdapterFileError, match="adapter_config.json"):
        compress(tmp_path, budget=0.5)
    (tmp_path / "adapter_config.json").write_text('{"hello": 1}')
    with pytest.raises(AdapterFileError, match="no adapter_model.safetensors"):
        compress(tmp_path, budget=0.5)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match="neither"):
        compress(tmp_path, budget=0.5)
    with pytest.raises(AdapterFileError, match="does not exist"):
        compress(tmp_path / "missing", budget=0.5)


def test_a_model_without_an_adapter_is_refused():
    with pytest.raises(SpliceError, match="no adapter"):
        compress(make_bert(), budget=0.5)


# -- real weights ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_lora_on_rotten_tomatoes_compressed_by_half_keeps_its_logits(minilm):
    """LoRA r=8 on query/value of the real MiniLM, 20 Adam steps on 32 real reviews (head trained
    too), then PARA at budget 0.5, scored on 32 other reviews: the logits' error stays within
    2·sqrt(discarded energy) of the change the LoRA factors make (to first order the logit change
    is linear in ΔW, whose global relative Frobenius error is sqrt(discarded energy); measured
    here: 0.11 against sqrt(discarded) = 0.096)."""
    from transformers import AutoTokenizer

    rows = splice.assets.rotten_tomatoes().train[:64]
    tokenizer = AutoTokenizer.from_pretrained(splice.assets.minilm_path())
    batch = tokenizer([r["text"] for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt")
    labels = torch.tensor([r["label"] for r in rows])
    train = {k: v[:32] for k, v in batch.items()}
    held = {k: v[32:] for k, v in batch.items()}
    base = {k: v.clone() for k, v in minilm.state_dict().items()}
    torch.manual_seed(0)
    splice.attach(minilm, splice.LoRA(r=8, alpha=16, targets=["query", "value"], train_also=["classifier"]))
    optimizer = torch.optim.Adam(splice.trainable_parameters(minilm).values(), lr=5e-3)
    minilm.train()
    for _ in range(20):
        loss = nn.functional.cross_entropy(minilm(**train).logits, labels[:32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    minilm.eval()
    assert loss.item() < 0.5  # it fitted the reviews

    result = compress(minilm, budget=0.5)
    assert result.factor_parameters_after <= 0.5 * result.factor_parameters_before
    assert 1 < len(set(result.ranks_after.values()))  # ranks differ across modules
    fresh_model = type(minilm)(minilm.config).eval()
    fresh_model.load_state_dict(base)
    compressed = logits(attach_state(fresh_model, result.state), **held)
    original = logits(minilm, **held)
    with splice.disabled(minilm):  # the trained head alone: what the LoRA factors add is the rest
        head_only = logits(minilm, **held)
    change = (original - head_only).norm()
    error = (compressed - original).norm()
    discarded = 1 - result.retained_energy
    assert 0 < discarded < 0.5
    assert error <= 2 * math.sqrt(discarded) * change, (error / change, math.sqrt(discarded))


def test_splice_compress_is_paras_function_and_compression_the_package():
    import importlib

    import splice.compression.para as para_module

    assert splice.compress is para_module.compress
    assert importlib.import_module("splice.compression.jactus").jactus is splice.compression.jactus
    model = nn.Sequential(nn.Linear(6, 5))
    splice.attach(model, splice.LoRA(r=3, targets=["0"]))
    with torch.no_grad():
        model[0].splice["default"].lora_B.normal_()
    result = splice.compress(model, rank=1)
    assert isinstance(result, para_module.CompressionResult)
    assert result.ranks_after == {"0": 1}
