"""Review of BoostLoRA (commit d8aa839): TinyLoRA, the `BoostRounds` engine, `boostlora()` with
the trainer, its config/CLI reading, and `correct_rows`. Each test pins a defect found in review:
it fails on the reviewed commit and passes once the defect is fixed (where two fixes are
reasonable, e.g. refuse an input or honour it, the test accepts either)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import make_bert, make_gpt2, minilm_tokenizer, randomize, save_tiny_bert, sentiment_rows
from rich.console import Console
from torch import nn

import splice
from splice.boost.boostlora import BoostSettings, _places, boostlora, read_boost_config
from splice.boost.rounds import BoostRounds
from splice.core.errors import ConfigError, OutputExistsError, SpliceError
from splice.core.host import hosts
from splice.train import TrainConfig, Trainer, tasks
from splice.train.adapters import adapter_parameters
from splice.train.data import load_splits
from splice.train.evaluation import correct_rows
from splice.train.optimizers import make_optimizer

QUIET = Console(quiet=True)


# -- fixtures: the tiny BERT folder and the word-list sentiment rows as files -----------------


def _write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> str:
    return str(save_tiny_bert(tmp_path_factory.mktemp("review-boost-bert"), dropout=0.0))


@pytest.fixture
def config(tiny_bert_dir, tmp_path) -> TrainConfig:
    """LoRA's places (query, value) on the tiny random BERT (which learns nothing in a TinyLoRA
    round, so every round is undone), 96 training and 48 validation rows, 12 steps."""
    return TrainConfig(model=tiny_bert_dir, data=_write_rows(tmp_path / "train.jsonl", sentiment_rows(96, 1)),
                       validation=_write_rows(tmp_path / "val.jsonl", sentiment_rows(48, 2)), batch_size=8,
                       max_steps=12, lr=5e-2, head_lr=5e-2, output_dir=str(tmp_path / "boost"),
                       adapter={"method": "lora", "r": 4, "targets": ["query", "value"]})


# -- config and CLI inputs accepted silently ---------------------------------------------------


def test_steps_per_round_zero_is_refused_not_read_as_the_default():
    """boostlora.py:88 checks `steps_per_round or 1`, so 0 passes validation, and boostlora.py:193
    (`steps_per_round or ...`) then silently runs the default budget instead."""
    with pytest.raises(SpliceError, match="steps_per_round"):
        BoostSettings(steps_per_round=0)


def test_a_boost_section_that_is_not_a_mapping_is_refused(tmp_path):
    """`BoostSettings.from_dict` refuses a non-mapping ('boost must be a mapping of settings'), but
    read_boost_config (boostlora.py:117) first does `fields.pop("boost") or {}`: `boost: false`
    (or `[]`, `0`, `""`) boosts with every default instead."""
    path = tmp_path / "boost.yaml"
    path.write_text(yaml.safe_dump({"model": "minilm", "data": "rotten_tomatoes", "boost": False}))
    with pytest.raises(ConfigError, match="boost must be a mapping"):
        read_boost_config(path)


def test_set_r_on_the_command_line_is_not_silently_ignored(tmp_path):
    """`splice boostlora CFG --set r=3` (the way `splice train` sets a rank) goes to the config's
    LoRA mapping, which boostlora only reads for its places: the run boosts at r=1 with no word.
    It should set the boost's r or be refused (pointing at --r)."""
    path = tmp_path / "boost.yaml"
    path.write_text(yaml.safe_dump({"model": "minilm", "data": "rotten_tomatoes",
                                    "adapter": {"method": "lora", "targets": ["query", "value"]}}))
    with pytest.raises(ConfigError, match=r"'r' cannot be used: each round is a TinyLoRA set by boost:"):
        read_boost_config(path, settings={"r": 3})


