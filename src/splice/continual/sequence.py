"""A continual run as configuration: the tasks in order, the strategy, and what every task's
training shares; read from YAML with every value checked (file, key and value in the message).

    model: minilm
    strategy: olora            # sequential, separate, olora, ...
    options: {penalty: 0.5}    # the strategy's own keys
    adapter: {method: lora, r: 8, alpha: 16}
    train: {batch_size: 16, lr: 2e-3, max_length: 64}   # any TrainConfig field, for every task
    tasks:
      - {name: sentiment, data: rotten_tomatoes, max_steps: 120}
      - {name: topic, data: bbc_news, max_steps: 80}
      - name: business
        data: bbc_news
        labels: {business: business, tech: business, entertainment: other, politics: other, sport: other}
"""

from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from splice.core.api import adapter_name_problem
from splice.core.errors import ConfigError
from splice.core.validation import check_fields, did_you_mean, keyed_error, show, yaml_number
from splice.train.config import SETTABLE_FIELDS, TrainConfig, default_adapter, read_yaml_mapping

Setting = Literal["task_incremental", "task_agnostic"]
SETTINGS = ("task_incremental", "task_agnostic")
# Per-task fields that set the TrainConfig field of the same name for that task only.
BUDGET_FIELDS = ("max_steps", "epochs", "max_train_examples", "max_eval_examples", "lr", "eval_every")
# TrainConfig fields a sequence sets itself (per task or from its own keys), not through `train`.
OWN_FIELDS = ("model", "task", "data", "validation", "adapter", "output_dir", "init_adapter", "seed")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


@dataclass
class TaskSpec:
    """One task of a sequence.

    Attributes:
        name: the task's name (letters, digits, _ and -): its adapter, head and folder.
        data: a bundled data set, a file or a folder, as `TrainConfig.data`.
        labels: classification only: a new label for every label of the data, by name (several
            may map to one): the same texts as a different task, e.g. business/tech vs the rest.
        as_words: turn a classification data set into prompt -> label-word rows for a causal LM
            (the labels as words, scored by greedy exact match), with `prompt` ({text} is the row's text).
        head: classification only: the name of an earlier task whose head this task shares and
            trains on (its labels must be the same): a new domain for the same label set, or
            the same task again. None: a fresh head of its own.
        max_words: as_words only: keep the first N words of each text, so that a long article
            leaves room for the answer within `max_length` (the end of a longer row is cut).
        max_steps, epochs, max_train_examples, max_eval_examples, lr, eval_every: this task's
            budget and rate (None: the sequence's `train` value).
    """

    name: str
    data: str
    labels: dict[str, str] | None = None
    as_words: bool = False
    prompt: str = "Text: {text}\nLabel:"
    max_words: int | None = None
    head: str | None = None
    max_steps: int | None = None
    epochs: float | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    lr: float | None = None
    eval_every: int | None = None


