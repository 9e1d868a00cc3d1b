"""`splice train` and `splice eval`: turn flags into a TrainConfig, call splice.train, print."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from splice.assets import DATASETS
from splice.cli.errors import user_errors
from splice.core.errors import SpliceError
from splice.core.registry import method_names

console = Console()


def register(app: typer.Typer) -> None:
    """Add the `train` and `eval` commands to the `splice` app."""
    app.command("train")(train)
    app.command("eval")(evaluate)


Model = Annotated[str | None, typer.Option(help="minilm, smollm2 (bundled) or a local model folder.")]
Task = Annotated[str | None, typer.Option(help="classification or causal_lm.")]
Data = Annotated[str | None, typer.Option(help="Bundled data set (rotten_tomatoes, bbc_news, arithmetic, "
                                          "iris, ...) or a .jsonl/.csv file.")]
BatchSize = Annotated[int | None, typer.Option(help="Examples per forward pass.")]
Precision = Annotated[str | None, typer.Option(help="Mixed precision: no, bf16 or fp16.")]


def train(
    configs: Annotated[list[Path] | None, typer.Argument(
        help="YAML config; flags override its values. With --tenants, one config per tenant.",
        show_default=False)] = None,
    model: Model = None,
    task: Task = None,
    data: Data = None,
    method: Annotated[str | None, typer.Option(help=f"Adapter method: {', '.join(method_names())}.")] = None,
    r: Annotated[int | None, typer.Option(help="Adapter rank.")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA scale numerator (scale = alpha / r).")] = None,
    targets: Annotated[str | None, typer.Option(help="Comma-separated module names, e.g. query,value, "
                                                "or all-linear.")] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--set", help="A hyperparameter of the method as KEY=VALUE (YAML value), repeatable: "
        "--set blocks=32, --set positions=f3+l3, --set ranks=[2,4,8].", show_default=False)] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate of the adapter.")] = None,
    head_lr: Annotated[float | None, typer.Option(help="Learning rate of the head trained in full.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the training data.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps; overrides --epochs.")] = None,
    batch_size: BatchSize = None,
    max_train_examples: Annotated[int | None, typer.Option(help="Train on a fixed sample of N examples.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate every N optimizer steps.")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        help="Recompute activations in the backward pass: less memory, about a third more compute.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    precision: Precision = None,
    output_dir: Annotated[str | None, typer.Option(help="Run folder (default: runs/<data>-<method>).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty run folder.")] = False,
    tenants: Annotated[bool, typer.Option("--tenants", help="Train every config given at once on one shared "
                                          "copy of the model (multiplexed); flags apply to all.")] = False,
    join_at: Annotated[str | None, typer.Option(help="With --tenants: comma-separated step at which each "
                                                "tenant joins, e.g. 0,0,100.")] = None,
    max_rows: Annotated[int | None, typer.Option(help="With --tenants: most rows in one packed forward "
                                                 "pass (bounds memory); default: the largest tenant batch "
                                                 "size; 0: no limit.")] = None,
    max_padding: Annotated[float, typer.Option(help="With --tenants: largest share of padded token slots "
                                               "in a packed pass before its rows are split.")] = 0.25,
    checkpoint_every: Annotated[int | None, typer.Option(
        help="Write a resumable checkpoint every N optimizer steps (0: only on Ctrl-C / SIGTERM).")] = None,
    on_nonfinite: Annotated[str | None, typer.Option(
        help="A NaN/inf loss or gradient: stop (keep the best finite adapter) or skip (drop that step).")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue the interrupted run in this folder from its last checkpoint, with its config.yaml.",
        show_default=False)] = None,
) -> None:
    """Train an adapter, evaluate it before and after, save it (HF PEFT format) and a report.

    With no arguments this is the main job: LoRA (r=8, alpha=16, query/value, head trained)
    on the bundled MiniLM for Rotten Tomatoes sentiment, about four minutes on two CPU cores,
    written to runs/rotten-tomatoes-lora.

    Examples:

        splice train --force

        splice train examples/smollm2_arithmetic.yaml --max-steps 20

        splice train --data reviews.jsonl --r 16 --targets query,key,value --output-dir runs/reviews

        splice train --method diablo --set blocks=32 --targets all-linear

        splice train --tenants alice.yaml bob.yaml carol.yaml --max-steps 200

        splice train --resume runs/rotten-tomatoes-lora

    Ctrl-C (or SIGTERM) stops after the current step with a checkpoint, the best adapter so far
    in RUN/adapter and the command that continues the run (exit status 130 / 143).
    """
    from splice.train import TrainConfig
    from splice.train.loop import TrainingInterrupted, run
    from splice.train.loop import resume as resume_run

    if resume is not None:
        given = {name for name, value in locals().items() if name in FLAGS and value not in (None, False, [])}
        with user_errors():
            if given:
                raise SpliceError(f"--resume continues a run with its own config.yaml; it takes no config or other "
                                  f"flags (got {', '.join(sorted(FLAGS[n] for n in given))})")
        with user_errors(), _interruptions(TrainingInterrupted):
            _exit_if_diverged([resume_run(resume, console=console)])
        return
    adapter = {"method": method, "r": r, "alpha": alpha, "targets": targets.split(",") if targets else None}
    if adapter["targets"] == ["all-linear"]:
        adapter["targets"] = "all-linear"
    configs = configs or []
    with user_errors():
        adapter |= method_params(param or [])
        if len(configs) > 1 and not tenants:
            raise SpliceError(f"{len(configs)} configs given; train them together with --tenants, "
                              "or give one config")
        if tenants and not configs:
            raise SpliceError("--tenants needs one YAML config per tenant")
        if (join_at or max_rows) and not tenants:
            raise SpliceError("--join-at and --max-rows apply to --tenants runs only")
        settings = [TrainConfig.from_yaml(
            path, model=model, task=task, data=data, lr=lr, head_lr=head_lr, epochs=epochs, max_steps=max_steps,
            batch_size=batch_size, max_train_examples=max_train_examples, eval_every=eval_every, seed=seed,
            gradient_checkpointing=gradient_checkpointing, precision=precision, output_dir=output_dir,
            adapter={k: v for k, v in adapter.items() if v is not None}, on_nonfinite=on_nonfinite,
            checkpoint_every=checkpoint_every or None,
        ) for path in configs or [None]]
        if checkpoint_every == 0:  # a None override would be ignored: rebuild with the field unset
            settings = [TrainConfig.from_dict({**c.to_dict(), "checkpoint_every": None}) for c in settings]
    with user_errors(), _interruptions(TrainingInterrupted):
        if tenants:
            from splice.orchestrate import multiplex

            steps = [int(s) for s in join_at.split(",")] if join_at else None
            rows = "auto" if max_rows is None else (max_rows or None)
            results = multiplex(settings, join_at=steps, max_rows=rows, max_padding=max_padding, force=force,
                                console=console)
            _exit_if_diverged(list(results.values()))
        else:
            _exit_if_diverged([run(settings[0], console=console, force=force)])


# Parameters of `train` that --resume does not combine with (the run's config.yaml says it all).
FLAGS = {
    "configs": "a config file", "model": "--model", "task": "--task", "data": "--data", "method": "--method",
    "r": "--r", "alpha": "--alpha", "targets": "--targets", "param": "--set", "lr": "--lr", "head_lr": "--head-lr",
    "epochs": "--epochs", "max_steps": "--max-steps", "batch_size": "--batch-size",
    "max_train_examples": "--max-train-examples", "eval_every": "--eval-every",
    "gradient_checkpointing": "--gradient-checkpointing", "seed": "--seed", "precision": "--precision",
    "output_dir": "--output-dir", "force": "--force", "tenants": "--tenants", "join_at": "--join-at",
    "max_rows": "--max-rows", "checkpoint_every": "--checkpoint-every", "on_nonfinite": "--on-nonfinite",
}


@contextmanager
def _interruptions(kind: type[Exception]) -> Iterator[None]:
    """A run stopped by SIGINT/SIGTERM: its message (where the checkpoint is, how to resume) and
    the shell's exit status for that signal."""
    try:
        yield
    except kind as err:
        Console(stderr=True, soft_wrap=True).print(f"[yellow]interrupted:[/] {err}", highlight=False)
        raise typer.Exit(err.exit_code) from None