def test_init_adapter_is_refused_or_used_not_silently_dropped(config, tmp_path):
    """boostlora.py:245 replaces the config's `init_adapter` by None: a config that starts from a
    trained adapter boosts the bare base instead, with no word. Either refuse it naming the
    field, or start the rounds from it (then the boosted model is not the bare base)."""
    splits = load_splits(config)
    model, _ = tasks.load_model(config, splits.label_names)
    splice.attach(model, splice.LoRA(r=2, targets=["query", "value"]))
    randomize(model, scale=0.5)
    init = splice.save(model, tmp_path / "init-adapter")
    with pytest.raises(SpliceError, match="init_adapter: .*merge it into the model first"):
        boostlora(dataclasses.replace(config, init_adapter=str(init)), rounds=1, steps_per_round=2, console=QUIET)
    assert not Path(config.output_dir).exists()


def test_save_format_peft_is_refused_before_any_work_or_honoured(config):
    """`save_format: peft` (each round's TinyLoRA cannot be written in PEFT's format) is only
    refused by the first round's trainer, after its run folder is written, with a message about
    an adapter named 'boost' the user never named (boostlora.py:243-249)."""
    config = dataclasses.replace(config, save_format="peft")
    with pytest.raises(SpliceError, match="save_format: 'peft'"):
        boostlora(config, rounds=1, steps_per_round=1, console=QUIET)
    assert not Path(config.output_dir).exists(), "refused only after the run folder was written"


# -- the engine: state after keep / undo, refusals ---------------------------------------------


def test_a_keep_whose_merge_fails_leaves_no_phantom_round_in_the_engine():
    """end(keep=True) (rounds.py:238-244) appends the round's factors and heads to the engine
    before splice.unload merges; when the merge is refused (a tied or 4-bit weight, a
    non-finite sum) the model is unchanged but the engine keeps the factors: after undoing the
    round, ranks() and adapter_state() describe a change the model does not have."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    engine = BoostRounds(model, r=1, u=1, targets=["0"], max_rounds=3)
    with torch.no_grad():
        engine.begin()["0"].v.fill_(float("inf"))  # a diverged round: the merge refuses inf weights
    with pytest.raises(SpliceError):
        engine.end(keep=True)
    engine.end(keep=False)  # the round is still open: undo it
    assert engine.kept == 0
    assert engine.updates == {}, "the refused round's factors are still recorded"
    with pytest.raises(SpliceError, match="no BoostLoRA round was kept"):
        engine.adapter_state()


@pytest.mark.parametrize("case", ["tied", "4-bit"])
def test_a_target_that_cannot_take_a_merge_is_refused_before_the_round_trains(case):
    """Every kept BoostLoRA round is merged: GPT-2's lm_head (tied to wte) and a 4-bit base are
    refused by begin(), before any training, and the refused round leaves no adapter behind."""
    from helpers import make_llama

    if case == "tied":
        model, targets, reason = make_gpt2(), ["lm_head"], "tied to"
    else:
        model, targets, reason = splice.quantize(make_llama(), "nf4", backend="torchao"), ["q_proj"], "quantized"
    engine = BoostRounds(model, r=2, u=2, targets=targets, max_rounds=2)
    with pytest.raises(SpliceError, match=reason):
        engine.begin()
    assert not splice.adapters(model) and engine.started == 0 and not engine.open


def test_on_a_bf16_base_kept_rounds_are_not_rounded_away_one_by_one():
    """end(keep=True) merges each round into the current bf16 weight (rounds.py:244): W_k =
    bf16(W_{k-1} + dW_k). A TinyLoRA round's change is a few numbers' worth, often below half a
    bf16 ulp of W, so each kept round rounds away to nothing: after 8 kept rounds the boosted
    model is bit-identical to W0, while ranks() says 8 and the saved LoRA (the same change,
    rounded once: bf16(W0 + sum dW_k)) changes the weights. Accumulating the change in fp32 from
    W0 (or keeping an fp32 master) would merge it."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12, bias=False))
    with torch.no_grad():  # entries of magnitude in [1, 2): half a bf16 ulp is 2^-8 = 0.0039
        model[0].weight.copy_((1 + torch.rand(12, 16, generator=generator))
                              * torch.sign(torch.randn(12, 16, generator=generator)))
    model = model.to(torch.bfloat16)
    W0 = model[0].weight.detach().clone()
    engine = BoostRounds(model, r=1, u=1, targets=["0"], max_rounds=8)
    for _ in range(8):
        adapter = engine.begin()["0"]
        with torch.no_grad():
            adapter.v.fill_(1.0)
            adapter.v.mul_(0.0038 / adapter.delta_weight().abs().max())  # each round: |dW| <= 0.0038
        engine.end(keep=True)
    B, A = engine.factors("0")
    once = (W0.float() + B @ A).to(torch.bfloat16)
    assert engine.ranks() == {"0": 8} and not torch.equal(once, W0)  # the change is there, and visible in bf16
    assert not torch.equal(model[0].weight, W0), "8 kept rounds, yet the boosted bf16 weight is W0 bit for bit"


