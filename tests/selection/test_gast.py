"""GAST (volume-2 §11): the spec's three CPU tests, per-sample gradients by vmap equal to a loop
over samples on real architectures, the trainer integration (only the chosen blocks move),
option errors, refusals, and one run on real MiniLM weights and Rotten Tomatoes rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_close, make_bert, make_llama, minilm_tokenizer, randomize, save_tiny_bert, save_tiny_llama
from rich.console import Console
from torch import nn

import splice
from splice.core.errors import ConfigError, SpliceError
from splice.selection.gast import (
    GAST,
    PerSample,
    block_of,
    layer_blocks,
    per_sample_gradients,
    sample_losses,
)
from splice.train import TrainConfig, Trainer
from splice.train.gradients import gradient_rule

BLOCK = {"layers.0": ["layers.0.weight"]}


def per_sample(rows: torch.Tensor) -> PerSample:
    """Given per-sample gradients of one parameter `layers.0.weight` ([B, ...])."""
    return PerSample({"layers.0.weight": rows}, torch.zeros(len(rows)), torch.ones(len(rows)))


# ------------------------------------------------------------------- the spec's CPU tests


@pytest.mark.parametrize("options", [{}, {"reference": "batch"}, {"mode": "positive"}, {"keep": 0.25}])
def test_identical_per_sample_gradients_are_all_kept(options):
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    selection = GAST(**options).select(per_sample(g.expand(16, 3, 5).clone()), BLOCK, [])
    assert selection.kept["layers.0"].all()
    assert selection.chosen == ["layers.0"]
    assert_close(selection.updates["layers.0.weight"], g)


@pytest.mark.parametrize("options", [{}, {"reference": "batch"}, {"mode": "positive"}, {"keep": 0.25}])
def test_a_quarter_with_the_opposite_gradient_is_dropped(options):
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    signs = torch.ones(16)
    signs[[1, 6, 10, 13]] = -1  # 25% with -g
    selection = GAST(**options).select(per_sample(signs[:, None, None] * g), BLOCK, [])
    assert torch.equal(selection.kept["layers.0"], signs > 0)
    assert_close(selection.updates["layers.0.weight"], g)


class Linear(nn.Module):
    """A linear classifier as one layer block (`layers.0`)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(features, 2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


def clusters(n: int, mean: torch.Tensor, generator: torch.Generator, flipped: float = 0.0):
    """Two Gaussian clusters at ±mean (unit noise); a share `flipped` of the labels swapped."""
    y = torch.randint(0, 2, (n,), generator=generator)
    x = (2 * y - 1).float()[:, None] * mean + torch.randn(n, len(mean), generator=generator)
    if flipped:
        y = torch.where(torch.rand(n, generator=generator) < flipped, 1 - y, y)
    return x, y


def clean_test_loss(seed: int, rule: GAST | None, steps: int = 100, batch: int = 32, lr: float = 0.2) -> float:
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(10, generator=generator)
    mean = 2 * mean / mean.norm()
    x, y = clusters(steps * batch, mean, generator, flipped=0.3)
    x_test, y_test = clusters(2000, mean, generator)
    torch.manual_seed(seed)
    model = Linear(10)
    params = dict(model.named_parameters())
    blocks, outside = layer_blocks(list(params))
    optimizer = torch.optim.SGD(params.values(), lr=lr)
    for step in range(steps):
        rows = {"x": x[step * batch : (step + 1) * batch], "labels": y[step * batch : (step + 1) * batch]}
        optimizer.zero_grad()
        if rule is None:
            nn.functional.cross_entropy(model(rows["x"]), rows["labels"]).backward()
        else:
            updates = rule.select(per_sample_gradients(model, params, rows, "classification"), blocks, outside).updates
            for name, update in updates.items():
                params[name].grad = update
        optimizer.step()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x_test), y_test).item()


def test_flipped_labels_gast_beats_plain_sgd_on_clean_test_loss():
    """30% of the training labels flipped: GAST's selection ends with a lower clean test loss
    than plain SGD after the same number of steps, for every seed."""
    for seed in range(3):
        plain, gast = clean_test_loss(seed, None), clean_test_loss(seed, GAST())
        assert gast < 0.8 * plain, (seed, gast, plain)


# ------------------------------------------------------------------- per-sample gradients


