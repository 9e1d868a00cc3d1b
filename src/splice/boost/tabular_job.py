"""`splice boost-tabular`: BoostLLM against logistic regression and gradient-boosted trees on one
table, over several seeded draws of the same number of shots; a report with each draw's scores
and their mean and spread (<output_dir>/results.json, results.md)."""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from splice.boost.baselines import BASELINES, fit_baselines
from splice.boost.tabular import draw_shots, load_table
from splice.boost.tabular_llm import boostllm, scored_rows
from splice.core.errors import OutputExistsError, SpliceError
from splice.io.files import atomic_directory, write_json, write_text
from splice.io.output_dirs import check_output_dir

METRICS = ("accuracy", "auc", "log_loss")
CLAIM = "job.json"  # written first: the folder belongs to the run under way


@dataclass
class TabularJob:
    """One table, one number of shots, several seeds; BoostLLM's settings and the baselines."""

    data: str
    shots: int = 16
    seeds: list[int] = field(default_factory=lambda: [0])
    model: str = "smollm2"
    label_column: str | None = None
    rounds: int = 3
    shrinkage: float = 0.5
    tree_depth: int = 3
    views: tuple[str, ...] = ("features", "path")
    max_length: int = 512
    test_rows: int | None = None
    baselines: tuple[str, ...] = BASELINES
    output_dir: str = "runs/boost-tabular"
    settings: dict[str, Any] = field(default_factory=dict)  # BoostLLMSettings' other fields

    def __post_init__(self) -> None:
        own = {"seed", "rounds", "shrinkage"} & set(self.settings)
        if own:
            raise SpliceError(f"settings {sorted(own)} are the job's own fields (seeds, rounds, shrinkage): set them "
                              "there, so that BoostLLM and the baselines share each draw")
        if self.test_rows is not None and self.test_rows < 1:
            raise SpliceError(f"test_rows must be >= 1 (None scores every test row), got {self.test_rows}")
        if any(seed < 0 for seed in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise SpliceError(f"seeds must be distinct numbers >= 0, got {self.seeds}")


def run_tabular_job(job: TabularJob, *, console: Console | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Every seed's draw: BoostLLM and the baselines on the same shots and test rows; the report
    (also written to `job.output_dir`)."""
    console = console or Console()
    started = time.perf_counter()
    folder = check_output_dir(job.output_dir, overwrite)
    table = load_table(job.data, job.label_column)
    if folder.exists() and overwrite:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CLAIM, {"job": _plain(job)})  # the folder is this run's: another one is refused
    draws = []
    for seed in job.seeds:
        split = draw_shots(table, job.shots, seed)
        test = scored_rows(split, job.test_rows, seed)
        console.print(f"[bold]seed {seed}[/]: {len(split.train)} training and {len(split.validation)} validation "
                      f"shots, {len(test)} test rows" + (f" ({split.note})" if split.note else ""))
        result = boostllm(job.model, table, split, rounds=job.rounds, shrinkage=job.shrinkage,
                          tree_depth=job.tree_depth, views=job.views, max_length=job.max_length,
                          test_rows=job.test_rows, **{"seed": seed, **job.settings})
        draw = {"seed": seed, "boostllm": result.to_dict(),
                "baselines": fit_baselines(table, split, test, seed, job.baselines)}
        console.print("  " + "; ".join(f"{name} {_line(s)}" for name, s in _methods(draw).items()))
        draws.append(draw)
    report = {"job": _plain(job),
              "table": {"name": table.name, "rows": len(table), "columns": len(table.columns),
                        "classes": table.classes},
              "draws": draws, "summary": summarize(draws), "wall_seconds": time.perf_counter() - started}
    others = sorted(p.name for p in folder.iterdir() if p.name != CLAIM)
    if others:
        raise OutputExistsError(f"{folder} was written by something else during this run ({', '.join(others)}); "
                                "results not written over it (pass overwrite / --force, or another output folder)")
    with atomic_directory(folder, overwrite=True) as tmp:
        write_json(tmp / "results.json", report)
        write_text(tmp / "results.md", markdown(report))
    return report


def _plain(job: TabularJob) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(job).items()}


def _methods(draw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"BoostLLM": draw["boostllm"]["test"], **draw["baselines"]}


def _line(s: dict[str, Any]) -> str:
    if "error" in s:
        return s["error"]
    return f"accuracy {s['accuracy']:.3f}, AUC " + ("-" if s["auc"] is None else f"{s['auc']:.3f}")


def summarize(draws: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per method and metric, the mean and standard deviation over the draws that ran."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in _methods(draws[0]) if draws else []:
        runs = [_methods(d)[name] for d in draws if "error" not in _methods(d)[name]]
        if runs:
            out[name] = {}
            for m in METRICS:
                values = [r[m] for r in runs if r[m] is not None]  # AUC is None on a one-class test set
                out[name][m] = {"mean": statistics.fmean(values) if values else None,
                                "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def markdown(report: dict[str, Any]) -> str:
    job, table = report["job"], report["table"]
    lines = [f"# BoostLLM on {table['name']}: {job['shots']} shots, {len(job['seeds'])} draw(s)", "",
             f"{job['model']}, {job['rounds']} rounds, shrinkage {job['shrinkage']}, views {', '.join(job['views'])},"
             f" tree depth {job['tree_depth']}; {table['rows']} rows, {table['columns']} columns, "
             f"{len(table['classes'])} classes. Mean ± std over the draws.", "",
             "| method | accuracy | AUC | log-loss |", "|---|---:|---:|---:|"]
    for name, metrics in report["summary"].items():
        lines.append(f"| {name} | " + " | ".join("-" if metrics[m]["mean"] is None else
                                                f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}"
                                                for m in METRICS) + " |")
    missing = {n: s["error"] for d in report["draws"] for n, s in d["baselines"].items() if "error" in s}
    lines += ["", *[f"- {name}: {error}" for name, error in missing.items()], ""]
    return "\n".join(lines)

