"""Federated LoRA on Flower (`splice.federated`, issue 17): aggregation rules, Med-DualLoRA,
FED-FSTQ, FedEU and SFed-LoRA's scale on real data, 3 seeds, a verdict per claim.

MiniLM (BERT, 6 layers) sequence classification, LoRA on query/value with the head trained,
Flower's simulation engine (`splice.federated.run_federated`), label-Dirichlet partitions.

rules   Rotten Tomatoes (8 clients) and BBC News (5 clients), Dirichlet alpha 0.1 and 1.0, LoRA
        r=8, alpha=16:
          fedavg   FedAvg-LoRA, A and B averaged separately (weighted by rows)
          exact    the weighted mean of the clients' B A, re-factored to rank 8 by SVD
          dual     Med-DualLoRA: + a local LoRA r=4 per client, never uploaded (FedAvg of the global)
          fstq     FED-FSTQ: the update quantised to mixed bit-widths (2/4/8, 4 bits per value on
                   average) and packed; classification has no tokens to drop (keep_ratio 1.0).
                   Skipped, with a note in the report, where `splice.federated.methods.METHODS`
                   has no "fstq".
          fedeu    FedEU: evidential head loss, uploads weighted by the clients' top-k uncertainty
        Per run: global accuracy (the server's adapter on the first `eval_examples` test rows),
        mean per-client accuracy (each client on its own label mix of the test rows; for dual the
        clients' global-adapter-alone accuracy too), training loss, cumulative uplink/downlink
        bytes (Flower's serialized messages), the separation error of FedAvg's A/B rule against
        the exact mean of B A (recorded every round whichever rule runs) and wall time, per round.
sfed    SFed-LoRA's scale alpha*sqrt(N/r) against alpha/r ("standard") and rsLoRA's alpha/sqrt(r)
        at r = 4, 16, 64, the same alpha (16) for all three, FedAvg; on Rotten Tomatoes with 8
        clients at Dirichlet alpha 1.0 only (the budget: one data set and alpha; `--sfed-datasets`,
        `--sfed-alphas` add more). With N fixed, SFed is rsLoRA times sqrt(N): the comparison is
        between scale levels as much as between rank rules (the report shows every scale).
continual  PRISM vs FedAvg-sequential on a federated task sequence (as examples/federated_prism.yaml):
        Rotten Tomatoes -> BBC News -> BBC re-labelled business-or-tech vs the rest, 5 clients holding a
        Dirichlet(1.0) shard of every task, 3 rounds per task, MiniLM with MoELoRA (4 experts, top-2,
        total rank 8):
          fedavg-seq    one MoELoRA adapter keeps training through the tasks (a head per task)
          prism         a block per task, A and router projected off shared per-expert bases (0.97)
          prism-client  the negative control: each client's own bases
        Per run: the global accuracy matrix (average accuracy, backward transfer, forgetting), PRISM's
        ‖A_e M_e‖ after each aggregation and the bases' size, bytes (the bases travel with every
        training message; the query rounds' sketches are uplink), wall time. Measured (load 2-4, the
        first seed): fedavg-seq 408 s, prism 493 s per run (its bases: 350 MB of downlink): 3 seeds x
        3 variants ~70 min.

Verdicts (paired by seed: the same seed gives the same partition and data order to every
variant; "yes" only if every seed agrees, "no" if every seed disagrees, else "can't tell"):
exact beats separate; SFed's spread of accuracy across ranks is smaller than alpha/r's and
rsLoRA's, and its r=64 does not collapse; Med-DualLoRA's personalised accuracy >= its global
adapter alone on label-shifted clients; FED-FSTQ reaches FedAvg's final global accuracy (and
loss) with >= 3x fewer cumulative uplink bytes (read off the per-round curves: the uplink bytes
at the first round each variant reaches the target); FedEU vs FedAvg accuracy; PRISM's backward
transfer above FedAvg-sequential's and above its client-bases control's, and ‖A_e M_e‖ ~ 0 after FedAvg.

Every run is one fresh interpreter (`--run-child`), one at a time (Flower's Ray workers take the
machine's cores, one torch thread each); the JSON, markdown and PNG are rewritten after every
run. Runs are recorded with their settings: `--merge` keeps the finished runs of the results
already in `--out-dir` whose settings equal this invocation's (of any section, data set or seed,
so subsets accumulate) and runs only the rest. The first seed of every job runs first, then
seed 1, then seed 2: a job expected to end past `--budget-min` is not started (listed "not run"),
so the budget cuts seeds, not variants.

Budget per run (full): 5 rounds x 10 local steps, batch 16, max_length 64, lr 2e-3 (head 1e-2),
every client every round, 200 evaluation rows (global; each client: its share of the test split,
at most 200). Measured on this 2-core machine while other jobs ran (load average 6-10): one RT
8-client round of 5 local steps and ~590 evaluation rows took 56 s (the first round 99 s, Ray's
start and the workers' model loads included); a --quick run (2 clients, 2 rounds of 2 steps)
26-33 s by its own report, 41-50 s per child process, 7 min for the 9 quick runs. Extrapolated
(training ~70% of a round, linear in steps and rows): a full RT 8-client run ~9 min at load ~10,
~3 min on an idle machine; a BBC 5-client run ~0.9x that (fewer steps, longer rows); dual +15%
(two client evaluations), fedeu +40% (its 256-row uncertainty pass per client and round). Total
idle: rules 60 runs ~3.2 h + sfed 27 runs ~1.4 h = ~4.5 h; 2-3x that at load 6-10. The default
budget (240 min) covers seed 0 of everything (~1.5 h idle) and part of seed 1; continue with
`--merge` (the budget counts per invocation).

    .venv/bin/python bench/bench_federated.py                                    # everything, budget 240 min
    .venv/bin/python bench/bench_federated.py --merge --budget-min 300           # continue it
    .venv/bin/python bench/bench_federated.py --sections rules --datasets bbc_news --alphas 0.1 --merge
    .venv/bin/python bench/bench_federated.py --sections sfed --seed-list 0 --merge
    .venv/bin/python bench/bench_federated.py --variants fedavg fstq --merge     # a subset of variants
    .venv/bin/python bench/bench_federated.py --sections continual --merge      # PRISM's sequence only
    .venv/bin/python bench/bench_federated.py --quick                            # smoke run, 7 min at load 6-8
    .venv/bin/python bench/bench_federated.py --render bench/results/federated.json   # redo .md and .png

Results: bench/results/federated.{json,md} and federated.png (`federated_quick.*` for --quick:
too few steps to mean anything).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    Phases,
    bench_main,
    bench_parser,
    environment,
    finish,
    json_child,
    run_child,
    settings_from,
    source_version,
)
from federated_report import draw, markdown

SECTIONS = ["rules", "sfed", "continual"]
CLIENTS = {"rotten_tomatoes": 8, "bbc_news": 5}
# the continual section's task sequence (as examples/federated_prism.yaml)
SEQUENCE_NAME = "rt-bbc-bizTech"
SEQUENCE = [{"name": "sentiment", "data": "rotten_tomatoes"}, {"name": "topic", "data": "bbc_news"},
            {"name": "business-tech", "data": "bbc_news",
             "labels": {"business": "business_or_tech", "tech": "business_or_tech", "entertainment": "other",
                        "politics": "other", "sports": "other"}}]
PRISM_OPTIONS = {"threshold": 0.97, "sketch_rank": 32, "basis_rows": 256}
CONTINUAL = {  # variant -> (method, options, note)
    "fedavg-seq": ("fedavg", {}, "FedAvg-sequential: one MoELoRA adapter keeps training, a head per task"),
    "prism": ("prism", PRISM_OPTIONS, "PRISM: a MoELoRA block per task, A and router projected off per-expert "
                                      "input bases the server builds and all clients share (threshold 0.97)"),
    "prism-client": ("prism", {**PRISM_OPTIONS, "bases": "client"},
                     "PRISM's negative control: each client projects off bases of its own rows only"),
}


@dataclass(frozen=True)
class Variant:
    """One federated method with its aggregation rule and options (the `rules` section)."""

    name: str
    method: str
    aggregation: str
    options: dict[str, Any]
    note: str


VARIANTS = [
    Variant("fedavg", "fedavg", "fedavg", {}, "FedAvg-LoRA: A and B averaged separately, weighted by rows"),
    Variant("exact", "fedavg", "exact", {}, "the weighted mean of B A, re-factored to rank r (SVD)"),
    Variant("dual", "dual", "fedavg", {"local_adapter": {"method": "lora", "r": 4, "alpha": 8}},
            "Med-DualLoRA: global LoRA (FedAvg) + a local LoRA r=4, alpha=8 per client, never uploaded"),
    Variant("fstq", "fstq", "fedavg", {"keep_ratio": 1.0},
            "FED-FSTQ: the update quantised per row to 2/4/8 bits (4 bits per value on average), packed;"
            " keep_ratio 1.0 (classification has no tokens to drop)"),
    Variant("fedeu", "fedeu", "fedavg", {},
            "FedEU: evidential head loss, uploads weighted by top-k uncertainty (the method's default options)"),
]
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}
SCALINGS = ["standard", "rslora", "sfed"]


@dataclass
class Settings:
    quick: bool = False
    threads: int = 1
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # rules section
    datasets: list[str] = field(default_factory=lambda: list(CLIENTS))
    alphas: list[float] = field(default_factory=lambda: [0.1, 1.0])
    variants: list[str] = field(default_factory=lambda: [v.name for v in VARIANTS])
    rank: int = 8
    lora_alpha: float = 16.0
    # sfed section
    sfed_datasets: list[str] = field(default_factory=lambda: ["rotten_tomatoes"])
    sfed_alphas: list[float] = field(default_factory=lambda: [1.0])
    sfed_ranks: list[int] = field(default_factory=lambda: [4, 16, 64])
    sfed_scalings: list[str] = field(default_factory=lambda: list(SCALINGS))
    sfed_alpha: float = 16.0  # the same LoRA alpha for every scale rule (the spec's comparison)
    # continual section: MoELoRA (4 experts, top-2, total rank 8) through SEQUENCE
    continual_variants: list[str] = field(default_factory=lambda: list(CONTINUAL))
    continual_clients: int = 5
    continual_alpha: float = 1.0
    continual_rounds: int = 3
    # every run
    clients: dict[str, int] = field(default_factory=lambda: dict(CLIENTS))
    rounds: int = 5
    local_steps: int = 10
    batch_size: int = 16
    max_length: int = 64
    lr: float = 2e-3
    head_lr: float = 1e-2
    eval_examples: int = 200
    max_train_examples: int | None = None
    budget_min: float = 240.0

    @classmethod
    def quick_run(cls, threads: int = 1) -> Settings:
        return cls(quick=True, threads=threads, seeds=[0], datasets=["rotten_tomatoes"], alphas=[1.0],
                   sfed_ranks=[4, 16], sfed_scalings=["standard", "sfed"], continual_clients=2, continual_rounds=1,
                   clients={"rotten_tomatoes": 2, "bbc_news": 2}, rounds=2, local_steps=2, batch_size=8,
                   max_length=48, eval_examples=16, max_train_examples=64, budget_min=20.0)


# ----------------------------------------------------------------------------------------- jobs


def make_job(s: Settings, section: str, data: str, alpha: float, seed: int, variant: str | None = None,
             rank: int | None = None, scaling: str | None = None) -> dict[str, Any]:
    """One run: its identity (section, variant, data, alpha, seed) and every setting it runs with."""
    train = {"batch_size": s.batch_size, "max_length": s.max_length, "lr": s.lr, "head_lr": s.head_lr}
    if s.max_train_examples is not None:
        train["max_train_examples"] = s.max_train_examples
    clients = s.clients.get(data, s.continual_clients)
    rounds = s.rounds
    if section == "continual":
        method, options, _ = CONTINUAL[variant]
        aggregation, options, clients, rounds = "fedavg", dict(options), s.continual_clients, s.continual_rounds
        adapter = {"method": "moelora", "experts": 4, "top_k": 2, "r": s.rank, "alpha": s.lora_alpha}
    elif section == "rules":
        v = VARIANT_BY_NAME[variant]
        method, aggregation, options = v.method, v.aggregation, dict(v.options)
        adapter: dict[str, Any] = {"method": "lora", "r": s.rank, "alpha": s.lora_alpha}
    else:
        variant = f"{scaling}-r{rank}"
        method, aggregation, options = "fedavg", "fedavg", {}
        adapter = {"method": "lora", "r": rank, "alpha": s.sfed_alpha, "scaling": scaling}
        if scaling == "sfed":
            adapter["num_clients"] = clients
    return {"section": section, "variant": variant, "data": data, "alpha": alpha, "seed": seed,
            "rank": adapter["r"], "scaling": adapter.get("scaling", "standard"), "clients": clients,
            "rounds": rounds, "local_steps": s.local_steps, "train": train, "eval_examples": s.eval_examples,
            "method": method, "aggregation": aggregation, "options": options, "adapter": adapter,
            "threads": s.threads}


IDENTITY = ("section", "variant", "data", "alpha", "seed", "rank", "scaling")


def job_key(job: dict[str, Any]) -> str:
    """What makes two runs the same run: every setting (not the outcome)."""
    keys = (*IDENTITY, "clients", "rounds", "local_steps", "train", "eval_examples", "method", "aggregation",
            "options", "adapter", "threads")
    return json.dumps({k: job.get(k) for k in keys}, sort_keys=True)


def available_methods() -> set[str]:
    """The federated methods this splice has (FED-FSTQ may not be there yet)."""
    from splice.federated.methods import METHODS

    return set(METHODS)


def jobs(s: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(every job to run, every job skipped with why): seed by seed, the rules section's data sets,
    alphas and variants, then the sfed section's ranks and scale rules."""
    methods = available_methods()
    out, skipped = [], []
    for seed in s.seeds:
        if "rules" in s.sections:
            for data in s.datasets:
                for alpha in s.alphas:
                    for name in s.variants:
                        job = make_job(s, "rules", data, alpha, seed, variant=name)
                        if job["method"] not in methods:
                            skipped.append({**{k: job[k] for k in IDENTITY},
                                            "why": f"splice.federated.methods.METHODS has no {job['method']!r}"})
                        else:
                            out.append(job)
        if "sfed" in s.sections:
            for data in s.sfed_datasets:
                for alpha in s.sfed_alphas:
                    for rank in s.sfed_ranks:
                        for scaling in s.sfed_scalings:
                            out.append(make_job(s, "sfed", data, alpha, seed, rank=rank, scaling=scaling))
        if "continual" in s.sections:
            for name in s.continual_variants:
                out.append(make_job(s, "continual", SEQUENCE_NAME, s.continual_alpha, seed, variant=name))
    return out, skipped


