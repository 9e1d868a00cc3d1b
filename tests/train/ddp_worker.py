"""One process of `test_ddp.py`: `splice.train.run` on a config file, then a dump of what it learned.

    accelerate launch --cpu --num_processes 2 ddp_worker.py CONFIG_YAML DUMP_DIR
    python ddp_worker.py CONFIG_YAML DUMP_DIR        (one process)

Every process writes its trainable tensors (after `run` restored the best checkpoint) to
DUMP_DIR/rank{N}.safetensors and its result (losses, metrics, best step) to DUMP_DIR/rank{N}.json.
The model is caught by wrapping `splice.attach`, which the loop calls on the unwrapped model.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file

import splice
from splice.train import TrainConfig, run


def train_and_dump(config: TrainConfig, dump_dir: Path, rank: int = 0) -> None:
    caught: list[torch.nn.Module] = []
    attach = splice.attach

    def catching_attach(model: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
        caught.append(model)
        return attach(model, *args, **kwargs)

    splice.attach = catching_attach
    try:
        result = run(config, console=Console(quiet=True))
    finally:
        splice.attach = attach
    (model,) = caught
    tensors = {name: p.detach().cpu().contiguous() for name, p in splice.trainable_parameters(model).items()}
    dump_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dump_dir / f"rank{rank}.safetensors"))
    summary = {"losses": [h["loss"] for h in result.history], "lrs": [h["lr"] for h in result.history],
               "metrics": result.metrics, "best_step": result.best_step}
    (dump_dir / f"rank{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    torch.set_num_threads(1)
    config_path, dump = sys.argv[1:3]
    train_and_dump(TrainConfig.from_yaml(config_path), Path(dump), int(os.environ.get("RANK", "0")))
