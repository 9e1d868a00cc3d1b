"""A continual run that stops (Ctrl-C, a killed job, a crash in task 3 of 5) resumes at the task
after the last one it finished, and ends as the run that never stopped.

After every task the harness writes `<output_dir>/progress/` whole (`atomic_directory`):

- state.pt: the model's tensors (adapters, heads, base weights that merged adapters changed),
  which parameters train, which adapters are active, the strategy's own memory (tasks trained,
  LoDA's covariances, ConDU's unified vector and masks) and the random-number generators;
  read back with `weights_only=True`, so it holds tensors and plain values only;
- result.json: the accuracy rows, switches and costs so far, and the sequence config the run
  was started with (a resume under another config is refused, naming what changed).

To resume, the harness loads the pretrained model and heads as at the start, asks the strategy
to re-create the modules each finished task left (`Strategy.rebuild`: attached, merged), then
loads the tensors and the rest over them. The folder is removed when the run ends.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import splice
from splice.continual.strategies.base import Strategy
from splice.core.errors import SpliceError
from splice.core.validation import config_changes
from splice.io.files import atomic_directory, write_json

FOLDER = "progress"


def folder_of(output_dir: str | Path) -> Path:
    return Path(output_dir) / FOLDER


def save(output_dir: str | Path, model: nn.Module, strategy: Strategy, done: int, result: dict[str, Any]) -> None:
    """The run after its first `done` tasks: `result` holds its rows and costs so far."""
    state = {
        "done": done,
        "model": model.state_dict(),
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "active": splice.active_adapters(model),
        "strategy": strategy.state(),
        "rng": _rng_state(),
    }
    with atomic_directory(folder_of(output_dir), overwrite=True) as tmp:
        torch.save(state, tmp / "state.pt")
        write_json(tmp / "result.json", {"done": done, **result})


def load(output_dir: str | Path, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, result) of the run in `output_dir`, refused with the reason where there is none to
    resume, it is unreadable, or it was started with another config."""
    folder = folder_of(output_dir)
    if not (folder / "state.pt").is_file() or not (folder / "result.json").is_file():
        raise SpliceError(f"cannot resume {output_dir}: it has no {FOLDER}/ with state.pt and result.json "
                          "(no task of it finished, or it ended); start it again without --resume")
    try:
        result = json.loads((folder / "result.json").read_text())
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which and why
        raise SpliceError(f"cannot resume {output_dir}: {folder} is unreadable ({type(err).__name__}: {err})") from err
    config = json.loads(json.dumps(config))  # as it was saved: a tuple is a list there
    if result.get("config") != config:
        changed = config_changes(result.get("config") or {}, config)
        raise SpliceError(f"cannot resume {output_dir}: it was started with another sequence config "
                          f"({'; '.join(changed)}); a resumed run continues the same config")
    if state.get("done") != result.get("done"):
        raise SpliceError(f"cannot resume {output_dir}: {folder}'s state.pt and result.json disagree on the "
                          f"tasks done ({state.get('done')} vs {result.get('done')})")
    return state, result


def restore(model: nn.Module, strategy: Strategy, state: dict[str, Any]) -> None:
    """Put the saved tensors, flags, active adapters, strategy memory and generators back into
    `model` (on which the strategy has rebuilt every finished task's modules)."""
    device = next(model.parameters()).device
    missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in state["model"].items()}, strict=False)
    if missing or unexpected:
        raise SpliceError(f"the saved run does not fit the rebuilt model: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    for name, p in model.named_parameters():
        p.requires_grad_(state["requires_grad"][name])
    if state["active"]:
        splice.activate(model, state["active"])
    elif splice.adapters(model):
        splice.deactivate(model)
    strategy.load_state(state["strategy"])
    _set_rng_state(state["rng"])


def remove(output_dir: str | Path) -> None:
    """The run ended: nothing to resume."""
    shutil.rmtree(folder_of(output_dir), ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