def _exit_if_diverged(results: list) -> None:
    """A run that stopped on non-finite numbers saved its best finite adapter; say so and exit 1."""
    diverged = [r for r in results if r.status != "finished"]
    for result in diverged:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {result.paths['run_dir']}: {result.message}",
                                                   highlight=False)
    if diverged:
        raise typer.Exit(1)


def method_params(pairs: list[str]) -> dict[str, object]:
    """`--set KEY=VALUE` pairs as a mapping; values are read as YAML (numbers, lists, booleans)."""
    import yaml

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SpliceError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise SpliceError(f"--set {key}: cannot read {value!r} ({err.__class__.__name__})") from None
    return out


def evaluate(
    adapter: Annotated[Path, typer.Option(help="Adapter folder (splice or HF PEFT format).")],
    model: Model = "minilm",
    task: Task = "classification",
    data: Data = "rotten_tomatoes",
    split: Annotated[str, typer.Option(help="Split of a bundled data set: train, validation or test.")] = "test",
    batch_size: BatchSize = 32,
    max_length: Annotated[int, typer.Option(help="Tokens per example.")] = 64,
    precision: Precision = "no",
) -> None:
    """Evaluate a saved adapter on a data set: accuracy, or loss/perplexity/exact match.

    Example:

        splice eval --model minilm --adapter runs/rotten-tomatoes-lora/adapter --data rotten_tomatoes
    """
    from splice.train import TrainConfig, evaluate_adapter

    with user_errors():
        settings = TrainConfig.from_dict(model=model, task=task, data=data, batch_size=batch_size,
                                         max_length=max_length, precision=precision)
        metrics = evaluate_adapter(settings, adapter, split)
    table = Table(title=f"{data} ({split})" if data in DATASETS else data, caption=f"adapter: {adapter}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}")
    console.print(table)
