"""Review of `splice.federated` (aggregation rules, Med-DualLoRA, SFed-LoRA, FED-FSTQ, the
server's strategy, byte accounting, seeds, config validation) and `splice federate`, against
volume 1 §6/§11, volume 2 §7/§8 and what a Hugging Face PEFT / Flower user expects.

The first group pins bugs found in the review: each test fails on the code as reviewed and passes
once the bug is fixed (the docstring says what is wrong and what is expected). The last group pins
correct behaviour that tests/federated/ does not cover in-process. Nothing here starts Flower's
simulation engine (no Ray): the strategy, the client functions and the grid are driven directly
on hand-made messages, with a 2-layer, 32-wide random BERT and a word-list data set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import flwr.server.workflow
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.server.client_proxy import ClientProxy
from helpers import assert_close, assert_differs, make_bert, save_tiny_bert
from rich.console import Console
from torch import nn

import splice
import splice.federated.run as run_module
from splice.core.errors import ConfigError, SpliceError
from splice.core.host import hosts
from splice.federated import FederatedConfig, aggregation, payload, run_federated
from splice.federated.client import PRIVATE_STATE, LocalRun, _train
from splice.federated.history import History
from splice.federated.methods import make_method
from splice.federated.methods.fstq import PAYLOAD
from splice.federated.server import AdapterStrategy, CountingGrid, ServerRun, _run_secure
from splice.train.adapters import adapter_parameters

QUIET = Console(quiet=True)
WORDS = {"positive": ["good", "great", "fine", "lovely"], "negative": ["bad", "awful", "poor", "dull"]}
TRAIN = {"batch_size": 8, "max_length": 16, "lr": 5e-3, "group_by_length": False}


# -- fixtures and small builders ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("review-federated-bert"), dropout=0.0)


@pytest.fixture(scope="module")
def word_file(tmp_path_factory) -> Path:
    """120 three-word rows labelled by their word list (96 training rows once split)."""
    rng = random.Random(0)
    rows = []
    for _ in range(120):
        label = rng.choice(sorted(WORDS))
        rows.append({"text": " ".join(rng.choice(WORDS[label]) for _ in range(3)), "label": label})
    path = tmp_path_factory.mktemp("review-federated-data") / "words.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def make(bert_folder, word_file, tmp_path):
    """A FederatedConfig on the tiny task; keywords override, `name` picks the run folder."""
    def build(name: str = "run", **overrides) -> FederatedConfig:
        settings = dict(model=str(bert_folder), data=str(word_file), clients=2, rounds=1, local_steps=2,
                        adapter={"method": "lora", "r": 4, "alpha": 8}, eval_examples=8, train=dict(TRAIN),
                        partition={"scheme": "iid"}, output_dir=str(tmp_path / name))
        settings.update(overrides)
        return FederatedConfig(**settings)
    return build


def reply(src_node: int, content: RecordDict) -> Message:
    """A client's reply to a train instruction, as the Grid hands it to the strategy."""
    metadata = Metadata(run_id=1, message_id=f"reply-{src_node}", src_node_id=src_node, dst_node_id=0,
                        reply_to_message_id="instruction", group_id="", created_at=time.time(), ttl=3600.0,
                        message_type="train")
    return Message(content=content, metadata=metadata)


def upload(src_node: int, client: int, arrays, rows: int = 10) -> Message:
    metrics = MetricRecord({"client": client, "num-examples": rows, "train_loss": 1.0})
    record = arrays if not isinstance(arrays, dict) else payload.to_record(arrays)
    return reply(src_node, RecordDict({payload.ARRAYS: record, payload.METRICS: metrics}))


def instruction(state: dict[str, torch.Tensor], kind: str, server_round: int, node: int = 5) -> Message:
    """What the server's FedAvg sends a node: the global arrays and the round."""
    metadata = Metadata(run_id=1, message_id=f"{kind}-{server_round}", src_node_id=0, dst_node_id=node,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0, message_type=kind)
    content = RecordDict({payload.ARRAYS: payload.to_record(state),
                          payload.CONFIG: ConfigRecord({"server-round": server_round})})
    return Message(content=content, metadata=metadata)