def padded_batch(task: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 97, (4, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    mask[2, -1:] = 0
    if task == "classification":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loop_gradients(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> list[dict[str, torch.Tensor]]:
    """Reference: one sample at a time, its padding cut off, plain autograd."""
    out = []
    for i in range(len(batch["labels"])):
        length = int(batch["attention_mask"][i].sum())
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"][i : i + 1, :length]).logits
        labels = batch["labels"][i : i + 1] if task == "classification" else batch["labels"][i : i + 1, :length]
        sample_losses(task, logits, labels)[0][0].backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    return out


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_vmap_per_sample_gradients_equal_a_loop_over_samples(task):
    """Padded rows, vmapped, against each row alone without its padding: the 4-D mask is right,
    and LoRA's custom backward is not in the way."""
    model = make_bert() if task == "classification" else make_llama()
    heads = ["classifier"] if task == "classification" else []
    splice.attach(model, splice.LoRA(r=4, targets="all-linear", train_also=heads))
    randomize(model)  # B != 0: every factor has a gradient
    batch = padded_batch(task)
    params = splice.trainable_parameters(model)
    vmapped = per_sample_gradients(model, params, batch, task)
    assert model.config._attn_implementation == "sdpa"  # put back after the pass
    for i, expected in enumerate(loop_gradients(model, batch, task)):
        for name, grad in expected.items():
            assert_close(vmapped.grads[name][i], grad, rel=1e-4)
    assert vmapped.grads[next(iter(params))].shape[0] == 4


def test_layer_blocks():
    names = ["bert.encoder.layer.0.attention.self.query.splice.default.lora_A",
             "bert.encoder.layer.0.output.dense.splice.default.lora_B",
             "bert.encoder.layer.11.attention.self.query.splice.default.lora_A",
             "bert.pooler.dense.splice.default.cores.0",  # numbers inside an adapter do not make a block
             "classifier.weight", "model.layers.3.mlp.up_proj.splice.task.lora_A",
             "encoder.block.2.layer.1.SelfAttention.q.splice.default.lora_A",
             "decoder.block.2.layer.1.SelfAttention.q.splice.default.lora_A", "layers.0.weight"]
    blocks, outside = layer_blocks(names)
    assert list(blocks) == ["bert.encoder.layer.0", "bert.encoder.layer.11", "model.layers.3", "encoder.block.2",
                            "decoder.block.2", "layers.0"]
    assert blocks["bert.encoder.layer.0"] == names[:2]
    assert outside == ["bert.pooler.dense.splice.default.cores.0", "classifier.weight"]
    assert block_of("transformer.h.7.attn.c_attn.splice.default.lora_A") == "transformer.h.7"


def test_without_numbered_blocks_each_adapter_host_is_a_block():
    """Layers as attributes (fc1, fc2) or a top-level nn.Sequential (0., 1.): one block per
    adapter host module; a head trained in full stays outside."""
    names = ["fc1.splice.default.lora_A", "fc1.splice.default.lora_B", "fc2.splice.default.lora_A",
             "classifier.weight"]
    assert layer_blocks(names) == ({"fc1": names[:2], "fc2": names[2:3]}, ["classifier.weight"])
    sequential = ["0.splice.default.lora_A", "2.splice.default.lora_A", "4.weight"]
    assert layer_blocks(sequential) == ({"0": sequential[:1], "2": sequential[1:2]}, ["4.weight"])
    assert layer_blocks(["classifier.weight"]) == ({}, ["classifier.weight"])


# ---------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("gast-bert"))


def sentiment(tmp_path: Path) -> tuple[str, str]:
    words = (["bad", "awful", "dull", "poor"], ["good", "great", "fine", "superb"])
    generator = torch.Generator().manual_seed(0)
    paths = []
    for name, n in (("train", 48), ("val", 16)):
        rows = []
        for _ in range(n):
            label = int(torch.randint(0, 2, (1,), generator=generator))
            picks = torch.randint(0, 4, (int(torch.randint(2, 6, (1,), generator=generator)),), generator=generator)
            rows.append({"text": " ".join(words[label][i] for i in picks), "label": label})
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    return paths[0], paths[1]


def tiny_config(model_dir: Path, tmp_path: Path, **overrides) -> TrainConfig:
    train, val = sentiment(tmp_path)
    fields = {"model": str(model_dir), "data": train, "validation": val, "batch_size": 8, "max_steps": 4,
              "eval_every": 4, "lr": 1e-2, "output_dir": str(tmp_path / "run"),
              "selection": {"name": "gast", "layers": 1}} | overrides
    return TrainConfig(**fields)


def test_the_trainer_updates_only_the_chosen_blocks(tiny_bert_dir, tmp_path):
    """layers: 1 on a 2-layer model: after a step one block's LoRA moved, the other is bit for
    bit as it was, the head (outside any block) moved; the history says which block and how
    many samples each block kept; the run finishes and reports it."""
    trainer = Trainer.from_config(tiny_config(tiny_bert_dir, tmp_path), console=Console(quiet=True))
    rule = trainer.gradient_rule
    assert isinstance(rule, GAST) and rule.layers == 1
    for _ in range(2):
        before = trainer.snapshot()
        entry = trainer.step()
        after = trainer.snapshot()
        moved = {name for name in before if not torch.equal(before[name], after[name])}
        (chosen,) = entry["selection"]["layers"]
        block = rule.blocks[chosen]
        assert {n for n in moved if n.startswith("bert.encoder.layer.")} == {n for n in before if n.startswith(block)}
        assert {"classifier.weight", "classifier.bias"} <= moved
        assert entry["selection"]["rows"] == 8 and entry["selection"]["kept"] == [0.5, 0.5]
        assert rule.steps[-1] == entry["selection"]
    result = trainer.fit()
    assert result.status == "finished" and len(rule.steps) == 4
    saved = json.loads((Path(trainer.config.output_dir) / "metrics.json").read_text())
    assert all("selection" in h for h in saved["history"])


def test_refresh_every_keeps_the_chosen_block_between_refreshes(tiny_bert_dir, tmp_path):
    config = tiny_config(tiny_bert_dir, tmp_path, selection={"name": "gast", "layers": 1, "refresh_every": 4,
                                                              "mode": "positive"})
    trainer = Trainer.from_config(config, console=Console(quiet=True))
    entries = [trainer.step() for _ in range(4)]
    assert len({tuple(e["selection"]["layers"]) for e in entries}) == 1
    # between refreshes only the chosen block's per-sample gradients are computed
    assert all(sum(k is not None for k in e["selection"]["kept"]) == 1 for e in entries[1:])


def test_a_causal_lm_trains_with_gast(tmp_path_factory, tmp_path):
    model_dir = save_tiny_llama(tmp_path_factory.mktemp("gast-llama"))
    rows = splice.assets.arithmetic_problems(24, seed=3)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(model=str(model_dir), task="causal_lm", data=str(data), max_length=48, batch_size=6,
                         max_steps=2, lr=1e-2, output_dir=str(tmp_path / "run"),
                         adapter={"method": "lora", "r": 4, "targets": "all-linear"},
                         selection={"name": "gast", "keep": 0.5, "score": "alignment"})
    trainer = Trainer.from_config(config, console=Console(quiet=True))
    entry = trainer.step()
    assert entry["loss"] is not None and entry["selection"]["layers"] == [0, 1]
    assert entry["selection"]["kept"] == [0.5, 0.5]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_a_batch_without_labelled_tokens_is_a_non_finite_step_as_in_plain_training(tmp_path_factory, tmp_path):
    """Prompts longer than max_length leave no labelled token: plain training's loss is NaN and
    the non-finite policy applies; GAST does the same (not a silent zero step). (Six of the eight
    rows are so, and a warning says it; were all of them, the run would be refused at the start.)"""
    model_dir = save_tiny_llama(tmp_path_factory.mktemp("gast-llama-unlabelled"))
    rows = [{"prompt": "one two three four five six seven eight nine ten", "completion": "yes"}] * 6 \
        + [{"prompt": "one", "completion": "yes"}] * 2
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for selection in (None, {"name": "gast"}):
        config = TrainConfig(model=str(model_dir), task="causal_lm", data=str(data), validation=str(data),
                             max_length=6, batch_size=2, max_steps=4, lr=1e-2, on_nonfinite="skip",
                             group_by_length=False, output_dir=str(tmp_path / f"{selection}"),
                             adapter={"method": "lora", "r": 4, "targets": "all-linear"}, selection=selection)
        with pytest.warns(UserWarning, match="no completion token left"):
            trainer = Trainer.from_config(config, console=Console(quiet=True))
        skipped = 0
        for _ in range(4):
            before = trainer.snapshot()
            entry = trainer.step()
            if entry["loss"] is None:
                skipped += 1
                assert entry["skipped"] == "loss nan", selection
                after = trainer.snapshot()
                assert all(torch.equal(before[n], after[n]) for n in before)
        assert skipped, selection


def test_resume_keeps_the_chosen_block_between_refreshes(tiny_bert_dir, tmp_path):
    """refresh_every 4, checkpoint at step 2: the resumed run keeps the block chosen at step 0
    and the validation reference taken then, and ends where the whole run ends."""
    selection = {"name": "gast", "layers": 1, "refresh_every": 4, "reference": "validation"}

    def config(out: str) -> TrainConfig:
        return tiny_config(tiny_bert_dir, tmp_path, output_dir=str(tmp_path / out), max_steps=6, eval_every=100,
                           checkpoint_every=2, selection=selection)

    whole = Trainer.from_config(config("whole"), console=Console(quiet=True))
    whole_entries = [whole.step() for _ in range(6)]
    first = Trainer.from_config(config("split"), console=Console(quiet=True))
    for _ in range(2):
        first.step()
    del first
    resumed = Trainer.from_config(config("split"), console=Console(quiet=True), resume=True)
    resumed_entries = [resumed.step() for _ in range(4)]
    assert [e["selection"] for e in resumed_entries] == [e["selection"] for e in whole_entries[2:]]
    assert resumed.gradient_rule.steps == whole.gradient_rule.steps
    expected, got = whole.snapshot(), resumed.snapshot()
    assert all(torch.equal(expected[n], got[n]) for n in expected)


@pytest.mark.parametrize("option", [{"packing": True, "task": "causal_lm"}, {"gradient_checkpointing": True}])
def test_what_gast_cannot_do_is_refused_by_the_config(option):
    with pytest.raises(ConfigError, match=f"selection 'gast' takes per-sample gradients.*{next(iter(option))}") as err:
        TrainConfig(model="smollm2", selection={"name": "gast"}, **option)
    assert err.value.key == "selection"


# -------------------------------------------------------------------------------- options


@pytest.mark.parametrize(("options", "message"), [
    ({"keep": 0}, r"keep .* \(0, 1\]; got 0"),
    ({"keep": 1.5}, r"keep .*got 1.5"),
    ({"keep": "half"}, r"keep .*got 'half'"),
    ({"mode": "all"}, r"mode must be one of top, positive; got 'all'"),
    ({"layers": 0}, r"layers .*got 0"),
    ({"layers": 2.5}, r"layers .*got 2.5"),
    ({"layers": True}, r"layers .*got True"),
    ({"score": "loss"}, r"score must be one of norm, alignment; got 'loss'"),
    ({"reference": "test"}, r"reference must be one of direction, batch, validation; got 'test'"),
    ({"refresh_every": 0}, r"refresh_every .*got 0"),
    ({"rho": 0.5}, r"no option \['rho'\]; its options: .*'keep'"),
])
def test_bad_options_are_refused_with_the_option_and_value(options, message):
    with pytest.raises(SpliceError, match=message):
        gradient_rule({"name": "gast", **options})


def test_a_config_with_a_bad_gast_option_names_the_field():
    with pytest.raises(ConfigError, match="keep") as err:
        TrainConfig(selection={"name": "gast", "keep": 2})
    assert err.value.key == "selection"


# --------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_minilm_on_rotten_tomatoes_rows(minilm):
    """Real MiniLM weights, LoRA r=8 on query/value and the head, 8 real reviews padded: the
    vmapped per-sample gradients equal a loop over the reviews one by one, and GAST selects per
    layer over the 6 real blocks."""
    rows = splice.assets.dataset("rotten_tomatoes").train[:8]
    tokenizer = minilm_tokenizer()
    batch = dict(tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=48,
                           return_tensors="pt"))
    batch["labels"] = torch.tensor([r["label"] for r in rows])
    assert (batch["attention_mask"] == 0).any()
    splice.attach(minilm, splice.LoRA(r=8, targets=["query", "value"], train_also=["classifier"]))
    randomize(minilm, scale=0.05)
    params = splice.trainable_parameters(minilm)
    vmapped = per_sample_gradients(minilm, params, batch, "classification")
    for i, expected in enumerate(loop_gradients(minilm, batch, "classification")):
        for name, grad in expected.items():
            assert_close(vmapped.grads[name][i], grad, rel=1e-4)
    blocks, outside = layer_blocks(list(params))
    assert len(blocks) == 6 and outside == ["classifier.weight", "classifier.bias"]
    selection = GAST(layers=2).select(vmapped, blocks, outside)
    assert len(selection.chosen) == 2 and all(int(k.sum()) == 4 for k in selection.kept.values())
    assert set(selection.updates) == {n for b in selection.chosen for n in blocks[b]} | set(outside)


def test_a_validation_reference_and_gradient_accumulation(tiny_bert_dir, tmp_path):
    """reference: validation aligns with a clean held-out batch's gradient; with grad_accum 2 a
    step's record covers both batches (16 rows)."""
    config = tiny_config(tiny_bert_dir, tmp_path, grad_accum=2,
                         selection={"name": "gast", "reference": "validation", "keep": "5e-1"})
    trainer = Trainer.from_config(config, console=Console(quiet=True))
    assert trainer.gradient_rule.keep == 0.5
    entry = trainer.step()
    assert entry["selection"]["rows"] == 16 and entry["selection"]["layers"] == [0, 1]
    assert trainer.gradient_rule._reference is not None
