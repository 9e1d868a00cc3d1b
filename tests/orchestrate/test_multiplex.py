"""Multiplexed training equals training each tenant alone, with tenants joining and leaving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mux_helpers import text_rows
from safetensors.torch import load_file

import splice
from splice.orchestrate import Multiplexer, multiplex
from splice.train import TrainConfig, run


def _adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["history"]


def _assert_same_training(alone: Path, mux: Path) -> None:
    """Same saved tensors and the same loss at every step.

    The losses agree to 1e-5. The tensors get a looser bound: a packed batch sums in another
    order, and Adam divides by the root of tiny second moments (lora_A's gradients start at
    exactly zero), which turns 1e-8 differences into ~1e-4 in a few steps; a wrong loss
    scale or a leaked gradient would move them by ~lr = 1e-2 per step.
    """
    expected, got = _adapter_tensors(alone), _adapter_tensors(mux)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-3, rtol=1e-3, msg=key)
    steps_alone, steps_mux = _history(alone), _history(mux)
    assert [e["step"] for e in steps_mux] == [e["step"] for e in steps_alone]
    for a, b in zip(steps_alone, steps_mux, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)


@pytest.fixture
def classification_tenants(bert_dir, tmp_path):
    """Two tenants that differ in everything a tenant may choose: data, labels, adapter, lr, seed,
    accumulation (5 batches per epoch with grad_accum=2 ends an epoch on a partial step)."""
    a = TrainConfig(model=str(bert_dir), data=str(text_rows(tmp_path / "a.jsonl", 96, 2, 12, 1)),
                    validation=str(text_rows(tmp_path / "a-val.jsonl", 32, 2, 12, 11)), batch_size=8,
                    max_steps=12, eval_every=4, lr=5e-2, seed=1, output_dir=str(tmp_path / "a"))
    b = TrainConfig(model=str(bert_dir), data=str(text_rows(tmp_path / "b.jsonl", 40, 3, 3, 2)),
                    validation=str(text_rows(tmp_path / "b-val.jsonl", 30, 3, 3, 12)), batch_size=8,
                    grad_accum=2, max_steps=6, eval_every=2, lr=1e-2, head_lr=3e-2, seed=2,
                    adapter={"method": "lora", "r": 4, "alpha": 4, "targets": "all-linear", "rslora": True},
                    output_dir=str(tmp_path / "b"))
    return a, b


def _alone(config: TrainConfig, folder: Path) -> Path:
    run(config.__class__.from_dict(config.to_dict(), output_dir=str(folder)))
    return folder


def test_each_tenant_trains_as_it_would_alone(classification_tenants, tmp_path):
    a, b = classification_tenants
    alone = {"a": _alone(a, tmp_path / "alone-a"), "b": _alone(b, tmp_path / "alone-b")}
    results = multiplex([a, b])
    assert set(results) == {"a", "b"}
    for name in ("a", "b"):
        _assert_same_training(alone[name], Path(results[name].paths["run_dir"]))
        after_alone = json.loads((alone[name] / "metrics.json").read_text())["after"]["validation"]
        assert results[name].metrics["after"]["validation"] == pytest.approx(after_alone, abs=1e-5)
    learned = json.loads((alone["a"] / "metrics.json").read_text())
    assert learned["best_step"] > 0  # the compared adapters are trained ones, not the initial ones


def test_a_tenant_joining_late_and_one_leaving_early_still_match(classification_tenants, tmp_path):
    a, b = classification_tenants
    alone_b = _alone(b, tmp_path / "alone-b")
    results = multiplex([a, b], join_at=[0, 4])
    assert results["b"].timings["joined_at_step"] == 4
    assert results["a"].timings["left_at_step"] == 12  # a leaves while b goes on
    assert results["b"].timings["left_at_step"] > 12
    _assert_same_training(alone_b, Path(results["b"].paths["run_dir"]))


def test_row_limit_and_padding_limit_change_the_passes_not_the_result(classification_tenants, tmp_path):
    a, b = classification_tenants
    loose = multiplex([a, b], max_padding=0.99)
    a2 = TrainConfig.from_dict(a.to_dict(), output_dir=str(tmp_path / "a2"))
    b2 = TrainConfig.from_dict(b.to_dict(), output_dir=str(tmp_path / "b2"))
    mux = Multiplexer(max_rows=5, max_padding=0.1)
    mux.run([(0, a2), (0, b2)])
    assert mux.padding.forwards > mux.padding.steps  # rows really were split over several passes
    assert mux.padding.packed_share < mux.padding.naive_share
    assert mux.padding.packed_share <= 0.1 + 1e-9  # every pass keeps within max_padding
    for name, folder in (("a", tmp_path / "a2"), ("b", tmp_path / "b2")):
        _assert_same_training(Path(loose[name].paths["run_dir"]), folder)


def test_causal_lm_tenants_with_their_own_lm_heads(llama_dir, tmp_path):
    rows = splice.assets.arithmetic_problems(72, seed=3)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(model=str(llama_dir), task="causal_lm", data=str(data), max_length=48, batch_size=8, lr=1e-2,
                  max_eval_examples=8)
    a = TrainConfig(**common, max_steps=4, seed=1, output_dir=str(tmp_path / "a"),
                    adapter={"method": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]})
    b = TrainConfig(**common, max_steps=5, seed=2, output_dir=str(tmp_path / "b"),
                    adapter={"method": "lora", "r": 2, "alpha": 2, "targets": "all-linear", "train_also": ["lm_head"]})
    alone = {"a": _alone(a, tmp_path / "alone-a"), "b": _alone(b, tmp_path / "alone-b")}
    results = multiplex([a, b])
    for name in ("a", "b"):
        _assert_same_training(alone[name], Path(results[name].paths["run_dir"]))
    assert any(k.endswith("lm_head.weight") for k in _adapter_tensors(Path(results["b"].paths["run_dir"])))


def test_tenants_on_a_4bit_base_train_as_they_would_alone(llama_dir, tmp_path):
    """QLoRA tenants: the shared backbone's Linear layers are NF4 (torchao), each tenant's LoRA on top."""
    rows = splice.assets.arithmetic_problems(48, seed=4)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(model=str(llama_dir), task="causal_lm", data=str(data), max_length=48, batch_size=8, lr=1e-2,
                  max_eval_examples=8, quantize="nf4")
    a = TrainConfig(**common, max_steps=3, seed=1, output_dir=str(tmp_path / "a"),
                    adapter={"method": "lora", "r": 4, "alpha": 8, "targets": "all-linear"})
    b = TrainConfig(**common, max_steps=4, seed=2, output_dir=str(tmp_path / "b"),
                    adapter={"method": "lora", "r": 2, "alpha": 2, "targets": ["q_proj", "v_proj"]})
    alone = {"a": _alone(a, tmp_path / "alone-a"), "b": _alone(b, tmp_path / "alone-b")}
    mux = Multiplexer()
    for config in (a, b):
        mux.add(config)
    assert splice.quantized_layers(mux.shared)  # the shared backbone is the 4-bit one
    results = mux.run()
    for name in ("a", "b"):
        _assert_same_training(alone[name], Path(results[name].paths["run_dir"]))
    dense = {k: v for k, v in b.to_dict().items() if k != "quantize"} | {"output_dir": str(tmp_path / "d")}
    refusing = Multiplexer()
    refusing.add(TrainConfig.from_dict(a.to_dict(), output_dir=str(tmp_path / "c")))
    with pytest.raises(splice.SpliceError, match="tenants must share quantize: None vs 'nf4'"):
        refusing.add(TrainConfig.from_dict(dense))


def test_tenants_share_one_backbone(classification_tenants):
    a, b = classification_tenants
    mux = Multiplexer()
    names = [mux.add(a), mux.add(b)]
    views = [mux.tenants[n].model for n in names]
    weight = mux.shared.bert.encoder.layer[0].attention.self.query.weight
    assert all(v.bert.encoder.layer[0].attention.self.query.weight is weight for v in views)
    assert views[0].classifier is not views[1].classifier  # own heads, own label counts
    assert (views[0].classifier.out_features, views[1].classifier.out_features) == (2, 3)
    mux.step()
    trainable = {k for k, p in mux.shared.named_parameters() if p.requires_grad}
    assert trainable and all(".splice." in k or k.startswith("classifier.copies.") for k in trainable)


def test_bad_tenant_sets_are_refused(classification_tenants, llama_dir, tmp_path):
    a, b = classification_tenants
    with pytest.raises(splice.SpliceError, match="at least one"):
        multiplex([])
    with pytest.raises(splice.SpliceError, match="join_at"):
        multiplex([a, b], join_at=[0])
    mux = Multiplexer()
    mux.add(a)
    with pytest.raises(splice.SpliceError, match="already exists"):
        mux.add(TrainConfig.from_dict(a.to_dict(), output_dir=str(tmp_path / "other")), name="a")
    with pytest.raises(splice.SpliceError, match="share model"):
        mux.add(TrainConfig.from_dict(b.to_dict(), model=str(llama_dir), output_dir=str(tmp_path / "c")))
    with pytest.raises(splice.SpliceError, match="pissa"):
        mux.add(TrainConfig.from_dict(b.to_dict(), adapter={"init": "pissa"}, output_dir=str(tmp_path / "d")))
    with pytest.raises(splice.SpliceError, match="token positions"):
        mux.add(TrainConfig.from_dict(b.to_dict(), adapter={"method": "loreft"}, output_dir=str(tmp_path / "f")))
    with pytest.raises(splice.SpliceError, match="bf16"):
        Multiplexer().add(TrainConfig.from_dict(a.to_dict(), precision="fp16", output_dir=str(tmp_path / "e")))
    with pytest.raises(splice.SpliceError, match="max_padding"):
        Multiplexer(max_padding=1.0)


def test_gradient_checkpointing_gives_the_same_training(classification_tenants, tmp_path):
    """The recompute in backward must see the packed batch's routing (backward runs inside it)."""
    a, b = classification_tenants
    plain = multiplex([a, b])
    ckpt = [TrainConfig.from_dict(c.to_dict(), gradient_checkpointing=True, output_dir=str(tmp_path / f"ck-{n}"))
            for n, c in (("a", a), ("b", b))]
    checkpointed = multiplex(ckpt)
    for name, folder in (("a", "ck-a"), ("b", "ck-b")):
        assert checkpointed[folder].history[-1]["loss"] == pytest.approx(plain[name].history[-1]["loss"], rel=1e-5)
        _assert_same_training(Path(plain[name].paths["run_dir"]), tmp_path / folder)


