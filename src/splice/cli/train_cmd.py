"""`splice train` and `splice eval`: turn flags into a TrainConfig, call splice.train, print."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from splice.assets import DATASETS
from splice.cli.errors import user_errors
from splice.cli.options import (
    BatchSize,
    CompletionColumn,
    Data,
    LabelColumn,
    Model,
    Precision,
    PromptColumn,
    Task,
    TextColumn,
)
from splice.cli.output import Quiet, command, quieted, to_stderr
from splice.core.errors import SpliceError

if TYPE_CHECKING:
    from splice.train import TrainConfig
    from splice.train.results import RunResult

console = Console()


def register(app: typer.Typer) -> None:
    """Add the `train` and `eval` commands to the `splice` app."""
    command(app, "train", train)
    command(app, "eval", evaluate)


ConfigFiles = Annotated[list[Path] | None, typer.Argument(
    help="YAML config; flags override its values. With --tenants, one config per tenant.", show_default=False)]
# Written out rather than read from the registry, which would import every method (and torch) for
# `--help`; tests/cli checks that it names every registered method.
METHOD_NAMES = ("conv_adapter", "diablo", "domlora", "dora", "flexilora", "lora", "loreft", "loretta", "moelora",
                "rep_conv_adapter", "tinylora", "ttlora")
Method = Annotated[str | None, typer.Option(help=f"Adapter method: {', '.join(METHOD_NAMES)}.")]
Rank = Annotated[int | None, typer.Option(help="Adapter rank.")]
Alpha = Annotated[float | None, typer.Option(help="LoRA scale numerator (scale = alpha / r).")]
Targets = Annotated[str | None, typer.Option(help="Comma-separated module names, e.g. query,value, or all-linear.")]
Settings = Annotated[list[str] | None, typer.Option(
    "--set", help="A setting as KEY=VALUE (YAML value), repeatable: a hyperparameter of the method (--set "
    "blocks=32, --set positions=f3+l3, --set ranks=[2,4,8]) or a key of the training config (--set "
    "max_length=128, --set max_steps=null); a key that is neither is refused with both lists of keys.",
    show_default=False)]
InitAdapter = Annotated[Path | None, typer.Option(
    help="Continue training this saved adapter folder (e.g. an earlier run's RUN/adapter) on the new task "
    "instead of a fresh adapter; the task trains a fresh head of its own.", show_default=False)]
Lr = Annotated[float | None, typer.Option(help="Learning rate of the adapter.")]
HeadLr = Annotated[float | None, typer.Option(help="Learning rate of the head trained in full.")]
Epochs = Annotated[float | None, typer.Option(help="Passes over the training data.")]
MaxSteps = Annotated[int | None, typer.Option(help="Optimizer steps; overrides --epochs.")]
MaxTrainExamples = Annotated[int | None, typer.Option(help="Train on a fixed sample of N examples.")]
MaxEvalExamples = Annotated[int | None, typer.Option(
    help="Evaluate on the first N rows of the validation and test splits (the same rows in every run): a "
    "quick run's evaluations stay quick.", show_default=False)]
EvalEvery = Annotated[int | None, typer.Option(help="Evaluate every N optimizer steps.")]
GradientCheckpointing = Annotated[bool | None, typer.Option(
    help="Recompute activations in the backward pass: less memory, about a third more compute.")]
Seed = Annotated[int | None, typer.Option(help="Random seed.")]
GroupByLength = Annotated[bool | None, typer.Option(
    help="Batch training rows of similar length together (less padding, same results up to seed noise); on "
    "by default, --no-group-by-length for the plain shuffle.")]
Schedule = Annotated[str | None, typer.Option(
    help="A schedule that acts on the adapter during the run, with its default options: dmep (prune a MoELoRA's "
    "under-used experts after 15% of the steps, then train without the balancing loss). Options go in the "
    "YAML: schedule: {name: dmep, prune_at: 0.15, keep_mass: 0.9}.", show_default=False)]
Optimizer = Annotated[str | None, typer.Option(
    help="adamw (default); loraplus: B at 16x A's learning rate (HF PEFT's LoRA+ groups); loft: AdamW steps of "
    "W projected onto the LoRA factors, one factor per step (behaves like full fine-tuning of the adapted "
    "layers). Options go in the YAML: optimizer: {name: loraplus, lr_ratio: 8}.", show_default=False)]
Selection = Annotated[str | None, typer.Option(
    help="A gradient rule with its default options: gast (per layer, update with the samples whose gradients "
    "agree with the batch's, and only the layers where they agree most). Options go in the YAML: "
    "selection: {name: gast, keep: 0.5}.", show_default=False)]
Quantize = Annotated[str | None, typer.Option(
    help="A 4-bit base (QLoRA): nf4 puts the base's Linear layers in NF4 (torchao; bitsandbytes on CUDA) before "
    "the adapter is attached. Other options go in a training YAML: quantize: {scheme: nf4, compute_dtype: "
    "bfloat16, backend: torchao}.", show_default=False)]
OutputDir = Annotated[str | None, typer.Option(help="Run folder (default: runs/<data>-<method>).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite a non-empty run folder.")]
Tenants = Annotated[bool, typer.Option("--tenants", help="Train every config given at once on one shared copy "
                                       "of the model (multiplexed); flags apply to all.")]
JoinAt = Annotated[str | None, typer.Option(help="With --tenants: comma-separated step at which each tenant "
                                            "joins, e.g. 0,0,100.")]
MaxRows = Annotated[int | None, typer.Option(help="With --tenants: most rows in one packed forward pass (bounds "
                                             "memory); default: the largest tenant batch size; 0: no limit.")]
MaxPadding = Annotated[float, typer.Option(help="With --tenants: largest share of padded token slots in a packed "
                                           "pass before its rows are split.")]
CheckpointEvery = Annotated[int | None, typer.Option(
    help="Write a resumable checkpoint every N optimizer steps (0: only on Ctrl-C / SIGTERM).")]
OnNonfinite = Annotated[str | None, typer.Option(
    help="A NaN/inf loss or gradient: stop (keep the best finite adapter) or skip (drop that step).")]
Resume = Annotated[Path | None, typer.Option(
    help="Continue the interrupted run in this folder from its last checkpoint, with its config.yaml.",
    show_default=False)]


def train(
    configs: ConfigFiles = None,
    model: Model = None, task: Task = None, data: Data = None,
    text_column: TextColumn = None, label_column: LabelColumn = None,
    prompt_column: PromptColumn = None, completion_column: CompletionColumn = None,
    method: Method = None, r: Rank = None, alpha: Alpha = None, targets: Targets = None,
    param: Settings = None, init_adapter: InitAdapter = None,
    lr: Lr = None, head_lr: HeadLr = None, epochs: Epochs = None, max_steps: MaxSteps = None,
    batch_size: BatchSize = None, max_train_examples: MaxTrainExamples = None,
    max_eval_examples: MaxEvalExamples = None, eval_every: EvalEvery = None,
    gradient_checkpointing: GradientCheckpointing = None, group_by_length: GroupByLength = None,
    seed: Seed = None, precision: Precision = None, quantize: Quantize = None, schedule: Schedule = None,
    optimizer: Optimizer = None, selection: Selection = None, output_dir: OutputDir = None, force: Force = False,
    tenants: Tenants = False, join_at: JoinAt = None, max_rows: MaxRows = None, max_padding: MaxPadding = 0.25,
    checkpoint_every: CheckpointEvery = None, on_nonfinite: OnNonfinite = None, resume: Resume = None,
    quiet: Quiet = False,
) -> None:
    """Train an adapter, evaluate it before and after, save it (HF PEFT format) and a report.

    With no arguments this is the main job: LoRA (r=8, alpha=16, query/value, head trained)
    on the bundled MiniLM for Rotten Tomatoes sentiment, about four minutes on two CPU cores,
    written to runs/rotten-tomatoes-lora.

    Examples:

        splice train --force

        splice train examples/smollm2_arithmetic.yaml --max-steps 20

        # LoRA on a 4-bit NF4 base:
        splice train examples/smollm2_arithmetic_qlora.yaml

        splice train --data reviews.jsonl --text-column review \\
            --label-column sentiment --r 16

        splice train --method diablo --set blocks=32 --targets all-linear

        splice train --method moelora --set experts=8 --set init=goat \\
            --r 16 --schedule dmep

        splice train --optimizer loft --lr 1e-3

        splice train --tenants alice.yaml bob.yaml carol.yaml --max-steps 200

        splice train --resume runs/rotten-tomatoes-lora

    Ctrl-C (or SIGTERM) stops after the current step with a checkpoint, the best adapter so far
    in RUN/adapter and the command that continues the run (exit status 130 / 143).
    """
    flags = dict(locals())
    from splice.train.loop import TrainingInterrupted, run

    with user_errors(), _interruptions(TrainingInterrupted), quieted(console, quiet) as out:
        if resume is not None:
            results = [_resume(resume, flags, out)]
        elif tenants:
            results = _multiplex(_configs(flags), join_at, max_rows, max_padding, force, out)
        else:
            results = [run(_configs(flags)[0], console=out, force=force)]
    if quiet:
        _closing_lines(results)
    _exit_if_diverged(results)


# Flags of `train` that set the training config's field of the same name.
CONFIG_FLAGS = ("model", "task", "data", "text_column", "label_column", "prompt_column", "completion_column",
                "init_adapter", "lr", "head_lr", "epochs", "max_steps", "batch_size", "max_train_examples",
                "max_eval_examples", "eval_every", "gradient_checkpointing", "group_by_length", "seed", "precision",
                "quantize", "optimizer", "output_dir",
                "checkpoint_every", "on_nonfinite")


def _configs(flags: dict[str, Any]) -> list[TrainConfig]:
    """One TrainConfig per YAML file given (the defaults without one): the file, the flags on
    top, then the --set pairs (`TrainConfig.from_yaml`)."""
    from splice.train import TrainConfig

    paths = flags["configs"] or []
    if len(paths) > 1 and not flags["tenants"]:
        raise SpliceError(f"{len(paths)} configs given; train them together with --tenants, or give one config")
    if flags["tenants"] and not paths:
        raise SpliceError("--tenants needs one YAML config per tenant")
    if (flags["join_at"] or flags["max_rows"]) and not flags["tenants"]:
        raise SpliceError("--join-at and --max-rows apply to --tenants runs only")
    targets = flags["targets"]
    adapter = {"method": flags["method"], "r": flags["r"], "alpha": flags["alpha"],
               "targets": targets.split(",") if targets and targets != "all-linear" else targets or None}
    # --checkpoint-every 0 unsets the field (a None flag would be ignored); --set pairs come after it.
    settings = {"checkpoint_every": None} if flags["checkpoint_every"] == 0 else {}
    settings |= key_values(flags["param"] or [])
    if flags["schedule"] is not None:
        settings["schedule"] = {"name": flags["schedule"]}
    if flags["selection"] is not None:
        settings["selection"] = {"name": flags["selection"]}
    return [TrainConfig.from_yaml(path, settings=settings, adapter={k: v for k, v in adapter.items() if v is not None},
                                  **{name: flags[name] for name in CONFIG_FLAGS}) for path in paths or [None]]


def _resume(run_dir: Path, flags: dict[str, Any], out: Console) -> RunResult:
    """Continue the interrupted run in `run_dir`, printing to `out`; its config.yaml says it all,
    so any other argument given (but --quiet) is refused, by its flag."""
    from splice.train.loop import resume

    defaults = inspect.signature(train).parameters
    given = sorted({"configs": "a config file", "param": "--set"}.get(name, "--" + name.replace("_", "-"))
                   for name, value in flags.items()
                   if name not in ("resume", "quiet") and value not in (None, []) and value != defaults[name].default)
    if given:
        raise SpliceError(f"--resume continues a run with its own config.yaml; it takes no config or other "
                          f"flags (got {', '.join(given)})")
    return resume(run_dir, console=out)


def _multiplex(configs: list[TrainConfig], join_at: str | None, max_rows: int | None, max_padding: float,
               force: bool, out: Console) -> list[RunResult]:
    """Train the tenants' configs at once on one shared model (`splice.orchestrate.multiplex`),
    printing to `out`."""
    from splice.orchestrate import multiplex

    steps = [_join_step(part) for part in join_at.split(",")] if join_at else None
    rows = "auto" if max_rows is None else (max_rows or None)
    results = multiplex(configs, join_at=steps, max_rows=rows, max_padding=max_padding, force=force, console=out)
    return list(results.values())


def _join_step(text: str) -> int:
    """One entry of --join-at: the step a tenant joins at."""
    from splice.core.errors import SpliceError

    try:
        return int(text)
    except ValueError:
        raise SpliceError(f"--join-at takes comma-separated whole steps such as 0,50; got {text.strip()!r}") from None


@contextmanager
def _interruptions(kind: type[Exception]) -> Iterator[None]:
    """A run stopped by SIGINT/SIGTERM: its message (where the checkpoint is, how to resume) and
    the shell's exit status for that signal."""
    try:
        yield
    except kind as err:
        to_stderr(f"[yellow]interrupted:[/] {err}")
        raise typer.Exit(err.exit_code) from None


