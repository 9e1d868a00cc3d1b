"""The Flower ClientApp: a client trains the global adapter on its own shard with splice's
`Trainer` and sends back only the adapter's tensors (and the trained head's).

One process may serve many clients (Flower's simulation engine runs them in a few workers), so
the model is loaded once per process (`LocalRun`) and each call loads the tensors it is given.
What a client keeps between rounds (Med-DualLoRA's local adapter) lives in the node's
`context.state`, which Flower keeps per client. Every call answers the server's layout: the
Message API's named arrays, or the legacy list layout of a SecAgg+ server.

    app = client_app(config)          # for flwr.simulation.run_simulation
    splice.federated.apps:client      # for the deployment engine (config from the run config)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import Code, EvaluateRes, FitRes, Status
from flwr.compat.common import recorddict_compat as legacy
from rich.console import Console

from splice.assets import DatasetSplits
from splice.core import progress
from splice.core.errors import SpliceError
from splice.federated import payload
from splice.federated.config import FederatedConfig
from splice.federated.methods import make_method
from splice.federated.sequence import TaskSequence
from splice.federated.shards import Shards, make_shards
from splice.train import Trainer
from splice.train.adapters import adapter_parameters
from splice.train.config import TrainConfig
from splice.train.evaluation import evaluate
from splice.train.run_setup import load_run

GLOBAL = "global"
PRIVATE_STATE = "splice.private"  # the key of what a client keeps to itself in its context.state
KEPT_STATE = "splice.kept"  # what a node keeps of the task under way (constant tensors, extras)
KEPT_TASK = "splice.kept-task"  # and the task it is of (one key per record: Flower's RecordDict)
CONFIG_KEY = "splice-config"  # the run-config key that carries the config (deployment engine)
OVERWRITE_KEY = "splice-overwrite"  # the run-config key that lets a deployment run replace an earlier one


class LocalRun:
    """One process's model for a federated config: the global adapter attached (and what the
    method adds), the data and every client's shard; reused by every client it serves."""

    GLOBAL = GLOBAL

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        self.method = make_method(config)
        self.train_config = config.train_config()
        setup = load_run(self.train_config, GLOBAL, head=config.tasks is None)
        self.model, self.tokenizer, self.splits = setup.model, setup.tokenizer, setup.splits
        self.sequence = TaskSequence(config, self.model) if config.tasks is not None else None
        self.task = 0
        self.shards: Shards = make_shards(config, self.splits) if self.sequence is None else self.sequence[0].shards
        more = self.method.attach_held(self.model)
        self.method.prepare(self)
        self.held = held_parameters(self.model, self.sequence, more)
        self.global_state = self.held_state()

    def held_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of everything the server holds and broadcasts (`held_parameters`)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.held.items()}

    def select_task(self, index: int) -> str | None:
        """Work on task `index` of a sequence (its head, its shards); the head's module path."""
        if self.sequence is None:
            return None
        if index != self.task:
            self.method.task_selected(self.model, index)
        self.task, self.shards = index, self.sequence[index].shards
        return self.sequence.select(index)

    def state_of(self, adapter: str) -> dict[str, torch.Tensor]:
        """A CPU copy of what training adapter `adapter` updates (its tensors and its heads')."""
        return {n: p.detach().to("cpu", copy=True) for n, p in adapter_parameters(self.model, adapter).items()}

    def copy_in(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put the given tensors into the model's parameters of the same names."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)

    def train(self, client: int, server_round: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """`config.local_steps` steps on client `client`'s shard (of the selected task) from the
        loaded state; the tensors it trained and the round's metrics. The data order and every
        random draw are seeded by the run's seed, the round (counted over a sequence's tasks) and
        the client (`client_seed`), so a round gives the same result whichever worker process
        serves the client."""
        config = self.config
        seed = client_seed(config.seed, server_round, client)
        output = Path(config.output_dir) / "clients" / f"client-{client}"
        train_config = dataclasses.replace(self.train_config, seed=seed, output_dir=str(output))
        set_seed(seed)  # dropout's draws too: a worker's earlier clients must not change this one's
        splits = self.splits if self.sequence is None else self.sequence[self.task].splits
        heads = [] if self.sequence is None else [self.sequence.head_of(self.task)]
        if self.sequence is not None:
            self.sequence.set_training(self.task, True)
        try:
            state, metrics = self._run_trainer(client, server_round, train_config, splits, heads)
        finally:
            if self.sequence is not None:
                self.sequence.set_training(self.task, False)
        return state, metrics

    def _run_trainer(self, client: int, server_round: int, train_config: TrainConfig, splits: DatasetSplits,
                     heads: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        trainer = Trainer(self.model, self.tokenizer, train_config, adapter_name=GLOBAL,
                          splits=self.shards.client(client, splits), console=Console(quiet=True), heads=heads,
                          companions=self.method.companions(), objective=self.method.objective(self, server_round),
                          callbacks=self.method.callbacks(self))
        losses = []
        while not trainer.done:
            entry = trainer.step()
            if entry is None:
                break
            if entry["loss"] is not None:  # None: a step skipped for non-finite numbers (on_nonfinite: skip)
                losses.append(entry["loss"])
        if trainer.stop is not None:
            raise SpliceError(f"client {client}, round {server_round}: {trainer.stop[1]}")
        if not losses:
            raise SpliceError(f"client {client}, round {server_round}: every step was skipped for non-finite "
                              "numbers; nothing trained")
        metrics = {"train_loss": sum(losses) / len(losses), "client": client,
                   "num-examples": len(self.shards.train[client]), **self.method.train_metrics(self, client)}
        return self.state_of(GLOBAL), metrics

    def evaluate(self, client: int) -> dict[str, float]:
        """Accuracy (classification) or loss and exact match (causal LM) on the client's test
        rows with its model, and what the method adds (Med-DualLoRA: the global adapter alone)."""
        rows = self.shards.test[client]
        if not rows:
            return {"num-examples": 0, "client": client}
        metrics = {key: float(value) for key, value in evaluate(self.model, self.tokenizer, rows,
                                                                 self.train_config).items()}
        return {**metrics, **self.method.evaluate_metrics(self, client), "num-examples": len(rows), "client": client}


def held_parameters(model: torch.nn.Module, sequence: TaskSequence | None,
                    more: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """What the server holds and broadcasts, by name: the global adapter's tensors (and the head it
    trains), a sequence's per-task heads, and what the method adds (PRISM's frozen blocks)."""
    heads = {} if sequence is None else sequence.head_parameters()
    return {**adapter_parameters(model, GLOBAL), **heads, **more}


_RUNS: dict[str, LocalRun] = {}


def local_run(config: FederatedConfig) -> LocalRun:
    """The process's `LocalRun` for `config` (built on first use)."""
    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if key not in _RUNS:
        _RUNS.clear()  # one run per process at a time: a new config frees the old model
        _RUNS[key] = LocalRun(config)
    return _RUNS[key]


def client_app(config: FederatedConfig | None = None) -> ClientApp:
    """A ClientApp for `config`, or (None) for the config each run carries in its run config
    under `splice-config` (the deployment engine's way). SecAgg+ and client-side clipping are
    applied as the config asks (Flower's `secaggplus_mod`, `fixedclipping_mod`)."""
    def config_of(context: Context) -> FederatedConfig:
        return config if config is not None else config_from_context(context)

    app = ClientApp(mods=[_privacy_mods(config_of)])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        with progress.use(quiet=True):  # a client's bars would interleave in the server's output
            return _train(message, context, local_run(config_of(context)))

    @app.evaluate()
    def evaluate_(message: Message, context: Context) -> Message:
        with progress.use(quiet=True):
            return _evaluate(message, context, local_run(config_of(context)))

    @app.query()
    def query(message: Message, context: Context) -> Message:
        with progress.use(quiet=True):
            return _query(message, context, local_run(config_of(context)))

    return app


def client_of(context: Context, run: LocalRun) -> int:
    """The node's client (its shard): `partition-id` in its node config, one of 0..clients-1."""
    value = context.node_config.get("partition-id")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < run.config.clients:
        raise SpliceError(f"this SuperNode's node config has partition-id {value!r}; it must be one of "
                          f"0..{run.config.clients - 1} (start it with --node-config 'partition-id=I "
                          f"num-partitions={run.config.clients}')")
    return value


def _train(message: Message, context: Context, run: LocalRun) -> Message:
    """Load the broadcast tensors (and what this client keeps), train, reply with the upload."""
    client = client_of(context, run)
    old_layout = payload.is_legacy(message)
    received, settings = _received(message, context, run)
    state, metrics = run.train(client, int(settings.get("round-offset", 0)) + int(settings.get("server-round", 1)))
    _keep_private(run, context)
    if old_layout:
        fitres = FitRes(Status(Code.OK, "ok"), payload.legacy_parameters(state), metrics["num-examples"], metrics)
        return Message(legacy.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)
    content = RecordDict({payload.ARRAYS: run.method.upload(run, state, received),
                          payload.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=message)


def _evaluate(message: Message, context: Context, run: LocalRun) -> Message:
    """Load the broadcast tensors (and what this client keeps), evaluate on the client's rows; in
    the last round (every client evaluates, sampled for training or not) save what is its own."""
    client = client_of(context, run)
    old_layout = payload.is_legacy(message)
    _, settings = _received(message, context, run)
    metrics = run.evaluate(client)
    last_task = run.sequence is None or run.task == len(run.sequence) - 1
    if int(settings.get("server-round", 0)) == run.config.rounds and last_task:
        run.method.last_round(run, client)
    if old_layout:
        res = EvaluateRes(Status(Code.OK, "ok"), float(metrics.get("loss", 0.0)), int(metrics["num-examples"]), metrics)
        return Message(legacy.evaluateres_to_recorddict(res), reply_to=message)
    return Message(RecordDict({payload.METRICS: MetricRecord(metrics)}), reply_to=message)


def _query(message: Message, context: Context, run: LocalRun) -> Message:
    """Load the broadcast tensors and answer the method's question about this client's rows of
    the selected task (PRISM: sketches of its experts' inputs, between tasks)."""
    client = client_of(context, run)
    _received(message, context, run)
    answer = run.method.answer_query(run, client)
    _keep_private(run, context)
    return Message(RecordDict({payload.ARRAYS: answer, payload.METRICS: MetricRecord({"client": client})}),
                   reply_to=message)


def client_seed(seed: int, server_round: int, client: int) -> int:
    """The seed of a client's round: the run's seed for client 0's first round (one client for
    one round is then plain training with that seed), else numpy's SeedSequence of (run seed,
    round, client), so that no two (round, client) pairs share one, within a run or across runs
    with other seeds (a sum such as seed + round x clients + client would give run seed 1's
    client 0 the seed of run seed 0's client 1)."""
    if (server_round, client) == (1, 0):
        return seed
    return int(np.random.SeedSequence([seed, server_round, client]).generate_state(1)[0])


def config_from_context(context: Context) -> FederatedConfig:
    """The config a deployment run carries in its run config (`splice-config`, the YAML's
    mapping as JSON)."""
    text = context.run_config.get(CONFIG_KEY)
    if not isinstance(text, str):
        raise SpliceError(f"this Flower run has no {CONFIG_KEY!r} in its run config; start it with "
                          "`splice federate CONFIG.yaml --superlink ADDRESS`")
    return FederatedConfig.from_dict(json.loads(text), where=f"run config {CONFIG_KEY!r}")


def _privacy_mods(config_of: Callable[[Context], FederatedConfig]):
    """One mod that applies Flower's SecAgg+ or client-side clipping mod when the config asks."""
    def mod(message: Message, context: Context, call_next):
        config = config_of(context)
        if config.secure is not None:
            return secaggplus_mod(message, context, call_next)
        if config.privacy is not None and config.privacy.side == "client":
            return fixedclipping_mod(message, context, call_next)
        return call_next(message, context)
    return mod


def _received(message: Message, context: Context, run: LocalRun) -> tuple[dict[str, torch.Tensor], dict]:
    """The broadcast tensors and settings of a train or evaluate message (either layout), loaded
    into the process's model with this client's own kept state."""
    if payload.is_legacy(message):
        unpack = payload.legacy_fit if message.metadata.message_type == "train" else payload.legacy_evaluate
        arrays, settings = unpack(message)
        received = payload.from_list(arrays, run.global_state)
    else:
        settings = dict(message.content[payload.CONFIG])
        state, extras = _with_kept(message.content[payload.ARRAYS].to_torch_state_dict(), settings, context)
        received = payload.checked(state, run.global_state)
        run.method.receive(run, extras)
    run.select_task(int(settings.get("task", 0)))
    _load(run, received, context)
    return received, settings


def _with_kept(arrays: dict[str, torch.Tensor], settings: dict,
               context: Context) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's tensors and the method's extras of a message: kept in the node's state where
    the server asks (`keep-for-task`), completed from what the node kept where it left the
    constant part out (`held-for-task`)."""
    if payload.KEEP in settings:
        context.state.array_records[KEPT_STATE] = payload.to_record(arrays)
        context.state.config_records[KEPT_TASK] = ConfigRecord({"task": int(settings[payload.KEEP])})
    elif payload.HELD in settings:
        kept = context.state.config_records.get(KEPT_TASK)
        if kept is None or int(kept["task"]) != int(settings[payload.HELD]):
            raise SpliceError(f"the server sent this node task {settings[payload.HELD]}'s constant tensors before, but "
                              "its state does not hold them (was the SuperNode restarted?); start the run again")
        arrays = {**context.state.array_records[KEPT_STATE].to_torch_state_dict(), **arrays}
    return payload.split_extras(arrays)


def _keep_private(run: LocalRun, context: Context) -> None:
    """What the method keeps at this client, into the node's state."""
    private = run.method.private_state(run)
    if private:
        context.state.array_records[PRIVATE_STATE] = payload.to_record(private)


def _load(run: LocalRun, received: dict[str, torch.Tensor], context: Context) -> None:
    """The broadcast global tensors and this client's own kept state into the process's model."""
    run.copy_in(received)
    record: ArrayRecord | None = context.state.array_records.get(PRIVATE_STATE)
    run.method.restore_private(run, None if record is None else record.to_torch_state_dict())


