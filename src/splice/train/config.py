"""Everything one training run needs, as a dataclass that reads and writes YAML.

The defaults are the main job: LoRA (r=8, alpha=16) on the query/value projections of the
bundled MiniLM, with its classification head trained in full, on Rotten Tomatoes: two epochs,
about four minutes on two CPU cores. A YAML file sets any field; keyword overrides (the CLI's flags) win
over the file, and a key of the `adapter` mapping can be overridden alone. Settings (the CLI's
`--set KEY=VALUE`) come last and take either kind of key: a training-config field or a key of
the adapter's method.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from splice.core.config import AdapterConfig
from splice.core.errors import ConfigError, SpliceError
from splice.core.quantization import quantize_options
from splice.core.registry import config_class, config_from_dict
from splice.core.validation import (
    check_value,
    did_you_mean,
    field_types,
    init_fields,
    keyed_error,
    show,
    yaml_number,
)
from splice.train.callbacks import schedule_callback
from splice.train.gradients import gradient_rule
from splice.train.optimizers import optimizer_options

Task = Literal["classification", "causal_lm"]
Precision = Literal["no", "bf16", "fp16"]
SaveFormat = Literal["auto", "peft", "splice"]
NonFinite = Literal["stop", "skip"]
TASKS = ("classification", "causal_lm")
PRECISIONS = ("no", "bf16", "fp16")
SAVE_FORMATS = ("auto", "peft", "splice")
NONFINITE_RULES = ("stop", "skip")
PATH_FIELDS = ("model", "data", "validation", "output_dir", "init_adapter")
ENCODER_MODELS = ("minilm",)
# Fields that may be a mapping of options ({name: ..., option: value}).
OPTION_MAPPINGS = ("optimizer", "selection", "schedule", "quantize")
# Keys of an adapter mapping that say where it goes; they survive a change of method.
PLACEMENT_KEYS = ("targets", "exclude", "layers", "train_also")


def default_adapter() -> dict[str, Any]:
    """LoRA r=8, alpha=16; no `targets` means the architecture's default (query/value for BERT)."""
    return {"method": "lora", "r": 8, "alpha": 16}


