"""The Flower ServerApp: rounds of broadcast, local training, upload and aggregation of adapter
tensors, with splice's aggregation rules, every message sized, and the global adapter evaluated
and saved.

Two paths, one result: the Message API strategy (`AdapterStrategy`, a Flower `FedAvg` whose
aggregation is `fedavg` or `exact`, optionally wrapped in Flower's differential-privacy
strategies), and, for SecAgg+, Flower's legacy workflow (`SecAggPlusWorkflow`), the only one
that speaks that protocol in Flower 1.42; there the server sees only the clients' sum, so the
rule is FedAvg of every tensor.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

import splice
from splice.core.errors import SpliceError
from splice.core.progress import use as progress_to
from splice.federated import aggregation, payload
from splice.federated.client import GLOBAL, OVERWRITE_KEY, config_from_context, held_parameters
from splice.federated.config import FederatedConfig
from splice.federated.history import History
from splice.federated.methods import make_method
from splice.federated.report import write_report
from splice.federated.sequence import TaskSequence
from splice.federated.shards import eval_rows, make_shards
from splice.io.files import write_tensors
from splice.train.adapters import adapter_parameters
from splice.train.evaluation import evaluate
from splice.train.run_setup import load_run


class ServerRun:
    """The server's side of a run: the model with the global adapter (its initial tensors are the
    first broadcast), the global evaluation rows, the history, and the final save."""

    def __init__(self, config: FederatedConfig, on_round: Callable[[int, History], None] | None = None) -> None:
        self.config = config
        self.method = make_method(config)
        self.train_config = config.train_config()
        setup = load_run(self.train_config, GLOBAL, head=config.tasks is None)
        self.model, self.tokenizer = setup.model, setup.tokenizer
        self.sequence = TaskSequence(config, self.model) if config.tasks is not None else None
        self.held = held_parameters(self.model, self.sequence, self.method.attach_held(self.model))
        self.initial = {n: p.detach().to("cpu", copy=True) for n, p in self.held.items()}
        self.adapter_names = set(adapter_parameters(self.model, GLOBAL))  # the global adapter's own tensors
        if self.sequence is None:
            self.rows = [eval_rows(setup.splits, config.eval_examples)]
            self.partition = make_shards(config, setup.splits).description
        else:
            self.rows = [eval_rows(task.splits, config.eval_examples) for task in self.sequence.tasks]
            self.partition = {"tasks": {task.name: task.shards.description for task in self.sequence.tasks}}
        self.task = 0
        self.history = History()
        self.on_round = on_round
        self.started = time.perf_counter()
        self.final: dict[str, torch.Tensor] | None = None

    def select_task(self, index: int) -> None:
        """Evaluate (and aggregate) task `index` of a sequence from now on."""
        self.task = index
        if self.sequence is not None:
            self.method.task_selected(self.model, index)
            self.sequence.select(index)

    def trained_names(self) -> list[str]:
        """What the clients train in the current task, of the held tensors (all, without a sequence)."""
        if self.sequence is None:
            return sorted(self.initial)
        return self.sequence.trained_names(self.task, self.adapter_names)

    def metrics_on(self, task: int) -> dict[str, float]:
        """The loaded model's metrics on task `task`'s global evaluation rows (with its head)."""
        if self.sequence is not None:
            self.sequence.select(task)
        try:
            return {key: float(value) for key, value in evaluate(self.model, self.tokenizer, self.rows[task],
                                                                 self.train_config).items()}
        finally:
            if self.sequence is not None:
                self.sequence.select(self.task)

    def evaluate(self, server_round: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """The global adapter's metrics on the current task's global evaluation rows, recorded for
        the round (counted over a sequence's tasks)."""
        self.load(state)
        metrics = self.metrics_on(self.task)
        record = self.history.round(server_round)
        record.global_metrics = metrics
        if self.sequence is not None:
            record.task = self.sequence[self.task].name
        now = time.perf_counter()
        record.seconds, self.started = now - self.started, now
        self.final = state
        if self.on_round is not None:
            self.on_round(server_round, self.history)
        return metrics

    def evaluate_seen(self, state: dict[str, torch.Tensor]) -> None:
        """After a task of a sequence: every task so far on its own rows (the accuracy matrix's row)."""
        self.load(state)
        metric = "accuracy"
        self.history.matrix.append([self.metrics_on(j)[metric] if j <= self.task else None
                                    for j in range(len(self.rows))])

    def load(self, state: dict[str, torch.Tensor]) -> None:
        payload.check_state(state, self.initial)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)

    def record_client(self, server_round: int, metrics: dict[str, Any], kind: str, node_id: int | None) -> None:
        """One client's reported metrics (`kind`: train or evaluate)."""
        client = int(metrics["client"])
        if node_id is not None:
            self.history.node_clients[node_id] = client
        shown = {k: float(v) for k, v in metrics.items() if k != "client"}
        getattr(self.history.round(server_round), kind)[str(client)] = shown

    def record_failures(self, server_round: int, replies: list[Message]) -> None:
        """Keep the error of every failed client in the round's record (Flower only logs it)."""
        for message in replies:
            if message.has_error():
                who = self.history.client_of(message.metadata.src_node_id)
                self.history.round(server_round).failures[who] = message.error.reason

    def finite_uploads(self, server_round: int, replies: list[Message],
                       decode: Callable[[Message], dict[str, torch.Tensor]]) -> list[tuple[Message,
                                                                                      dict[str, torch.Tensor]]]:
        """The uploads `decode` reads, without a non-finite value; the others (an unreadable
        payload: a quantised one with a non-finite scale, say) are left out of the round and
        recorded (a diverged client must not poison the global adapter). None left: an error."""
        kept = []
        failures = self.history.round(server_round).failures
        for message in replies:
            client = str(message.content[payload.METRICS]["client"])
            try:
                state = decode(message)
            except SpliceError as err:
                failures[client] = f"its upload could not be read ({err}); left out of the round"
                continue
            bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
            if bad:
                failures[client] = (f"non-finite values in its upload ({', '.join(bad[:3])}"
                                    f"{', ...' if len(bad) > 3 else ''}); left out of the round")
            else:
                kept.append((message, state))
        if replies and not kept:
            raise SpliceError(f"round {server_round}: no upload could be used (clients {sorted(failures)}: "
                              f"{'; '.join(f'{c}: {why}' for c, why in sorted(failures.items())[:3])}); the global "
                              "adapter is kept as it was. Lower the learning rate or set train.max_grad_norm")
        return kept

    def save(self) -> Path:
        """The final global adapter (HF PEFT's format for LoRA-shaped adapters) in the run folder;
        a sequence's per-task heads beside it (`task-heads.safetensors`), and what the method
        holds besides (PRISM's frozen blocks)."""
        if self.final is not None:
            self.load(self.final)
        folder = Path(self.config.output_dir)
        path = folder / "global-adapter"
        splice.save(self.model, path, GLOBAL, overwrite=True)
        if self.sequence is not None:
            heads = {name: p.detach().cpu().contiguous() for name, p in self.sequence.head_parameters().items()}
            write_tensors(folder / "task-heads.safetensors", heads,
                          {"tasks": ",".join(task.name for task in self.sequence.tasks)})
        self.method.save_held(self.model, folder)
        return path