@dataclass
class SequenceConfig:
    """A sequence of tasks trained in order with one strategy.

    Attributes:
        tasks: the tasks, in training order (at least two, distinct names).
        strategy: how earlier tasks are kept (`splice.continual.STRATEGIES`).
        options: the strategy's own keys (e.g. O-LoRA's `penalty`).
        model: "minilm", "smollm2" or a local transformers folder.
        task: "classification" (per-task heads) or "causal_lm" (one generator; classification
            data joins with `as_words`).
        adapter: the adapter form every task trains, as `TrainConfig.adapter`.
        train: TrainConfig fields shared by every task (batch_size, lr, max_length, ...).
        settings: the inference settings evaluated after each task: task_incremental (task id
            given) and/or task_agnostic (the strategy picks the task).
        routing: task-agnostic task selection: "prototype" (the row's closest class prototype
            of the frozen model, ConDU's rule) or "confidence" (classification only: the task
            whose view and head give the row's most confident prediction, max softmax; one
            forward pass per seen task).
        eval_split: the split of the accuracy matrix ("test" or "validation").
        angle_samples: gradient samples per task for the principal angles between successive
            tasks (0: no angles).
        seed: seeds the model, the adapters and every task's data order.
        output_dir: the run folder (default runs/continual-<model>-<strategy>).
    """

    tasks: list[TaskSpec]
    strategy: str = "sequential"
    options: dict[str, Any] = field(default_factory=dict)
    model: str = "minilm"
    task: Literal["classification", "causal_lm"] = "classification"
    adapter: dict[str, Any] = field(default_factory=default_adapter)
    train: dict[str, Any] = field(default_factory=dict)
    settings: list[Setting] = field(default_factory=lambda: list(SETTINGS))
    routing: Literal["prototype", "confidence"] = "prototype"
    eval_split: Literal["test", "validation"] = "test"
    angle_samples: int = 4
    seed: int = 0
    output_dir: str | None = None

    def __post_init__(self) -> None:
        self.tasks = [t if isinstance(t, TaskSpec) else task_spec(t, i) for i, t in enumerate(self.tasks)]
        check_fields(SequenceConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                       if f.name != "tasks"}, "")
        names = [t.name for t in self.tasks]
        check_task_names(names, "a sequence")
        for i, spec in enumerate(self.tasks):
            check_task(spec, i, self.task)
            if spec.head is not None and (self.task != "classification" or spec.head not in names[:i]):
                raise keyed_error("tasks", f"tasks[{i}] ({spec.name!r}): head {spec.head!r} must name an earlier "
                                      f"classification task of the sequence, one of {names[:i]}")
        check_train_keys(self.train, OWN_FIELDS, "the sequence")
        if not self.settings or any(s not in SETTINGS for s in self.settings):
            raise keyed_error("settings", f"settings must list some of {', '.join(SETTINGS)}; got {self.settings!r}")
        if "task_incremental" not in self.settings:
            raise keyed_error("settings", "settings must include task_incremental: forgetting, BWT, FWT and the "
                                          "forgetting law are read from it (task_agnostic is measured beside it); "
                                          f"got {self.settings!r}")
        if self.routing == "confidence" and self.task != "classification":
            raise keyed_error("routing", "routing: confidence reads a classification head's probabilities; a generator "
                                    "routes by prototype")
        if self.angle_samples < 0:
            raise keyed_error("angle_samples", f"angle_samples must be >= 0, got {self.angle_samples}")
        if self.output_dir is None:
            self.output_dir = f"runs/continual-{Path(self.model).name}-{self.strategy}"
        for spec in self.tasks:  # every task's training config is valid before anything loads
            self.train_config(spec)
        self.options = {key: yaml_number(value) for key, value in self.options.items()}
        self.check_strategy()

    def check_strategy(self) -> None:
        """The strategy exists, takes these options and can train this adapter form, before
        anything loads (or any earlier run is replaced)."""
        from splice.continual.strategies import STRATEGIES, make_strategy

        try:
            make_strategy(self.strategy, self.train_config(self.tasks[0]).adapter_config(), self.options)
        except ConfigError as err:
            about_options = self.strategy in STRATEGIES and any(repr(key) in str(err) or f"{key} " in str(err)
                                                                 for key in self.options)
            raise keyed_error("options" if about_options else "strategy", str(err)) from None

    def train_config(self, spec: TaskSpec) -> TrainConfig:
        """The TrainConfig of one task: the sequence's model, adapter, seed and `train`, the task's
        data and budget, its own folder under the run's."""
        budget = {k: getattr(spec, k) for k in BUDGET_FIELDS if getattr(spec, k) is not None}
        try:
            return TrainConfig.from_dict({**self.train, **budget}, model=self.model, task=self.task, data=spec.data,
                                         adapter=dict(self.adapter), seed=self.seed,
                                         output_dir=str(Path(self.output_dir) / "tasks" / spec.name))
        except ConfigError as err:
            raise keyed_error("train", f"task {spec.name!r}: {err}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> SequenceConfig:
        """Read a sequence file; keyword overrides (the CLI's flags; None: not given) win."""
        path = Path(path)
        data = read_task_file(cls, path, "sequence file", "sequence keys (tasks, strategy, ...)")
        try:
            return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_task_file(cls: type, path: Path, what: str, holds: str) -> dict[str, Any]:
    """The mapping of a file that lists tasks (a sequence, a mixture): every key one of config
    class `cls`'s fields, and a 'tasks' list (`what`, `holds`: as `read_yaml_mapping`)."""
    data = read_yaml_mapping(path, what, holds)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}{did_you_mean(key, known)}")
    if "tasks" not in data:
        raise ConfigError(f"{path}: no 'tasks' list (each task a mapping with name and data)")
    return data


