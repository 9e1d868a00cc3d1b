"""Review of splice.multitask (volume 2 §9) and `splice multitask`: each test pins a defect found
in review; it fails now and passes once the defect is fixed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from helpers import save_tiny_llama
from typer.testing import CliRunner

from splice.cli import multitask_cmd
from splice.core.errors import ConfigError, SpliceError
from splice.multitask import MultitaskConfig, load_tasks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "multitask"))
from multitask_helpers import LISTS, jsonl, labelled, task  # noqa: E402

runner = CliRunner(env={"COLUMNS": "200"})
app = typer.Typer()
multitask_cmd.register(app)


@app.callback()
def _main() -> None:
    """The `splice` app holds the command beside others."""


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("review-multitask-llama")))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("review-multitask-data")
    out = {}
    for i, (name, lists) in enumerate(LISTS.items()):
        out[name] = jsonl(folder / f"{name}.jsonl", labelled(lists, 120, 2 * i))
        out[f"{name}-val"] = jsonl(folder / f"{name}-val.jsonl", labelled(lists, 40, 2 * i + 1))
    return out


def make(files, model, out: Path, tasks: list[dict[str, Any]] | None = None, train: dict[str, Any] | None = None,
         **fields: Any) -> MultitaskConfig:
    return MultitaskConfig(**{
        "tasks": tasks or [task(files, "colour"), task(files, "animal")], "model": model,
        "adapter": {"method": "lora", "r": 2, "alpha": 4, "targets": "all-linear"},
        "train": {"batch_size": 8, "max_steps": 2, "lr": 5e-3, "max_length": 16, "max_eval_examples": 8,
                  **(train or {})},
        "output_dir": str(out), **fields})


def write_yaml(tmp_path: Path, files, model, tasks=None, train=None, **extra) -> Path:
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({
        "model": model, "tasks": tasks or [task(files, "colour"), task(files, "animal")],
        "adapter": {"method": "lora", "r": 2, "alpha": 4, "targets": "all-linear"},
        "train": {"batch_size": 8, "max_steps": 2, "max_length": 16, "max_eval_examples": 16, **(train or {})},
        "output_dir": str(tmp_path / "job"), **extra}))
    return path


@pytest.fixture
def captured(monkeypatch):
    """Replace `run_multitask` so that the CLI only builds its config: the config it would run."""
    import splice.multitask

    seen: list[MultitaskConfig] = []

    def capture(config, **kwargs):
        seen.append(config)
        raise SpliceError("captured (review stub)")

    monkeypatch.setattr(splice.multitask, "run_multitask", capture)
    return seen


# ------------------------------------------------------------------------------- training


def test_train_selection_rule_is_not_silently_ignored(files, tiny_llama, tmp_path):
    """run.py MixtureRun.train_on (about line 150) does its own forward/backward
    (`trainer.model(**batch).loss` + `accelerator.backward`) and never calls the trainer's
    gradient rule, so `train: {selection: {name: gast, ...}}` is accepted by the config and then
    silently has no effect: every run trains as if no selection were set. Correct: either the
    config refuses `train.selection` (as it refuses grad_accum, packing, ...), or each batch's
    gradients are made by the rule (`trainer.gradient_rule.backward`)."""
    with pytest.raises(ConfigError, match=r"train.selection must be None: a multi-task step takes one task's batch"):
        make(files, tiny_llama, tmp_path / "job", train={"selection": {"name": "gast", "keep": 0.5}})


def test_a_task_named_like_a_module_attribute_is_refused_or_works(files, tiny_llama, tmp_path):
    """config.py check_task accepts any name of letters, digits, _ and -, but heads.py puts each
    task's head in an nn.ModuleDict under the task's name, and ModuleDict refuses keys that are
    attributes of nn.Module ("type", "train", "eval", "training", "cuda", "keys", "update", ...):
    a mixture with a task named `type` passes validation, the job creates its folder and
    job.json, then crashes in RunHeads with a raw `KeyError: "attribute 'type' already exists"`
    (a traceback, not a message). Correct: refuse such a name in the config (naming file, key and
    value), or store the heads under keys that cannot clash."""
    for name in ("type", "train", "keys"):
        tasks = [task(files, "colour"), {**task(files, "animal"), "name": name}]
        with pytest.raises(ConfigError, match=rf"tasks\[1\] \('{name}'\): '{name}' cannot name a task"):
            make(files, tiny_llama, tmp_path / "job", tasks=tasks)


def test_a_prompt_with_other_braces_is_refused_as_a_config_error(files, tiny_llama, tmp_path):
    """config.py check_task only checks that `prompt` contains "{text}"; data.py then builds
    each row with `prompt.format(text=...)` (continual.data.as_words), so a prompt such as
    "Words: {text} {answer}" (or any literal brace) is accepted and then crashes at load with a
    bare `KeyError: 'answer'` that names neither the task nor the key. Correct: a ConfigError
    naming the task and its prompt (at config time, or at least from load_tasks)."""
    tasks = [{**task(files, "colour"), "prompt": "Words: {text} {answer}\nWarmth:"}, task(files, "animal")]
    with pytest.raises(ConfigError, match="prompt"):
        config = make(files, tiny_llama, tmp_path / "job", tasks=tasks, task="causal_lm")
        load_tasks(config)


def test_max_words_on_a_classifier_task_is_not_silently_ignored(files, tiny_llama, tmp_path):
    """config.py check_task accepts `max_words` on every task, but it only acts when
    classification data is turned into prompts for a generator (as_words). In a classifier job
    (task: classification) `max_words: 1` is silently ignored: the texts keep all their words.
    (The continual config, whose task fields these are, refuses max_words outside as_words.)
    Correct: refuse `max_words` (and a non-default `prompt`) where it has no effect, or apply it."""
    for extra, said in (({"max_words": 1}, "max_words"), ({"prompt": "Say {text}:"}, "prompt")):
        tasks = [{**task(files, "colour"), **extra}, task(files, "animal")]
        with pytest.raises(ConfigError, match=rf"a classifier's task gets a head, not a prompt, so {said} would do "
                                              "nothing"):
            make(files, tiny_llama, tmp_path / "job", tasks=tasks)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_numpy_cannot_take_is_refused_by_the_config(files, tiny_llama, tmp_path, seed):
    """config.py checks only that `seeds` is a non-empty list of distinct integers. A seed below
    0 or above 2**32 - 1 is accepted, and the job then creates its folder and job.json and dies
    in `accelerate.utils.set_seed` (run.py MixtureRun) with numpy's raw
    `ValueError: Seed must be between 0 and 2**32 - 1` (a traceback through the CLI, and the
    half-made folder then needs --force). Correct: a ConfigError on `seeds` naming the value."""
    with pytest.raises(ConfigError, match="seed"):
        make(files, tiny_llama, tmp_path / "job", seeds=[seed])


def test_tasks_that_is_not_a_list_names_the_key(tmp_path):
    """config.py __post_init__ iterates `self.tasks` before any check, so `tasks: 5` in a file
    gives "mix.yaml: 'int' object is not iterable" (the TypeError caught in from_yaml): neither
    the key nor the value is named. Correct: "tasks must be a list of tasks ..., got 5"."""
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({"tasks": 5}))
    with pytest.raises(ConfigError) as err:
        MultitaskConfig.from_yaml(path)
    message = str(err.value).replace(str(path), "<file>")
    assert "tasks" in message and "5" in message, message


# ------------------------------------------------------------------------------- CLI


def test_set_key_null_is_not_silently_dropped(tmp_path, files, tiny_llama, captured):
    """multitask_cmd.py merges `--set` pairs into the same `train` mapping as the flags, and
    MultitaskConfig.from_yaml drops every None there (None meaning "flag not given"), so
    `--set max_eval_examples=null` (or max_grad_norm=null, max_steps=null) is silently ignored
    and the file's value stays. In `splice train`, `--set KEY=null` unsets the field (None is a
    value for settings). Correct: the run's config has max_eval_examples None."""
    path = write_yaml(tmp_path, files, tiny_llama)
    result = runner.invoke(app, ["multitask", str(path), "--set", "max_eval_examples=null"])
    assert captured, result.output
    assert captured[0].shared_config().max_eval_examples is None, captured[0].train


