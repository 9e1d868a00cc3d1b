"""Environment headers and report headings, phases, number formatting, markdown tables, the JSON +
markdown output, the command line every benchmark shares (`bench_parser`, `settings_from`,
`bench_main`, `rerender`) and accuracy over seeds: the reporting half of the bench harness
(bench/common.py re-exports all of it). Imports no torch, transformers, splice or PEFT at module level."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# The classification data sets the accuracy benchmarks train on, with the names their reports use.
DATASETS = {"rotten_tomatoes": "Rotten Tomatoes", "bbc_news": "BBC News"}

# ----------------------------------------------------------------------------------- reporting


def git(*args: str) -> str:
    """A git command's output, run in the repository (empty where git is missing)."""
    try:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def source_version() -> str:
    """The git commit, with "+src changes" when src/ differs from it: what splice code ran."""
    changed = git("status", "--porcelain", "--", ":/src")
    return git("rev-parse", "--short", "HEAD") + (" +src changes" if changed else "")


def environment(threads: int) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    import splice

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "splice": splice.__version__,
            "git_commit": git("rev-parse", "--short", "HEAD"),
            "git_dirty_src": bool(git("status", "--porcelain", "--", ":/src")),  # src from the root, not bench/
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": threads,
            "loadavg_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def environment_line(env: dict[str, Any]) -> str:
    """One markdown sentence: date, versions, CPU, threads, load average at start and end."""
    dirty = ", src has uncommitted changes" if env["git_dirty_src"] else ""
    return (f"{env['date']}; splice {env['splice']} (git {env['git_commit']}{dirty}),"
            f" PEFT {env['peft']}, transformers {env['transformers']}, torch {env['torch']}, Python {env['python']};"
            f" {env['cpu']} x{env['cpu_count']}, torch threads {env['torch_threads']};"
            f" load average at start {env['loadavg_start'][0]:.2f}, at end {env['loadavg_end'][0]:.2f}.")


def heading(title: str, env: dict[str, Any]) -> list[str]:
    """A report's first lines: its title and the environment sentence (`environment_line`)."""
    return [f"# {title}", "", environment_line(env)]


class Phases:
    """Prints each phase as it starts and records how long each took."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.marks: dict[str, float] = {}

    def __call__(self, label: str) -> None:
        print(f"{label} ...", flush=True)
        self.marks[label] = time.perf_counter()

    def seconds(self) -> dict[str, float]:
        labels = list(self.marks)
        ends = [self.marks[b] for b in labels[1:]] + [time.perf_counter()] * bool(labels)
        return {a: end - self.marks[a] for a, end in zip(labels, ends, strict=True)}

    def total(self) -> float:
        return time.perf_counter() - self.started


def fmt_ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.3f} [{r['q1']:.3f}-{r['q3']:.3f}]"


def fmt_pct(r: dict[str, float]) -> str:
    return f"{r['median']:+.1%} [{r['q1']:+.1%} to {r['q3']:+.1%}]"


def fmt_s(a: dict[str, float]) -> str:
    return f"{a['min_s'] * 1e3:.1f} / {a['median_s'] * 1e3:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_results(out_dir: Path, stem: str, result: dict[str, Any], text: str) -> None:
    """`stem`.json (every number) and `stem`.md (the tables), and the tables on stdout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / f"{stem}.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\nwrote {out_dir / stem}.json and .md")


# -- the command line every benchmark shares ---------------------------------------------------


def bench_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The options of every benchmark: --quick, --threads, --out-dir, --render; add your own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1: bench/README.md)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--render", type=Path, metavar="JSON", help="measure nothing: rewrite the markdown of a JSON")
    return p


