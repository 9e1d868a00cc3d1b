"""Review of GAST (selection: {name: gast}) and SEA-PEFT (splice autoconfig): each test pins a
defect found in review (commit 99a8753); it fails now and passes once the defect is fixed."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_llama, randomize, save_tiny_bert
from rich.console import Console
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

import splice
from splice.core.errors import ConfigError, SpliceError
from splice.selection.gast import GAST, layer_blocks, per_sample_gradients
from splice.selection.sea_peft import SeaPeftConfig, Search, finetune
from splice.selection.sea_peft_allocation import Unit, allocate
from splice.train import TrainConfig, Trainer
from splice.train.data import load_splits
from splice.train.report import claim_run_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "selection"))
from sea_peft_toy import BUCKETS, Gated, branch_space, sentiment_rows, toy_config  # noqa: E402

# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("review-gast-bert"), dropout=0.0)


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def bert_config(model_dir: Path, tmp_path: Path, out: str = "run", train: int = 48, val: int = 16,
                **overrides) -> TrainConfig:
    fields = {"model": str(model_dir), "data": write_rows(tmp_path / "train.jsonl", sentiment_rows(train, 1)),
              "validation": write_rows(tmp_path / "val.jsonl", sentiment_rows(val, 2)), "batch_size": 8,
              "max_length": 16, "max_steps": 4, "eval_every": 100, "lr": 1e-2, "seed": 0,
              "output_dir": str(tmp_path / out), "selection": {"name": "gast"}} | overrides
    return TrainConfig(**fields)


class TwoLayers(nn.Module):
    """A plain classifier (no transformers) whose layers are attributes, not a numbered list;
    `smoothing` > 0 makes its own loss label-smoothed cross-entropy."""

    def __init__(self, smoothing: float = 0.0, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.smoothing = smoothing
        self.embed = nn.Embedding(BUCKETS, dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, 2)

    def forward(self, input_ids, attention_mask=None, labels=None, **_):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        x = (self.embed(input_ids % BUCKETS) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        logits = self.classifier(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        loss = None if labels is None else F.cross_entropy(logits, labels, label_smoothing=self.smoothing)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class Numbered(TwoLayers):
    """The same network with its two layers in a numbered list (`layers.0`, `layers.1`)."""

    def __init__(self, smoothing: float = 0.0) -> None:
        super().__init__(smoothing)
        self.layers = nn.ModuleList([self.fc1, self.fc2])
        del self.fc1, self.fc2

    def forward(self, input_ids, attention_mask=None, labels=None, **_):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        x = (self.embed(input_ids % BUCKETS) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        logits = self.classifier(torch.tanh(self.layers[1](torch.tanh(self.layers[0](x)))))
        loss = None if labels is None else F.cross_entropy(logits, labels, label_smoothing=self.smoothing)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def toy_trainer(model: nn.Module, targets: list[str], tmp_path: Path, selection: dict | None,
                tokenizer) -> Trainer:
    config = TrainConfig(model="toy", data=sentiment_rows(32, 1), validation=sentiment_rows(16, 2), batch_size=8,
                         max_length=16, lr=1e-2, max_steps=2, seed=0, output_dir=str(tmp_path / "toy-run"),
                         selection=selection)
    splice.attach(model, splice.LoRA(r=2, targets=targets, train_also=["classifier"]))
    randomize(model, scale=0.2)
    return Trainer(model, tokenizer, config, splits=load_splits(config), console=Console(quiet=True))


@pytest.fixture(scope="module")
def tokenizer():
    from helpers import minilm_tokenizer

    return minilm_tokenizer()


# ----------------------------------------------------------------------------------- GAST


def test_gast_validation_reference_with_grad_accum_takes_every_optimizer_step(tiny_bert_dir, tmp_path):
    """reference: validation draws one validation batch per step from the accelerate-prepared
    loader and leaves its iterator open: accelerate's GradientState then takes the validation
    loader as the active one and decides `sync_gradients` from it. With grad_accum 2 and an odd
    number of batches per epoch (40 rows / 8), the trainer's own count calls optimizer_step on
    batches where accelerate says "not synced": AcceleratedOptimizer.step and zero_grad are then
    no-ops, so whole steps silently do not move the adapter and gradients leak into the next
    step (here steps 6 and 7). Fix: draw the reference batch from a loader accelerate does not
    track (e.g. a plain DataLoader over `trainer.eval_rows['validation']` moved to the device,
    or the prepared loader's `base_dataloader`)."""
    config = bert_config(tiny_bert_dir, tmp_path, train=40, grad_accum=2, max_steps=8, eval_every=2,
                         selection={"name": "gast", "reference": "validation"})
    trainer = Trainer.from_config(config, console=Console(quiet=True))
    stuck = []
    for _ in range(8):
        before = trainer.snapshot()
        entry = trainer.step()
        after = trainer.snapshot()
        leftover = [n for n, p in trainer.trained.items() if p.grad is not None]
        if all(torch.equal(before[n], after[n]) for n in before) or leftover:
            stuck.append(entry["step"])
    assert stuck == [], f"optimizer steps that did not update (gradients left behind): {stuck}"


def test_gast_resume_continues_as_the_uninterrupted_run(tiny_bert_dir, tmp_path):
    """`resume` promises the run it would have been had it never stopped. GAST keeps state that
    the checkpoint does not hold: with reference: validation the position in the validation
    split (the resumed run starts again from its first batch; 3 batches here), and with
    refresh_every the chosen blocks and when they were chosen. Fix: register the rule's state
    (validation cursor, chosen blocks, chosen_at) for checkpointing, or derive the validation
    batch from the step number."""
    selection = {"name": "gast", "reference": "validation"}

    def config(out):
        return bert_config(tiny_bert_dir, tmp_path, out=out, val=24, max_steps=4, checkpoint_every=2,
                           selection=selection)

    whole = Trainer.from_config(config("whole"), console=Console(quiet=True))
    for _ in range(4):
        whole.step()
    first = Trainer.from_config(config("split"), console=Console(quiet=True))
    for _ in range(2):
        first.step()
    del first
    resumed = Trainer.from_config(config("split"), console=Console(quiet=True), resume=True)
    for _ in range(2):
        resumed.step()
    expected, got = whole.snapshot(), resumed.snapshot()
    assert all(torch.equal(expected[n], got[n]) for n in expected), max(
        float((expected[n] - got[n]).abs().max()) for n in expected)


def test_gast_trains_a_plain_module_whose_layers_are_attributes(tmp_path, tokenizer):
    """The library's methods work on any nn.Module, but GAST only finds layer blocks in names
    with a number after a named segment (`layer.3`): a model whose layers are `fc1`, `fc2` (or
    a root nn.Sequential: `0.`, `1.`) is refused with "found no layer block" at its first step.
    Fix: where no numbered block exists, make each adapter host module (the parameter path up
    to `.splice.`) its own block."""
    trainer = toy_trainer(TwoLayers(), ["fc1", "fc2"], tmp_path, {"name": "gast", "layers": 1}, tokenizer)
    entry = trainer.step()
    assert len(trainer.gradient_rule.blocks) >= 2  # fc1 and fc2 apart
    assert len(entry["selection"]["layers"]) == 1


def test_gast_optimizes_the_models_own_loss(tmp_path, tokenizer):
    """The trainer's task loss is `model(**batch).loss` (here label-smoothed cross-entropy); GAST
    replaces it by plain cross-entropy of the logits, so with keep=1 (every sample kept, every
    block updated: the batch mean gradient) it neither reports the loss plain training reports
    nor follows its gradient. Fix: take each sample's loss from the model's own `.loss` on the
    batch of one that vmap runs (falling back to `sample_losses` only where the model returns
    no loss)."""
    def first_step(selection):
        trainer = toy_trainer(Numbered(smoothing=0.3), ["layers.0", "layers.1"], tmp_path, selection, tokenizer)
        grads = {}
        for name, p in trainer.trained.items():
            p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.clone()))
        entry = trainer.step()
        return entry["loss"], grads

    plain_loss, plain = first_step(None)
    gast_loss, gast = first_step({"name": "gast", "keep": 1.0})
    assert gast_loss == pytest.approx(plain_loss, rel=1e-5)
    for name, grad in plain.items():
        torch.testing.assert_close(gast[name], grad, rtol=1e-4, atol=1e-7)