class CountingGrid(Grid):
    """A Grid that sizes every message it carries (`payload.message_bytes`) into the history:
    downlink by destination, uplink by source, under the round under way."""

    def __init__(self, grid: Grid, history: History, current_round: Callable[[], int]) -> None:
        self.inner, self.history, self.current_round = grid, history, current_round

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._count(messages, "downlink", lambda m: m.metadata.dst_node_id)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._count(replies, "uplink", lambda m: m.metadata.src_node_id)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self._count(messages, "downlink", lambda m: m.metadata.dst_node_id)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self._count(replies, "uplink", lambda m: m.metadata.src_node_id)
        return replies

    def _count(self, messages: list[Message], direction: str, node: Callable[[Message], int]) -> None:
        record = self.history.round(self.current_round())
        for message in messages:
            if direction == "uplink" and (client := reported_client(message)) is not None:
                self.history.node_clients[message.metadata.src_node_id] = client
            record.count(message.metadata.message_type, direction, self.history.client_of(node(message)),
                         payload.message_bytes(message))


def reported_client(message: Message) -> int | None:
    """The partition id a reply reports in its metrics (either layout), if any: how a node's bytes
    are put under its client even where the strategy sees no node ids (the SecAgg+ workflow)."""
    if message.has_error():
        return None
    records = [*message.content.metric_records.values(), *message.content.config_records.values()]
    found = next((r["client"] for r in records if "client" in r), None)
    return int(found) if isinstance(found, (int, float)) else None


