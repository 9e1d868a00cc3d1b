"""Four tenants trained together (splice's multiplexer) vs one after another (HF PEFT, splice).

What: the issue's goal, on CPU, for 4 LoRA tenants on the bundled all-MiniLM-L6-v2 classifier:
"concurrent training of 4 tenants vs the same 4 trained one after another with HF PEFT: no
slower in total and at most 1.3x the peak memory of one tenant alone". The tenants:

    rt-qv8     rotten_tomatoes  LoRA r=8  alpha=16 on query, value      seed 1
    bbc-qv8    bbc_news         LoRA r=8  alpha=16 on query, value      seed 2
    rt-all4    rotten_tomatoes  LoRA r=4  alpha=8  on all-linear         seed 3
    bbc-qv16   bbc_news         LoRA r=16 alpha=32 on query, value      seed 4

each N optimizer steps (default 10, --steps; --quick: 4) of batch 8, max_length 64, on N*8
training rows (one epoch), with the classification head trained in full, evaluated on 16
validation and 16 test rows. N=10 rather than 25 and 16 eval rows rather than 32 keep the full
run (6 subprocesses x 2 rounds) to about 8 minutes on the loaded 2-core machine, where one
training step of one tenant takes ~0.5-1 s with one thread.

Candidates, each in a fresh interpreter (`--child KIND`) so that its peak resident set is its
own (VmHWM from /proc/self/status, which starts fresh at exec; ru_maxrss is recorded too):

    peft_one          tenant rt-qv8 alone, minimal HF PEFT loop (below)
    peft_sequential   the 4 tenants one after another in one process, PEFT loop
    splice_one        tenant rt-qv8 alone via `splice.train.run`
    splice_sequential the 4 via `splice.train.run` one after another in one process
    splice_multiplex  the 4 via `splice.orchestrate.Multiplexer` (max_rows=None)
    splice_mux_rows8  the same with max_rows=8: a packed forward holds at most one tenant's batch

Why this PEFT loop: it does what `splice.train.run` does, so that the time difference is the
training, not the bookkeeping: the same rows (the parent computes them with splice's
`load_splits` and hands them over in a JSON file, so the PEFT child never imports splice), the
same shuffle (a DataLoader with a generator seeded by the tenant's seed), tokenizer padding
to the longest row, AdamW (weight decay 0.01, lr 2e-3 for LoRA, 1e-2 for the head), cosine
schedule with 6% warm-up, clipping at 1.0, and the same evaluations: splice evaluates
validation+test before training, validation at the last step and validation+test after, so
the loop evaluates 5 times over 16 rows too; it saves the adapter with `save_pretrained`.
The PEFT model is AutoModelForSequenceClassification + get_peft_model(LoraConfig(task_type=
"SEQ_CLS", ...)), which trains the head through `modules_to_save`.

Timings per child: `run_s` is from after the imports to the end (what the job costs beyond
starting Python + torch), `load_s` the model + tokenizer loading inside it (timed by wrapping
`splice.train.tasks.load_model` for splice, `from_pretrained` + `get_peft_model` for PEFT),
`eval_s` the evaluations where they can be separated, and `proc_s` the parent's view of the
whole subprocess (interpreter start and imports included). Rounds are interleaved with the
order rotated; the tables show medians.

Caveats:
- 2 CPU cores, torch threads 1 by default (--threads); other jobs may share the machine, so
  the load average at start and end is recorded. Only 2 rounds: medians of 2, read the spread.
- The multiplexer loads each tenant's model from disk to set it up exactly as a lone run does
  (then keeps only its adapter and head), so it still pays 4 model loads; the peak memory
  counts one shared backbone plus one transient copy.
- splice's runs write a report (metrics.json, config.yaml, a curves plot) per tenant; the
  PEFT loop writes only the adapter. That is part of splice's cost and is left in.
- Backbone dropout (0.1 in MiniLM) is on in both libraries, as in real training.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the offline / quiet environment before transformers)

TENANTS = [
    {"name": "rt-qv8", "data": "rotten_tomatoes", "r": 8, "alpha": 16, "targets": ["query", "value"], "seed": 1},
    {"name": "bbc-qv8", "data": "bbc_news", "r": 8, "alpha": 16, "targets": ["query", "value"], "seed": 2},
    {"name": "rt-all4", "data": "rotten_tomatoes", "r": 4, "alpha": 8, "targets": "all-linear", "seed": 3},
    {"name": "bbc-qv16", "data": "bbc_news", "r": 16, "alpha": 32, "targets": ["query", "value"], "seed": 4},
]
BATCH, MAX_LEN, EVAL_ROWS = 8, 64, 16
LR, HEAD_LR, WD, WARMUP, CLIP = 2e-3, 1e-2, 0.01, 0.06, 1.0
KINDS = ["peft_one", "peft_sequential", "splice_one", "splice_sequential", "splice_multiplex", "splice_mux_rows8"]


# ------------------------------------------------------------------------------------- configs


def train_config(tenant: dict[str, Any], steps: int, out: Path):
    from splice.train import TrainConfig

    return TrainConfig(
        model="minilm", task="classification", data=tenant["data"],
        adapter={"method": "lora", "r": tenant["r"], "alpha": tenant["alpha"], "targets": tenant["targets"]},
        batch_size=BATCH, max_length=MAX_LEN, max_steps=steps, max_train_examples=steps * BATCH,
        max_eval_examples=EVAL_ROWS, eval_every=steps, lr=LR, head_lr=HEAD_LR, weight_decay=WD,
        warmup_ratio=WARMUP, max_grad_norm=CLIP, seed=tenant["seed"], output_dir=str(out / tenant["name"]),
    )


def write_rows(steps: int, path: Path) -> None:
    """The exact rows splice trains and evaluates each tenant on, for the PEFT child."""
    from splice.train.data import load_splits

    rows = {}
    for tenant in TENANTS:
        splits = load_splits(train_config(tenant, steps, path.parent))
        rows[tenant["name"]] = {"train": splits.train, "validation": splits.validation, "test": splits.test,
                                "num_labels": len(splits.label_names)}
    path.write_text(json.dumps(rows))


# ------------------------------------------------------------------------------------- children


def peft_tenant(tenant: dict[str, Any], rows: dict[str, Any], steps: int, out: Path) -> dict[str, float]:
    """One tenant with HF PEFT, as `splice.train.run` would train it (see the module docstring)."""
    import torch
    import transformers
    from torch.utils.data import DataLoader

    tick = time.perf_counter()
    model, tokenizer = peft_model(tenant, rows["num_labels"])
    load_s = time.perf_counter() - tick

    def collate(batch_rows: list[dict[str, Any]]) -> dict[str, Any]:
        return common.encode_rows(tokenizer, batch_rows, MAX_LEN)

    generator = torch.Generator().manual_seed(tenant["seed"])
    loader = DataLoader(rows["train"], batch_size=BATCH, shuffle=True, collate_fn=collate, generator=generator)
    evals = {s: DataLoader(rows[s], batch_size=BATCH, collate_fn=collate) for s in ("validation", "test")}
    params = [p for p in model.parameters() if p.requires_grad]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    optimizer = torch.optim.AdamW([{"params": lora, "lr": LR}, {"params": head, "lr": HEAD_LR}], weight_decay=WD)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, int(WARMUP * steps), steps)
    eval_s = evaluate(model, evals, ("validation", "test"))
    tick = time.perf_counter()
    common.train_loop(model, loader, optimizer, scheduler, params, steps, CLIP)
    train_s = time.perf_counter() - tick
    eval_s += evaluate(model, evals, ("validation",)) + evaluate(model, evals, ("validation", "test"))
    model.save_pretrained(out / tenant["name"])
    gc.collect()  # the model goes with this frame; collect before the next tenant loads
    return {"load_s": load_s, "eval_s": eval_s, "train_s": train_s}


def peft_model(tenant: dict[str, Any], num_labels: int) -> tuple[Any, Any]:
    """The tenant's seeded MiniLM classifier with its PEFT LoRA (the head trained through
    `modules_to_save`), and the tokenizer."""
    import transformers
    from peft import LoraConfig, get_peft_model

    common.seed_everything(tenant["seed"])
    path = common.minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=tenant["r"], lora_alpha=tenant["alpha"],
                                             lora_dropout=0.0, target_modules=tenant["targets"]))
    return model, tokenizer


def evaluate(model: Any, evals: dict[str, Any], splits: tuple[str, ...]) -> float:
    """Forward passes over `splits` in eval mode, as splice's evaluations (back in train mode after);
    returns the seconds they took."""
    import torch

    tick = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for split in splits:
            for batch in evals[split]:
                model(**batch)
    model.train()
    return time.perf_counter() - tick


def child(kind: str, steps: int, rows_path: Path, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    imports_s = started - T0
    out = Path(tempfile.mkdtemp(prefix=f"tenants-{kind}-"))
    result: dict[str, Any] = {"kind": kind}
    if kind.startswith("peft"):
        rows = json.loads(rows_path.read_text())
        tenants = TENANTS[:1] if kind == "peft_one" else TENANTS
        parts = [peft_tenant(t, rows[t["name"]], steps, out) for t in tenants]
        result["load_s"] = sum(p["load_s"] for p in parts)
        result["eval_s"] = sum(p["eval_s"] for p in parts)
    else:
        from rich.console import Console

        import splice.train
        from splice.orchestrate.multiplex import Multiplexer
        from splice.train import tasks

        loads: list[float] = []
        original = tasks.load_model

        def timed_load(*args, **kwargs):
            tick = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                loads.append(time.perf_counter() - tick)

        tasks.load_model = timed_load
        console = Console(file=io.StringIO(), width=120)
        configs = [train_config(t, steps, out) for t in (TENANTS[:1] if kind == "splice_one" else TENANTS)]
        if kind in ("splice_one", "splice_sequential"):
            results = [splice.train.run(c, force=True, console=console) for c in configs]
            # before + after (4 of the 5 passes; the one at the last step is inside train_s)
            result["eval_s"] = sum(r.timings["eval_before_s"] + r.timings["eval_after_s"] for r in results)
            accuracy = {c.output_dir.split("/")[-1]: r.metrics["after"]["test"]["accuracy"]
                        for c, r in zip(configs, results, strict=True)}
        else:
            mux = Multiplexer(max_rows=None if kind == "splice_multiplex" else BATCH, force=True, console=console)
            tick = time.perf_counter()
            for c in configs:
                mux.add(c)
            result["setup_s"] = time.perf_counter() - tick
            result["eval_s"] = float("nan")
            results = mux.run()
            result["padding"] = mux.padding.to_dict()
            accuracy = {n: r.metrics["after"]["test"]["accuracy"] for n, r in results.items()}
        result["load_s"] = sum(loads)
        result["test_accuracy"] = accuracy
    result["run_s"] = time.perf_counter() - started
    result["run_minus_load_s"] = result["run_s"] - result["load_s"]
    result["imports_s"] = imports_s
    result.update(common.memory_marks())
    result["peak_mb"] = result.get("vmhwm_mb", result["ru_maxrss_mb"])
    return result


# --------------------------------------------------------------------------------------- parent


def run_child(kind: str, steps: int, rows_path: Path, threads: int) -> dict[str, Any]:
    tick = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", str(steps),
                           "--rows", str(rows_path), "--threads", str(threads)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["proc_s"] = time.perf_counter() - tick
    return result


def med(samples: list[dict[str, Any]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every candidate in its own subprocess, `args.rounds` interleaved rounds; the result JSON."""
    if args.quick:
        args.steps, args.rounds = 4, 1
    env = common.environment(args.threads)
    work = Path(tempfile.mkdtemp(prefix="tenants-bench-"))
    rows_path = work / "rows.json"
    write_rows(args.steps, rows_path)
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for r in range(args.rounds):
        order = KINDS[r % len(KINDS):] + KINDS[: r % len(KINDS)]
        for kind in order:
            res = run_child(kind, args.steps, rows_path, args.threads)
            samples[kind].append(res)
            print(f"round {r + 1} {kind:18s} run {res['run_s']:6.1f}s load {res['load_s']:5.1f}s "
                  f"peak {res['peak_mb']:6.0f} MB", flush=True)
    env["loadavg_end"] = os.getloadavg()

    summary = {k: {key: med(v, key) for key in ("proc_s", "run_s", "load_s", "run_minus_load_s", "eval_s",
                                                 "peak_mb")} for k, v in samples.items()}

    def ratio(a: str, b: str, key: str) -> float:
        return summary[a][key] / summary[b][key]

    ratios = {}
    for mux in ("splice_multiplex", "splice_mux_rows8"):
        ratios[mux] = {
            "time_vs_peft_sequential_run": ratio(mux, "peft_sequential", "run_s"),
            "time_vs_peft_sequential_proc": ratio(mux, "peft_sequential", "proc_s"),
            "time_vs_peft_sequential_minus_load": ratio(mux, "peft_sequential", "run_minus_load_s"),
            "time_vs_splice_sequential_run": ratio(mux, "splice_sequential", "run_s"),
            "time_vs_splice_sequential_minus_load": ratio(mux, "splice_sequential", "run_minus_load_s"),
            "peak_vs_peft_one": ratio(mux, "peft_one", "peak_mb"),
            "peak_vs_splice_one": ratio(mux, "splice_one", "peak_mb"),
            "peak_vs_peft_sequential": ratio(mux, "peft_sequential", "peak_mb"),
        }
    padding = {k: samples[k][0]["padding"] for k in ("splice_multiplex", "splice_mux_rows8")}
    return {"env": env, "steps": args.steps, "rounds": args.rounds, "tenants": TENANTS, "summary": summary,
            "ratios": ratios, "padding": padding, "samples": samples}


