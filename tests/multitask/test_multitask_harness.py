"""The whole job on a tiny mixture: its runs, the comparison, the report; the transfer matrix's
sanity (volume 2 §9 (d) test 3)."""

from __future__ import annotations

import json

import pytest
import torch
from multitask_helpers import task
from rich.console import Console
from safetensors.torch import load_file

from splice.core.errors import OutputExistsError, SpliceError
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


def test_a_stopped_job_resumes_at_its_first_unfinished_run_and_ends_as_the_uninterrupted_one(mixture, tmp_path,
                                                                                              monkeypatch):
    from splice.multitask import harness

    whole = run_multitask(mixture(output_dir=str(tmp_path / "whole"), train={"max_steps": 4}), console=QUIET,
                          quiet=True)
    config = mixture(output_dir=str(tmp_path / "stopped"), train={"max_steps": 4})
    trained, real_train_run = [], harness.train_run

    def stop_at_the_third(config, members, seed, name, folder, *args, **kwargs):
        trained.append(name)
        if len(trained) == 3:  # killed part-way: the run's folder holds a config, no run.json
            folder.mkdir(parents=True)
            (folder / "config.yaml").write_text("partial\n")
            raise KeyboardInterrupt
        return real_train_run(config, members, seed, name, folder, *args, **kwargs)

    monkeypatch.setattr(harness, "train_run", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_multitask(config, console=QUIET, quiet=True)
    assert trained == ["joint", "single-colour", "single-animal"]
    with pytest.raises(OutputExistsError, match="already exists"):  # not without resume
        run_multitask(config, console=QUIET, quiet=True)
    trained.clear()
    resumed = run_multitask(config, console=QUIET, quiet=True, resume=True)
    assert trained == ["single-animal"]  # the two finished runs were read back, the stopped one trained again
    assert [r.to_dict() | {"folder": "", "train_seconds": 0, "eval_seconds": 0} for r in resumed.runs] == [
        r.to_dict() | {"folder": "", "train_seconds": 0, "eval_seconds": 0} for r in whole.runs]
    assert resumed.summary == whole.summary | {"costs": resumed.summary["costs"]}
    saved = json.loads((resumed.output_dir / "report" / "results.json").read_text())
    assert [r["name"] for r in saved["runs"]] == ["joint", "single-colour", "single-animal"]
    trained.clear()
    run_multitask(config, console=QUIET, quiet=True, resume=True)  # a finished job: nothing trains again
    assert trained == []


def test_a_resume_is_refused_without_a_job_under_another_config_or_with_overwrite(mixture, tmp_path):
    config = mixture(train={"max_steps": 2}, compare=False)
    with pytest.raises(SpliceError, match="no job.json"):
        run_multitask(config, console=QUIET, quiet=True, resume=True)
    run_multitask(config, console=QUIET, quiet=True)
    changed = mixture(train={"max_steps": 2}, compare=False, seeds=[0, 1])
    with pytest.raises(SpliceError, match=r"another config \(seeds: \[0\] -> \[0, 1\]\)"):
        run_multitask(changed, console=QUIET, quiet=True, resume=True)
    with pytest.raises(SpliceError, match="pass one of them"):
        run_multitask(config, console=QUIET, quiet=True, resume=True, overwrite=True)
    (run_json := tmp_path / "job" / "runs" / "seed0" / "joint" / "run.json").write_text("{not json")
    with pytest.raises(SpliceError, match=r"run.json is unreadable .*remove the folder"):
        run_multitask(config, console=QUIET, quiet=True, resume=True)
    assert run_json.read_text() == "{not json"
