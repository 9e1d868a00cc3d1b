"""Adversarial review of a user's day with `splice train` and its neighbours: the command line
(`splice.cli.train_cmd`, `adapter_cmds`, `hub_cmd`), the training config (`splice.train.config`),
data loading (`splice.train.data`), tasks and evaluation, the run folder and `--resume`.

Every test here fails on the reviewed code for the reason its docstring gives, and passes once
that is fixed. Each runs a tiny random-weight model on a few rows (seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import make_bert, minilm_tokenizer, sentiment_rows
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

import splice
from splice.cli.main import app
from splice.core.errors import ConfigError, DataError, SpliceError
from splice.train import TrainConfig, Trainer, loop
from splice.train.data import load_splits
from splice.train.evaluation import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import Crash, CrashAt  # noqa: E402  (the folder's helpers, as its own tests use them)

runner = CliRunner()


def quiet() -> Console:
    return Console(quiet=True)


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cli_message(result) -> str:
    return " ".join(result.output.split())


def assert_clean_failure(result) -> None:
    """A refusal the way every splice command refuses: a message and exit status 1 (or 2 for a
    usage error), never an exception escaping as a traceback."""
    assert isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception} escaped as a traceback")
    assert result.exit_code in (1, 2), result.output


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory) -> tuple[Path, Path]:
    """Two LoRA adapters of the tiny in-memory BERT (for merge)."""
    folder = tmp_path_factory.mktemp("review-cli-adapters")
    paths = []
    for i in range(2):
        model = make_bert(seed=0)
        splice.attach(model, splice.LoRA(r=2, targets=["query", "value"]))
        with torch.no_grad():
            for p in splice.trainable_parameters(model).values():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
        paths.append(splice.save(model, folder / f"a{i}"))
    return paths[0], paths[1]


# ------------------------------------------------------------------------------ data


@pytest.mark.parametrize(("train_labels", "odd_label"), [(("neg", "pos"), "postive"), ((0, 1), 2)])
def test_data_validation_label_never_seen_in_training_is_refused(tmp_path, train_labels, odd_label):
    """Bug: data.py:132-139 (load_splits -> canonical_splits) numbers the classes over training
    and validation rows together, so a validation label the training rows never have (a typo
    such as "postive", or class 2 beside 0/1) silently becomes one more class: label_names
    ('neg', 'pos', 'postive'), a 3-way head that can never predict it, and a validation accuracy
    that counts it wrong. Expected: a DataError naming the label and the validation file."""
    neg, pos = train_labels
    train = write_rows(tmp_path / "train.jsonl", [{"text": f"good {i}", "label": pos} for i in range(6)]
                       + [{"text": f"bad {i}", "label": neg} for i in range(6)])
    val = write_rows(tmp_path / "val.jsonl", [{"text": "good x", "label": pos}, {"text": "bad y", "label": odd_label}])
    config = TrainConfig(data=train, validation=val, output_dir=str(tmp_path / "run"))
    with pytest.raises(DataError) as refused:
        load_splits(config)
    assert str(odd_label) in str(refused.value) and "val.jsonl" in str(refused.value)


@pytest.mark.parametrize("case", ["latin-1 csv", "latin-1 jsonl", "folder of jsonl files"])
def test_data_unreadable_input_is_a_message_not_a_traceback(bert_dir, sentiment, tmp_path, case):
    """Bug: data.py:60/65 open files as UTF-8 with no handling of UnicodeDecodeError, and
    data.py:109 lets `datasets.load_from_disk`'s FileNotFoundError through, so `splice train
    --data reviews.csv` on a Latin-1 file (what Excel writes) or `--data folder/` on a folder of
    JSONL files ends with a Python traceback (exit 1, UnicodeDecodeError / FileNotFoundError)
    instead of an `error:` line naming the file. Expected: a DataError message, exit 1."""
    if case == "latin-1 csv":
        data = tmp_path / "reviews.csv"
        data.write_bytes("text,label\ncaf\xe9 good,1\nbad film,0\nnice,1\nawful,0\n".encode("latin-1"))
    elif case == "latin-1 jsonl":
        data = tmp_path / "reviews.jsonl"
        data.write_bytes("".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in
                                 [("caf\xe9 good", 1), ("bad", 0), ("nice", 1), ("awful", 0)]).encode("latin-1"))
    else:
        data = tmp_path / "reviews"
        data.mkdir()
        (data / "train.jsonl").write_text(Path(sentiment[0]).read_text())
    result = runner.invoke(app, ["train", "--model", str(bert_dir), "--data", str(data), "--max-steps", "1",
                                 "--output-dir", str(tmp_path / "run"), "-q"])
    assert_clean_failure(result)
    assert "reviews" in cli_message(result)


def test_data_datasetdict_folder_is_used_or_named(bert_dir, sentiment, tmp_path):
    """Bug: data.py:54-56 iterates whatever `datasets.load_from_disk` returns; for the folder of a
    `DatasetDict.save_to_disk` (train/validation splits: what most HF users save) that is the
    split names, so `splice train --data dd/` says "dd: row 1 is a str, not a mapping of column
    names to values", which does not tell the user what is wrong. Expected: its train (and
    validation) split used, or a refusal that names the DatasetDict and its splits."""
    import datasets

    rows = [json.loads(line) for line in Path(sentiment[0]).read_text().splitlines()]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows[:8])}).save_to_disk(str(tmp_path / "dd"))
    result = runner.invoke(app, ["train", "--model", str(bert_dir), "--data", str(tmp_path / "dd"),
                                 "--max-steps", "1", "--output-dir", str(tmp_path / "run"), "-q"])
    message = cli_message(result)
    assert result.exit_code == 0 or ("DatasetDict" in message and "train" in message), message


# ------------------------------------------------------------------------------ causal LM


def test_causal_lm_completion_cut_off_by_max_length_is_refused(llama_dir, tmp_path):
    """Bug: data.py:337-338 (CausalLMCollator.encode) cuts prompt + completion at max_length, so
    a prompt as long as max_length leaves no completion token to learn, silently. With every
    row so, the run reports validation loss 0.0000 and perplexity 1.0000 "before" and "after",
    then stops as "diverged" at step 1 (the loss of zero label tokens is NaN) with the advice to
    lower the learning rate. Expected: a SpliceError naming max_length (and the rows whose
    completion does not fit), before training."""
    prompt = "please tell me the colour that i am thinking about right now in this long sentence :"
    rows = [{"prompt": prompt, "completion": f" {c}"} for c in "red green blue gold pink gray".split()]
    train, val = write_rows(tmp_path / "train.jsonl", rows), write_rows(tmp_path / "val.jsonl", rows[:2])
    config = TrainConfig(model=str(llama_dir), task="causal_lm", data=train, validation=val, max_length=8,
                         batch_size=6, max_steps=2, checkpoint_every=None, output_dir=str(tmp_path / "run"))
    with pytest.raises(SpliceError, match="max_length"):
        loop.run(config, console=quiet())


class _Oracle(nn.Module):
    """A "model" whose greedy generation is the right answer, token for token (within
    `max_new_tokens`), and whose logits are uniform."""

    def __init__(self, tokenizer, answer: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.answer, self.vocab = torch.tensor(ids), len(tokenizer)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))

    def generate(self, input_ids, max_new_tokens, **_):
        new = self.answer[:max_new_tokens].expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, new], dim=1)


def test_causal_lm_exact_match_reads_the_whole_completion():
    """Bug: tasks.py:191/198 generate at most 8 new tokens (max_new_tokens=8, which
    evaluation.py:79 never changes), so a completion longer than 8 tokens can never match: a
    model that generates exactly the 14-token answer scores exact_match 0.0 in every
    metrics.json. Expected: 1.0 (generate up to the longest completion's length, plus eos)."""
    tokenizer = minilm_tokenizer()
    tokenizer.eos_token = "[SEP]"
    answer = "seven hundred and twenty three thousand four hundred and one point five"
    assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) > 8
    rows = [{"prompt": "what is the number ?", "completion": " " + answer}]
    config = TrainConfig(model="smollm2", task="causal_lm", batch_size=1, max_length=64, output_dir="unused")
    metrics = evaluate(_Oracle(tokenizer, answer), tokenizer, rows, config)
    assert metrics["exact_match"] == 1.0


def test_config_max_length_beyond_the_models_positions_is_caught(bert_dir, tmp_path):
    """Bug: nothing compares max_length with what the model can take (tasks.py load_model,
    config.py validate): the tiny BERT has 128 positions, `max_length: 256` is accepted, and the
    first batch of long texts dies inside the model with "RuntimeError: The size of tensor a
    (202) must match the size of tensor b (128)" (a traceback from `splice train`, after the
    model loaded; MiniLM with `--set max_length=1024` on long reviews does the same at 512).
    Expected: a SpliceError naming max_length and the model's limit, or the texts cut to it."""
    long_rows = [{"text": " ".join(["good" if i % 2 else "bad"] * 200), "label": i % 2} for i in range(16)]
    config = TrainConfig(model=str(bert_dir), data=write_rows(tmp_path / "long.jsonl", long_rows), batch_size=8,
                         max_steps=1, max_length=256, checkpoint_every=None, output_dir=str(tmp_path / "run"))
    try:
        result = loop.run(config, console=quiet())
    except SpliceError as err:
        assert "max_length" in str(err)
    else:
        assert result.status == "finished"


# ------------------------------------------------------------------------------ config


def test_config_save_format_peft_for_a_method_peft_cannot_hold_is_refused():
    """Bug: config.py:200 checks only that save_format is one of auto/peft/splice, so
    `save_format: peft` with `adapter: {method: diablo}` is accepted, and the run fails after
    the model loaded and the first evaluation ran, at its first save ("adapter 'default'
    (diablo) cannot be written in PEFT's format"), leaving a run folder with config.yaml alone.
    Expected: TrainConfig refuses it, naming save_format and the method."""
    with pytest.raises(ConfigError, match="save_format"):
        TrainConfig(adapter={"method": "diablo", "blocks": 4}, save_format="peft")


@pytest.mark.xfail(strict=True, reason="deliberate for now (from_dict's docstring): keeping the file's alpha while "
                                        "--set r changes would change the scale silently (tests/train/test_train_cli: "
                                        "dora with r=3 kept alpha 16); a switch should report what it drops instead")
def test_config_switching_method_keeps_the_settings_the_new_method_takes(tmp_path):
    """Bug: config.py:406-409 (_merge_adapter) keeps only targets/exclude/layers/train_also when
    the method changes, so `splice train job.yaml --method dora` on a YAML with `adapter:
    {method: lora, r: 16, alpha: 32, dropout: 0.1}` trains DoRA at r=8, alpha=16, dropout=0,
    silently (DoRA takes all three keys). Expected: the keys the new method accepts are kept
    (r=16, alpha=32, dropout=0.1); only those it has no field for are dropped."""
    path = tmp_path / "job.yaml"
    path.write_text("adapter: {method: lora, r: 16, alpha: 32, dropout: 0.1, targets: [query, value]}\n")
    adapter = TrainConfig.from_yaml(path, adapter={"method": "dora"}).adapter_config()
    assert type(adapter).__name__ == "DoRA"
    assert (adapter.r, adapter.alpha, adapter.dropout) == (16, 32, 0.1)


def test_train_init_adapter_with_other_adapter_settings_is_refused_or_recorded(bert_dir, sentiment, tmp_path):
    """Bug: with init_adapter set, run_setup.py:51-54 loads the saved adapter and ignores the
    config's adapter mapping (method, r, alpha, targets) entirely, yet config.yaml and
    metrics.json record that mapping: `--init-adapter A --method dora --r 2` trains A's LoRA r=8
    while the run's config.yaml says `{method: dora, r: 2, alpha: 4}`. Expected: such settings
    refused naming init_adapter, or config.yaml recording the adapter that trained."""
    train, val = sentiment
    common = dict(model=str(bert_dir), data=train, validation=val, batch_size=8, max_steps=1, checkpoint_every=None)
    first = loop.run(TrainConfig(**common, output_dir=str(tmp_path / "first")), console=quiet())
    out = tmp_path / "second"
    try:
        loop.run(TrainConfig(**common, init_adapter=str(first.paths["adapter"]), output_dir=str(out),
                             adapter={"method": "dora", "r": 2, "alpha": 4}), console=quiet())
    except SpliceError as err:
        assert "init_adapter" in str(err)
        return
    recorded = yaml.safe_load((out / "config.yaml").read_text())["adapter"]
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert recorded.get("r") == saved["r"] and bool(saved.get("use_dora")) == (recorded["method"] == "dora")


# ------------------------------------------------------------------------------ resume


def test_resume_refuses_a_data_file_changed_since_the_checkpoint(bert_dir, tmp_path):
    """Bug: a checkpoint records the config (checkpoint.py:71-79 compares it on resume) but not
    what the data files held, so after `train.jsonl` is rewritten, `splice train --resume RUN`
    continues silently on other rows, with the old run's data position and shuffle state: not
    the run "continued bit for bit" that README promises. Expected: a SpliceError naming the
    data file that changed (config.yaml's data path is the same)."""
    train = tmp_path / "train.jsonl"
    write_rows(train, sentiment_rows(32, 1))
    val = write_rows(tmp_path / "val.jsonl", sentiment_rows(8, 2))
    config = TrainConfig(model=str(bert_dir), data=str(train), validation=val, batch_size=8, max_steps=4,
                         eval_every=100, checkpoint_every=1, group_by_length=False, output_dir=str(tmp_path / "run"))
    with pytest.raises(Crash):
        Trainer.from_config(config, callbacks=[CrashAt(2)], console=quiet()).fit()
    write_rows(train, sentiment_rows(32, 7))  # other rows, same file
    with pytest.raises(SpliceError, match="train.jsonl"):
        loop.resume(tmp_path / "run", console=quiet())


# ------------------------------------------------------------------------------ other commands


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no network"])
def test_hub_push_without_the_hub_is_a_message_not_a_traceback(saved_adapters, monkeypatch, offline):
    """Bug: hub.py:114-118 (push_folder) calls HfApi.create_repo / upload_folder with no error
    handling, so `splice push DIR owner/name` with HF_HUB_OFFLINE=1 ends in an
    OfflineModeIsEnabled traceback, and without a network in a ConnectError traceback, where
    `splice.load` of a repo says what is wrong. Expected: exit 1 with an `error:` line naming
    the repo and why (offline / unreachable)."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    if offline == "no network":
        class Unreachable:
            def __init__(self, **kwargs) -> None:
                pass

            def create_repo(self, *args, **kwargs):
                raise ConnectionError("[Errno -2] Name or service not known")

            create_branch = upload_folder = create_repo

        monkeypatch.setattr(huggingface_hub, "HfApi", Unreachable)
    result = runner.invoke(app, ["push", str(saved_adapters[0]), "me/review-adapter"])
    assert_clean_failure(result)
    assert "me/review-adapter" in cli_message(result)


@pytest.mark.parametrize("command", ["merge --weights", "inspect --layers"])
def test_cli_unparsable_numbers_are_a_message_not_a_traceback(saved_adapters, bert_dir, tmp_path, command):
    """Bug: adapter_cmds.py:215 (`float(w) for w in weights.split(",")`) and adapter_cmds.py:85
    (`int(low)` in _parse_layers) raise ValueError outside any check, so `splice merge A B
    --weights a,b` and `splice inspect MODEL --layers a` end in a traceback ("could not convert
    string to float: 'a'"), after the adapters or model loaded. Expected: a usage error (exit 2)
    or an `error:` line (exit 1) naming the option."""
    if command == "merge --weights":
        args = ["merge", str(saved_adapters[0]), str(saved_adapters[1]), "--weights", "a,b",
                "--out", str(tmp_path / "merged")]
        option = "--weights"
    else:
        args = ["inspect", str(bert_dir), "--layers", "a"]
        option = "--layers"
    result = runner.invoke(app, args)
    assert_clean_failure(result)
    assert option in cli_message(result)


def test_resume_of_a_checkpoint_from_before_the_data_hashes_names_the_changed_field(tmp_path):
    """A checkpoint written before `data_files` existed has no hashes to compare; a changed field
    is still named (the hash key must not turn that into a KeyError)."""
    from splice.train.checkpoint import DATA_FILES, check_same_config, comparable

    current = comparable(TrainConfig(output_dir=str(tmp_path)))
    older = {k: v for k, v in current.items() if k != DATA_FILES} | {"lr": 1.0}
    check_same_config({k: v for k, v in current.items() if k != DATA_FILES}, current, tmp_path)
    with pytest.raises(SpliceError, match="lr: 1.0 ->"):
        check_same_config(older, current, tmp_path)
