"""A multi-task run as configuration: the tasks, the shared adapter, how batches are mixed, the
training every run shares, the seeds; read from YAML with every value checked (file, key and
value in the message).

    model: minilm                  # or smollm2 (task: causal_lm): one generator for every task
    task: classification           # a head per task; causal_lm: labels as words, tagged prompts
    adapter: {method: lora, r: 8, alpha: 16}
    train: {batch_size: 16, lr: 2e-3, max_steps: 100}   # TrainConfig fields; max_steps per task
    mixing: temperature            # or proportional (p_t ∝ n_t)
    temperature: 2.0               # p_t ∝ n_t^(1/T)
    budget: per_task               # a run on k tasks takes the sum of their single-task steps
    seeds: [0, 1, 2]
    tasks:
      - {name: sentiment, data: rotten_tomatoes}
      - {name: topic, data: bbc_news}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from splice.continual.sequence import (
    check_name,
    check_prompt,
    check_task_names,
    check_train_keys,
    read_task_file,
    task_spec,
)
from splice.core.errors import ConfigError
from splice.core.validation import check_fields, keyed_error, show
from splice.train.config import TrainConfig, default_adapter

Kind = Literal["classification", "causal_lm"]
Mixing = Literal["proportional", "temperature"]
Budget = Literal["per_task", "total"]
# TrainConfig fields a multi-task run sets itself (per task, or from its own keys), not through `train`.
OWN_FIELDS = ("model", "task", "data", "validation", "adapter", "output_dir", "seed", "text_column",
              "label_column", "prompt_column", "completion_column", "group_by_length")
# TrainConfig fields a multi-task run cannot honour: the value that turns each off, and why.
REFUSED_FIELDS = {
    "grad_accum": (1, "a multi-task step is one batch of one task (through that task's head); raise "
                      "batch_size instead"),
    "packing": (False, "a multi-task batch is padded (packing is for a lone causal-LM run)"),
    "eval_every": (None, "a multi-task run has no periodic validation: every task is evaluated once, at the end"),
    "early_stopping_patience": (None, "a multi-task run has no periodic validation to stop on"),
    "checkpoint_every": (None, "a multi-task run is not checkpointed part-way (a stopped job continues with "
                           "--resume at its first unfinished run)"),
    "init_adapter": (None, "every run of a multi-task job starts from a fresh adapter, so that runs compare"),
    "selection": (None, "a multi-task step takes one task's batch through that task's head; a gradient rule "
                        "(GAST) is for a lone run (splice train)"),
}
# What the trainer of every run is given for them (settings: None is a value there).
RUN_SETTINGS = {"eval_every": None, "checkpoint_every": None, "early_stopping_patience": None,
                "group_by_length": False}
# Per-task keys that set the TrainConfig field of the same name for that task's data only.
DATA_FIELDS = ("validation", "text_column", "label_column", "prompt_column", "completion_column",
               "max_train_examples", "max_eval_examples")


@dataclass
class TaskSpec:
    """One task of a mixture.

    Attributes:
        name: the task's name (letters, digits, _ and -): its head, its tag, its column in the tables.
        data: a bundled data set (rotten_tomatoes, bbc_news, arithmetic, ...), a .jsonl / .csv file
            or a folder, as `TrainConfig.data`.
        kind: what the data holds, "classification" (text, label) or "causal_lm" (prompt,
            completion); None: a bundled data set's own kind, a file's from its first row (with
            the prompt and completion columns: causal_lm). A generator (task: causal_lm) turns
            classification data into prompt -> label-word rows.
        validation, text_column, label_column, prompt_column, completion_column,
            max_train_examples, max_eval_examples: as the TrainConfig fields, for this task's data.
        labels: classification data: a new name for every label (several may map to one).
        prompt: a generator's prompt for classification data; {text} is the row's text.
        max_words: with `prompt`: keep the first N words of each text, so the answer fits max_length.
        tag: prefixed to every input of the task (prompt, or text to classify), in every run it is
            in, so that one adapter can tell the tasks apart. None: "[name] " for a generator, ""
            for a classifier (its head tells the tasks apart).
        head: classification only: the name of another task whose head (and labels) this task
            shares; None: a head of its own.
    """

    name: str
    data: str
    kind: Kind | None = None
    validation: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    labels: dict[str, str] | None = None
    prompt: str = "Text: {text}\nLabel:"
    max_words: int | None = None
    tag: str | None = None
    head: str | None = None


@dataclass
class MultitaskConfig:
    """One shared adapter trained on a mixture of tasks, against one adapter per task, with the
    pairwise transfer matrix.

    Attributes:
        tasks: the tasks (at least two, distinct names).
        model: "minilm", "smollm2" or a local transformers folder.
        task: "classification" (one head per task) or "causal_lm" (one generator; classification
            data joins as label words, every prompt tagged with its task).
        adapter: the shared adapter, as `TrainConfig.adapter` (no head in it: the heads are the run's).
        train: TrainConfig fields every run shares (batch_size, lr, head_lr, max_length, ...).
            `max_steps` (or `epochs` over the task's rows) is the budget of one task alone.
        mixing: which task each batch comes from: "proportional" (p_t ∝ n_t, the task's training
            rows) or "temperature" (p_t ∝ n_t^(1/T): T > 1 lifts small tasks, T -> inf is uniform).
        temperature: T of temperature mixing.
        budget: "per_task": a run on k tasks takes the sum of their single-task budgets (under
            proportional mixing each task gets batches in proportion to its rows, what training on
            the union does: about its own budget with `epochs` budgets, but with `max_steps` a
            task smaller than the others gets fewer batches than alone);
            "total": every run takes the mean single-task budget of its tasks (compute held fixed).
        compare: also train one adapter per task (the baseline: accuracy, stored parameters, compute).
        transfer: also train every pair of tasks, for Δ_ij = acc_i(i+j) - acc_i(i) (it needs the
            single-task runs of `compare`); None: as `compare`.
        seeds: every run is trained once per seed; tables give the mean (and std) over seeds.
        eval_split: the split every task is scored on ("test"; a task without test rows falls
            back to its validation rows), or "validation".
        output_dir: the job's folder (default runs/multitask-<model>).
    """

    tasks: list[TaskSpec]
    model: str = "minilm"
    task: Kind = "classification"
    adapter: dict[str, Any] = field(default_factory=default_adapter)
    train: dict[str, Any] = field(default_factory=dict)
    mixing: Mixing = "proportional"
    temperature: float = 2.0
    budget: Budget = "per_task"
    compare: bool = True
    transfer: bool | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_split: Literal["test", "validation"] = "test"
    output_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, list):
            raise keyed_error("tasks", "tasks must be a list of tasks (mappings with name and data), got "
                                       f"{show(self.tasks)}")
        self.tasks = [t if isinstance(t, TaskSpec) else task_spec(t, i, cls=TaskSpec)
                      for i, t in enumerate(self.tasks)]
        check_fields(MultitaskConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                       if f.name != "tasks"}, "")
        names = [t.name for t in self.tasks]
        check_task_names(names, "a mixture")
        for i, spec in enumerate(self.tasks):
            check_task(spec, i, self.task, names)
        check_train_keys(self.train, OWN_FIELDS, "the multi-task run")
        for key, value in self.train.items():
            if key in REFUSED_FIELDS and value != REFUSED_FIELDS[key][0]:
                raise keyed_error("train", f"train.{key} must be {REFUSED_FIELDS[key][0]!r}: {REFUSED_FIELDS[key][1]}; "
                                           f"got {show(value)}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise keyed_error("temperature", f"temperature must be a positive number, got {show(self.temperature)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise keyed_error("seeds", f"seeds must be a non-empty list of distinct integers, got {self.seeds!r}")
        if bad := [s for s in self.seeds if not 0 <= s < 2**32]:
            raise keyed_error("seeds", f"a seed must be in [0, 2**32 - 1] (what numpy and torch take), got {bad[0]}")
        if self.transfer is None:
            self.transfer = self.compare
        if self.transfer and not self.compare:
            raise keyed_error("transfer", "transfer: Δ_ij needs the single-task runs of each task, which "
                                          "compare: false turns off; set transfer: false, or compare: true")
        if self.output_dir is None:
            self.output_dir = f"runs/multitask-{Path(self.model).name}"
        shared = self.shared_config()  # YAML 1.1 reads 1e-3 as a string: keep the number TrainConfig reads
        self.train = {key: getattr(shared, key) for key in self.train}
        for spec in self.tasks:  # every task's training fields are valid before anything loads
            self.data_config(spec, spec.kind or self.task)

    def data_config(self, spec: TaskSpec, kind: str) -> TrainConfig:
        """The TrainConfig that loads `spec`'s data as `kind` rows: its columns and limits, the
        shared `train` (max_length, max_eval_examples, ...)."""
        own = {k: getattr(spec, k) for k in DATA_FIELDS if getattr(spec, k) is not None}
        try:
            return TrainConfig.from_dict({**self.train, **own}, model=self.model, data=spec.data, task=kind,
                                         adapter=dict(self.adapter), seed=self.seeds[0], output_dir="unused",
                                         settings=RUN_SETTINGS)
        except ConfigError as err:
            raise keyed_error("tasks", f"task {spec.name!r}: {err}") from None

    def shared_config(self) -> TrainConfig:
        """The training fields every run shares (`train` over the defaults), as a TrainConfig."""
        try:
            return TrainConfig.from_dict(dict(self.train), model=self.model, task=self.task,
                                         adapter=dict(self.adapter), output_dir="unused", settings=RUN_SETTINGS)
        except ConfigError as err:
            raise keyed_error("train", str(err)) from None

    def run_config(self, seed: int, folder: str | Path, max_steps: int, rows: list[dict[str, Any]]) -> TrainConfig:
        """The TrainConfig of one run's trainer: the job's model, task, adapter and `train`, `rows`
        (the run's tasks' training rows, for the record), `max_steps`, and no periodic evaluation
        or checkpoint (`RUN_SETTINGS`)."""
        try:
            return TrainConfig.from_dict(dict(self.train), model=self.model, task=self.task, data=rows,
                                         adapter=dict(self.adapter), seed=seed, output_dir=str(folder),
                                         max_steps=max_steps, settings=RUN_SETTINGS)
        except ConfigError as err:
            raise keyed_error("train", str(err)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, *, train: dict[str, Any] | None = None, **overrides: Any) -> MultitaskConfig:
        """Read a multi-task file; keyword overrides (the CLI's flags; None: not given) win, and
        `train` entries are set over the file's `train` mapping (None too: `--set KEY=null` unsets
        a field) and over every task's own max_train_examples / max_eval_examples. A temperature
        without temperature mixing (a flag's, or the file's under the file's mixing) is refused: it
        would do nothing."""
        path = Path(path)
        data = read_task_file(cls, path, "multi-task file", "multi-task keys (tasks, model, mixing, ...)")
        merged = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        if train:
            if not isinstance(merged.get("train", {}), dict):
                raise ConfigError(f"{path}: key 'train' must be a mapping of training fields, got "
                                  f"{show(merged['train'])}")
            merged["train"] = {**merged.get("train", {}), **train}
            limits = [key for key in ("max_train_examples", "max_eval_examples") if key in train]
            if limits and isinstance(merged.get("tasks"), list):
                merged["tasks"] = [{k: v for k, v in spec.items() if k not in limits} if isinstance(spec, dict)
                                   else spec for spec in merged["tasks"]]
        flagged = {k for k, v in overrides.items() if v is not None}
        said = "temperature" in flagged or ("temperature" in data and "mixing" not in flagged)  # a flag's mixing wins
        if said and merged.get("mixing", "proportional") != "temperature":
            raise ConfigError(f"{path}: temperature {show(merged['temperature'])} does nothing with mixing "
                              f"{show(merged.get('mixing', 'proportional'))}; set mixing: temperature (--mixing "
                              "temperature), or drop the temperature")
        try:
            return cls(**merged)
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_task(spec: TaskSpec, index: int, task: str, names: list[str]) -> None:
    where = f"tasks[{index}] ({spec.name!r})"
    check_name(spec.name, where)
    if task == "classification" and spec.kind == "causal_lm":
        raise keyed_error("tasks", f"{where}: kind causal_lm needs a generator; set task: causal_lm (and a "
                                   "decoder model such as smollm2)")
    check_prompt(spec.prompt, where)
    if task == "classification" and (problem := words_settings_problem(spec)) is not None:
        raise keyed_error("tasks", f"{where}: a classifier's task gets a head, not a prompt, so {problem}")
    if spec.max_words is not None and spec.max_words < 1:
        raise keyed_error("tasks", f"{where}: max_words must be a positive number of words, got {spec.max_words}")
    for key in ("max_train_examples", "max_eval_examples"):
        value = getattr(spec, key)
        if value is not None and value < 1:
            raise keyed_error("tasks", f"{where}: {key} must be a positive number, got {value}")
    if spec.head is not None:
        if task != "classification":
            raise keyed_error("tasks", f"{where}: head shares a classification head; a generator has none")
        if spec.head == spec.name or spec.head not in names:
            raise keyed_error("tasks", f"{where}: head {spec.head!r} must name another task of the mixture, one "
                                       f"of {[n for n in names if n != spec.name]}")


def words_settings_problem(spec: TaskSpec) -> str | None:
    """What is wrong with `prompt` and `max_words` on a task whose rows are not turned into label
    words (a classifier's task, or prompt/completion rows): they would do nothing. None: unset."""
    given = [key for key, unset in (("prompt", TaskSpec.prompt), ("max_words", None)) if getattr(spec, key) != unset]
    if not given:
        return None
    return (f"{' and '.join(given)} would do nothing (they turn classification rows into label-word prompts "
            f"for a generator, task: causal_lm); drop {'them' if len(given) > 1 else 'it'}")