def test_a_mixture_of_experts_tenant_with_its_balancing_loss_trains_as_alone(classification_tenants, tmp_path):
    """The router's balancing loss reaches a multiplexed tenant as it does a lone run: on its own
    rows, padding left out although the packed pass pads them to another length. Three steps:
    top-k routing is discontinuous, so the packed pass's rounding (1e-8) flips a near-tied
    token's experts after a few more (here from step 4), which moves the loss by ~1e-3."""
    a, b = classification_tenants
    moe = TrainConfig.from_dict(a.to_dict(), output_dir=str(tmp_path / "moe"), max_steps=3, eval_every=3, adapter={
        "method": "moelora", "experts": 4, "r": 8, "aux_loss": 0.5, "targets": ["query", "value"]})
    lora = TrainConfig.from_dict(b.to_dict(), grad_accum=1, output_dir=str(tmp_path / "lora"))
    alone = _alone(moe, tmp_path / "alone-moe")
    results = multiplex([moe, lora])
    _assert_same_training(alone, Path(results["moe"].paths["run_dir"]))


def test_a_mixture_of_experts_tenant_split_over_several_passes_keeps_its_balancing_loss_weight(
        classification_tenants, tmp_path):
    """Each pass adds the tenant's balancing loss on its rows at their share of the batch. The
    loss is a product of two means (f_e P_e), so the parts do not sum to the whole batch's
    exactly: the losses stay within 1e-4 of the lone run's (at full weight per pass, 1e-3)."""
    a, b = classification_tenants
    adapter = {"method": "moelora", "experts": 4, "r": 8, "aux_loss": 0.3, "targets": ["query", "value"]}
    moe = TrainConfig.from_dict(a.to_dict(), output_dir=str(tmp_path / "moe"), max_steps=3, eval_every=3,
                                adapter=adapter)
    lora = TrainConfig.from_dict(b.to_dict(), grad_accum=1, output_dir=str(tmp_path / "lora"))
    alone = [h["loss"] for h in _history(_alone(moe, tmp_path / "alone-moe"))]
    mux = Multiplexer(max_rows=2, max_padding=0.99)  # the tenant's 8 rows go through 4+ passes a step
    mux.run([(0, moe), (0, lora)])
    assert mux.padding.forwards >= 4 * mux.padding.steps
    assert [h["loss"] for h in _history(Path(moe.output_dir))] == pytest.approx(alone, rel=1e-4)
