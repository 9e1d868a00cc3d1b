"""The whole job on a tiny mixture: its runs, the comparison, the report; the transfer matrix's
sanity (volume 2 §9 (d) test 3)."""

from __future__ import annotations

import json

import pytest
import torch
from multitask_helpers import task
from rich.console import Console
from safetensors.torch import load_file

from splice.core.errors import OutputExistsError
from splice.multitask import load_tasks, plan, run_multitask, train_run, transfer_matrix
from splice.multitask.run import Base, load_base
from splice.multitask.transfer import pair_key

QUIET = Console(quiet=True)


def test_transfer_matrix_is_zero_on_the_diagonal_and_reads_row_minus_single():
    names = ["a", "b", "c"]
    single = {"a": 0.5, "b": 0.75, "c": 0.25}
    pairs = {("a", "b"): {"a": 0.625, "b": 0.5}, ("a", "c"): {"a": 0.5, "c": 0.5}, ("b", "c"): {"b": 1.0, "c": 0.0}}
    assert transfer_matrix(names, single, pairs) == [[0.0, 0.125, 0.0], [-0.25, 0.0, 0.25], [0.25, -0.25, 0.0]]
    assert pair_key("c", "a", names) == ("a", "c")


def test_plan_trains_every_pair_once_and_the_pair_of_two_tasks_is_the_joint_run(mixture, files):
    three = mixture(tasks=[task(files, "colour"), task(files, "animal"), task(files, "hue", data="colour")])
    runs = [name for name, _ in plan(three, load_tasks(three))]
    assert runs == ["joint", "single-colour", "single-animal", "single-hue", "pair-colour+animal", "pair-colour+hue",
                    "pair-animal+hue"]
    two = mixture()
    assert [name for name, _ in plan(two, load_tasks(two))] == ["joint", "single-colour", "single-animal"]
    alone = mixture(compare=False)
    assert [name for name, _ in plan(alone, load_tasks(alone))] == ["joint"]


def test_a_job_compares_reports_and_reproduces_its_transfer_matrix_exactly(mixture, tmp_path):
    """Spec test 3: Δ_ii = 0 by construction, and the pair and single runs trained again with the
    same seed give the same Δ_ij, bit for bit."""
    config = mixture(seeds=[0, 1], train={"max_steps": 5})
    result = run_multitask(config, console=QUIET, quiet=True)
    names = ["colour", "animal"]
    assert [(r.name, r.seed) for r in result.runs] == [(n, s) for s in (0, 1)
                                                        for n in ("joint", "single-colour", "single-animal")]
    transfer = result.transfer
    for matrix in [transfer["mean"], *transfer["per_seed"].values()]:
        assert [matrix[i][i] for i in range(2)] == [0.0, 0.0]
    joint = result.run("joint", 1)
    assert transfer["per_seed"]["1"][1][0] == joint.scores["animal"] - result.run("single-animal", 1).scores["animal"]
    # the pair's and the singles' runs again, seed 1: the same numbers, the same adapter
    tasks = load_tasks(config)
    keys, base = {t.name: t.key for t in tasks}, Base(*load_base(config.shared_config()))
    again = {name: train_run(config, members, 1, name, tmp_path / "again" / name, keys, base=base)
             for name, members in (("joint", tasks), ("single-colour", tasks[:1]), ("single-animal", tasks[1:]))}
    rerun = transfer_matrix(names, {t: again[f"single-{t}"].scores[t] for t in names},
                            {("colour", "animal"): again["joint"].scores})
    assert rerun == transfer["per_seed"]["1"]
    first = load_file(result.output_dir / "runs" / "seed1" / "joint" / "adapter" / "adapter_model.safetensors")
    second = load_file(tmp_path / "again" / "joint" / "adapter" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # the comparison: one adapter for two, the heads the same
    costs = result.summary["costs"]
    assert costs["joint"]["adapters"] == 1 and costs["single"]["adapters"] == 2
    assert costs["single"]["adapter_parameters"] == 2 * costs["joint"]["adapter_parameters"]
    assert costs["joint"]["head_parameters"] == costs["single"]["head_parameters"] == 32 * (2 + 3)  # no bias
    assert costs["joint"]["steps"] == costs["single"]["steps"] == 10  # per_task budget
    row = result.summary["tasks"]["animal"]
    assert row["difference"]["per_seed"] == pytest.approx(
        [a - b for a, b in zip(row["joint"]["per_seed"], row["single"]["per_seed"], strict=True)])
    # the report
    report = result.output_dir / "report"
    saved = json.loads((report / "results.json").read_text())
    assert saved["transfer"]["per_seed"] == transfer["per_seed"] and len(saved["runs"]) == 6
    text = (report / "results.md").read_text()
    assert "| animal |" in text and "Transfer matrix" in text and "shared - own" in text
    assert (report / "transfer.png").stat().st_size > 0 and (report / "multitask.yaml").is_file()
    heads = json.loads((result.output_dir / "runs" / "seed0" / "joint" / "heads.json").read_text())
    assert heads["animal"]["labels"] == ["farm", "pet", "wild"]
    assert set(load_file(result.output_dir / "runs" / "seed0" / "joint" / "heads.safetensors")) == {
        "colour.weight", "animal.weight"}
    with pytest.raises(OutputExistsError, match="already exists"):
        run_multitask(config, console=QUIET, quiet=True)