class AdapterStrategy(FedAvg):
    """Flower's FedAvg over adapter tensors, with splice's aggregation rule (`fedavg` or `exact`)
    and every client's numbers recorded. The separate rule's error against the exact mean of
    B A (`aggregation.separation_error`) is recorded each round whichever rule runs.

    In a task sequence Flower's rounds restart at 1 for every task: `offset` (the rounds of the
    tasks before) makes them the run's rounds in the history and the clients' seeds. Only what the
    current task trains is aggregated; every other held tensor is kept as broadcast, bit for bit."""

    def __init__(self, server: ServerRun) -> None:
        config = server.config
        super().__init__(fraction_train=config.fraction, fraction_evaluate=1.0, min_train_nodes=config.sampled,
                         min_evaluate_nodes=config.clients, min_available_nodes=config.clients)
        self.server, self.rule = server, config.aggregation
        self.round, self.offset, self.broadcast = 0, 0, server.initial
        self.holding: dict[int, int] = {}  # node -> the task whose extras it holds (sent once per task)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Grid) -> Iterable[Message]:
        self.round = self.offset + server_round
        self.broadcast = payload.checked(payload.split_extras(arrays.to_torch_state_dict())[0], self.server.initial)
        with round_sampling(self.server.config.seed, self.round):
            messages = list(super().configure_train(server_round, arrays, config, grid))
        return [self.trimmed(message) for message in messages]

    def trimmed(self, message: Message) -> Message:
        """What does not change within a task (a method's extras, PRISM's bases; the held tensors
        the task does not train: frozen blocks, other tasks' heads) goes to each node once per
        task: that first message asks the node to keep it (`keep-for-task`), later ones leave it
        out and say so (`held-for-task`)."""
        task, node = self.server.task, message.metadata.dst_node_id
        state, extras = payload.split_extras(message.content[payload.ARRAYS].to_torch_state_dict())
        constant = sorted(set(state) - set(self.server.trained_names()))
        if not constant and not extras:
            return message
        if self.holding.get(node) == task:
            state = {name: tensor for name, tensor in state.items() if name not in constant}
            flag = {payload.HELD: task}
        else:
            self.holding[node] = task
            state = payload.with_extras(state, extras)
            flag = {payload.KEEP: task}
        settings = ConfigRecord({**dict(message.content[payload.CONFIG]), **flag})
        return Message(RecordDict({payload.ARRAYS: payload.to_record(state), payload.CONFIG: settings}),
                       message_type=message.metadata.message_type, dst_node_id=node)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: Any,
                           grid: Grid) -> Iterable[Message]:
        return [self.trimmed(message) for message in super().configure_evaluate(server_round, arrays, config, grid)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                       MetricRecord | None]:
        server_round = self.offset + server_round
        replies = list(replies)
        self.server.record_failures(server_round, replies)
        self.forget_failed(replies)
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        # in client order, not arrival order: a float sum depends on its order, and a run must not
        valid.sort(key=lambda m: int(m.content[payload.METRICS]["client"]))
        check_one_node_per_client(valid)
        for message in valid:
            self.server.record_client(server_round, dict(message.content[payload.METRICS]), "train",
                                      message.metadata.src_node_id)
        method = self.server.method
        trained = {name: self.broadcast[name] for name in self.server.trained_names()}
        uploads = self.server.finite_uploads(server_round, valid,
                                             lambda m: method.decode(m.content[payload.ARRAYS], trained))
        if not uploads:
            return None, None
        messages, states = zip(*uploads, strict=True)
        weights = ([1.0] * len(states) if self.server.config.privacy is not None  # DP's noise bounds a plain mean
                   else method.weights([dict(m.content[payload.METRICS]) for m in messages]))
        record = self.server.history.round(server_round)
        separation = aggregation.separation_error(states, weights)
        if separation:
            record.aggregation["separation_error_mean"] = float(np.mean(list(separation.values())))
            record.aggregation["separation_error_max"] = float(max(separation.values()))
        if self.rule == "exact":
            state, errors = aggregation.exact(states, weights)
            if errors:
                record.aggregation["refactor_error_max"] = float(max(errors.values()))
        else:
            state = aggregation.fedavg(states, weights)
        state = {**self.broadcast, **state}
        record.aggregation.update(method.aggregated(self.server, state))
        metrics = self.train_metrics_aggr_fn([m.content for m in messages], self.weighted_by_key)
        return payload.to_record(payload.with_extras(state, method.extras())), metrics

    def forget_failed(self, replies: list[Message]) -> None:
        """A node whose reply failed may not have kept what it was sent: send it all again."""
        for message in replies:
            if message.has_error():
                self.holding.pop(message.metadata.src_node_id, None)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.forget_failed(replies)
        self.server.record_failures(self.offset + server_round, replies)
        for message in replies:
            if not message.has_error():
                self.server.record_client(self.offset + server_round, dict(message.content[payload.METRICS]),
                                          "evaluate", message.metadata.src_node_id)
        return super().aggregate_evaluate(server_round, [m for m in replies if not m.has_error()
                                                         and m.content[payload.METRICS]["num-examples"] > 0])