def test_gast_rows_without_labelled_tokens_do_not_dilute_the_update():
    """Causal LM: a row whose labels are all -100 (a prompt longer than max_length, say) has no
    loss; plain training ignores it. GAST counts it as a sample with a zero gradient: with
    keep=1 it is "kept" and divides the block means, and the outside parameters' mean is over
    all rows, so appending such a row shrinks every update (here by 2/3). Fix: give rows of
    weight 0 no vote (leave them out of the reference, the kept set and the means)."""
    model = make_llama()
    splice.attach(model, splice.LoRA(r=4, targets="all-linear", train_also=["model.norm"]))
    randomize(model)
    model.train()
    ids = torch.randint(1, 97, (3, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[2] = -100
    params = splice.trainable_parameters(model)
    blocks, outside = layer_blocks(list(params))
    assert outside == ["model.norm.weight"]
    rule = GAST(keep=1.0)
    two = rule.select(per_sample_gradients(model, params, {"input_ids": ids[:2], "labels": labels[:2]},
                                           "causal_lm"), blocks, outside)
    three = rule.select(per_sample_gradients(model, params, {"input_ids": ids, "labels": labels}, "causal_lm"),
                        blocks, outside)
    for name, update in two.updates.items():
        torch.testing.assert_close(three.updates[name], update, rtol=1e-4, atol=1e-7)


def test_gast_with_a_quantized_base_is_refused_up_front(tiny_bert_dir, tmp_path):
    """quantize: nf4 (QLoRA) with selection gast passed the config, loaded, evaluated, and then
    failed at the first step: torchao's NF4 linear is an autograd.Function without the
    setup_context torch.func needs ("it must override the setup_context staticmethod"), which
    tells the user nothing to change. TrainConfig now refuses selection with quantize, as it
    refuses packing and gradient_checkpointing (key "selection", naming quantize)."""
    with pytest.raises(ConfigError, match="quantize") as err:
        bert_config(tiny_bert_dir, tmp_path, quantize="nf4", max_steps=1, selection={"name": "gast", "layers": 1})
    assert err.value.key == "selection"


# -------------------------------------------------------------------------------- SEA-PEFT


def test_allocate_keeps_an_active_unit_when_the_better_unit_of_its_group_does_not_fit():
    """Hysteresis: an active unit stays while its value is >= drop_below. Here the active unit
    `a` (value 0.5, 50 parameters) fits the budget beside `c`, but its group's best candidate
    `b` (0.6, 80 parameters) does not fit after `c`: the group takes nothing and `a` is
    dropped for no unit at all, leaving 60 of 100 parameters unused. Fix: when the group's best
    does not fit, fall back to the group's next allowed unit (greedy over all allowed units,
    one per group)."""
    units = [Unit("a", "s", "lora", 50), Unit("b", "s", "lora", 80), Unit("c", "t", "lora", 40)]
    values = {"a": 0.5, "b": 0.6, "c": 0.7}
    chosen = allocate(units, values, active={"a", "c"}, budget=100)
    assert chosen == {"a", "c"}


def test_sea_peft_search_with_a_gast_training_config_runs_or_is_refused(tmp_path, tokenizer):
    """An autoconfig YAML may carry `selection: {name: gast, layers: 1}` (TrainConfig accepts it
    and the search keeps it). GAST then computes per-sample gradients for every parameter the
    trainer was built with, inactive and probe-frozen units included; during a probe it can
    choose the block of a frozen active unit, whose parameters do not require grad, and
    `accelerator.backward` of its surrogate raises a raw "element 0 of tensors does not require
    grad". Fix: refuse `selection` in SEA-PEFT (Search / read_autoconfig), or let GAST compute
    and choose among the trained parameters that require grad at this step only."""
    config = toy_config(tmp_path, selection={"name": "gast", "layers": 1})
    try:
        search = Search(Gated(live=6, seed=0), tokenizer, config, branch_space(initial="fill", audit_fraction=0.5),
                        splits=load_splits(config), heads=[])
    except SpliceError:
        return  # refused up front: acceptable
    selection = search.run()
    assert len(selection.audits) == 5


def test_sea_peft_yaml_reads_numbers_in_exponent_notation(tmp_path):
    """PyYAML (YAML 1.1) reads `-2e-2` and `5e-1` as strings; TrainConfig and GAST turn them into
    numbers, SEA-PEFT refuses them ("drop_below must be a number, got '-2e-2'"), though the user
    wrote a number. Fix: coerce such strings as TrainConfig does (`_YAML_FLOAT`)."""
    from splice.selection.autoconfig import read_autoconfig

    data = write_rows(tmp_path / "train.jsonl", sentiment_rows(8, 1))
    path = tmp_path / "job.yaml"
    path.write_text(f"model: toy\ndata: {data}\nlr: 1e-3\nsea_peft:\n  budget: 1000\n  drop_below: -2e-2\n"
                    "  audit_fraction: 5e-1\n  ema: 9e-1\n")
    train, space = read_autoconfig(path)
    assert train.lr == pytest.approx(1e-3)
    assert space.drop_below == pytest.approx(-0.02) and space.audit_fraction == pytest.approx(0.5)
    assert space.ema == pytest.approx(0.9)


@pytest.mark.parametrize(("fields", "key"), [
    ({"seed": "abc"}, "seed"),  # np.random.default_rng("abc"): a TypeError traceback after the model loads
    ({"seed": -1}, "seed"),  # numpy refuses negative seeds: a ValueError traceback
    ({"seed": 1.5}, "seed"),
    ({"audit_fraction": True}, "audit_fraction"),  # a bool passes as 1
    ({"ema": False}, "ema"),  # a bool passes as 0
])
def test_sea_peft_settings_are_checked_with_the_key_and_value(fields, key):
    """Every sea_peft setting is checked when the file is read, naming the key and the value;
    `seed` is not checked at all, and booleans pass the number checks of audit_fraction and
    ema. Fix: validate seed (None or an integer >= 0) and refuse bools in the number checks."""
    with pytest.raises(ConfigError, match=key) as err:
        SeaPeftConfig(budget=100, **fields)
    assert err.value.key == key


def test_finetune_of_mixed_forms_refuses_a_folder_another_run_holds(tiny_bert_dir, tmp_path, monkeypatch):
    """One exported mapping fine-tunes through `splice.train.run`, which locks the folder and
    refuses one a live run holds even with force. Mixed forms skip that: `check_output_dir`
    only, no lock, so `finetune(..., force=True)` (what autoconfig always passes) trains into
    a folder another run is writing. Fix: claim the folder with `claim_run_dir` (held for the
    run) in the mixed path too."""
    import splice.train.tasks as tasks

    class Reached(Exception):
        pass

    def load_model(*args, **kwargs):
        raise Reached("finetune went on to load the model into a folder another run holds")

    monkeypatch.setattr(tasks, "load_model", load_model)
    out = tmp_path / "busy"
    holder = claim_run_dir(out)
    try:
        config = bert_config(tiny_bert_dir, tmp_path, out="busy", selection=None, max_steps=1)
        adapters = {"lora": {"method": "lora", "r": 2, "targets": ["bert.encoder.layer.0.attention.self.query"]},
                    "loreft": {"method": "loreft", "r": 2, "targets": ["bert.encoder.layer.0"]}}
        try:
            finetune(config, adapters, console=Console(quiet=True), force=True)
        except Reached as err:
            pytest.fail(str(err))
        except SpliceError:
            pass  # refused: what `splice.train.run` does ("... is in use by another training run")
        else:
            pytest.fail("finetune returned")
    finally:
        holder.release()


def test_autoconfig_force_does_not_wipe_a_folder_a_live_run_holds(tmp_path, monkeypatch):
    """`--force` removes the whole output folder (shutil.rmtree) before the search, without
    taking or checking the run-folder lock: a folder a live `splice train` (or another
    autoconfig's fine-tune) holds is wiped under it, lock file included. `splice train --force`
    refuses such a folder ("in use by another training run"). Fix: claim the folder (or check
    for a live lock in it and its run sub-folders) before replacing it, and hold it during the
    search and fine-tune."""
    import splice.selection.autoconfig as autoconfig_module

    class Reached(Exception):
        pass

    def search(*args, **kwargs):
        raise Reached("autoconfig went on to search in a folder another run holds")

    monkeypatch.setattr(autoconfig_module, "search", search)
    data = write_rows(tmp_path / "train.jsonl", sentiment_rows(8, 1))
    path = tmp_path / "job.yaml"
    path.write_text(f"model: toy\ndata: {data}\nsea_peft:\n  budget: 1000\n")
    out = tmp_path / "out"
    holder = claim_run_dir(out)
    (out / "adapter").mkdir()
    (out / "adapter" / "weights.bin").write_bytes(b"the live run's work")
    try:
        try:
            autoconfig_module.autoconfig(path, output_dir=out, force=True, console=Console(quiet=True))
        except Reached as err:
            pytest.fail(f"{err}; the folder now holds {sorted(p.name for p in out.iterdir())}")
        except SpliceError:
            pass  # refused
        assert (out / "adapter" / "weights.bin").is_file()
    finally:
        holder.release()
        shutil.rmtree(out, ignore_errors=True)
