"""HF `transformers.Trainer` with splice adapters: adapter-only checkpoints, exact resume.

A splice-attached model is a plain `PreTrainedModel` to the Trainer, so by default every
checkpoint is the whole model (`model.safetensors`, frozen base included), and
`from_pretrained(checkpoint)` drops the adapter's keys as unexpected. HF PEFT avoids this only
because the Trainer special-cases `PeftModel` inside its private `_save`,
`_load_from_checkpoint` and `_load_best_model`. `SpliceTrainerMixin` overrides exactly those
three methods, nothing else:

- `_save` (what `save_model()` and every checkpoint call) writes the trained adapters with
  `splice.save`: `adapter_config.json` + `adapter_model.safetensors`, HF PEFT's format for LoRA
  and DoRA (so `PeftModel.from_pretrained(base, checkpoint)` works), heads (`train_also`)
  included, a model card with the last evaluation's metrics, plus the tokenizer and
  `training_args.bin` as the Trainer writes them. No base weights. Several trained adapters:
  PEFT's layout (`splice.io.layout`), "default" at the root and every other in a subfolder
  named after it; a single one at the root, whatever its name.
- `_load_from_checkpoint` (`train(resume_from_checkpoint=...)`) and `_load_best_model`
  (`load_best_model_at_end=True`) copy the saved tensors back into the attached adapters and
  heads *in place*, exactly: the parameter objects the optimizer holds stay the same. A
  whole-model checkpoint written without splice's trainer still loads (the Trainer's own path).

Why a subclass and not a callback: a `TrainerCallback.on_save` runs after the Trainer has
already written the whole model into the checkpoint, and no callback runs before the Trainer
reads a checkpoint on resume (it refuses one without weights files, and would not know how to
put an adapter back). The mixin keeps the Trainer's own loop, optimizer, scheduler, RNG and
rotation logic untouched, and combines with other Trainer subclasses (TRL's `SFTTrainer`):

    class SpliceSFTTrainer(SpliceTrainerMixin, SFTTrainer): ...

PiSSA-initialised adapters are written in splice's own format here (their PEFT export is a
converted rank-2r LoRA, not the state that trains); use `splice.save` after training for the
PEFT file. Sharded training (DeepSpeed ZeRO-3, FSDP) is not supported: `splice.save` reads the
adapter from the local module.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import suppress
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import logging

from splice.core.api import model_state
from splice.core.errors import AdapterFileError, SpliceError
from splice.core.host import hosts
from splice.io import layout, native, peft_format, save
from splice.io.adapter_files import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, paired_tensors, read_adapter
from splice.io.manifest import MANIFEST_NAME, SIGNATURE_NAME
from splice.io.model_card import carry_over

__all__ = ["SpliceTrainer", "SpliceTrainerMixin", "restore_adapters", "save_adapters"]

logger = logging.get_logger(__name__)


def trained_adapters(model: nn.Module) -> list[str]:
    """The adapters a Trainer checkpoint holds: the trainable ones (all of them if none is)."""
    records = model_state(model).adapters
    names = [name for name, record in records.items() if record.trainable]
    return names or list(records)


def _folder_of(name: str, names: list[str]) -> str:
    """Where adapter `name` lives inside a saved folder: the only one at the root (so that
    `PeftModel.from_pretrained(base, checkpoint)` loads it), several in PEFT's layout."""
    return "" if len(names) == 1 else layout.subfolder(name)


def _restorable_as_peft(model: nn.Module, name: str) -> bool:
    """Whether the PEFT export of `name` is its training state (not so for PiSSA-style inits)."""
    return peft_format.can_write(model, name) and all(
        host[name].initial_delta_weight() is None for _, _, host in hosts(model) if name in host)