@dataclass
class TrainConfig:
    """One training run.

    Attributes:
        model: "minilm", "smollm2" (bundled) or a local transformers folder.
        task: "classification" (a sequence-classification head) or "causal_lm" (SFT with the
            loss on the completion only).
        data: a bundled data set name (rotten_tomatoes, bbc_news, arithmetic, iris, ...), a
            .jsonl / .csv file, a `datasets.Dataset.save_to_disk` folder, or rows in memory (a
            `datasets.Dataset`, a list of dicts); `validation` an optional source of the same
            shape. Data without validation rows gives up a seeded 10% of its rows for them. Rows
            in memory are recorded in config.yaml and metrics.json by `describe_data`.
        text_column, label_column, prompt_column, completion_column: column names in files.
        adapter: an adapter mapping as in `splice.config_from_dict` ({"method": "lora", ...}).
        max_length: tokens per example; longer texts are truncated.
        batch_size, grad_accum: examples per forward pass, and passes per optimizer step.
        group_by_length: batch training rows of similar token length together (each epoch:
            the seeded shuffle cut into mega-batches of 50 optimizer steps' rows, each sorted
            by length and cut into steps taken in random order, the longest step first;
            `splice.train.batching`), so that a batch pads little: Rotten Tomatoes batches of
            16 go from 44% padding to 2%. Rows of one length keep the plain shuffled order.
            True by default: on the main job grouping reached validation accuracy 0.78 in 0.65x
            HF PEFT + HF Trainer's time (plain shuffle, False: 0.95x) and ended 0.3 test points
            lower on average over 6 seeds, within seed noise (README, "Less padding").
        packing: causal LM only: concatenate each batch's sequences into one row without
            padding, attention kept within each sequence by restarting position ids (sdpa or
            eager attention in transformers 5, or flash attention; checked on the model before
            training). The loss is that of the padded batch; the order is plain shuffled.
        lr, weight_decay, warmup_ratio: AdamW's learning rate and decay; the share of steps of
            linear warm-up before the cosine decay. LoRA wants a higher rate than full
            fine-tuning (1e-4 to 3e-3): only the low-rank product moves, from zero.
        head_lr: learning rate of the modules trained in full (`train_also`, e.g. the new
            classification head); None: `lr`. A randomly initialised head on top of small
            pooled features (MiniLM's pooler outputs have std ~0.04) learns slowly at the
            adapter's rate.
        epochs, max_steps: length of training; `max_steps` (optimizer steps) wins when set.
        max_train_examples: train on a fixed random sample of N rows.
        max_eval_examples: evaluate on the first N rows of each evaluation split.
        eval_every: evaluate every N optimizer steps (and always at the end); None: once per epoch.
        early_stopping_patience: stop after this many evaluations without improvement.
        max_grad_norm: gradient clipping threshold (None: no clipping).
        gradient_checkpointing: keep only each transformer block's input in the forward pass
            and recompute the block's activations in the backward pass (transformers'
            non-reentrant checkpointing): activation memory of one block instead of all, for
            about one more forward pass of compute; the gradients are the same. For long
            sequences or big models on a small GPU.
        seed: seeds Python, NumPy and torch (adapter init, dropout, shuffling).
        precision: mixed precision through accelerate: "no", "bf16" or "fp16".
        quantize: a 4-bit base (QLoRA): "nf4", or a mapping of `splice.quantize`'s options
            ({scheme: nf4, backend: torchao, compute_dtype: bfloat16, double_quant: true, skip:
            [...], keep_heads: true, block_size: 64}). The base's Linear layers are quantized
            after loading and before the adapter is attached; the adapter trains in fp32 as
            usual. None: the base stays in full precision.
        output_dir: the run folder (adapter, metrics.json, curves.png, config.yaml); None:
            runs/<data>-<method>, e.g. runs/rotten-tomatoes-lora.
        save_format: "auto" (HF PEFT's format for LoRA-shaped adapters), "peft" or "splice".
        checkpoint_every: write a resumable checkpoint (adapter, heads, optimizer, scheduler,
            step, RNG states, data position) into the run folder every N optimizer steps, and
            always on SIGINT/SIGTERM; `splice train --resume RUN` continues from the last one.
            None: only on a signal.
        on_nonfinite: what a non-finite loss or gradient does: "stop" (end the run with a clear
            message; the best finite checkpoint is kept) or "skip" (drop that optimizer step
            and go on; the run stops anyway after 10 skips in a row). A non-finite state is
            never selected or saved.
        init_adapter: an adapter folder (splice's or HF PEFT's, e.g. an earlier run's adapter/)
            to continue from instead of a fresh `adapter` (for a sequence of tasks): its adapter
            weights are loaded and trained further; the heads it trained are not loaded, the
            task trains its own (a fresh classifier for its labels, as with a new adapter).
        optimizer: "adamw" (torch's AdamW), "loraplus" (AdamW with B at `lr_ratio` times A's
            rate, HF PEFT's LoRA+ groups) or "loft" (LoFT: AdamW steps of W projected onto the
            LoRA factors, one factor per step; it clips in W's space itself), or a mapping with
            the name and options: `{name: loraplus, lr_ratio: 16, lr_embedding: 1e-6}`,
            `{name: loft, damping: 1e-8}`; all take `betas` and `eps` (`splice.train.optimizers`).
        selection: a gradient rule that chooses which samples update which layers, by name with
            its options, e.g. `{name: gast, keep: 0.5, layers: 2}` (`splice.selection`).
        schedule: a training schedule that acts on the adapter during the run, by name with its
            options, e.g. `{name: dmep, prune_at: 0.15, keep_mass: 0.9}` (DMEP's expert pruning
            for MoELoRA; `splice.schedules`).
    """

    model: str = "minilm"
    task: Task = "classification"
    data: str = "rotten_tomatoes"
    validation: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    adapter: dict[str, Any] = field(default_factory=default_adapter)
    max_length: int = 64
    batch_size: int = 16
    grad_accum: int = 1
    group_by_length: bool = True
    packing: bool = False
    lr: float = 2e-3
    head_lr: float | None = 1e-2
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    epochs: float = 2.0
    max_steps: int | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    eval_every: int | None = 50
    early_stopping_patience: int | None = None
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    seed: int = 42
    precision: Precision = "no"
    quantize: str | dict[str, Any] | None = None
    output_dir: str | None = None
    save_format: SaveFormat = "auto"
    checkpoint_every: int | None = 100
    on_nonfinite: NonFinite = "stop"
    init_adapter: str | None = None
    optimizer: str | dict[str, Any] = "adamw"
    selection: dict[str, Any] | None = None
    schedule: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a pathlib.Path where a path string goes is fine
            if isinstance(getattr(self, f.name), os.PathLike) and f.name in PATH_FIELDS:
                setattr(self, f.name, os.fspath(getattr(self, f.name)))
        for name in OPTION_MAPPINGS:  # numbers PyYAML left as strings (lr_embedding: 1e-6); tuples as the lists
            if isinstance(getattr(self, name), dict):  # config.yaml gives back, so that a resume compares equal
                setattr(self, name, {k: [yaml_number(x) for x in v] if isinstance(v, (tuple, list)) else yaml_number(v)
                                     for k, v in getattr(self, name).items()})
        self.validate()
        if self.output_dir is None:
            name = "dataset" if in_memory(self.data) else Path(self.data).stem if Path(self.data).suffix else self.data
            self.output_dir = f"runs/{name.replace('_', '-')}-{self.adapter['method']}"

    def validate(self) -> None:
        """Refuse values that cannot work, saying which field, the value and what would.

        Raises ConfigError with `key` set to the field at fault (`from_yaml` adds the file)."""
        _one_of("task", self.task, TASKS)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("save_format", self.save_format, SAVE_FORMATS)
        _one_of("on_nonfinite", self.on_nonfinite, NONFINITE_RULES)
        if not isinstance(self.gradient_checkpointing, bool):
            raise keyed_error("gradient_checkpointing", f"gradient_checkpointing must be true or false, got "
                                                   f"{show(self.gradient_checkpointing)}")
        if not isinstance(self.adapter, dict) or "method" not in self.adapter:
            raise keyed_error("adapter", f"adapter must be a mapping with a 'method' key, e.g. "
                                    f"{default_adapter()}; got {self.adapter!r}")
        types = field_types(TrainConfig)
        for name in (f.name for f in dataclasses.fields(self)):
            if name in ("data", "validation") and in_memory(getattr(self, name)):
                continue
            if name != "adapter" and (expected := check_value(types[name], getattr(self, name))) is not None:
                raise keyed_error(name, f"{name} must be {expected}, got {show(getattr(self, name))}")
        if self.packing and self.task != "causal_lm":
            raise keyed_error("packing", "packing applies to task causal_lm only (a classifier reads each row's own "
                                    "first or last token); use group_by_length to cut padding instead")
        if self.task == "causal_lm" and self.model in ENCODER_MODELS:
            raise keyed_error("task", f"model {self.model!r} is an encoder and cannot be trained as a causal LM; "
                                 "use --model smollm2 (or a decoder folder), or --task classification")
        for name in ("max_length", "batch_size", "grad_accum"):
            _positive(name, getattr(self, name))
        for name in ("max_steps", "max_train_examples", "max_eval_examples", "eval_every",
                     "early_stopping_patience", "checkpoint_every"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        _positive("lr", self.lr)
        if isinstance(self.seed, int) and not 0 <= self.seed < 2**32:
            raise keyed_error("seed", f"seed must be in [0, 2**32) (what torch, NumPy and accelerate seed with), "
                                      f"got {self.seed}")
        if self.head_lr is not None:
            _positive("head_lr", self.head_lr)
        if self.max_steps is None:
            _positive("epochs", self.epochs)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise keyed_error("warmup_ratio", f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise keyed_error("weight_decay", f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None:
            _positive("max_grad_norm", self.max_grad_norm)
        try:
            adapter = self.adapter_config()
        except ConfigError as err:
            raise keyed_error("adapter", f"adapter: {err}") from None
        if self.save_format == "peft" and not _peft_shaped(adapter):
            raise keyed_error("save_format", f"save_format peft holds LoRA-shaped adapters (lora, dora, pissa, ...); "
                                             f"a {adapter.method!r} adapter cannot be written in it: use "
                                             "save_format auto or splice")
        if self.quantize is not None:
            try:
                quantize_options(self.quantize)
            except SpliceError as err:
                raise keyed_error("quantize", str(err)) from None
        try:
            optimizer_options(self.optimizer)
        except SpliceError as err:
            raise keyed_error("optimizer", str(err)) from None
        try:
            gradient_rule(self.selection)
        except SpliceError as err:
            raise keyed_error("selection", str(err)) from None
        if self.selection is not None and (self.packing or self.gradient_checkpointing or self.quantize):
            option = next(name for name in ("packing", "gradient_checkpointing", "quantize") if getattr(self, name))
            fix = "remove quantize (torch.func cannot differentiate a 4-bit layer)" if option == "quantize" else \
                f"set {option}: false"
            raise keyed_error("selection", f"selection {self.selection.get('name')!r} takes per-sample gradients, "
                                           f"which {option}: {show(getattr(self, option))} does not allow; {fix}")
        try:
            schedule_callback(self.schedule)
        except SpliceError as err:
            raise keyed_error("schedule", str(err)) from None

    def adapter_config(self) -> AdapterConfig:
        """The adapter mapping as a splice config object (raises with the method's own message)."""
        return config_from_dict(self.adapter, error=ConfigError)

    @classmethod
    def from_dict(cls, fields: dict[str, Any] | None = None, /, *, settings: Mapping[str, Any] | None = None,
                  **overrides: Any) -> TrainConfig:
        """Fields from `fields`, then `overrides` on top (None-valued ones are ignored: a flag not
        given), then `settings` (`splice train --set KEY=VALUE`; see `split_settings`), where None
        is a value (`--set max_steps=null` unsets a file's max_steps).

        An `adapter` override is merged key by key into the adapter mapping (so `r=4` keeps the
        targets); switching `method` keeps only the placement keys (targets, exclude, ...). A
        setting that is neither a field nor a key of the adapter's method is refused with the
        closest key and both lists of valid keys.
        """
        config_settings, adapter_settings = split_settings(settings or {})
        fields = _coerce_numbers(fields or {})
        overrides = _coerce_numbers({k: v for k, v in overrides.items() if v is not None} | config_settings)
        adapter_override = {**overrides.pop("adapter", {}), **adapter_settings}
        merged = {**fields, **overrides}
        if adapter_override:
            merged["adapter"] = _merge_adapter(merged.get("adapter", default_adapter()), adapter_override)
            _check_adapter_keys(merged["adapter"], adapter_settings)
        if isinstance(merged.get("adapter"), dict):
            merged["adapter"] = {k: yaml_number(v) for k, v in merged["adapter"].items()}
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: str | Path | None, /, *, settings: Mapping[str, Any] | None = None,
                  **overrides: Any) -> TrainConfig:
        """Read a YAML mapping of fields (None: the defaults) and apply `overrides`, then
        `settings`, on top (as `from_dict`)."""
        if path is None:
            return cls.from_dict({}, settings=settings, **overrides)
        path = Path(path)
        data = read_yaml_mapping(path, "config file", "config fields")
        config_settings, adapter_settings = split_settings(settings or {})
        given = {k for k, v in overrides.items() if v is not None} | set(config_settings)
        if adapter_settings:
            given.add("adapter")
        try:
            return cls.from_dict(data, settings=settings, **overrides)
        except ConfigError as err:
            key = getattr(err, "key", None)
            if key is None or key not in data:
                raise
            if key in given:  # the override replaced the file's value, except in the adapter mapping
                if key != "adapter":
                    raise
                raise keyed_error(key, f"{path} (with the command line's adapter settings): {err}") from None
            raise keyed_error(key, f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values; rows in memory as their `describe_data` description."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["adapter"] = copy.deepcopy(self.adapter)
        for name in ("data", "validation"):
            if in_memory(out[name]):
                out[name] = describe_data(out[name])
        return out

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML (fields in declaration order); also written to `path` if given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


def read_yaml_mapping(path: Path, what: str, holds: str) -> dict[str, Any]:
    """The mapping a YAML file holds (empty file: {}); a missing file, bad YAML or another kind of
    document is refused naming the file (`what`: "config file"; `holds`: what the mapping lists)."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of {holds}, not {type(data).__name__}")
    return data


IN_MEMORY_PREFIX = "<in memory: "


def in_memory(data: Any) -> bool:
    """Whether `data` is rows held in memory (a `datasets.Dataset`, a list of dicts) rather than
    a data set name, a file or a folder."""
    return data is not None and not isinstance(data, (str, bytes, os.PathLike)) and hasattr(data, "__iter__")


def describe_data(data: Any) -> str:
    """What a report records for `data`: the name or path as given; for rows in memory, their
    kind, number, columns and (for a `datasets.Dataset`) its content fingerprint, so that two
    runs on the same rows record the same description and a checkpoint resumes only on them."""
    if not in_memory(data):
        return os.fspath(data) if isinstance(data, os.PathLike) else str(data)
    kind = f"{type(data).__module__.split('.')[0]}.{type(data).__name__}"
    rows = len(data) if hasattr(data, "__len__") else "?"
    columns = getattr(data, "column_names", None)
    fingerprint = getattr(data, "_fingerprint", None)  # datasets' hash of the rows and transforms
    parts = [f"{rows} rows"] + ([f"columns {', '.join(columns)}"] if columns else []) \
        + ([f"fingerprint {fingerprint}"] if fingerprint else [])
    return f"{IN_MEMORY_PREFIX}{kind}, {'; '.join(parts)}>"


# The fields a setting (`--set KEY=VALUE`) can name; `adapter` is set key by key instead.
SETTABLE_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "adapter")


def split_settings(settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """KEY=VALUE settings as (training-config fields, adapter keys): a key that names a field of
    TrainConfig sets it, any other is a key of the adapter mapping (checked against its method's
    keys once the method is known). No adapter method has a key named like a field, so the one
    `--set` flag serves both without ambiguity."""
    config = {k: v for k, v in settings.items() if k in SETTABLE_FIELDS}
    return config, {k: v for k, v in settings.items() if k not in config}


def _check_adapter_keys(adapter: dict[str, Any], keys: Iterable[str]) -> None:
    """Refuse a setting that is neither a field nor a key of the adapter's method, naming the
    closest valid key and both sets of them (an unknown method is left to `validate`, which lists
    the methods)."""
    try:
        method_keys = ["method", *init_fields(config_class(adapter.get("method"), ConfigError))]
    except ConfigError:
        return
    for key in keys:
        if key not in method_keys:
            close = difflib.get_close_matches(key, [*SETTABLE_FIELDS, *method_keys], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise keyed_error("adapter", f"unknown setting {key!r}: {hint}Training config keys: "
                                    f"{', '.join(SETTABLE_FIELDS)}. Keys of the {adapter['method']!r} adapter: "
                                    f"{', '.join(sorted(method_keys))}")


def _peft_shaped(adapter: AdapterConfig) -> bool:
    """Whether the adapter saves in HF PEFT's LoRA format: a LoRA form, or a placement whose
    form is one (DomLoRA's)."""
    from splice.methods.lora import LoRA

    form_config = getattr(adapter, "form_config", None)
    return isinstance(form_config(["_check"]) if form_config else adapter, LoRA)


def _merge_adapter(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    if "method" in override and override["method"] != base.get("method"):
        base = {k: v for k, v in base.items() if k in PLACEMENT_KEYS}
    return {**base, **override}


def _coerce_numbers(data: dict[str, Any]) -> dict[str, Any]:
    """Check the keys, and read numbers YAML left as strings (PyYAML reads `1e-3` as a string)."""
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        if key not in types:
            raise keyed_error(key, f"unknown training config field {key!r}{did_you_mean(key, types)}")
        kind = types[key].split(" ")[0]
        if isinstance(value, str) and kind in ("int", "float"):
            try:
                value = float(value) if kind == "float" else int(value)
            except ValueError:
                expected = "a number" if kind == "float" else "an integer"
                raise keyed_error(key, f"{key} must be {expected} ({kind}), got {show(value)}") from None
        out[key] = value
    return out


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise keyed_error(name, f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise keyed_error(name, f"{name} must be a positive number, got {value!r}")
