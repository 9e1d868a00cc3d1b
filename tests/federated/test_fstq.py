"""FED-FSTQ (spec volume 1, section 11): the hooked token Fisher is the embedding gradient's
squared norm (d1); quantisation error falls with bits and bits follow importance (d2); packed
sizes are the analytic count (d3); an upload decodes to the trained state within half a step;
keep_ratio 1.0 is the plain loss bit for bit; and a Flower run uplinks far fewer bytes than
FedAvg's, by about the analytic ratio."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import save_tiny_llama
from transformers import AutoTokenizer, LlamaForCausalLM

from splice.core.errors import ConfigError, SpliceError
from splice.federated import FederatedConfig, run_federated
from splice.federated import token_fisher as tf
from splice.federated.methods import FedFSTQ, make_method
from splice.train.data import IGNORE_INDEX, CausalLMCollator


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("fstq-llama"))


@pytest.fixture(scope="module")
def count_file(tmp_path_factory) -> Path:
    """120 rows "count from a:" -> "a+1 ... a+n" (3 to 6 numbers: several completion tokens)."""
    rng = random.Random(0)
    rows = []
    for _ in range(120):
        start, n = rng.randint(1, 40), rng.randint(3, 6)
        rows.append({"prompt": f"count from {start}:", "completion": " ".join(str(start + k) for k in range(1, n + 1))})
    path = tmp_path_factory.mktemp("fstq-data") / "count.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_and_batch(tiny_llama, count_file):
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    rows = [json.loads(line) for line in count_file.read_text().splitlines()[:4]]
    return model, dict(CausalLMCollator(tokenizer, 32)(rows))


def causal_config(tiny_llama: Path, count_file: Path, tmp_path: Path, **overrides) -> FederatedConfig:
    settings = dict(model=str(tiny_llama), data=str(count_file), task="causal_lm", clients=3, rounds=1,
                    local_steps=3, adapter={"method": "lora", "r": 8, "alpha": 16}, eval_examples=6,
                    train={"batch_size": 8, "max_length": 32, "lr": 5e-3, "group_by_length": False},
                    partition={"scheme": "iid"}, output_dir=str(tmp_path / "run"), method="fstq")
    settings.update(overrides)
    return FederatedConfig(**settings)


# -- (d)1 the token Fisher --------------------------------------------------------------------


@pytest.mark.parametrize("frozen", [True, False])
def test_hooked_fisher_is_the_embedding_gradient(model_and_batch, frozen):
    model, batch = model_and_batch
    embedding = model.get_input_embeddings()
    embedding.weight.requires_grad_(not frozen)
    try:
        scores = tf.token_fisher(model, batch)
        embeds = embedding(batch["input_ids"]).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        (grad,) = torch.autograd.grad(loss, embeds)
        reference = grad.pow(2).sum(-1)
        assert scores.shape == batch["input_ids"].shape
        torch.testing.assert_close(scores, reference, rtol=1e-6, atol=0)
        # the same hook inside an ordinary training backward
        seen = []
        with tf.FisherHook(model, seen.append):
            model.zero_grad()
            model(**batch).loss.backward()
        assert len(seen) == 1
        torch.testing.assert_close(seen[0], reference, rtol=1e-6, atol=0)
        assert scores[batch["attention_mask"] == 1].gt(0).any()
    finally:
        embedding.weight.requires_grad_(True)
        model.zero_grad()


def test_ema_mask_and_vocab_tables():
    nan = math.nan
    first = tf.ema_update(None, torch.tensor([1.0, nan, 3.0]))
    after = tf.ema_update(first, torch.tensor([nan, 2.0, 5.0]), beta=0.5)
    assert torch.equal(after, torch.tensor([1.0, 2.0, 4.0]))  # kept, first seen, blended
    table = tf.vocab_mean(torch.tensor([[2, 2, 0]]), torch.tensor([[1.0, 3.0, 5.0]]), 4)
    assert torch.equal(tf.lookup(table, torch.tensor([0, 1, 2])), torch.tensor([5.0, math.inf, 2.0]))
    scores = torch.tensor([[1.0, 5, 3, 2, 0, 9], [2, 2, 2, 1, 9, 0]])
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]]).bool()
    keep = tf.topk_mask(scores, 0.3, valid)  # ceil(0.3 * 4) = 2, ceil(0.3 * 5) = 2
    assert keep.tolist() == [[False, True, True, False, False, False], [False, True, False, False, True, False]]
    assert torch.equal(tf.topk_mask(scores, 1.0, valid), valid)


# -- (d)2 quantisation and bits ---------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantisation_error_falls_with_bits(symmetric):
    torch.manual_seed(0)
    rows = torch.randn(16, 64) * torch.logspace(-4, 1, 16)[:, None]
    rows[3, 5] = 40.0  # an outlier row
    errors = []
    for bits in range(2, 9):
        quantized = tf.quantize(rows, bits, symmetric)
        error = tf.dequantize(quantized) - rows
        step = quantized.scales.float()[:, None]
        assert (error.abs() <= 0.5 * step * (1 + 1e-2) + 1e-12).all()  # half a step (the float16 scale's)
        assert int(quantized.codes.max()) < 2 ** bits
        errors.append(float(error.pow(2).sum()))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


def test_bit_allocation_is_monotone_in_importance():
    torch.manual_seed(1)
    importances = torch.rand(200) ** 4
    importances[:10] = 0.0
    for mean_bits in (2.0, 3.0, 4.0, 6.0, 8.0):
        bits = tf.allocate_bits(importances, mean_bits=mean_bits)
        ordered = bits[torch.argsort(importances)]
        assert (ordered[1:] >= ordered[:-1]).all(), mean_bits
        assert set(bits.tolist()) <= {2, 4, 8} and bits.float().mean() <= mean_bits
        assert (bits[:10] == 2).all()  # nothing to gain: the lowest level
    assert bits.float().mean() > 7.5  # mean 8: every row with a gain at 8
    sizes = torch.randint(1, 50, (200,))
    budget = 3 * int(sizes.sum())
    bits = tf.allocate_bits(importances, sizes, budget_bits=budget)
    assert budget - 8 * 50 < (bits * sizes).sum() <= budget


# -- (d)3 packing -----------------------------------------------------------------------------


def test_packed_size_is_analytic_and_round_trips():
    torch.manual_seed(2)
    for bits in range(2, 9):
        for count in (0, 1, 7, 8, 9, 101):
            codes = torch.randint(0, 2 ** bits, (count,))
            packed = tf.pack(codes, bits)
            assert packed.dtype == torch.uint8 and packed.numel() == tf.packed_bytes(count, bits) == \
                math.ceil(count * bits / 8)
            assert torch.equal(tf.unpack(packed, bits, count), codes.to(torch.uint8))
    delta = {"a.lora_A": torch.randn(8, 32), "a.lora_B": torch.randn(32, 8) * 1e-3, "head.bias": torch.randn(3)}
    for symmetric in (True, False):
        encoded = tf.encode_delta(delta, mean_bits=4, symmetric=symmetric)
        rows = 8 + 8 + 1
        header = math.ceil(rows * 2 / 8) + 2 * rows + (0 if symmetric else rows)
        codes = sum(math.ceil(b * int(encoded.sizes[encoded.bits == b].sum()) / 8) for b in (2, 4, 8))
        assert encoded.payload.numel() == header + codes == tf.payload_bytes(encoded.sizes, encoded.bits,
                                                                            symmetric=symmetric)
        assert encoded.sizes.tolist() == [32] * 16 + [3]  # B is cut per rank component, like A


# -- the method: upload, decode, objective, config ----------------------------------------------


@pytest.mark.parametrize("options", [{}, {"quantizer": "affine"}, {"mean_bits": 8}, {"budget_bytes": 600}])
def test_decode_of_upload_is_the_state_within_half_a_step(tiny_llama, count_file, tmp_path, options):
    method = make_method(causal_config(tiny_llama, count_file, tmp_path, options=options))
    torch.manual_seed(3)
    received = {"x.lora_A": torch.randn(8, 32), "x.lora_B": torch.randn(32, 8) * 0.1, "y.lora_B": torch.randn(16, 8)}
    state = {name: t + 0.01 * torch.randn_like(t) for name, t in received.items()}
    record = method.upload(None, state, received)
    assert list(record.keys()) == ["fstq.payload"]
    payload = record["fstq.payload"].numpy()
    if "budget_bytes" in options:
        assert payload.size <= options["budget_bytes"]
    decoded = method.decode(record, received)
    encoded = method.encode(state, received)
    assert payload.size == encoded.payload.numel()
    start = 0
    for name in sorted(received):
        delta_rows = tf.as_rows(state[name] - received[name])
        error = tf.as_rows(decoded[name] - state[name])
        bits = encoded.bits[start: start + delta_rows.shape[0]]
        start += delta_rows.shape[0]
        span = delta_rows.abs().amax(1) if "quantizer" not in options else \
            delta_rows.amax(1).clamp(min=0) - delta_rows.amin(1).clamp(max=0)
        step = span / tf.qmax(bits, "quantizer" not in options)
        assert (error.abs() <= 0.5 * step[:, None] * 1.01 + 1e-6).all(), name
        if options.get("mean_bits") == 8:
            assert (bits == 8).all() and error.abs().max() > 0  # 8 bits: close, not exact
    with pytest.raises(SpliceError, match="not an update of this adapter"):
        method.decode(method.upload(None, {"x.lora_A": state["x.lora_A"]}, received), received)


def test_keep_ratio_one_is_the_plain_loss_bit_for_bit(tiny_llama, count_file, tmp_path, model_and_batch):
    """Also with a frozen embedding, whose output the hook replaces by an identical leaf."""
    model, batch = model_and_batch
    embedding = model.get_input_embeddings()
    for frozen, keep_ratio in [(False, 1.0), (True, 1.0), (True, 0.3)]:
        embedding.weight.requires_grad_(not frozen)
        model.zero_grad()
        plain_loss = model(**batch).loss
        plain_loss.backward()
        plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        method = make_method(causal_config(tiny_llama, count_file, tmp_path, options={"keep_ratio": keep_ratio}))
        run = SimpleNamespace(model=model, config=method.config)
        method.prepare(run)
        try:
            model.zero_grad()
            loss = method.objective(run, 1)(model, batch)
            loss.backward()
        finally:
            method.hook.remove()
            embedding.weight.requires_grad_(True)
        if keep_ratio == 1.0:
            assert torch.equal(loss, plain_loss)
            assert all(torch.equal(p.grad, plain_grads[n]) for n, p in model.named_parameters() if n in plain_grads)
        else:  # the model's loss on the kept targets: ceil(0.3 n) of each row's n completion targets
            valid = batch["labels"] != IGNORE_INDEX
            assert method.kept == sum(math.ceil(0.3 * int(n)) for n in valid.sum(1)) < int(valid.sum())
            assert not torch.equal(loss, plain_loss)
        observed = ~method.ema.isnan()  # the backward fed the EMA: one score per kept target id
        assert observed.any() and (method.ema[observed] > 0).all()
        assert observed.sum() <= len(set(batch["labels"][batch["labels"] != IGNORE_INDEX].tolist()))
    model.zero_grad()


def test_check_refuses_what_fstq_cannot_run_with(make_config, tiny_llama, count_file, tmp_path):
    with pytest.raises(ConfigError, match="privacy"):
        make_config(method="fstq", options={"keep_ratio": 1.0}, privacy={"side": "server"})
    with pytest.raises(ConfigError, match="SecAgg"):
        make_config(method="fstq", options={"keep_ratio": 1.0}, secure={"num_shares": 3})
    with pytest.raises(ConfigError, match="keep_ratio 1.0"):
        make_config(method="fstq", options={"keep_ratio": 0.3})  # classification: no tokens to drop
    assert make_method(make_config(method="fstq")).options["keep_ratio"] == 1.0  # so that is its default there
    assert isinstance(make_method(make_config(method="fstq", options={"keep_ratio": 1.0}, aggregation="exact")),
                      FedFSTQ)
    for options, message in [({"mean_bits": 4, "budget_bytes": 100}, "not both"), ({"levels": [2, 9]}, "levels"),
                             ({"mean_bits": 9}, "mean_bits"), ({"keep_ratio": 0}, "keep_ratio"),
                             ({"quantizer": "log"}, "quantizer"), ({"beta": 1.0}, "beta")]:
        with pytest.raises(ConfigError, match=message):
            causal_config(tiny_llama, count_file, tmp_path, options=options)


# -- a Flower run -------------------------------------------------------------------------------


def test_simulation_uplinks_the_analytic_fraction_of_fedavg(tiny_llama, count_file, tmp_path):
    """Round-1 training uplink of fstq (4 bits on average) against plain FedAvg's: the only
    difference is the payload in place of the float32 tensors (and fstq's few metrics)."""
    fstq = run_federated(causal_config(tiny_llama, count_file, tmp_path / "fstq", rounds=2))
    plain = run_federated(causal_config(tiny_llama, count_file, tmp_path / "plain", method="fedavg"))
    values = 2 * (8 * 32 + 32 * 8 + 8 * 32 + 16 * 8)  # layers x (q A, q B, v A, v B)
    rows = 2 * 4 * 8
    bound = tf.header_bytes(rows, (2, 4, 8)) + math.ceil(4 * values / 8) + 3  # mean 4 bits, 3 streams' padding
    for client in "012":
        plain_up = plain.rounds[1]["bytes_by_type"]["train"]["uplink"][client]
        framing = plain_up - 4 * values  # everything in plain's reply but the tensors
        for record in fstq.rounds[1:]:
            up = record["bytes_by_type"]["train"]["uplink"][client]
            payload = record["train"][client]["fstq_upload_bytes"]
            assert payload <= bound
            assert payload < up < payload + framing + 256
            assert plain_up / up > 3
        assert 0.3 <= fstq.rounds[1]["train"][client]["fstq_kept_fraction"] < 1
    assert all(math.isfinite(r["global"]["loss"]) for r in fstq.rounds)
    assert fstq.rounds[2]["global"]["loss"] < fstq.rounds[0]["global"]["loss"]