def continuable(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of a benchmark that runs each job in a child (`common_measure.budgeted_children`):
    --merge (keep the finished runs of the result in --out-dir whose settings equal this invocation's,
    `common_measure.keep_finished`), --budget-min (a settings field: start no job expected to end past
    it), and the hidden --run-child JOB."""
    p.add_argument("--merge", action="store_true",
                   help="keep the finished runs (same settings) of the result already in --out-dir")
    p.add_argument("--budget-min", type=float,
                   help="minutes after which no new run starts (per invocation; those left are listed 'not run')")
    p.add_argument("--run-child", help=argparse.SUPPRESS)
    return p


def continued_result(target: Path, merge: bool, settings: Any, rebuild: Callable[[dict[str, Any]], dict[str, Any]],
                     key: Callable[[dict[str, Any]], str], extra: dict[str, Any], **invocation: Any) -> dict[str, Any]:
    """A child-per-run benchmark's result at its start: with `merge`, the finished runs of the result in
    `target` whose settings this invocation shares (`common_measure.keep_finished`) and its earlier
    invocations; `extra` (the tasks, ...) and this invocation's record (`invocation` added) on top."""
    import dataclasses

    from common_measure import keep_finished

    previous: dict[str, Any] = json.loads(target.read_text()) if merge and target.exists() else {}
    kept, dropped = keep_finished(previous.get("runs", []), rebuild, key)
    if dropped:
        print(f"--merge: {dropped} earlier run(s) dropped (other settings, or failed)", flush=True)
    return {"environment": environment(settings.threads), "settings": dataclasses.asdict(settings), **extra,
            "runs": kept, "not_run": [],
            "invocations": [*previous.get("invocations", []),
                            {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "source": source_version(),
                             "loadavg": os.getloadavg(), "merge": merge, "kept": len(kept), "dropped": dropped,
                             **invocation}]}


def result_saver(result: dict[str, Any], target: Path, phase: Any, markdown: Callable[[dict[str, Any]], str],
                 draw: Callable[[dict[str, Any], Path], Any]) -> Callable[[], None]:
    """`save()` for `continued_result`'s result: its phases and runtime, then the JSON, markdown and PNG
    rewritten (after every run: a stopped bench keeps what it finished)."""

    def save() -> None:
        finish(result, phase)
        result["invocations"][-1]["runtime_s"] = result["runtime_s"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2, default=str) + "\n")
        target.with_suffix(".md").write_text(markdown(result) + "\n")
        draw(result, target.with_suffix(".png"))

    return save


def settings_from(args: argparse.Namespace, settings_cls: Any, overrides: tuple[str, ...] | None = None) -> Any:
    """The benchmark's settings (quick or full) with every override given on the command line:
    `overrides`, or by default every settings field that is also an option and was given."""
    import dataclasses

    settings = settings_cls.quick_run(threads=args.threads) if args.quick else settings_cls(threads=args.threads)
    if overrides is None:
        overrides = tuple(f.name for f in dataclasses.fields(settings_cls) if f.name in vars(args))
    for name in overrides:
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    return settings


def parse_settings(p: argparse.ArgumentParser, argv: list[str] | None,
                   settings_cls: Any) -> tuple[argparse.Namespace, Any]:
    """Parse; a child's settings come whole from its (hidden) --settings-json, a parent's from
    its options (`settings_from`)."""
    args = p.parse_args(argv)
    if getattr(args, "settings_json", None):
        return args, settings_cls(**json.loads(args.settings_json))
    return args, settings_from(args, settings_cls)


def rerender(path: Path, settings_cls: Any, markdown: Callable[[dict[str, Any], Any], str]) -> None:
    """--render: rewrite `path`'s markdown from its JSON, measuring nothing."""
    result = json.loads(path.read_text())
    settings = settings_cls(**result["settings"]) if settings_cls is not None else None
    path.with_suffix(".md").write_text(markdown(result, settings) + "\n")
    print(f"wrote {path.with_suffix('.md')}")


# -- accuracy over seeds -----------------------------------------------------------------------