def test_max_train_examples_flag_wins_over_the_files_task_value(tmp_path, files, tiny_llama, captured):
    """`--max-train-examples N` ("Train each task on a fixed sample of N of its rows") goes into
    `train`, but config.py data_config merges a task's own `max_train_examples` over `train`, so
    a file task with max_train_examples: 50 keeps 50 rows and the flag is silently ignored for
    it, although from_yaml says the CLI's flags win over the file. Same for
    --max-eval-examples. Correct: every task trains on 4 rows."""
    tasks = [{**task(files, "colour"), "max_train_examples": 50}, task(files, "animal")]
    path = write_yaml(tmp_path, files, tiny_llama, tasks=tasks)
    result = runner.invoke(app, ["multitask", str(path), "--max-train-examples", "4"])
    assert captured, result.output
    sizes = {t.name: len(t.splits.train) for t in load_tasks(captured[0])}
    assert sizes == {"colour": 4, "animal": 4}, sizes


def test_temperature_flag_without_temperature_mixing_is_not_silently_ignored(tmp_path, files, tiny_llama,
                                                                             captured):
    """`splice multitask FILE --temperature 3` with a file that mixes proportionally (the
    default) runs proportional mixing: T is stored and never used (sampler.mixing_weights only
    reads it under mixing: temperature), with no word to the user. Correct: refuse the flag
    ("--temperature needs --mixing temperature"), or let it select temperature mixing."""
    path = write_yaml(tmp_path, files, tiny_llama)
    result = runner.invoke(app, ["multitask", str(path), "--temperature", "3"])
    assert not captured and result.exit_code != 0
    assert "temperature 3.0 does nothing with mixing 'proportional'" in " ".join(result.output.split())


def test_quiet_job_whose_runs_diverged_does_not_exit_0_silently(tmp_path, files, tiny_llama):
    """With --quiet, a job whose every run stopped on a non-finite loss prints only the closing
    line ("wrote ...: shared adapter 0.4xx ...") and exits 0: harness/run.py record the status
    in run.json and results.md, but multitask_cmd.py neither exits non-zero nor writes anything
    to stderr, and the summary and transfer tables use the diverged runs' scores as if they were
    results. `splice train` exits 1 with the error on stderr for a diverged run. Correct: the
    divergence is reported on stderr (and the exit status is non-zero)."""
    path = write_yaml(tmp_path, files, tiny_llama, train={"lr": 1e30, "head_lr": 1e30, "max_grad_norm": None,
                                                          "warmup_ratio": 0.0, "max_steps": 3})
    result = runner.invoke(app, ["multitask", str(path), "--no-compare", "--quiet"])
    assert (Path(tmp_path) / "job" / "runs" / "seed0" / "joint" / "run.json").is_file(), result.output
    saved = yaml.safe_load((Path(tmp_path) / "job" / "runs" / "seed0" / "joint" / "run.json").read_text())
    assert saved["status"] == "diverged"  # the premise: the run did diverge
    assert result.exit_code != 0 or "diverged" in result.output.lower(), result.output