def check_one_node_per_client(replies: list[Message]) -> None:
    """Refuse two nodes that train one client's shard (SuperNodes started with the same partition-id)."""
    seen: dict[int, int] = {}
    for message in replies:
        client, node = int(message.content[payload.METRICS]["client"]), message.metadata.src_node_id
        if client in seen and seen[client] != node:
            raise SpliceError(f"nodes {seen[client]} and {node} both train client {client}'s shard: every SuperNode "
                              "needs its own partition-id (its --node-config)")
        seen[client] = node


def server_app(config: FederatedConfig | None = None,
               on_round: Callable[[int, History], None] | None = None,
               done: Callable[[ServerRun], None] | None = None) -> ServerApp:
    """A ServerApp for `config` (None: the config the run carries, deployment engine). `on_round`
    is called after each round's global evaluation (a progress display); `done` with the
    finished `ServerRun` (the runner writes the report there)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = config if config is not None else config_from_context(context)
        if config is None:  # deployment: the folder is on the SuperLink's machine, unchecked by the submitter
            check_no_earlier_run(run_config, bool(context.run_config.get(OVERWRITE_KEY, False)))
        server = ServerRun(run_config, on_round)
        if run_config.secure is not None:
            _run_secure(grid, context, server)
        else:
            _run_rounds(grid, server)
        server.save()
        write_report(run_config, server.history, server.partition)
        if done is not None:
            done(server)

    return app


# What a finished run leaves in its folder (`ServerRun.save`, `write_report`).
RUN_OUTPUTS = ("report", "global-adapter")


def check_no_earlier_run(config: FederatedConfig, overwrite: bool) -> None:
    """Refuse, before any round, a run whose folder holds an earlier run's results unless the
    submitter passed --force: where the SuperLink runs on another machine, the submitter could
    check only its own copy of the folder."""
    folder = Path(config.output_dir)
    earlier = [name for name in RUN_OUTPUTS if (folder / name).exists()]
    if earlier and not overwrite:
        raise SpliceError(f"{folder} on the SuperLink's machine holds an earlier run ({', '.join(earlier)}); "
                          "submit with --force to replace it, or choose another output_dir")


def _run_rounds(grid: Grid, server: ServerRun) -> None:
    """Every task's rounds (one task without a sequence) through the strategy, the DP wrapper
    around it where asked; between a sequence's tasks, every seen task evaluated and the method's
    end-of-task step (PRISM's query round)."""
    config, method = server.config, server.method
    adapter_strategy = AdapterStrategy(server)
    strategy: Strategy = adapter_strategy
    if config.privacy is not None:
        wrapper = (DifferentialPrivacyServerSideFixedClipping if config.privacy.side == "server"
                   else DifferentialPrivacyClientSideFixedClipping)
        strategy = wrapper(adapter_strategy, noise_multiplier=config.privacy.noise_multiplier,
                           clipping_norm=config.privacy.clipping_norm, num_sampled_clients=config.sampled)
    counting = CountingGrid(grid, server.history, lambda: adapter_strategy.round)
    state = server.initial
    tasks = 1 if server.sequence is None else len(server.sequence)
    for index in range(tasks):
        offset = index * config.rounds
        adapter_strategy.offset = adapter_strategy.round = offset
        server.select_task(index)
        state = method.begin_task(server, index, state)

        def evaluate_fn(server_round: int, arrays: ArrayRecord, offset: int = offset) -> MetricRecord | None:
            if server_round == 0 and offset > 0:  # the previous task's last round evaluated this state
                return None
            model_state = payload.split_extras(arrays.to_torch_state_dict())[0]
            return MetricRecord(server.evaluate(offset + server_round, model_state))

        settings = ConfigRecord({"task": index, "round-offset": offset})
        with progress_to(None, quiet=True):  # clients' and evaluations' bars stay out of the round display
            initial = payload.to_record(payload.with_extras(state, method.extras()))
            strategy.start(grid=counting, initial_arrays=initial, num_rounds=config.rounds, train_config=settings,
                           evaluate_config=ConfigRecord(dict(settings)), evaluate_fn=evaluate_fn)
        state = server.final if server.final is not None else state
        if server.sequence is not None:
            with progress_to(None, quiet=True):
                server.evaluate_seen(state)
                method.end_task(server, counting, index, state)


@contextmanager
def round_sampling(seed: int, server_round: int) -> Iterator[None]:
    """Flower samples a round's clients with Python's global RNG, which anything else may draw
    from: within the block it is seeded from the run's seed and the round (and restored after)."""
    state = random.getstate()
    random.seed(f"{seed}-{server_round}")
    try:
        yield
    finally:
        random.setstate(state)


def _run_secure(grid: Grid, context: Context, server: ServerRun) -> None:
    """SecAgg+ through Flower's legacy workflow: FedAvg of the masked sum, the same records."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    config, secure = server.config, server.config.secure
    current = {"round": 0}

    def fit_config(server_round: int) -> dict[str, Any]:
        current["round"] = server_round
        return {"server-round": server_round}

    def record(kind: str) -> Callable[[list[tuple[int, dict]]], dict]:
        def aggregate(results: list[tuple[int, dict]]) -> dict:
            for _, metrics in results:
                server.record_client(current["round"], metrics, kind, None)
            return {}
        return aggregate

    def evaluate_fn(server_round: int, arrays: list[np.ndarray], _: dict) -> tuple[float, dict]:
        metrics = server.evaluate(server_round, payload.from_list(arrays, server.initial))
        return metrics.get("loss", 0.0), metrics

    class SeededFedAvg(LegacyFedAvg):
        """Flower's legacy FedAvg, its round's sample drawn as `AdapterStrategy`'s is."""

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
            with round_sampling(config.seed, server_round):
                return super().configure_fit(server_round, parameters, client_manager)

    strategy = SeededFedAvg(fraction_fit=config.fraction, fraction_evaluate=1.0, min_fit_clients=config.sampled,
                            min_evaluate_clients=config.clients, min_available_clients=config.clients,
                            evaluate_fn=evaluate_fn, on_fit_config_fn=fit_config,
                            on_evaluate_config_fn=fit_config,
                            initial_parameters=payload.legacy_parameters(server.initial),
                            fit_metrics_aggregation_fn=record("train"),
                            evaluate_metrics_aggregation_fn=record("evaluate"))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=config.rounds), strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=secure.num_shares, reconstruction_threshold=secure.reconstruction_threshold,
        clipping_range=secure.clipping_range, quantization_range=secure.quantization_range))
    with progress_to(None, quiet=True):
        workflow(CountingGrid(grid, server.history, lambda: current["round"]), legacy)