class _Stacked(nn.Module):
    """Module paths with two numbers, `body.stack.N.layer.M.proj`: PEFT's default layer index is
    N, with layers_pattern="layer" it is M."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Module()
        self.body.stack = nn.ModuleList(
            nn.ModuleDict({"layer": nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(8, 8)}) for _ in range(2))})
            for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.body.stack:
            for sub in block["layer"]:
                x = sub["proj"](x)
        return x


def test_the_rounds_go_where_the_configs_adapter_goes_layers_pattern_included():
    """boostlora takes the places of the config's adapter (`_places`, boostlora.py:291-293) but
    drops `layers_pattern` (and BoostRounds, rounds.py:172, cannot take it): with layers=[1],
    layers_pattern="layer" the rounds adapt other modules than the config's LoRA would."""
    torch.manual_seed(0)
    lora = splice.LoRA(r=2, targets="all-linear", layers=[1], layers_pattern="layer")
    reference = _Stacked()
    splice.attach(reference, lora)
    expected = {name for name, _, _ in hosts(reference)}
    assert expected == {"body.stack.0.layer.1.proj", "body.stack.1.layer.1.proj"}
    engine = BoostRounds(_Stacked(), r=1, u=1, **_places(lora))
    assert set(engine.begin()) == expected


# -- boostlora() with the trainer: rounds, the trainer path, the output folder ----------------


def test_round_0_on_every_row_holds_until_a_round_is_kept(config):
    """first_round_all exists because 'the mistakes of a model with a fresh classification head
    are noise, often a whole class, and training on them alone teaches the head that class'
    (boostlora.py:7-9). But boostlora.py:202 tests `engine.started == 0`: when round 0 is undone,
    round 1 trains on exactly those mistakes of the fresh-head model."""
    result = boostlora(config, rounds=2, r=2, u=4, patience=2, console=QUIET)
    first, second = result.rounds
    assert not first.kept  # the model is still the one with the fresh head
    assert second.trained_rows == 96, f"round 1 trained on {second.trained_rows} mined rows of the fresh-head model"


def test_a_refused_boostlora_leaves_the_trainers_adapter_in_place(config):
    """_setup (boostlora.py:277-279) detaches the trainer's adapter before check_output_dir
    (boostlora.py:192) refuses the run folder: a refused call (the trainer's own folder is not
    empty, e.g. after trainer.fit()) has already thrown away the adapter the trainer trained."""
    trainer = Trainer.from_config(config, console=QUIET)
    Path(config.output_dir).mkdir(parents=True)
    (Path(config.output_dir) / "metrics.json").write_text("{}")
    with pytest.raises(OutputExistsError):
        boostlora(trainer, rounds=2, console=QUIET)
    assert "default" in splice.adapters(trainer.plain_model), "the refused call detached the trainer's adapter"


