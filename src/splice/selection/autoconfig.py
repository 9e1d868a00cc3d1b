"""SEA-PEFT from a YAML file, end to end: read the training fields and the `sea_peft:` section,
search, write what was chosen, fine-tune it (`splice autoconfig`).

The run folder holds sea_peft.json (every audit, every unit's score, the choice),
selected_adapters.yaml (the chosen adapter mappings by name), selected.yaml (a config that
`splice train` runs, when the choice is one adapter mapping; its output_dir is <out>/retrain,
so that running it leaves the fine-tuning run here alone), search/ (the search's trainer) and
finetune/ (the fine-tuning run).

The folder is claimed (locked, as a training run's folder is) before anything is written and
held through the search and the fine-tune: a folder that another live run holds, or whose run
sub-folders (search/, finetune/, ...) one holds, is refused even with `force`. `force` then
empties it (everything but its lock file).
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from splice.core.errors import ConfigError
from splice.io.output_dirs import check_output_dir
from splice.selection.sea_peft import SeaPeftConfig, Selection, finetune, search
from splice.train import TrainConfig
from splice.train.config import read_yaml_mapping
from splice.train.report import LOCK_NAME, claim_run_dir
from splice.train.results import RunResult


@dataclass
class Autoconfig:
    """What `autoconfig` did: the search's choice, the folder, and the fine-tuning run (if any)."""

    selection: Selection
    folder: Path
    finetuned: RunResult | None


def read_autoconfig(path: Path, *, budget: int | None = None, audits: int | None = None) -> tuple[TrainConfig,
                                                                                                   SeaPeftConfig]:
    """The training fields and the search settings of an autoconfig YAML (`budget`, `audits`
    override the file's); an `adapter:` key is refused (the search chooses the adapters), and a
    `selection:` key (a gradient rule such as GAST: the search's probes freeze and switch
    adapters, which such a rule does not expect)."""
    fields = read_yaml_mapping(path, "config file", "config fields")
    if "adapter" in fields:
        raise ConfigError(f"{path}: remove adapter: the search chooses the adapters (sea_peft: families and sites "
                          "say among which)")
    if fields.get("selection") is not None:
        err = ConfigError(f"{path}: remove selection: SEA-PEFT's search cannot run with a gradient rule "
                          f"(selection: {fields['selection']!r}); its probes freeze and switch adapters on and off, "
                          "which a rule that makes the gradients itself does not expect")
        err.key = "selection"
        raise err
    space_fields = fields.pop("sea_peft", None) or {}
    try:
        space = SeaPeftConfig.from_dict(space_fields, budget=budget, audits=audits)
        train = TrainConfig.from_dict(fields)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return train, space


def autoconfig(path: Path, *, budget: int | None = None, audits: int | None = None, output_dir: Path | None = None,
               fine_tune: bool = True, force: bool = False, console: Console | None = None) -> Autoconfig:
    """Search the space `path` describes, write the choice into the run folder (`output_dir`,
    else the file's output_dir, else runs/<data>-sea-peft; a non-empty one only with `force`,
    which empties it) and fine-tune the choice from a fresh model unless `fine_tune` is False.
    The folder is locked for all of it; one that a live run holds is refused (even with `force`)."""
    train, space = read_autoconfig(path, budget=budget, audits=audits)
    given = read_yaml_mapping(path, "config file", "config fields").get("output_dir")
    folder = Path(output_dir or given or f"runs/{Path(str(train.data)).stem.replace('_', '-')}-sea-peft")
    check_output_dir(folder, force)
    with ExitStack() as held:
        held.callback(claim_run_dir(folder, force=force).release)  # refuses a folder a live run holds
        if force:
            _empty(folder)
        with claim_run_dir(folder / "search", force=True):  # the search's trainer does not lock its folder
            selection = search(train.from_dict(train.to_dict(), output_dir=str(folder / "search")), space,
                               console=console)
        report: dict[str, Any] = {"sea_peft": space.to_dict(), "train": train.to_dict(), **selection.to_dict()}
        (folder / "sea_peft.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (folder / "selected_adapters.yaml").write_text(yaml.safe_dump(selection.adapters, sort_keys=False))
        if len(selection.adapters) == 1:  # to run again; not into finetune/, which the fine-tune below writes
            only = next(iter(selection.adapters.values()))
            train.from_dict(train.to_dict(), output_dir=str(folder / "retrain"),
                            adapter=dict(only)).to_yaml(folder / "selected.yaml")
        tuning = train.from_dict(train.to_dict(), output_dir=str(folder / "finetune"))
        finetuned = finetune(tuning, selection.adapters, console=console, force=True) \
            if fine_tune and selection.adapters else None
    return Autoconfig(selection, folder, finetuned)


def _empty(folder: Path) -> None:
    """Remove what `folder` holds but its lock file (ours), after claiming every run folder inside
    it (one with a lock file): a live run's folder is refused, and nothing is removed then."""
    with ExitStack() as held:
        for lock in sorted(folder.rglob(LOCK_NAME)):
            if lock.parent != folder:
                held.callback(claim_run_dir(lock.parent, force=True).release)
        for child in folder.iterdir():
            if child.name == LOCK_NAME:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