def fstq_tensors() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A received (A, B) pair and a trained state a small step away."""
    generator = torch.Generator().manual_seed(0)
    received = {"x.lora_A": torch.randn(4, 16, generator=generator),
                "x.lora_B": torch.randn(16, 4, generator=generator) * 0.1}
    state = {name: t + 0.01 * torch.randn(t.shape, generator=generator) for name, t in received.items()}
    return received, state


# -- bugs --------------------------------------------------------------------------------------------


def test_exact_aggregation_of_identical_moelora_clients_keeps_the_model():
    """aggregation.py:_refactor (via `exact`, server.py:AdapterStrategy.aggregate_train) treats
    every `<prefix>.lora_A` / `.lora_B` pair as one LoRA whose change is B A. A MoELoRA adapter
    names its stacked experts the same way (A [E r, in], B [out, E r]), but its change is
    sum_e g_e(x) s_e B_e A_e x: the router gates each expert's r columns. The SVD re-factoring
    keeps B A and mixes the experts' components, so even two identical clients give back a
    different model (refactor_error_max reports ~1e-16 all the same). FederatedConfig accepts
    `adapter: {method: moelora}` with `aggregation: exact` (FlexiLoRA, whose nested-rank weights
    gate A's rows, is accepted the same way). Expected: either the config refuses exact for
    adapters whose change is not B A, or exact re-factors per expert (B_e A_e at rank r_e, the
    router averaged plainly), which gives identical clients back unchanged."""
    moelora = {"method": "moelora", "experts": 2, "top_k": 1, "r": 4, "aux_loss": 0.0}
    try:
        FederatedConfig(adapter=moelora, aggregation="exact")
    except ConfigError:
        return  # refused when the config is read: fixed that way
    model = make_bert(0)
    splice.attach(model, splice.MoELoRA(experts=2, top_k=1, r=4, aux_loss=0.0), "global")
    params = adapter_parameters(model, "global")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith(".lora_B"):
                p.copy_(torch.randn(p.shape, generator=generator))
    state = {name: p.detach().clone() for name, p in params.items()}
    ids = torch.randint(1, 97, (3, 10), generator=generator)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    merged, errors = aggregation.exact([state, state], [10, 10])
    assert max(errors.values()) < 1e-9  # what the run reports: nothing lost
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(merged[name])
        after = model(input_ids=ids).logits
    assert_close(after, before, rel=1e-5)


def test_fstq_upload_with_an_infinite_value_is_not_passed_off_as_finite(make):
    """token_fisher.py:_fp16_scale clamps a row's scale to float16's largest value and
    `quantize` clamps the codes, so an update holding +inf is encoded as finite numbers
    (here ~8.3e6 where the client had inf). The server's only guard, `finite_uploads`
    (server.py), checks the *decoded* state, so under method fstq a diverged client's update
    poisons the global adapter instead of being left out. Expected: the client refuses to
    encode a non-finite update (SpliceError), or it travels so that the decoded state is
    non-finite and the server drops it."""
    method = make_method(make(method="fstq", options={"keep_ratio": 1.0}))
    received, state = fstq_tensors()
    state["x.lora_A"][1, 3] = math.inf
    try:
        record = method.upload(None, state, received)
    except SpliceError:
        return
    decoded = method.decode(record, received)
    assert not all(t.isfinite().all() for t in decoded.values()), \
        f"an inf update decoded as finite values up to {max(t.abs().max().item() for t in decoded.values()):.3g}"


def test_fstq_one_clients_corrupt_upload_is_left_out_not_fatal(make):
    """server.py:AdapterStrategy.aggregate_train decodes every upload in one list comprehension
    before `finite_uploads`; under method fstq a client whose update holds a NaN sends a NaN
    scale, `decode_delta` raises ("the payload holds non-finite scales"), and the exception
    ends the whole ServerApp (every client's work lost; the message does not even name the
    client). Under method fedavg the same client is left out of the round and recorded in
    `failures` (the documented behaviour: "a diverged client must not poison the global
    adapter"). Expected: the same for fstq: the round goes on with client 0, client 1's failure
    is recorded under its partition id."""
    server = ServerRun(make("fstq", method="fstq", options={"keep_ratio": 1.0}))
    strategy = AdapterStrategy(server)
    method = server.method
    good = {k: v + 0.01 for k, v in server.initial.items()}
    with pytest.raises(SpliceError, match="non-finite"):  # a client refuses to quantise a NaN update now
        method.upload(None, {k: v * math.nan for k, v in good.items()}, server.initial)
    encoded = method.encode(good, server.initial).payload
    corrupt = ArrayRecord({PAYLOAD: encoded[:-1]})  # a payload the server cannot read: one byte short
    replies = [upload(100, 0, method.upload(None, good, server.initial)), upload(101, 1, corrupt)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert "1" in server.history.round(1).failures


def test_dual_local_adapter_is_not_given_the_sfed_averaging_scale(make):
    """dual.py:DualLoRA.prepare builds the local adapter through `config.train_config(mapping)`,
    which (config.py:train_config) fills SFed-LoRA's N with the clients sampled per round. With
    `adapter: {scaling: sfed}` and no `local_adapter` the never-uploaded local adapter gets
    gamma = alpha * sqrt(N / r) too: here 8 * sqrt(8 / 4) = 11.3 instead of 4. SFed's sqrt(N)
    (volume 2 §8) compensates the averaging of N clients' updates; the local adapter (volume 2
    §7: "never leaves the site") is never averaged, so its N is 1 (SFed at N = 1 is rsLoRA,
    alpha / sqrt(r)), and the personal adapter's effective step grows with the size of the
    federation for no reason. Expected: the local adapter's scale is alpha / sqrt(r)."""
    config = make("dual-sfed", method="dual", clients=8,
                  adapter={"method": "lora", "r": 4, "alpha": 8, "scaling": "sfed"})
    run = LocalRun(config)
    scales = {(layer, name): host[name].scaling for layer, _, host in hosts(run.model)
              for name in ("global", "local") if name in host}
    assert scales, "no adapted layer found"
    assert all(s == pytest.approx(8 * math.sqrt(8 / 4)) for (_, name), s in scales.items() if name == "global")
    local = sorted({s for (_, name), s in scales.items() if name == "local"})
    assert local == [pytest.approx(8 / math.sqrt(4))], f"local adapter scales {local}"


class _Proxy(ClientProxy):
    """A legacy client proxy that only has an id (sampling never calls it)."""

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def test_secure_aggregation_samples_the_round_from_the_seed(make, monkeypatch):
    """server.py:_run_secure runs Flower's legacy FedAvg, whose `configure_fit` samples the
    round's clients with `random.sample` on Python's global RNG (SimpleClientManager.sample).
    AdapterStrategy.configure_train seeds that draw from the run's seed and round; the SecAgg+
    path does not, so with secure and fraction < 1 which clients train depends on whatever
    else drew from the global RNG (Ray, a library, an earlier run in the process): the same
    config and seed give different runs. Expected: the same sample whatever the global RNG's
    state, as on the Message-API path."""
    config = make("secure", clients=8, fraction=0.5, secure={"num_shares": 3, "reconstruction_threshold": 2})
    server = ServerRun(config)
    captured = {}

    class Workflow:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __call__(self, grid, legacy) -> None:
            captured["legacy"] = legacy

    monkeypatch.setattr(flwr.server.workflow, "DefaultWorkflow", Workflow)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    _run_secure(None, context, server)
    legacy = captured["legacy"]
    for node in range(100, 108):
        legacy.client_manager.register(_Proxy(str(node)))
    picks = []
    for other in (0, 1, 2):
        random.seed(other)  # someone else's use of the global RNG
        fit = legacy.strategy.configure_fit(1, legacy.strategy.initial_parameters, legacy.client_manager)
        picks.append(sorted(proxy.cid for proxy, _ in fit))
    assert len(picks[0]) == 4
    assert picks[0] == picks[1] == picks[2], picks


def test_force_keeps_the_previous_run_until_the_new_one_is_accepted(make, monkeypatch):
    """run.py:run_federated removes the old run folder (overwrite=True, CLI --force) before
    anything of the new run is checked beyond the config: the data, the partition and the model
    are first read inside the ServerApp. A config that passes FederatedConfig but cannot run
    (here 500 clients for 96 training rows: partition.iid refuses) deletes the previous results
    and leaves nothing. `splice continual` was fixed for exactly this ("--force replaces the old
    run only once the new one is accepted"). Expected: the previous run's files are still there
    after a run that fails before its first round."""
    previous = make("force")
    marker = Path(previous.output_dir) / "report" / "results.json"
    marker.parent.mkdir(parents=True)
    marker.write_text('{"final": {"global_accuracy": 0.91}}')
    bad = dataclasses.replace(previous, clients=500)  # accepted: the rows are counted when the data loads

    def simulation(server_app, client_app, **kwargs) -> None:
        try:
            ServerRun(bad)  # what the ServerApp does first; Flower logs its error and returns
        except SpliceError:
            return

    monkeypatch.setattr(run_module, "run_simulation", simulation)
    with pytest.raises(SpliceError):
        run_federated(bad, console=QUIET, overwrite=True)
    assert marker.exists(), "the previous run was deleted by a run that never started"


@pytest.mark.parametrize("changes", [{"seed": -1}, {"seed": 2**32}], ids=["negative", "too-large"])
def test_a_seed_the_run_cannot_use_is_refused_with_the_config(make, changes):
    """config.py accepted any int seed. A negative one failed in the ServerApp (`set_seed`: "Seed
    must be between 0 and 2**32 - 1", a ValueError with no key) after the run folder was set up
    (and, with --force, the previous run deleted). Expected: a ConfigError naming `seed` when
    the config is read. (The clients' seeds, once seed + (round - 1) * clients + client and able
    to overflow, are now hashed into that range by `client_seed`.)"""
    with pytest.raises(ConfigError, match="seed"):
        make(**changes)


def test_client_seeds_differ_across_rounds_clients_and_run_seeds():
    """seed + (round - 1) * clients + client gave run seed 1's client 0 the seed of run seed 0's
    client 1, so 'independent' replicate runs shared their clients' data orders and dropout."""
    from splice.federated.client import client_seed

    seeds = [client_seed(run, server_round, client) for run in range(3) for server_round in (1, 2)
             for client in range(4)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**32 for s in seeds)
    assert client_seed(2**32 - 1, 10**6, 10**4) < 2**32


@pytest.mark.parametrize(("text", "read"), [
    ("privacy: {noise_multiplier: 5e-1, clipping_norm: 1.0}\n", lambda c: c.privacy.noise_multiplier),
    ("partition: {scheme: dirichlet, alpha: 5e-1}\n", lambda c: c.partition.alpha),
    ("clients: 8\nfraction: 5e-1\n", lambda c: c.fraction),
    ("method: fedeu\noptions: {kl_weight: 5e-1}\n", lambda c: make_method(c).options["kl_weight"]),
], ids=["privacy", "partition", "fraction", "options"])
def test_yaml_exponents_are_numbers_in_every_section(tmp_path, text, read):
    """PyYAML (YAML 1.1) reads `5e-1` as a string. `train: {lr: 2e-3}` is accepted (TrainConfig
    reads it as a number, core.validation.yaml_number), but the same notation in the federated
    run's own keys is refused: "privacy.noise_multiplier must be a number, got '5e-1' (a
    string)", and likewise partition.alpha, fraction and the method's options (config.py
    from_yaml / _section, fedeu.py _number). `splice continual` was fixed for this. Expected:
    every numeric key of the file reads `5e-1` as 0.5."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert read(FederatedConfig.from_yaml(path)) == 0.5


def test_a_bad_local_adapter_is_named_as_options_local_adapter(tmp_path):
    """dual.py:DualLoRA.check validates `options.local_adapter` through
    `config.train_config(local)`, whose error says "adapter: bad 'lora' config: LoRA rank r must
    be >= 1": the message names `adapter`, which is fine in this file; the bad value is under
    options.local_adapter. Expected: the message names options.local_adapter."""
    path = tmp_path / "run.yaml"
    path.write_text("adapter: {method: lora, r: 8}\nmethod: dual\noptions: {local_adapter: {method: lora, r: 0}}\n")
    with pytest.raises(ConfigError) as err:
        FederatedConfig.from_yaml(path)
    message = str(err.value).replace(str(path), "<file>")  # (the test's folder is named after the test)
    assert str(path) in str(err.value) and "local_adapter" in message, message


def test_fstq_with_its_defaults_runs_on_a_classification_config():
    """fstq.py:FedFSTQ.check refuses keep_ratio < 1 for classification, and the default
    keep_ratio is 0.3, so `method: fstq` on any classification config is refused for a value
    the user never wrote: `splice federate examples/federated_minilm.yaml --method fstq` (the
    CLI help lists fstq) fails with "options.keep_ratio 0.3 drops tokens ... use keep_ratio 1.0".
    Expected: the default keep_ratio of a classification run is 1.0 (only an explicit value
    below 1 is refused); the uploads are still quantised."""
    config = FederatedConfig(method="fstq")
    assert make_method(config).options["keep_ratio"] == 1.0


# -- correct behaviour, pinned ------------------------------------------------------------------------


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 2)  # B A is 2 x 3: rank 2 = r, so the rank-r re-factoring loses nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_exact_aggregation_is_the_sample_weighted_mean_of_the_clients_models():
    """On an affine model the output is affine in the weight change, so the model `exact` gives
    back (at the clients' rank, as the server calls it; lossless here) predicts the
    sample-count-weighted mean of the clients' predictions, sum_i n_i y_i / sum_i n_i; FedAvg of
    A and B separately does not (its B A is biased)."""
    model = _Linear()
    splice.attach(model, splice.LoRA(r=2, alpha=4, targets=["fc"]), "global")
    params = adapter_parameters(model, "global")
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(3))
    states, outputs = [], []
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in params.values():
                p.copy_(torch.randn(p.shape, generator=generator))
            outputs.append(model(x))
        states.append({n: p.detach().clone() for n, p in params.items()})
    rows = [10, 30]
    expected = (rows[0] * outputs[0] + rows[1] * outputs[1]) / sum(rows)

    def predict(state: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])
            return model(x)

    merged, errors = aggregation.exact(states, rows)
    assert max(errors.values()) < 1e-9
    assert_close(predict(merged), expected, rel=1e-5)
    assert_differs(predict(aggregation.fedavg(states, rows)), expected)


@pytest.mark.parametrize("private", [False, True], ids=["rows", "privacy-equal"])
def test_the_server_weighs_uploads_by_rows_and_equally_under_privacy(make, private):
    """AdapterStrategy.aggregate_train: plain runs weigh each upload by its client's training
    rows (10 and 30: 1/4 and 3/4); under differential privacy every upload weighs the same
    (Flower's noise std sigma C / m bounds an unweighted mean)."""
    privacy = {"side": "server", "noise_multiplier": 0.0, "clipping_norm": 1.0} if private else None
    server = ServerRun(make("weights", privacy=privacy))
    strategy = AdapterStrategy(server)
    first = {k: v + 1.0 for k, v in server.initial.items()}
    second = {k: v - 1.0 for k, v in server.initial.items()}
    arrays, _ = strategy.aggregate_train(1, [upload(100, 0, first, rows=10), upload(101, 1, second, rows=30)])
    after = payload.from_record(arrays)
    w = 0.5 if private else 0.25
    for key, value in after.items():
        hand = w * first[key].double() + (1 - w) * second[key].double()
        torch.testing.assert_close(value.double(), hand, rtol=0, atol=1e-6)


def test_byte_accounting_is_the_serialized_size_of_what_is_sent(make):
    """CountingGrid records each message's protobuf size under the round and the client (the
    node's partition id, learnt from its reply): the downlink and uplink numbers are the
    messages' `message_to_proto(...).ByteSize()`, i.e. the tensors' raw bytes plus a small
    envelope, not an estimate."""
    server = ServerRun(make("bytes"))
    state = server.initial
    tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
    sent = instruction(state, "train", 1, node=7)
    answer = upload(7, 3, {k: v + 0.5 for k, v in state.items()})

    class Inner:
        def send_and_receive(self, messages, *, timeout=None):
            return [answer]

    history = History()
    grid = CountingGrid(Inner(), history, lambda: 1)
    list(grid.send_and_receive([sent]))
    record = history.to_dict()["rounds"][1]
    assert record["downlink_bytes"] == {"3": payload.message_bytes(sent)}
    assert record["uplink_bytes"] == {"3": payload.message_bytes(answer)}
    for size in (payload.message_bytes(sent), payload.message_bytes(answer)):
        assert tensor_bytes <= size <= tensor_bytes + 4096


def test_dual_uploads_the_global_tensors_only_and_keeps_its_local_adapter(make):
    """Med-DualLoRA (volume 2 §7 (d)(1)) in-process: a client's train reply holds exactly the
    tensors the server broadcast (the global adapter and its head), none of the local adapter's;
    the local adapter, trained, stays in the node's state and is put back next time."""
    run = LocalRun(make("dual", method="dual"))
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    answer = _train(instruction(run.global_state, "train", 1), context, run)
    sent = set(answer.content[payload.ARRAYS].keys())
    assert sent == set(run.global_state)
    assert not [name for name in sent if ".splice.local." in name]
    kept = context.state.array_records[PRIVATE_STATE].to_torch_state_dict()
    assert kept and all(".splice.local." in name for name in kept)
    assert any(not torch.equal(kept[n], run.method.initial[n]) for n in kept)  # it trained
    run.method.restore_private(run, None)  # another client's turn in this process: the initial local adapter
    run.method.restore_private(run, kept)
    params = dict(run.model.named_parameters())
    assert all(torch.equal(params[n].detach().cpu(), kept[n]) for n in kept)