def _closing_lines(results: list[RunResult]) -> None:
    """Under --quiet, the end of what the trainer would have printed: its warning (stderr), and
    where each finished run went with its final metrics (a diverged run's error follows)."""
    from splice.train.report import metrics_line

    for result in results:
        if result.status == "finished":
            if result.message:
                to_stderr(f"[bold yellow]warning:[/] {escape(result.message)}")
            label = f"saved to {escape(str(result.paths['run_dir']))}"
            console.print(metrics_line(label, result.metrics["after"]), highlight=False)


def _exit_if_diverged(results: list) -> None:
    """A run that stopped on non-finite numbers saved its best finite adapter; say so and exit 1."""
    diverged = [r for r in results if r.status != "finished"]
    for result in diverged:
        to_stderr(f"[red]error:[/] {result.paths['run_dir']}: {result.message}")
    if diverged:
        raise typer.Exit(1)


def key_values(pairs: list[str]) -> dict[str, object]:
    """`--set KEY=VALUE` pairs as a mapping; values are read as YAML (numbers, lists, booleans, null)."""
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
    text_column: TextColumn = None, label_column: LabelColumn = None,
    prompt_column: PromptColumn = None, completion_column: CompletionColumn = None,
    split: Annotated[str, typer.Option(help="Split of a bundled data set: train, validation or test.")] = "test",
    batch_size: BatchSize = 32,
    max_length: Annotated[int, typer.Option(help="Tokens per example.")] = 64,
    precision: Precision = "no",
    quantize: Quantize = None,
    quiet: Quiet = False,
) -> None:
    """Evaluate a saved adapter on a data set: accuracy, or loss/perplexity/exact match.

    An adapter trained on a 4-bit base (QLoRA) gives its training numbers on that base: pass
    --quantize nf4 (the default options; a run's config.yaml says which it used). Without it the
    adapter runs on the full-precision base, whose outputs differ by the quantization's error.

    Example:

        splice eval --model minilm --adapter runs/rotten-tomatoes-lora/adapter \\
            --data rotten_tomatoes

        splice eval --model smollm2 --task causal_lm --data arithmetic \\
            --quantize nf4 \\
            --adapter runs/smollm2-arithmetic-qlora/adapter
    """
    from splice.train import TrainConfig, evaluate_adapter

    with user_errors(), quieted(console, quiet) as tables:
        settings = TrainConfig.from_dict(model=model, task=task, data=data, text_column=text_column,
                                         label_column=label_column, prompt_column=prompt_column,
                                         completion_column=completion_column, batch_size=batch_size,
                                         max_length=max_length, precision=precision, quantize=quantize)
        metrics = evaluate_adapter(settings, adapter, split)
    title = f"{data} ({split})" if data in DATASETS else data
    table = Table(title=title, caption=f"adapter: {adapter}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}")
    tables.print(table)
    if quiet:  # the metrics on one line
        console.print(f"{escape(title)}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), highlight=False)
