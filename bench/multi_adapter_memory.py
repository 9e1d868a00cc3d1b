"""bench_multi_adapter.py's memory section: one LoRA training step of every configuration, each in
a fresh interpreter (`bench_multi_adapter.py --mem-child KIND`) that imports only the library it
measures, against a floor (the frozen model with gradients flowing to its first layer)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from common import (
    RSS_FOLLOWS_LIVE,
    Library,
    LoraSpec,
    Peft,
    Splice,
    load_minilm_classifier,
    memory_children,
    memory_marks,
    optimizer_for,
    review_batch,
    step_memory,
    train_step,
    trainable,
)
from multi_adapter_setup import TARGETS, Context, Settings, causal_batch, load_smollm2

SCRIPT = Path(__file__).resolve().with_name("bench_multi_adapter.py")  # the children run its --mem-child


def memory_kinds(s: Settings) -> list[str]:
    """model:library:targets:dropout for each child, plus model:floor (no adapter)."""
    kinds = []
    for model in s.mem_models:
        targets = [t for t in s.targets if t in s.mem_targets] if model == "minilm" else s.smollm_train_targets
        kinds += [f"{model}:{lib}:{t}:{p}" for t in targets for p in s.mem_dropouts for lib in ("splice", "peft")]
        kinds.append(f"{model}:floor")
    return kinds


def memory(ctx: Context) -> dict[str, Any]:
    """One fresh interpreter per configuration, run one after another (never concurrently).

    The children run with glibc's mmap threshold fixed at 64 KiB (unless --default-malloc):
    every tensor buffer is then its own mapping, returned to the OS when freed, so the RSS
    follows live memory and the step's RSS increase does not depend on what the allocator kept
    from earlier steps (with the default dynamic threshold it varied 13-31 MB for one config).
    """
    s = ctx.settings
    env = {} if s.default_malloc else RSS_FOLLOWS_LIVE
    kinds = {kind: ["--mem-child", kind, "--threads", str(s.threads), "--mem-steps", str(s.mem_steps),
                    "--model-path", str(ctx.minilm if kind.startswith("minilm:") else ctx.smollm2),
                    "--minilm-batch", str(s.minilm_batch), "--minilm-seq", str(s.minilm_seq),
                    "--smollm-batch", str(s.smollm_batch), "--smollm-seq", str(s.smollm_seq)]
             for kind in memory_kinds(s)}
    return {"children": memory_children(SCRIPT, kinds, env, ctx.phase), "malloc_env": env}


def memory_child(kind: str, s: Settings, model_path: Path) -> dict[str, Any]:
    """Inside a fresh interpreter (`bench_multi_adapter.py --mem-child KIND`): import the library,
    load, attach, then `common.step_memory` (a warm-up step, the RSS high-water mark reset,
    `mem_steps` steps, one forward under `saved_for_backward`)."""
    torch.set_num_threads(s.threads)
    model_name, library, *rest = kind.split(":")
    minilm = model_name == "minilm"
    spec = LoraSpec(dropout=float(rest[1])) if rest else LoraSpec()
    spec = spec if minilm else LoraSpec(dropout=spec.dropout, head=None, task_type="CAUSAL_LM")
    lib: Library | None = {"splice": Splice, "peft": Peft}[library](spec) if library != "floor" else None
    after_import = memory_marks()
    if minilm:
        model = load_minilm_classifier(model_path)
        batch, _ = review_batch(s.minilm_batch, s.minilm_seq)
    else:
        model = load_smollm2(model_path)
        batch = causal_batch(model_path, s.smollm_batch, s.smollm_seq, seed=1)
    if lib is not None:
        model = lib.attach(model, TARGETS[model_name][rest[0]])
        optimizer: torch.optim.Optimizer | None = optimizer_for(model)
    else:  # the floor: nothing trains, but gradients flow down to the embeddings' output
        model.requires_grad_(False)
        model.enable_input_require_grads()
        optimizer = None
    model.train()

    def step() -> None:
        if optimizer is not None:
            train_step(model, optimizer, batch)
        else:
            model(**batch).loss.backward()

    return {"kind": kind, "trainable": sum(p.numel() for p in trainable(model).values()),
            **step_memory(model, batch, step, after_import, s.mem_steps, detail=True), "steps": s.mem_steps,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