def kept_runs(previous: list[dict[str, Any]], s: Settings) -> tuple[list[dict[str, Any]], int]:
    """The finished runs of an earlier result whose settings equal what this invocation would run
    for the same identity (any section, data set, alpha or seed); and how many were dropped."""
    kept, dropped = [], 0
    for run in previous:
        if "error" in run:
            dropped += 1
            continue
        try:
            if run["section"] in ("rules", "continual"):
                again = make_job(s, run["section"], run["data"], run["alpha"], run["seed"], variant=run["variant"])
            else:
                again = make_job(s, "sfed", run["data"], run["alpha"], run["seed"], rank=run["rank"],
                                 scaling=run["scaling"])
        except KeyError:  # a variant or data set this version does not know
            dropped += 1
            continue
        if job_key(again) == job_key(run):
            kept.append(run)
        else:
            dropped += 1
    return kept, dropped


# ---------------------------------------------------------------------------------- one run


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and v == v]  # drop None and NaN
    return sum(values) / len(values) if values else None


def compact(results: dict[str, Any]) -> dict[str, Any]:
    """A run's report (results.json) as the bench keeps it: per round the global metrics, the mean
    per-client metrics, the cumulative bytes, the aggregation errors, the seconds and the mean of
    every method metric the clients report with their uploads; the clients' last evaluations and
    the partition."""
    rounds = results["rounds"]

    def client_mean(record: dict[str, Any], source: str, key: str) -> float | None:
        return _mean([m.get(key) for m in record[source].values()])

    method_keys = sorted({k for r in rounds for m in r["train"].values() for k in m}
                         - {"train_loss", "num-examples", "client"})
    last = rounds[-1]
    return {
        "curves": {
            "global_accuracy": [r["global"].get("accuracy") for r in rounds],
            "global_loss": [r["global"].get("loss") for r in rounds],
            "client_accuracy": [client_mean(r, "evaluate", "accuracy") for r in rounds],
            "client_global_accuracy": [client_mean(r, "evaluate", "global_accuracy") for r in rounds],
            "train_loss": [client_mean(r, "train", "train_loss") for r in rounds],
            "uplink_bytes": results["cumulative_uplink_bytes"],
            "downlink_bytes": results["cumulative_downlink_bytes"],
            "separation_error_mean": [r["aggregation"].get("separation_error_mean") for r in rounds],
            "separation_error_max": [r["aggregation"].get("separation_error_max") for r in rounds],
            "refactor_error_max": [r["aggregation"].get("refactor_error_max") for r in rounds],
            "seconds": [r["seconds"] for r in rounds],
        },
        "method_metrics": {key: [client_mean(r, "train", key) for r in rounds] for key in method_keys},
        "clients_final": {c: {k: m[k] for k in ("accuracy", "global_accuracy", "num-examples") if k in m}
                          for c, m in last["evaluate"].items()},
        "partition": partition_of(results["partition"]),
        "final": results["final"],
        "accuracy_matrix": results.get("accuracy_matrix"),
        "prism": {key: [r["aggregation"].get(key) for r in rounds]
                  for key in sorted({k for r in rounds for k in r["aggregation"] if k.startswith("prism_")})},
        "tasks": [r.get("task") for r in rounds],
    }