def markdown(result: dict[str, Any], settings: Any = None) -> str:
    """The report, from the result JSON alone (`--render`)."""
    env, summary, ratios, padding, samples = (result[k] for k in ("env", "summary", "ratios", "padding", "samples"))
    rows = [[k, f"{s['proc_s']:.1f}", f"{s['run_s']:.1f}", f"{s['load_s']:.1f}", f"{s['run_minus_load_s']:.1f}",
             f"{s['eval_s']:.1f}" if s["eval_s"] == s["eval_s"] else "-", f"{s['peak_mb']:.0f}"]
            for k, s in summary.items()]
    ratio_rows = [[name, *(f"{r[k]:.3f}" for k in r)] for name, r in ratios.items()]
    pad_rows = [[k, f"{p['padded_share_naive']:.1%}", f"{p['padded_share_packed']:.1%}", str(p["forwards"]),
                 str(p["steps"]), str(p["real_tokens"])] for k, p in padding.items()]
    acc_rows = [[k, ", ".join(f"{n} {a:.3f}" for n, a in samples[k][0]["test_accuracy"].items())]
                for k in ("splice_sequential", "splice_multiplex", "splice_mux_rows8")]
    m = ratios["splice_multiplex"]
    time_ok, mem_ok = m["time_vs_peft_sequential_run"] <= 1.0, m["peak_vs_peft_one"] <= 1.3
    return "\n\n".join([
        f"# 4 tenants: splice multiplex vs one after another ({result['steps']} steps x batch {BATCH} each,"
        f" {result['rounds']} round(s), medians)",
        common.environment_line(env) + " Other jobs may have been running on this machine during the run.",
        "Seconds: `proc` = whole subprocess (Python + imports included), `run` = after imports, `load` = model"
        " + tokenizer loading inside `run`, `eval` = evaluations (5 passes over 16 rows per tenant in every"
        " candidate; not separable inside the multiplexer; splice's column counts 4 of the 5, the one at the"
        " last step is inside its training time). Peak = VmHWM of the subprocess.",
        common.table(["candidate", "proc s", "run s", "load s", "run - load s", "eval s", "peak MB"], rows),
        "Ratios (goal: time vs PEFT sequential <= 1.0, peak vs PEFT one <= 1.3):",
        common.table(["multiplexer", "time / peft_seq (run)", "time / peft_seq (proc)", "time / peft_seq (-load)",
                      "time / splice_seq (run)", "time / splice_seq (-load)", "peak / peft_one",
                      "peak / splice_one", "peak / peft_seq"], ratio_rows),
        "Padding (share of token slots that are padding, naive concatenation vs splice's packing):",
        common.table(["multiplexer", "padded naive", "padded packed", "forwards", "steps", "real tokens"], pad_rows),
        "Test accuracy after training (first round, 16 rows; a sanity check that every tenant trained and"
        " that multiplexed matches alone):",
        common.table(["candidate", "accuracy"], acc_rows),
        f"Reading: time goal {'met' if time_ok else 'MISSED'} "
        f"({m['time_vs_peft_sequential_run']:.2f}x PEFT sequential), memory goal {'met' if mem_ok else 'MISSED'} "
        f"({m['peak_vs_peft_one']:.2f}x PEFT one tenant).",
    ])


def main() -> None:
    parser = common.bench_parser(__doc__, "4 steps, 1 round, writes tenants_quick.*")
    parser.add_argument("--child", choices=KINDS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.rows, args.threads)))
        return
    if args.render:
        common.rerender(args.render, None, markdown)
        return
    result = measure(args)
    common.write_results(args.out_dir, "tenants_quick" if args.quick else "tenants", result, markdown(result))


if __name__ == "__main__":
    main()