def test_overwrite_replaces_the_run_folder_leaving_nothing_of_an_earlier_run(config):
    """overwrite=True (--force) only lets check_output_dir pass; boostlora then writes
    rounds/round-k, adapter/ and report/ into the old folder (boostlora.py:192, 228, 230). An
    earlier run's extra rounds stay, and its adapter/ stays when this run keeps no round (a LoRA
    file beside a report that says no round was kept). io.output_dirs promises the folder is
    replaced as a whole."""
    out = Path(config.output_dir)
    (out / "rounds" / "round-5").mkdir(parents=True)
    (out / "rounds" / "round-5" / "metrics.json").write_text("{}")
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_config.json").write_text("{}")
    result = boostlora(config, rounds=1, steps_per_round=1, console=QUIET, overwrite=True)
    assert not (out / "rounds" / "round-5").exists(), "an earlier run's round is left in rounds/"
    assert result.adapter is not None or not (out / "adapter").exists(), \
        "no round was kept, yet an earlier run's adapter/ is left in the folder"


def test_an_interrupted_run_does_not_send_the_user_to_resume_one_round_with_splice_train(config, monkeypatch):
    """A SIGINT in round k surfaces the round trainer's TrainingInterrupted unchanged (boostlora.py:249):
    'Continue with: splice train --resume <out>/rounds/round-k'. That resumes round k's TinyLoRA
    alone on a freshly loaded base (without the rounds already merged, which lived only in
    memory), and never continues the boosting, writes adapter/ or the report. boostlora has no
    resume, so the message should say how to go on with boostlora (or that it cannot)."""
    monkeypatch.setattr(Trainer, "interrupt_requested", property(lambda self: self.state.step >= 1))
    with pytest.raises(SpliceError) as caught:
        boostlora(config, rounds=2, steps_per_round=3, console=QUIET)
    assert "splice train --resume" not in str(caught.value), str(caught.value)


# -- TinyLoRA and correct_rows: docstrings vs behaviour ----------------------------------------


def test_loft_refuses_a_model_whose_only_adapter_is_tinylora_as_its_docstring_says():
    """TinyLoRA trains v, not factors: LoFT has no pair to step and refuses with a message that
    says what it needs (the docstring once claimed LoFT stepped v as AdamW)."""
    model = make_bert()
    splice.attach(model, splice.TinyLoRA(r=2, u=3, targets=["query", "value"]))
    trained = adapter_parameters(model, "default")
    with pytest.raises(SpliceError, match="LoRA-shaped"):
        make_optimizer("loft", model, trained, [], lr=1e-2, head_lr=None, weight_decay=0.0, max_grad_norm=1.0)


def test_correct_rows_does_not_ask_a_causal_lm_to_stop_after_the_completion_as_documented():
    """correct_rows' docstring (evaluation.py:102-105): teacher forcing and greedy exact match
    'agree except that this does not ask the generation to stop after the completion'. But the
    collator appends eos to every completion's labels, so a model that gets every completion
    token right and then does not emit eos is counted wrong (and mined as an error), while greedy
    exact match (first line, special tokens skipped) counts it right."""
    tokenizer = minilm_tokenizer()
    tokenizer.eos_token = "[SEP]"

    class NoStop(nn.Module):
        """Predicts each next token of its input, except eos: there it predicts [CLS]."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1))

        def forward(self, input_ids: torch.Tensor, attention_mask=None, **kwargs) -> SimpleNamespace:
            nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], 1)
            nxt = torch.where(nxt == tokenizer.eos_token_id, torch.full_like(nxt, tokenizer.cls_token_id), nxt)
            return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, tokenizer.vocab_size).float())

    rows = [{"prompt": "add one and two", "completion": "three"}, {"prompt": "add two and two", "completion": "four"}]
    config = TrainConfig(model="/unused", task="causal_lm", data="unused.jsonl", output_dir="/unused", batch_size=2)
    assert correct_rows(NoStop(), tokenizer, rows, config).all()