def partition_of(partition: dict[str, Any]) -> Any:
    """Rows and label counts per client (per task, for a sequence)."""
    def clients(description: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"rows": c["rows"], "labels": c["labels"]} for c in description["clients"]]
    if "tasks" in partition:
        return {task: clients(description) for task, description in partition["tasks"].items()}
    return clients(partition)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One federated run (in a fresh interpreter): `compact` of its report, the adapter's scale,
    the run's own seconds and this process's."""
    started = time.perf_counter()
    import torch
    from rich.console import Console

    from splice.federated import FederatedConfig, run_federated
    from splice.methods.lora import lora_scale

    torch.set_num_threads(job["threads"])
    with tempfile.TemporaryDirectory(prefix="federated-bench-") as folder:
        source = {"tasks": SEQUENCE} if job["section"] == "continual" else {"data": job["data"]}
        config = FederatedConfig(model="minilm", task="classification", **source, adapter=dict(job["adapter"]),
                                 train=dict(job["train"]), clients=job["clients"], rounds=job["rounds"],
                                 local_steps=job["local_steps"],
                                 partition={"scheme": "dirichlet", "alpha": job["alpha"]},
                                 aggregation=job["aggregation"], method=job["method"], options=dict(job["options"]),
                                 eval_examples=job["eval_examples"], seed=job["seed"], output_dir=f"{folder}/run")
        loaded = time.perf_counter()
        result = run_federated(config, console=Console(quiet=True), overwrite=True)
        ran = time.perf_counter()
        row = compact(result.results)
    adapter = job["adapter"]
    scale = None if adapter["method"] != "lora" else lora_scale(adapter.get("scaling", "standard"), adapter["alpha"],
                                                                 adapter["r"], adapter.get("num_clients"))
    row.update(scale=scale,
               run_s=ran - loaded, child_s=time.perf_counter() - started, source=source_version(),
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), loadavg=os.getloadavg())
    return row


# ------------------------------------------------------------------------------------ the loop


def expected_minutes(runs: list[dict[str, Any]], job: dict[str, Any]) -> float:
    """A run's expected length: the mean process time of finished runs of its data set and section
    (of its data set, of any run; 0 before the first)."""
    for same in (lambda r: r["data"] == job["data"] and r["section"] == job["section"],
                 lambda r: r["data"] == job["data"], lambda r: True):
        times = [r["process_s"] for r in runs if "process_s" in r and "error" not in r and same(r)]
        if times:
            return sum(times) / len(times) / 60
    return 0.0


def run(s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Every job one at a time in a fresh interpreter, the results rewritten after each; with
    `--merge`, the finished runs of the results in `--out-dir` with the same settings are kept."""
    phase = Phases()
    stem = "federated_quick" if s.quick else "federated"
    target = args.out_dir / f"{stem}.json"
    previous: dict[str, Any] = json.loads(target.read_text()) if args.merge and target.exists() else {}
    kept, dropped = kept_runs(previous.get("runs", []), s)
    todo, skipped = jobs(s)
    env = environment(s.threads)
    result: dict[str, Any] = {"environment": env, "settings": asdict(s),
                              "variants": {v.name: asdict(v) for v in VARIANTS},
                              "continual_variants": {name: {"method": m, "options": o, "note": n}
                                                     for name, (m, o, n) in CONTINUAL.items()},
                              "sequence": SEQUENCE, "runs": list(kept),
                              "not_run": [], "skipped": skipped, "notes": previous.get("notes", []),
                              "invocations": [*previous.get("invocations", []),
                                              {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                               "source": source_version(), "loadavg": os.getloadavg(),
                                               "merge": bool(args.merge), "kept": len(kept), "dropped": dropped}]}
    if args.note:
        result["notes"].append({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "text": args.note})
    if dropped:
        print(f"--merge: {dropped} earlier run(s) dropped (other settings, or failed)", flush=True)

    def save() -> None:
        finish(result, phase)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2, default=str) + "\n")
        target.with_suffix(".md").write_text(markdown(result, s) + "\n")
        draw(result, target.with_suffix(".png"))

    done = {job_key(r) for r in kept}
    clock = time.perf_counter()
    for i, job in enumerate(todo):
        if job_key(job) in done:
            continue
        elapsed = (time.perf_counter() - clock) / 60
        if elapsed + expected_minutes(result["runs"], job) > s.budget_min:
            result["not_run"].append({k: job[k] for k in IDENTITY})
            continue
        phase(f"[{job['section']}] run {i + 1}/{len(todo)}: {job['variant']}, {job['data']}, alpha {job['alpha']},"
              f" seed {job['seed']}")
        row = dict(job)
        started = time.perf_counter()
        try:
            row.update(run_child(Path(__file__).resolve(), ["--run-child", json.dumps(job)]))
        except RuntimeError as err:
            lines = [x for x in str(err).strip().splitlines() if x.strip()]
            row["error"] = lines[-1][:300] if lines else "child failed"
        row["process_s"] = time.perf_counter() - started
        result["runs"].append(row)
        if "error" in row:
            print(f"  failed: {row['error']}", flush=True)
        else:
            f = row["final"]
            print(f"  global accuracy {f['global_accuracy']:.3f}, client mean {f['client_mean_accuracy']:.3f},"
                  f" uplink {f['uplink_bytes'] / 1e6:.1f} MB, run {f['seconds']:.0f} s,"
                  f" process {row['process_s']:.0f} s", flush=True)
        save()
    finish(result, phase)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    draw(result, target.with_suffix(".png"))
    return result


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "smoke run: Rotten Tomatoes, 2 clients, 2 rounds of 2 steps, 64 training rows, 16 "
                              "evaluation rows, alpha 1.0, seed 0, sfed at r 4 and 16 (not results)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, help="subset of sections")
    p.add_argument("--seed-list", nargs="+", type=int, help="seeds (default 0 1 2)")
    p.add_argument("--datasets", nargs="+", choices=list(CLIENTS), help="rules section: data sets")
    p.add_argument("--alphas", nargs="+", type=float, help="rules section: Dirichlet alphas (default 0.1 1.0)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANT_BY_NAME), help="rules section: variants")
    p.add_argument("--sfed-datasets", nargs="+", choices=list(CLIENTS), help="sfed section: data sets")
    p.add_argument("--sfed-alphas", nargs="+", type=float, help="sfed section: Dirichlet alphas (default 1.0)")
    p.add_argument("--sfed-ranks", nargs="+", type=int, help="sfed section: LoRA ranks (default 4 16 64)")
    p.add_argument("--sfed-scalings", nargs="+", choices=SCALINGS, help="sfed section: scale rules")
    p.add_argument("--continual-variants", nargs="+", choices=list(CONTINUAL), help="continual section: variants")
    for name, kind in (("rounds", int), ("local-steps", int), ("eval-examples", int), ("budget-min", float)):
        p.add_argument(f"--{name}", type=kind, help=f"override the setting {name.replace('-', '_')}")
    p.add_argument("--merge", action="store_true",
                   help="keep the finished runs (same settings) of the results already in --out-dir")
    p.add_argument("--note", help="a sentence for the report's notes (context the numbers cannot carry)")
    p.add_argument("--run-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    s = settings_from(args, Settings)
    if args.seed_list:
        s.seeds = args.seed_list
    return args, s


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, Settings, run, markdown, "federated", child=json_child(run_one), draw=draw)


if __name__ == "__main__":
    main()