def check_task_names(names: list[str], what: str) -> None:
    """At least two tasks, with distinct names (`what`: "a sequence", "a mixture")."""
    if len(names) < 2:
        raise keyed_error("tasks", f"{what} needs at least two tasks, got {len(names)}")
    if len(set(names)) != len(names):
        raise keyed_error("tasks", f"task names must differ, got {names}")


def check_train_keys(train: dict[str, Any], own: tuple[str, ...], who: str) -> None:
    """Every key of a config's `train` mapping is a training field that `who` (the job) leaves
    to it, not one of `own`, which the job sets itself."""
    for key in train:
        if key in own or key not in SETTABLE_FIELDS:
            why = f"is set by {who} itself" if key in own else f"is not a training field" \
                  f"{did_you_mean(key, SETTABLE_FIELDS)}"
            raise keyed_error("train", f"train.{key} {why}")


def task_spec(data: Any, index: int, keys: tuple[str, ...] | None = None, why_not: str = "",
              cls: type = TaskSpec) -> Any:
    """`tasks[index]` of a config as a TaskSpec (or another task dataclass `cls` with `name` and
    `data`), every key checked; `keys`: the only keys this config takes (another field of `cls`
    is refused with `why_not`)."""
    fields = [f.name for f in dataclasses.fields(cls)]
    known = list(keys) if keys is not None else fields
    if not isinstance(data, dict):
        raise keyed_error("tasks", f"tasks[{index}] must be a mapping ({', '.join(known[:4])}, ...), got {show(data)}")
    for key in data:
        if key not in known:
            if key in fields:
                raise keyed_error("tasks", f"tasks[{index}].{key} is {why_not}")
            raise keyed_error("tasks", f"tasks[{index}]: unknown key {key!r}{did_you_mean(key, known)}")
    for key in ("name", "data"):
        if key not in data:
            raise keyed_error("tasks", f"tasks[{index}] has no {key!r}")
    numeric = {f.name for f in dataclasses.fields(cls) if "float" in str(f.type)}
    data = {key: yaml_number(value) if key in numeric else value for key, value in data.items()}
    check_fields(cls, data, f"tasks[{index}].")
    return cls(**data)


def check_name(name: str, where: str) -> None:
    """A task name is letters, digits, _ and - (its adapter, head and folder are named after it),
    and not a name torch or splice keeps for itself (adapters and heads are modules stored under
    their names: "train", "type", "keys", ... are attributes there)."""
    if not _NAME.match(name):
        raise keyed_error("tasks", f"{where}: a task name is letters, digits, _ and - and starts with a letter")
    if adapter_name_problem(name) is not None or hasattr(nn.ModuleDict, name):
        raise keyed_error("tasks", f"{where}: {name!r} cannot name a task: its adapter and head are modules stored "
                                   "under its name, and torch's modules already have an attribute of that name; "
                                   f"choose another (e.g. {name + '_task'!r})")


def check_task(spec: TaskSpec, index: int, task: str) -> None:
    where = f"tasks[{index}] ({spec.name!r})"
    check_name(spec.name, where)
    if spec.as_words and task != "causal_lm":
        raise keyed_error("tasks", f"{where}: as_words makes rows for a causal LM; set task: causal_lm")
    if spec.max_words is not None and (not spec.as_words or spec.max_words < 1):
        raise keyed_error("tasks", f"{where}: max_words is a positive number of words, for as_words tasks only")
    if spec.as_words:
        check_prompt(spec.prompt, where)
    elif spec.prompt != TaskSpec.prompt:
        raise keyed_error("tasks", f"{where}: prompt is for as_words tasks only (a classification task reads the "
                                   "text itself); set as_words: true with task: causal_lm, or drop prompt")


def check_prompt(prompt: str, where: str) -> None:
    """A label-word prompt is filled with `prompt.format(text=...)`: {text} once or more, no other
    field, and literal braces doubled ({{ and }})."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None]
    except ValueError as err:
        raise keyed_error("tasks", f"{where}: prompt {prompt!r} is not a format string ({err}); write a literal "
                                   "brace as {{ or }}") from None
    if set(fields) != {"text"}:
        others = sorted({f"{{{name}}}" for name in fields if name != "text"})
        raise keyed_error("tasks", f"{where}: prompt must contain {{text}} and no other field"
                                   + (f" (found {', '.join(others)}; write a literal brace as {{{{ or }}}})"
                                      if others else "") + f", got {prompt!r}")

