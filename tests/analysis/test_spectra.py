"""Spectra of delta weights: ranks of constructed matrices, LoRA's rank bound, skipped forms,
plots, and one real LoRA trained on MiniLM."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import randomize
from rich.console import Console
from typer.testing import CliRunner

import splice
from splice.analysis import (
    adapter_dir_spectra,
    adapter_spectra,
    delta_matrix,
    energy_rank,
    entropy_rank,
    plot_effective_ranks,
    plot_spectra,
    singular_values,
    stable_rank,
)
from splice.analysis.spectra import delta_svd, matrix_svd
from splice.core.host import hosts


def with_singular_values(s: list[float], rows: int = 20, cols: int = 12, seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthonormal U [rows, k] and V [cols, k]."""
    generator = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(rows, len(s), generator=generator, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(cols, len(s), generator=generator, dtype=torch.float64))[0]
    return U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.T


def test_ranks_of_a_delta_with_known_singular_values():
    s = singular_values(with_singular_values([4.0, 2.0, 1.0, 1.0]))
    torch.testing.assert_close(s[:4], torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64))
    assert s[4:].abs().max() < 1e-12
    p = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64) / 8
    assert entropy_rank(s) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)
    # energies 16, 4, 1, 1 of 22: 16/22 = 0.73, 20/22 = 0.91, 21/22 = 0.95, 22/22
    assert [energy_rank(s, f) for f in (0.5, 0.9, 0.95, 0.99, 1.0)] == [1, 2, 3, 4, 4]
    assert stable_rank(s) == pytest.approx(22 / 16, rel=1e-12)


def test_equal_singular_values_give_every_rank_equal_to_their_count():
    s = singular_values(with_singular_values([1.5] * 5))
    assert entropy_rank(s) == pytest.approx(5.0, rel=1e-9)
    assert stable_rank(s) == pytest.approx(5.0, rel=1e-9)
    assert energy_rank(s, 0.99) == 5 and energy_rank(s, 0.8) == 4  # 4/5 of the energy, exactly


def test_an_energy_threshold_reached_exactly_counts_and_a_zero_delta_has_rank_zero():
    assert energy_rank(torch.tensor([3.0, 1.0], dtype=torch.float64), 0.9) == 1  # 9/10
    zero = torch.zeros(4, dtype=torch.float64)
    assert (entropy_rank(zero), energy_rank(zero), stable_rank(zero)) == (0.0, 0, 0.0)
    with pytest.raises(splice.SpliceError, match="fraction"):
        energy_rank(zero, 1.5)


def test_a_lora_of_rank_r_has_r_nonzero_singular_values(bert):
    splice.attach(bert, splice.LoRA(r=3, targets="all-linear"))
    randomize(bert)
    report = adapter_spectra(bert)
    assert len(report.modules) == 13 and not report.skipped  # 2 layers x 6 Linears + the pooler
    for m in report.modules:
        assert m.numerical_rank == m.adapter_rank == 3 and m.singular_values.numel() == 3
        assert m.entropy_rank <= 3 and m.stable_rank <= 3 and max(m.energy_ranks.values()) <= 3
    # from the factors == from the dense product, whose other singular values are round-off
    _, _, host = next(hosts(bert))
    dense = matrix_svd(delta_matrix(host["default"]).float())
    torch.testing.assert_close(dense.S[:3], delta_svd(host["default"]).S, rtol=1e-5, atol=0)
    assert (dense.S > dense.tolerance).sum() == 3 and dense.S[3] > 0


def test_convolution_and_embedding_loras_are_ranked_from_their_dense_delta(convnet):
    splice.attach(convnet, splice.LoRA(r=2, targets=["embed", "conv1", "conv2", "head"]))
    randomize(convnet)
    report = adapter_spectra(convnet)
    shapes = {m.name: m.shape for m in report.modules}
    assert shapes == {"embed": (97, 8), "conv1": (12, 8 * 3), "conv2": (6, 3 * 3 * 3), "head": (5, 18)}
    assert all(m.numerical_rank == 2 and m.entropy_rank <= 2 for m in report.modules)


def test_pissa_init_is_no_change_and_forms_without_a_weight_are_skipped(bert):
    splice.attach(bert, splice.LoRA(r=2, init="pissa"), name="pissa")
    assert all(m.numerical_rank == 0 and m.entropy_rank == 0 for m in adapter_spectra(bert, "pissa").modules)
    splice.attach(bert, splice.LoReFT(r=2), name="reft")
    report = adapter_spectra(bert, "reft")
    assert not report.modules and report.skipped
    assert all("no equivalent weight change" in reason for reason in report.skipped.values())
    with pytest.raises(splice.SpliceError, match="several adapters"):
        adapter_spectra(bert)


def test_plots_and_json_of_a_saved_adapter(bert, tmp_path):
    splice.attach(bert, splice.LoRA(r=2))
    randomize(bert)
    path = splice.save(bert, tmp_path / "adapter")
    splice.detach(bert, "default")
    report = adapter_dir_spectra(bert, path)
    assert report.adapter == str(path) and not splice.adapters(bert)  # loaded, then detached again
    assert [m.layer for m in report.modules] == [0, 0, 1, 1]
    assert report.rows()[0]["module"] == "bert.encoder.layer.0.attention.self.query"
    assert report.rows()[0]["energy 90%"] == report.modules[0].energy_ranks[0.9]
    row = json.loads(json.dumps(report.to_dict(top_k=1)))["modules"][0]
    assert row["type"] == "bert.encoder.layer.N.attention.self.query" and len(row["singular_values"]) == 1
    plot_spectra(report, tmp_path / "spectra.png")
    plot_effective_ranks(report, tmp_path / "ranks.png")
    for name in ("spectra.png", "ranks.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_lora_trained_on_minilm_uses_at_most_r_directions(tmp_path):
    from splice.cli.main import app
    from splice.train import TrainConfig, run

    # short reviews, small batches and a fast head: 20 steps that beat the untrained model (0.47 ->
    # 0.59 on 64 reviews), else the run would keep, and save, the untrained adapter (B = 0)
    config = TrainConfig(max_steps=20, eval_every=None, max_eval_examples=64, batch_size=8, max_length=32, lr=3e-3,
                         head_lr=0.1, output_dir=str(tmp_path / "run"))
    trained = run(config, console=Console(quiet=True))
    assert trained.best_step == 20
    adapter = trained.paths["adapter"]
    result = CliRunner().invoke(app, ["analyze", str(adapter), "--out", str(tmp_path / "spectra")])
    assert result.exit_code == 0, result.output
    modules = json.loads((tmp_path / "spectra" / "spectra.json").read_text())["modules"]
    assert len(modules) == 12  # 6 layers x query, value
    assert {m["type"].rsplit(".", 1)[-1] for m in modules} == {"query", "value"}
    for m in modules:
        assert m["numerical_rank"] <= 8 and 1 <= m["entropy_rank"] <= 8
        assert m["stable_rank"] <= 8 and m["energy_ranks"]["0.99"] <= 8
