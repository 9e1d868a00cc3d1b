"""bench_forms.py's setup: the adapter forms it compares, its settings, and how a form is attached and
takes a training step (the same in the step-time section, the memory children and the trainer)."""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
from common import DATASETS, HEAD, Batch, review_batch, trainable
from torch import nn

BASELINE = "LoRA"


@dataclass(frozen=True)
class Form:
    """One adapter form: its adapter mapping for `splice.config_from_dict` / TrainConfig, the
    module that registers its method, its learning rate (None: the shared one) and why."""

    name: str
    adapter: dict[str, Any]
    module: str
    lr: float | None = None
    why: str = ""


# Same placement for every weight-level form: query and value of all 6 layers (BERT's default
# targets); LoReFT edits the hidden states each of the 6 layers outputs. Ranks and scales as LoRA's
# where the form has them; DiaBlo's block count gives LoRA r=8's parameter count.
FORMS: list[Form] = [
    Form("LoRA", {"method": "lora", "r": 8, "alpha": 16}, "splice.methods.lora",
         why="r=8, alpha=16 (scale 2), query,value"),
    Form("rsLoRA", {"method": "lora", "r": 8, "alpha": 16, "rslora": True}, "splice.methods.lora",
         why="LoRA with scale alpha/sqrt(r) = 5.66"),
    Form("DoRA", {"method": "dora", "r": 8, "alpha": 16}, "splice.methods.dora",
         why="LoRA r=8, alpha=16 plus a trained magnitude per output row"),
    Form("DiaBlo", {"method": "diablo", "blocks": 24}, "splice.methods.diablo",
         why="24 diagonal blocks of 16x16 per layer: LoRA r=8's parameter count (the paper's N=64 is for 4096-wide"
             " layers)"),
    Form("LoReFT", {"method": "loreft", "r": 4, "positions": "f1+l1"}, "splice.methods.loreft", lr=6e-3,
         why="r=4 at every layer's output, first ([CLS], what BERT's pooler reads) and last token, separate"
             " interventions, as examples/rotten_tomatoes_loreft.yaml; a higher lr than LoRA's, as ReFT recipes use"
             " (that example's 6e-3; in a pilot, Rotten Tomatoes seed 0, 80 steps of 8, 5e-3 gave 55% test accuracy"
             " and 1.5e-2 49%)"),
    Form("Flexi-LoRA", {"method": "flexilora", "ranks": [2, 4, 8], "alpha": 16, "scorer": "length",
                        "bins": [20, 32]}, "splice.methods.flexilora",
         why="nested ranks 2/4/8 (LoRA r=8's storage), rank from the prompt length: < 20 tokens -> 2, 20-31 -> 4,"
             " 32 (a review cut at the max length) -> 8; Rotten Tomatoes reviews are 14-43 tokens (10th-90th"
             " percentile), BBC articles are always cut at 32 tokens, so BBC always uses rank 8"),
    Form("TT-LoRA", {"method": "ttlora", "r": 8, "alpha": 16}, "splice.methods.ttlora",
         why="tensor train of bond 8 (rank <= 8, scale alpha/r = 2 as LoRA), modes 384 -> 8x8x6"),
]
FORM_BY_NAME = {f.name: f for f in FORMS}


@dataclass
class Settings:
    """How much to measure; `--quick` shrinks every count to a smoke run."""

    threads: int = 1
    jobs: int = 2
    sections: list[str] = field(default_factory=lambda: ["memory", "accuracy", "step_time", "dora_peft"])
    forms: list[str] = field(default_factory=lambda: [f.name for f in FORMS])
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 80
    batch: int = 8
    max_length: int = 64  # of the fixed batch the step-time, memory and DoRA sections use
    # Tokens per training example, per data set: 32 keeps the full run near 20 minutes on two
    # idle cores; it holds ~80% of the reviews whole, and an article's headline and first words.
    train_max_length: dict[str, int] = field(default_factory=lambda: {"rotten_tomatoes": 32, "bbc_news": 32})
    lr: float = 2e-3
    # The trainer's default head lr is 1e-2; with it, most Rotten Tomatoes runs of a 60-step trial
    # kept their step-0 checkpoint (the random head). 3e-2 is the same for every form.
    head_lr: float = 3e-2
    eval_examples: int = 128
    warmup: int = 2
    rounds: int = 12
    dora_rounds: int = 12
    dora_targets: list[str] = field(default_factory=lambda: ["qv", "all-linear"])
    quick: bool = False

    @classmethod
    def quick_run(cls, **overrides: Any) -> Settings:
        return cls(seeds=[0], steps=3, max_length=32, train_max_length={"rotten_tomatoes": 32, "bbc_news": 32},
                   eval_examples=16, warmup=1, rounds=2, dora_rounds=2, quick=True, **overrides)


def lr_of(form: Form, s: Settings) -> float:
    return form.lr if form.lr is not None else s.lr


def adapter_config(form: Form) -> Any:
    """The form's splice config with the classifier trained in full (importing its module registers it)."""
    importlib.import_module(form.module)
    from splice.core.registry import config_from_dict

    return config_from_dict({**form.adapter, "train_also": [HEAD]})


def attach_form(base: nn.Module, form: Form) -> nn.Module:
    import splice

    model = copy.deepcopy(base)
    splice.attach(model, adapter_config(form))
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable numbers of the adapter and of the trained classification head, apart."""
    params = trainable(model)
    head = sum(p.numel() for n, p in params.items() if n.startswith(f"{HEAD}."))
    return {"adapter": sum(p.numel() for p in params.values()) - head, "head": head}


def form_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> float:
    """One training step as the trainer takes it: task loss plus the adapters' auxiliary loss."""
    import splice

    loss = model(**batch).loss
    extra = splice.auxiliary_loss(model)
    (loss if extra is None else loss + extra).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def fixed_batch(s: Settings) -> Batch:
    """The batch of reviews the step-time, memory and DoRA sections train on."""
    batch, _ = review_batch(s.batch, s.max_length)
    return batch