def save_adapters(model: nn.Module, output_dir: str | Path, metrics: dict[str, float] | None = None) -> list[str]:
    """Write the model's trained adapters into `output_dir` (which may hold other files, such as
    a Trainer's checkpoints: only the adapter files are replaced), with their model cards
    (`metrics` in the root one). Returns the names written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = trained_adapters(model)
    if not names:
        raise SpliceError("the model has no splice adapter to save")
    for name in names:
        fmt = "auto" if _restorable_as_peft(model, name) else "splice"
        sub = _folder_of(name, names)
        if sub:
            save(model, output_dir / sub, name, format=fmt, overwrite=True, metrics=metrics)
            continue
        # The root may hold other files (checkpoint-*/ folders under output_dir): write the
        # adapter aside, then move its files in, each replaced atomically.
        with tempfile.TemporaryDirectory(prefix=".splice-", dir=output_dir) as aside:
            written = save(model, Path(aside) / "adapter", name, format=fmt, metrics=metrics)
            carry_over(output_dir / CARD_NAME, written / CARD_NAME)  # a README the user wrote keeps its text
            for file in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, MANIFEST_NAME):
                os.replace(written / file, output_dir / file)
            with suppress(FileNotFoundError):  # a signature of an earlier manifest signs nothing here now
                os.unlink(output_dir / SIGNATURE_NAME)
    return names


def restore_adapters(model: nn.Module, folder: str | Path) -> list[str]:
    """Copy the adapters `save_adapters` wrote into `folder` back into the model's attached
    adapters of the same names, in place and exactly (parameter objects unchanged). Every
    module, head and shape is checked first; nothing changes if one does not fit."""
    folder = Path(folder)
    names = trained_adapters(model)
    plans = []
    for name in names:
        where = folder / _folder_of(name, names)
        if not (where / CONFIG_NAME).is_file():
            raise AdapterFileError(f"{where} holds no adapter for {name!r} ({CONFIG_NAME} missing)")
        plans.append(_plan(model, name, where))
    with torch.no_grad():
        for pairs in plans:
            for target, value in pairs:
                target.copy_(value)
    return names


def _plan(model: nn.Module, name: str, folder: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(the model's tensor, the saved value) for every tensor of adapter `name`, checked."""
    record = model_state(model).adapters[name]
    config, tensors = read_adapter(folder)
    where = f"{folder} (adapter {name!r})"
    if config.get("format") == native.FORMAT:
        if str(config.get("method", "")).lower() != record.config.method.lower():
            raise AdapterFileError(f"{folder} holds a {config.get('method')!r} adapter; {name!r} is "
                                   f"{record.config.method!r}")
        return paired_tensors(native.adapter_tensors(model, name), tensors, where)
    if not _restorable_as_peft(model, name):
        raise AdapterFileError(f"{folder} holds a PEFT LoRA file; adapter {name!r} ({record.config.method}) "
                               "cannot be restored from it")
    return peft_format.state_pairs(model, name, peft_format.from_peft(config, tensors, source=folder), where)


def _holds_adapter(folder: str | Path) -> bool:
    return Path(folder).is_dir() and bool(layout.saved_adapters(Path(folder)))


class SpliceTrainerMixin:
    """Mix into `transformers.Trainer` (or any subclass of it, listed after this mixin) so that
    checkpoints and `save_model()` hold the splice adapters, not the whole model, and
    `resume_from_checkpoint` and `load_best_model_at_end` restore them exactly."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        logger.info(f"Saving splice adapters {trained_adapters(model)} to {output_dir}")
        save_adapters(model, output_dir, metrics=self._latest_metrics())
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _latest_metrics(self) -> dict[str, float]:
        """The last evaluation's metrics (`eval_*`), for the model card; empty before any."""
        evaluated = [entry for entry in self.state.log_history if any(k.startswith("eval_") for k in entry)]
        if not evaluated:
            return {}
        timings = ("_runtime", "_per_second")
        return {k: v for k, v in evaluated[-1].items()
                if (k.startswith("eval_") and not k.endswith(timings)) or k in ("epoch", "step")}

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not _holds_adapter(resume_from_checkpoint):  # a whole-model checkpoint: the Trainer's own path
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info(f"Restoring splice adapters from {resume_from_checkpoint}")
        restore_adapters(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if not _holds_adapter(best):
            return super()._load_best_model()
        logger.info(f"Loading the best splice adapters from {best} (score: {self.state.best_metric}).")
        restore_adapters(self.accelerator.unwrap_model(self.model), best)


class SpliceTrainer(SpliceTrainerMixin, Trainer):
    """`transformers.Trainer` for splice-attached models: same arguments, same loop; checkpoints
    and `save_model()` hold the adapters (HF PEFT's format for LoRA) and heads, not the base."""
