"""Review of BoostLLM (issue 20, commit 4daf122 and later): the boosting engine
(`splice.boost.boostllm`), the tabular side (`tabular`), the language-model glue (`tabular_llm`),
the baselines and `splice boost-tabular`. Each test pins a defect found in review: it fails on the
reviewed code and passes once the defect is fixed (where two fixes are reasonable, e.g. refuse
an input or honour it, the test accepts either)."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import typer
from helpers import minilm_tokenizer, save_tiny_bert, save_tiny_llama
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from splice.boost import tabular_job, tabular_llm
from splice.boost.baselines import fit_baselines
from splice.boost.boostllm import BoostLLM, BoostLLMSettings
from splice.boost.tabular import Split, draw_shots, load_table, serialize_row
from splice.boost.tabular_job import TabularJob, run_tabular_job
from splice.boost.tabular_llm import boostllm, pooled_encoder, tokenized
from splice.cli import boost_cmd
from splice.core.errors import OutputExistsError, SpliceError

QUIET = Console(quiet=True)
runner = CliRunner(env={"COLUMNS": "200"})
app = typer.Typer()
boost_cmd.register(app)


@app.callback()
def _main() -> None:
    """The `splice` app holds the command beside others."""


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return str(save_tiny_bert(tmp_path_factory.mktemp("review-bert"), dropout=0.0))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("review-llama")))


def write_csv(path: Path) -> str:
    """40 rows: two numeric columns and a string one; the label is whether x > y / 2."""
    lines = ["x,y,colour,label"]
    for i in range(40):
        x, y = (i * 7) % 11, (i * 5) % 13
        lines.append(f"{x},{y / 2},{'red' if i % 3 else 'blue'},{'big' if x > y / 2 else 'small'}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def wine_booster(**settings) -> tuple[BoostLLM, list[int]]:
    """A frozen random MLP over wine's standardised features (one view), 48 shots' training rows."""
    table = load_table("wine")
    x = torch.tensor(table.features(), dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], 16), nn.Tanh())
    booster = BoostLLM(model, lambda m, inputs: m(inputs["x"]), [{"x": x}], table.labels, classes=3, hidden=16,
                       settings=BoostLLMSettings(**{"rounds": 1, "r": 2, "alpha": 4.0, "lr": 1e-2, "head_lr": 0.1,
                                                    **settings}))
    return booster, draw_shots(table, shots=48, seed=0).train.tolist()


# -- the engine --------------------------------------------------------------------------------


def test_a_round_of_one_step_trains():
    """`steps` is "optimizer steps per round", >= 1 allowed; but the warmup of the cosine schedule
    (max(1, steps // 10) steps) starts at lr 0, so with steps=1 the only step has lr 0 and the
    round is exactly F_0 (and every round wastes its first step)."""
    booster, train = wine_booster(steps=1, head_lr=0.5)
    history = booster.fit(train)  # no validation: the round keeps its last state
    assert booster.heads[0].weight.abs().max().item() > 0, "the one optimizer step ran at learning rate 0"
    assert history.rounds[0].train_loss < history.prior_train_loss


def test_a_negative_max_grad_norm_is_refused_not_gradient_ascent():
    """BoostLLMSettings checks rounds, r, steps, ... but not max_grad_norm: a negative one makes
    clip_grad_norm_ multiply every gradient by a negative factor, so the round ascends the loss
    (wine: train log-loss 1.09 -> 2.29 in 10 steps) and, without validation rows, keeps it."""
    with pytest.raises(SpliceError, match=r"max_grad_norm must be > 0 or None, got -1.0"):
        wine_booster(max_grad_norm=-1.0, steps=10)


@pytest.mark.parametrize("field", ["lr", "head_lr"])
def test_negative_learning_rates_are_refused_by_the_settings(field):
    """A negative lr/head_lr passes BoostLLMSettings (and `splice boost-tabular --lr -0.001`) and
    only fails once the model is loaded and round 0 builds AdamW, as a raw ValueError (a traceback
    from the CLI, whose user_errors catches SpliceError only)."""
    with pytest.raises(SpliceError, match=field):
        BoostLLMSettings(**{field: -1e-3})


# -- the language-model glue -----------------------------------------------------------------


def test_the_default_max_length_keeps_the_readme_tables_row():
    """boostllm / TabularJob / `--max-length` default to 256 tokens and `tokenized` truncates
    silently: breast_cancer (the README's and docstring's example) serialises to ~300 MiniLM tokens
    (395 with SmolLM2's tokenizer, the default model), so its last third of columns never reaches the
    model, and digits (706 tokens) loses two thirds. Expected: the whole row, or a warning/refusal."""
    default = inspect.signature(boostllm).parameters["max_length"].default
    tokenizer = minilm_tokenizer()
    table = load_table("breast_cancer")
    text = serialize_row(table, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            encoded = tokenized(tokenizer, [text], default)
        except SpliceError:
            return
    if any("trunc" in str(w.message).lower() or "cut" in str(w.message).lower() for w in caught):
        return
    read = tokenizer.decode(encoded["input_ids"][0], skip_special_tokens=True)
    assert table.columns[-1] in read, f"the model reads {read[-120:]!r}, not the row's last column"


@pytest.mark.parametrize("loader", ["AutoModel", "AutoModelForCausalLM"])
def test_a_loaded_model_is_read_through_its_bare_model_and_a_tokenizer_without_pad_pads_with_eos(tiny_llama,
                                                                                                 loader):
    """`model`: "... or a loaded model with its tokenizer". A `*ForCausalLM` is read through its bare
    model (its output has no `last_hidden_state`), and a tokenizer without a pad token pads with eos,
    as when the model is given by name."""
    import transformers

    model = getattr(transformers, loader).from_pretrained(tiny_llama)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token = None
    table = load_table("iris")
    split = draw_shots(table, shots=12, seed=0)
    result = boostllm(model, table, split, tokenizer=tokenizer, rounds=1, steps=2, test_rows=6, max_length=64)
    assert result.test_rows == 6 and tokenizer.pad_token == tokenizer.eos_token


def test_pooled_encoder_reads_the_last_real_token_under_left_padding(tiny_llama):
    """`pooled_encoder`: "the last hidden state at the last real token (decoders)". It takes index
    mask.sum() - 1, which is the last real token only under right padding; with a left-padding
    tokenizer (the usual one for decoders) it reads a token in the middle of the shorter rows."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.padding_side = "left"
    batch = tokenizer(["The a is 1.", "The b is 2. The c is 3. The d is 4."], padding=True, return_tensors="pt",
                      return_token_type_ids=False)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert inputs["attention_mask"][0, 0] == 0  # the short row is left-padded
    with torch.no_grad():
        pooled = pooled_encoder(model)(model, inputs)
        hidden = model(**inputs).last_hidden_state
    assert torch.allclose(pooled[0], hidden[0, -1], atol=1e-5), "the short row is read at a middle token"


# -- the baselines -----------------------------------------------------------------------------


def test_xgboost_baseline_on_shots_that_miss_a_class():
    """fit_baselines / `_all_classes` promise probability 0 for a class the shots miss, and the
    other two baselines give it; XGBClassifier needs labels 0..n-1 and raises ValueError ("Expected:
    [0 1], got [0 2]") for shots of classes 0 and 2 (only ImportError is caught)."""
    pytest.importorskip("xgboost")
    table = load_table("wine")
    labels = np.asarray(table.labels)
    shots = np.sort(np.concatenate([np.flatnonzero(labels == 0)[:6], np.flatnonzero(labels == 2)[:6]]))
    test = np.setdiff1d(np.arange(len(table)), shots)
    split = Split(train=shots, validation=np.array([], dtype=int), test=test)
    scored = fit_baselines(table, split, test.tolist(), seed=0, names=("xgboost",))
    assert "accuracy" in scored["xgboost"] or "error" in scored["xgboost"]


# -- the job and the CLI -----------------------------------------------------------------------


def test_the_job_scores_boostllm_and_the_baselines_on_the_same_test_rows(tmp_path, tiny_bert, monkeypatch):
    """run_tabular_job: "BoostLLM and the baselines on the same shots and test rows". The baselines
    get scored_rows(split, test_rows, <draw seed>); boostllm gets `**{"seed": seed, **job.settings}`
    and samples with its settings' seed, so a `seed` in job.settings (a BoostLLMSettings field, which
    `settings` is documented to take) scores BoostLLM on other rows than the baselines."""
    picked: dict[str, list[int]] = {}
    real_scored_rows = tabular_llm.scored_rows
    real_baselines = tabular_job.fit_baselines

    def spy_scored_rows(split, limit, seed):
        picked["boostllm"] = real_scored_rows(split, limit, seed)
        return picked["boostllm"]

    def spy_baselines(table, split, test, seed, names):
        picked["baselines"] = list(test)
        return real_baselines(table, split, test, seed, names)

    monkeypatch.setattr(tabular_llm, "scored_rows", spy_scored_rows)
    monkeypatch.setattr(tabular_job, "fit_baselines", spy_baselines)
    with pytest.raises(SpliceError, match=r"settings \['seed'\] are the job's own fields"):
        TabularJob(data=write_csv(tmp_path / "t.csv"), shots=12, seeds=[0], model=tiny_bert, rounds=1, test_rows=8,
                   max_length=64, baselines=("logistic_regression",), output_dir=str(tmp_path / "out"),
                   settings={"steps": 1, "seed": 3})
    job = TabularJob(data=write_csv(tmp_path / "t.csv"), shots=12, seeds=[3], model=tiny_bert, rounds=1, test_rows=8,
                     max_length=64, baselines=("logistic_regression",), output_dir=str(tmp_path / "out"),
                     settings={"steps": 1})
    run_tabular_job(job, console=QUIET)
    assert picked["boostllm"] == picked["baselines"]


@pytest.mark.parametrize("flag,value", [("--seed", "-1"), ("--test-rows", "-2")])
def test_negative_cli_numbers_are_messages_not_tracebacks(tmp_path, flag, value, monkeypatch):
    """`--seed -1`: np.random.default_rng(-1) in draw_shots raises ValueError; `--test-rows -2`:
    rng.choice(size=-2) in scored_rows raises ValueError. Both escape user_errors (SpliceError
    only) as tracebacks, before any model work."""
    def no_model(*args, **kwargs):
        raise AssertionError("boostllm ran")

    monkeypatch.setattr(tabular_job, "boostllm", no_model)
    data = write_csv(tmp_path / "t.csv")
    result = runner.invoke(app, ["boost-tabular", "--data", data, "--shots", "12", flag, value,
                                 "--output-dir", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), f"traceback: {result.exception!r}"


def test_test_rows_zero_is_refused_not_every_row(tmp_path, monkeypatch):
    """`--test-rows N`: "Score a seeded sample of N test rows". N=0 is taken as "all rows"
    (scored_rows: `if not limit`), silently scoring every row instead of refusing the count."""
    seen: dict[str, int] = {}

    def fake_boostllm(model, table, split, **kwargs):
        seen["test_rows"] = len(tabular_llm.scored_rows(split, kwargs["test_rows"], kwargs["seed"]))
        raise SpliceError("stop here")

    monkeypatch.setattr(tabular_job, "boostllm", fake_boostllm)
    data = write_csv(tmp_path / "t.csv")
    result = runner.invoke(app, ["boost-tabular", "--data", data, "--shots", "12", "--test-rows", "0",
                                 "--output-dir", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1
    assert "test_rows" not in seen, f"--test-rows 0 went on to score {seen.get('test_rows')} rows"


def test_results_are_not_written_over_a_folder_filled_during_the_run(tmp_path, monkeypatch):
    """check_output_dir refuses a non-empty folder before work, but the report is then written
    with atomic_directory(folder, overwrite=True): a run (same default folder,
    runs/boost-<data>-<shots>, e.g. another --model) that finished meanwhile is replaced without --force."""
    out = tmp_path / "out"

    def other_run_finishes(model, table, split, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "results.json").write_text('{"other": "run"}')
        return SimpleNamespace(to_dict=lambda: {"test": {"accuracy": 1.0, "auc": 1.0, "log_loss": 0.0}})

    monkeypatch.setattr(tabular_job, "boostllm", other_run_finishes)
    job = TabularJob(data=write_csv(tmp_path / "t.csv"), shots=12, seeds=[0], baselines=(), output_dir=str(out))
    try:
        run_tabular_job(job, console=QUIET, overwrite=False)
    except OutputExistsError:
        pass
    assert (out / "results.json").read_text() == '{"other": "run"}', "the other run's results were replaced"


# -- tables ------------------------------------------------------------------------------------


def test_csv_numbers_after_a_comma_and_space_are_numbers(tmp_path):
    """load_table: "A column whose cells are all integers holds ints, all numbers floats". Cells
    written "1, 2.5" (a space after the comma, common in hand-written CSVs; the empty check
    already strips cells) fail the fullmatch and the column becomes strings: one-hot categories,
    one per distinct number, for the tree and the baselines."""
    path = tmp_path / "spaced.csv"
    path.write_text("x, y, label\n1, 2.5, a\n2, 3.5, b\n3, 4.5, a\n4, 5.5, b\n")
    table = load_table(str(path))
    assert table.rows[0] == [1, 2.5], table.rows[0]


def test_csv_missing_value_markers_are_refused_not_categories(tmp_path):
    """Empty cells are refused ("fill or drop the row") and a Table refuses NaN floats, but a
    "nan"/"NA" cell in a number column turns the whole column into strings, every number a
    one-hot category, silently."""
    path = tmp_path / "nan.csv"
    path.write_text("x,y,label\n1.5,2,a\nnan,3,b\n2.5,4,a\n3.5,5,b\n")
    with pytest.raises(SpliceError, match=r"line 3: column 'x' holds numbers and the missing-value marker 'nan'"):
        load_table(str(path))


def test_a_csv_that_is_not_utf8_is_a_message(tmp_path):
    """A Latin-1 CSV (Excel's usual export) raises UnicodeDecodeError from `_read_csv`, not a
    DataError: `splice boost-tabular --data` shows a traceback."""
    path = tmp_path / "latin1.csv"
    path.write_bytes("city,size,label\nMálaga,1,a\nCáceres,2,b\nLeón,3,a\n".encode("latin-1"))
    with pytest.raises(SpliceError):
        load_table(str(path))
