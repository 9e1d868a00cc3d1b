"""A federated run as configuration: the model and data, how the data is split among clients,
the rounds, the local training, the aggregation rule and the privacy layers; read from YAML with
every value checked (file, key and value in the message).

    model: minilm
    data: rotten_tomatoes
    adapter: {method: lora, r: 8, alpha: 16}
    train: {batch_size: 16, lr: 2e-3, max_length: 64}   # any TrainConfig field, for local training
    clients: 8
    rounds: 10
    local_steps: 10
    partition: {scheme: dirichlet, alpha: 0.1}
    aggregation: exact            # fedavg (A and B separately) or exact (mean of B A, re-factored)
    method: dual                  # Med-DualLoRA: a global adapter + a never-uploaded local one
    options: {local_adapter: {method: lora, r: 4, alpha: 8}}   # the method's own keys
    secure: {num_shares: 3, reconstruction_threshold: 2}      # SecAgg+ (optional)
    privacy: {side: server, noise_multiplier: 0.5, clipping_norm: 1.0}  # Flower's DP (optional)

A federated continual run gives `tasks` instead of `data`: the clients learn the tasks one after
the other, `rounds` rounds each, every task with its own classification head and its own
partition of its rows among the same clients (`splice.federated.sequence`):

    tasks:
      - {name: sentiment, data: rotten_tomatoes}
      - {name: topic, data: bbc_news}
    method: prism             # PRISM: per-expert bases shared by the clients (MoELoRA adapter)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from splice.continual.sequence import TaskSpec, check_task, task_spec
from splice.core.errors import ConfigError
from splice.core.validation import check_fields, did_you_mean, keyed_error, show, yaml_number
from splice.federated.methods import METHODS
from splice.train.config import SETTABLE_FIELDS, TrainConfig, default_adapter, read_yaml_mapping

Aggregation = Literal["fedavg", "exact"]
# Adapter forms whose weight change is B A (DoRA: plus a magnitude, averaged plainly), which
# aggregation: exact averages and re-factors. A MoELoRA's router gates each expert's columns and
# a FlexiLoRA's rank weights gate A's rows: the mean of their B A is not the mean of their models.
EXACT_FORMS = ("lora", "dora")
SEED_LIMIT = 2**32 - 1  # numpy's and accelerate's set_seed take seeds up to this
# TrainConfig fields a federated run sets itself, not through `train`.
OWN_FIELDS = ("model", "task", "data", "validation", "adapter", "output_dir", "init_adapter", "seed", "max_steps",
              "epochs", "eval_every", "checkpoint_every", "max_eval_examples", "schedule")


@dataclass
class Partition:
    """How the training rows are split among the clients.

    Attributes:
        scheme: "iid" (a seeded random split into near-equal shards) or "dirichlet" (per label,
            the clients' shares drawn from Dir(alpha): small alpha, few labels per client).
        alpha: the Dirichlet concentration (dirichlet only); 0.1 is strongly non-IID, 100 near IID.
        min_size: the fewest training rows a client may get (dirichlet redraws until it holds).
    """

    scheme: Literal["iid", "dirichlet"] = "iid"
    alpha: float = 1.0
    min_size: int = 8


@dataclass
class Secure:
    """Flower's SecAgg+ (Bell et al. 2020): the server learns only the sum of the clients' updates.

    Attributes:
        num_shares: how many clients hold a share of each client's secret (>= 3).
        reconstruction_threshold: how many shares rebuild a dropped client's mask.
        clipping_range, quantization_range: values are clipped to +-clipping_range and quantized
            to integers in [0, quantization_range) before masking: the sum is exact up to
            clipping_range / quantization_range per value.
    """

    num_shares: int = 3
    reconstruction_threshold: int = 2
    clipping_range: float = 8.0
    quantization_range: int = 4194304


@dataclass
class Privacy:
    """Flower's central differential privacy with fixed clipping (Andrew et al. 2019). Its noise
    (std noise_multiplier x clipping_norm / sampled clients) bounds an unweighted mean: under
    privacy the server averages the clients' updates with equal weights, not by their rows.

    Attributes:
        side: "server" (the server clips each client's update and adds noise) or "client" (each
            client clips its own update, `fixedclipping_mod`; the server adds the noise).
        noise_multiplier: Gaussian noise std relative to the clipping norm, over the sampled clients.
        clipping_norm: the largest L2 norm of one client's update (all its tensors together).
    """

    side: Literal["server", "client"] = "server"
    noise_multiplier: float = 0.1
    clipping_norm: float = 1.0


@dataclass
class FederatedConfig:
    """A federated fine-tuning run on Flower.

    Attributes:
        data: the data set every client takes its shard of (as `TrainConfig.data`); default
            rotten_tomatoes. Not with `tasks`.
        tasks: a federated continual run: the tasks in order (`TaskSpec` mappings with name, data
            and optionally labels and head; at least two), `rounds` rounds each; None: one task, `data`.
        model: "minilm", "smollm2" or a local transformers folder.
        task: "classification" or "causal_lm".
        adapter: the (global) adapter, as `TrainConfig.adapter`. SFed-LoRA's scale
            (`scaling: sfed`) takes `num_clients` = the clients sampled per round unless given.
        train: TrainConfig fields of each client's local training (batch_size, lr, max_length, ...).
        clients: how many clients (Flower SuperNodes) hold a shard.
        rounds: server rounds (broadcast, local training, upload, aggregation, evaluation).
        local_steps: optimizer steps each sampled client takes per round (a fresh AdamW and
            schedule each round, the usual practice of FedAvg).
        fraction: the share of clients sampled for training in a round (at least one).
        partition: how the training rows are split (`Partition`).
        aggregation: "fedavg" (the weighted mean of every tensor, LoRA's A and B separately) or
            "exact" (the weighted mean of the clients' B A, re-factored to rank r by SVD; the
            separate rule's error is reported next to it).
        method: a federated method (`splice.federated.methods.METHODS`): "fedavg" (plain
            FedAvg-LoRA), "dual" (Med-DualLoRA: a local adapter per client trained with the global
            one and never uploaded; inference at a client uses both), "fedeu" (FedEU: an evidential
            loss, uploads weighted by each client's uncertainty), ...
        options: the method's own keys (e.g. dual's `local_adapter`).
        secure: SecAgg+ settings (`Secure`), or None.
        privacy: differential-privacy settings (`Privacy`), or None.
        eval_examples: at most this many test rows per client and for the global evaluation.
        seed: seeds the model, the adapters, the partition and every client's data order.
        output_dir: the run folder (default runs/federated-<data>-<method>-<aggregation>).
    """

    data: str | None = None
    tasks: list[TaskSpec] | None = None
    model: str = "minilm"
    task: Literal["classification", "causal_lm"] = "classification"
    adapter: dict[str, Any] = field(default_factory=default_adapter)
    train: dict[str, Any] = field(default_factory=dict)
    clients: int = 4
    rounds: int = 5
    local_steps: int = 10
    fraction: float = 1.0
    partition: Partition = field(default_factory=Partition)
    aggregation: Aggregation = "fedavg"
    method: str = "fedavg"
    options: dict[str, Any] = field(default_factory=dict)
    secure: Secure | None = None
    privacy: Privacy | None = None
    eval_examples: int | None = 200
    seed: int = 0
    output_dir: str | None = None

    def __post_init__(self) -> None:
        self.partition = _section(Partition, self.partition, "partition")
        self.secure = None if self.secure is None else _section(Secure, self.secure, "secure")
        self.privacy = None if self.privacy is None else _section(Privacy, self.privacy, "privacy")
        self.fraction = yaml_number(self.fraction)
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name not in ("partition", "secure", "privacy", "tasks")}
        check_fields(FederatedConfig, plain, "")
        self._check_tasks()
        for name in ("clients", "rounds", "local_steps"):
            if getattr(self, name) < 1:
                raise keyed_error(name, f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.fraction <= 1.0:
            raise keyed_error("fraction", f"fraction must be in (0, 1], got {self.fraction}")
        if self.eval_examples is not None and self.eval_examples < 1:
            raise keyed_error("eval_examples", f"eval_examples must be >= 1 or null, got {self.eval_examples}")
        if self.partition.alpha <= 0 or self.partition.min_size < 1:
            raise keyed_error("partition", f"partition.alpha must be > 0 and partition.min_size >= 1, got "
                                      f"{self.partition.alpha} and {self.partition.min_size}")
        if self.partition.scheme == "dirichlet" and self.task != "classification":
            raise keyed_error("partition", "partition.scheme dirichlet splits by label: a causal_lm run has no labels; "
                                      "use iid")
        self._check_seed()
        form = self.adapter.get("method", "lora") if isinstance(self.adapter, dict) else None
        if self.aggregation == "exact" and form not in EXACT_FORMS:
            raise keyed_error("aggregation", f"aggregation: exact averages each module's B A and re-factors it, "
                                             f"which is the mean model only for {' and '.join(EXACT_FORMS)}; "
                                             f"adapter method {form!r} gates its factors (a router or rank "
                                             "weights): use aggregation: fedavg")
        if self.method not in METHODS:
            raise keyed_error("method", f"method must be one of {', '.join(METHODS)}, got {show(self.method)}")
        if self.secure is not None:
            self._check_secure()
        if self.privacy is not None and self.aggregation == "exact":
            raise keyed_error("privacy", "privacy needs aggregation: fedavg: Flower's DP noise bounds how far one "
                                         "client moves a mean of tensors, and exact releases SVD factors of the "
                                         "mean of B A, which a tiny change of one client can rotate")
        if self.privacy is not None and (self.privacy.noise_multiplier < 0 or self.privacy.clipping_norm <= 0):
            raise keyed_error("privacy", f"privacy.noise_multiplier must be >= 0 and privacy.clipping_norm > 0, got "
                                    f"{self.privacy.noise_multiplier} and {self.privacy.clipping_norm}")
        for key in self.train:
            if key in OWN_FIELDS or key not in SETTABLE_FIELDS:
                why = "is set by the federated run itself" if key in OWN_FIELDS else \
                      f"is not a training field{did_you_mean(key, SETTABLE_FIELDS)}"
                raise keyed_error("train", f"train.{key} {why}")
        if self.output_dir is None:
            data = Path(self.data).stem.replace("_", "-") if self.tasks is None else "sequence"
            self.output_dir = f"runs/federated-{data}-{self.method}-{self.aggregation}"
        self.train_config()  # the local training config is valid before anything loads
        try:
            METHODS[self.method](self)  # and so are the method's options
        except ConfigError as err:
            raise keyed_error("options", str(err)) from None

    def _check_tasks(self) -> None:
        """`tasks` read into TaskSpecs and checked; `data` set where there are none."""
        if self.tasks is None:
            self.data = "rotten_tomatoes" if self.data is None else self.data
            return
        if self.data is not None:
            raise keyed_error("data", f"data ({show(self.data)}) and tasks exclude each other: a federated "
                                      "continual run names each task's data in tasks")
        if not isinstance(self.tasks, list) or len(self.tasks) < 2:
            raise keyed_error("tasks", f"tasks must be a list of at least two task mappings, got {show(self.tasks)}")
        self.tasks = [_task(_given(spec) if isinstance(spec, TaskSpec) else spec, i)
                      for i, spec in enumerate(self.tasks)]
        for index, spec in enumerate(self.tasks):
            check_task(spec, index, self.task)
        names = [spec.name for spec in self.tasks]
        if len(set(names)) != len(names):
            raise keyed_error("tasks", f"task names must be distinct, got {names}")
        for index, spec in enumerate(self.tasks):
            if spec.head is not None and spec.head not in names[:index]:
                raise keyed_error("tasks", f"tasks[{index}] ({spec.name!r}) shares the head of {spec.head!r}, which "
                                           f"is not an earlier task ({names[:index]})")
        if self.task != "classification":
            raise keyed_error("tasks", "a federated task sequence needs task: classification (each task has its own "
                                       "head)")
        for key in ("secure", "privacy"):
            if getattr(self, key) is not None:
                raise keyed_error(key, f"{key} is not supported with tasks: a federated continual run runs its "
                                       "tasks through splice's own strategy only")
        if self.aggregation == "exact":
            raise keyed_error("aggregation", "aggregation: exact re-factors B A per round, which mixes a task "
                                             "sequence's frozen and trained factors: use fedavg with tasks")

    def _check_seed(self) -> None:
        """The seed (the server's draws and the shards take it as is) must be one torch, numpy
        and accelerate take; the clients' seeds are derived from it in that range."""
        if self.seed < 0 or self.seed > SEED_LIMIT:
            raise keyed_error("seed", f"seed must be an integer from 0 to {SEED_LIMIT}, got {self.seed}")

    @property
    def datasets(self) -> list[str]:
        """The data set of every task (one without `tasks`)."""
        return [self.data] if self.tasks is None else [spec.data for spec in self.tasks]

    def _check_secure(self) -> None:
        secure = self.secure
        if self.aggregation == "exact":
            raise keyed_error("secure", "secure aggregation gives the server only the sum of the clients' tensors, "
                                   "not each client's B A: use aggregation: fedavg with secure")
        if self.privacy is not None:
            raise keyed_error("secure", "secure and privacy together are not supported here: Flower's DP wrappers "
                                   "need each client's update, which SecAgg+ hides")
        if not 3 <= secure.num_shares or not 2 <= secure.reconstruction_threshold < secure.num_shares:
            raise keyed_error("secure", "secure needs num_shares >= 3 and 2 <= reconstruction_threshold < "
                                        f"num_shares (Flower's SecAgg+), got {secure.num_shares} and "
                                        f"{secure.reconstruction_threshold}")
        if secure.num_shares > self.sampled:
            raise keyed_error("secure", f"secure.num_shares ({secure.num_shares}) exceeds the clients sampled per "
                                        f"round ({self.sampled} = clients x fraction): each share needs a client")
        if secure.clipping_range <= 0 or secure.quantization_range < 2:
            raise keyed_error("secure", f"secure.clipping_range must be > 0 and secure.quantization_range >= 2, got "
                                        f"{secure.clipping_range} and {secure.quantization_range}")

    @property
    def sampled(self) -> int:
        """Clients sampled per training round."""
        return max(1, int(self.clients * self.fraction))

    def train_config(self, adapter: dict[str, Any] | None = None, task: int = 0) -> TrainConfig:
        """The TrainConfig of one client's local training in one round of task `task` (no periodic
        evaluation, no checkpoints: a round is short and the server keeps the state)."""
        adapter = dict(adapter or self.adapter)
        if adapter.get("scaling") == "sfed" and adapter.get("num_clients") is None:
            adapter["num_clients"] = self.sampled  # SFed-LoRA's N: the clients each round averages
        try:
            return TrainConfig.from_dict(dict(self.train), model=self.model, task=self.task,
                                         data=self.datasets[task],
                                         adapter=adapter, seed=self.seed,
                                         max_steps=self.local_steps, eval_every=None, checkpoint_every=None,
                                         output_dir=str(Path(self.output_dir) / "clients"))
        except ConfigError as err:
            raise keyed_error("train", str(err)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> FederatedConfig:
        """Read a federated run file; keyword overrides (the CLI's flags; None: not given) win."""
        path = Path(path)
        data = read_yaml_mapping(path, "federated run file", "federated keys (data, clients, rounds, ...)")
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}}, where=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> FederatedConfig:
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, known)}")
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config as `from_dict` reads it back (a task as the keys a federated task takes)."""
        data = dataclasses.asdict(self)
        if self.tasks is not None:
            data["tasks"] = [{key: getattr(spec, key) for key in TASK_KEYS if getattr(spec, key) is not None}
                             for spec in self.tasks]
        return data


# The TaskSpec keys a federated task takes (its budget is the run's: rounds, local_steps).
TASK_KEYS = ("name", "data", "labels", "head")


def _given(spec: TaskSpec) -> dict[str, Any]:
    """A TaskSpec's keys that differ from their defaults (name and data always): what it asks for."""
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(TaskSpec)
            if f.name in ("name", "data") or getattr(spec, f.name) != f.default}


def _task(value: Any, index: int) -> TaskSpec:
    return task_spec(value, index, TASK_KEYS, "a continual sequence's per-task budget or form; a federated task "
                                              "takes name, data, labels and head (its budget: rounds, local_steps)")


def _section(cls: type, value: Any, key: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise keyed_error(key, f"{key} must be a mapping ({', '.join(f.name for f in dataclasses.fields(cls))}), "
                          f"got {show(value)}")
    known = [f.name for f in dataclasses.fields(cls)]
    for name in value:
        if name not in known:
            raise keyed_error(key, f"{key}: unknown key {name!r}{did_you_mean(name, known)}")
    numeric = {f.name for f in dataclasses.fields(cls) if "float" in str(f.type)}
    value = {name: yaml_number(v) if name in numeric else v for name, v in value.items()}
    check_fields(cls, value, f"{key}.")
    return cls(**value)