def seed_summary(runs: list[dict[str, Any]], key: str, names: list[str], datasets: list[str],
                 extra: Callable[[list[dict[str, Any]]], dict[str, Any]] = lambda ok: {}) -> dict[str, Any]:
    """Per candidate (`run[key]`) and data set: test accuracy mean, std (ddof 1), per seed, how many
    seeds failed, plus `extra(successful runs)`; {"error": ...} where no seed ran."""
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        summary[name] = {}
        for data in datasets:
            rows = [r for r in runs if r.get(key) == name and r["data"] == data]
            ok = [r for r in rows if "error" not in r]
            if not ok:
                summary[name][data] = {"error": rows[0]["error"] if rows else "not run"}
                continue
            acc = np.array([r["test_accuracy"] for r in ok])
            summary[name][data] = {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                                   "n": len(acc), "per_seed": acc.tolist(), "failed_seeds": len(rows) - len(ok),
                                   **extra(ok)}
    return summary


def mean_std(a: dict[str, Any]) -> str:
    """"72.3% ± 0.8%" from a `seed_summary` cell, with failed seeds or the error said."""
    if "error" in a:
        return f"failed: {a['error']}"
    failed = f" ({a['failed_seeds']} seed(s) failed)" if a["failed_seeds"] else ""
    return f"{a['mean']:.1%} ± {a['std']:.1%}{failed}"


def seed_table(header: list[str], summary: dict[str, Any], names: list[str], datasets: list[str],
               cells: Callable[[dict[str, Any]], list[str]]) -> str:
    """One row per candidate and data set of a `seed_summary`: the name, the data set and
    `cells(summary cell)`; a cell without a seed that ran says its error and leaves the rest blank."""
    rows = []
    for name in names:
        for data in datasets:
            a = summary[name][data]
            rows.append([name, DATASETS[data], *([f"failed: {a['error']}"] + [""] * (len(header) - 3)
                                                 if "error" in a else cells(a))])
    return table(header, rows)


# -- one benchmark run, start to end -----------------------------------------------------------


def finish(result: dict[str, Any], phase: Any, keys: tuple[str, str] = ("phase_s", "runtime_s")) -> dict[str, Any]:
    """Close a run's result: seconds per phase and total runtime under `keys` (older benchmarks'
    JSON says "phase_seconds" and "total_s"), and the load average at the end."""
    result[keys[0]] = phase.seconds()
    result["environment"]["loadavg_end"] = os.getloadavg()
    result[keys[1]] = phase.total()
    return result


def bench_main(argv: list[str] | None, parse_args: Callable[[list[str] | None], tuple[argparse.Namespace, Any]],
               settings_cls: Any, run: Callable[[Any, argparse.Namespace], dict[str, Any]],
               markdown: Callable[[dict[str, Any], Any], str], stem: str,
               child: Callable[[argparse.Namespace, Any], bool] | None = None,
               draw: Callable[[dict[str, Any], Path], Any] | None = None) -> dict[str, Any] | None:
    """The `main` of a benchmark: parse, answer a child call (`child` returns True when it did),
    or re-render (`--render`: the markdown, and with `draw` the PNG beside the JSON), or run and
    write `stem`(`_quick`).{json,md}; returns the result."""
    args, settings = parse_args(argv)
    if child is not None and child(args, settings):
        return None
    if args.render:
        rerender(args.render, settings_cls, markdown)
        if draw is not None:
            draw(json.loads(args.render.read_text()), args.render.with_suffix(".png"))
        return None
    result = run(settings, args)
    write_results(args.out_dir, f"{stem}_quick" if settings.quick else stem, result, markdown(result, settings))
    return result


def json_child(run_one: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[argparse.Namespace, Any], bool]:
    """`bench_main`'s `child` for a benchmark run by `common_measure.budgeted_children`: the hidden
    --run-child JOB answered with `run_one(JOB)` as one JSON line on stdout."""

    def child(args: argparse.Namespace, settings: Any) -> bool:
        if not args.run_child:
            return False
        print(json.dumps(run_one(json.loads(args.run_child)), default=str))
        return True

    return child


def verdict(low: float, high: float, limit: float, lower_is_better: bool = True) -> str:
    """A goal against a spread [low, high] (IQR or confidence interval): met only if the whole
    spread is on the good side of `limit`, missed if all of it is on the bad side."""
    good, bad = (high <= limit, low > limit) if lower_is_better else (low >= limit, high < limit)
    return "yes" if good else ("no" if bad else "can't tell (spread spans the goal)")
