"""`splice boostlora`: rounds of TinyLoRA trained on what the model still gets wrong, each merged
into the base weights in a fresh slice of their singular basis (BoostLoRA). `splice boost-tabular`:
BoostLLM on a table against logistic regression and gradient-boosted trees."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from splice.cli.errors import user_errors
from splice.cli.output import Quiet, command, quieted

console = Console()


def register(app: typer.Typer) -> None:
    command(app, "boostlora", boostlora)
    command(app, "boost-tabular", boost_tabular)


def boostlora(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG", help="Training YAML (model, task, data, lr, "
                                                "max_steps, ...; the adapter's targets say where) with an optional "
                                                "boost: section (rounds, r, u, mine, mix_correct, rotate, "
                                                "steps_per_round, patience, first_round_all).", show_default=False)],
    rounds: Annotated[int | None, typer.Option(help="Most rounds K; the merged change has rank up to K r "
                                               "(default: 8).", show_default=False)] = None,
    r: Annotated[int | None, typer.Option("--r", help="Width of each round's singular slice (default: 2).",
                                          show_default=False)] = None,
    u: Annotated[int | None, typer.Option("--u", help="Trainable numbers per module and round, at most r² "
                                          "(default: 4).",
                                          show_default=False)] = None,
    mine: Annotated[str | None, typer.Option(help="errors: train each round on the rows still wrong; all: on every "
                                             "row (default: errors).", show_default=False)] = None,
    mix_correct: Annotated[float | None, typer.Option(help="Share of a mined round's rows drawn from rows already "
                                                      "right (default: 0.1).", show_default=False)] = None,
    rotate: Annotated[bool | None, typer.Option("--rotate/--no-rotate", help="A fresh singular slice each kept "
                                                "round (--no-rotate reuses the top one: rank stays r).",
                                                show_default=False)] = None,
    steps_per_round: Annotated[int | None, typer.Option(help="Optimizer steps a round (default: the config's "
                                                        "budget / rounds).", show_default=False)] = None,
    patience: Annotated[int | None, typer.Option(help="Rounds without a validation gain before stopping "
                                                 "(default: 1).", show_default=False)] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--set", help="A training field as KEY=VALUE (YAML value), repeatable: --set lr=3e-2.",
        show_default=False)] = None,
    output_dir: Annotated[str | None, typer.Option(help="Run folder (default: the file's output_dir).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty run folder.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a stopped run in its folder (the same config "
                                         "and flags): the kept rounds are replayed, the rest trained.")] = False,
    quiet: Quiet = False,
) -> None:
    """Boost TinyLoRA rounds (BoostLoRA, arXiv 2604.27308): each round trains a few numbers per
    module in the next slice of the pretrained weights' singular basis, on the training rows the
    model still gets wrong (round 0 on all of them), keeps the round only if validation improves,
    merges it into the weights and discards it. Rank grows by r per kept round; inference costs
    nothing extra.

    Writes <out>/rounds/round-<k>/ (each round's run), <out>/adapter/ (the whole change as a PEFT
    LoRA of rank K r for the untouched base, with the head) and <out>/report/ (boost.json,
    boost.md, boost.png: scores, training error and rank of W - W0 per round).

    Examples:

        splice boostlora examples/rotten_tomatoes_boostlora.yaml
        splice boostlora examples/rotten_tomatoes_boostlora.yaml \\
            --rounds 4 --r 4 --u 8 --force
        splice boostlora examples/rotten_tomatoes_boostlora.yaml \\
            --no-rotate --output-dir runs/fixed-slice
        # after Ctrl-C:
        splice boostlora examples/rotten_tomatoes_boostlora.yaml --resume
    """
    from splice.boost.boostlora import boostlora as run_boost
    from splice.boost.boostlora import read_boost_config
    from splice.cli.train_cmd import key_values

    with user_errors(), quieted(console, quiet) as tables:
        settings = key_values(param or []) | ({"output_dir": output_dir} if output_dir else {})
        config, boost = read_boost_config(config_file, settings=settings, rounds=rounds, r=r, u=u, mine=mine,
                                          mix_correct=mix_correct, rotate=rotate, steps_per_round=steps_per_round,
                                          patience=patience)
        result = run_boost(config, **asdict(boost), console=tables, overwrite=force, resume=resume)
    scores = ", ".join(f"{split} {name} {value:.4f}" for split in ("validation", "test")
                       for name, value in getattr(result, split).items())
    kept_rank = max((r.rank["max"] for r in result.rounds if r.kept), default=0)
    console.print(f"{result.kept} of {len(result.rounds)} round(s) kept (stopped: "
                  f"{result.to_dict()['stop_reason']}); rank of W - W0 up to {kept_rank:.0f}; {scores or 'no scores'}"
                  f" ({result.wall_seconds:.0f} s). Wrote {Path(config.output_dir) / 'report'}"
                  + (f" and the LoRA {result.adapter}" if result.adapter else ""), highlight=False)


def boost_tabular(
    data: Annotated[str, typer.Option(help="A bundled table (breast_cancer, wine, iris, digits) or a CSV file "
                                      "(header row; the label column is the last unless --label-column).",
                                      show_default=False)],
    shots: Annotated[int, typer.Option(help="Rows drawn for training (stratified; a quarter held out for early "
                                       "stopping).")] = 16,
    seeds: Annotated[list[int] | None, typer.Option("--seed", help="A draw's seed, repeatable (default: 0).",
                                                    show_default=False)] = None,
    model: Annotated[str, typer.Option(help="The language model (bundled name or local folder).")] = "smollm2",
    label_column: Annotated[str | None, typer.Option(help="The CSV's label column.")] = None,
    rounds: Annotated[int, typer.Option(help="Boosting rounds (one LoRA and head each).")] = 3,
    shrinkage: Annotated[float, typer.Option(help="Weight η of each round's logits, in (0, 1].")] = 0.5,
    tree_depth: Annotated[int, typer.Option(help="Depth of the decision tree whose path is the second view.")] = 3,
    features_only: Annotated[bool, typer.Option("--features-only", help="Only the features view (no tree "
                                                "path): with --rounds 1 --shrinkage 1, the LLM fine-tuned "
                                                "once on the serialised rows (TabLLM).")] = False,
    steps: Annotated[int, typer.Option(help="Optimizer steps per round.")] = 40,
    lr: Annotated[float, typer.Option(help="Learning rate of each round's LoRA.")] = 1e-3,
    head_lr: Annotated[float, typer.Option(help="Learning rate of each round's head.")] = 1e-2,
    max_length: Annotated[int, typer.Option(help="Tokens a view is cut at (a warning counts the rows cut).")] = 512,
    test_rows: Annotated[int | None, typer.Option(help="Score a seeded sample of N test rows (default: all).",
                                                  show_default=False)] = None,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="Also fit logistic regression, "
                                            "HistGradientBoosting and XGBoost on the same shots.")] = True,
    output_dir: Annotated[str | None, typer.Option(help="Report folder (default: runs/boost-<data>-<shots>).",
                                                   show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty report folder.")] = False,
    quiet: Quiet = False,
) -> None:
    """Few-shot classification of a table with a language model, boosted (BoostLLM, arXiv
    2605.06117): each row is read as "The <column> is <value>." sentences and as the path a shallow
    decision tree takes for it; each round adds a LoRA and a head whose logits, times η, add to
    the earlier rounds' (log-loss boosting, early stopping per round on held-out shots). Scored on
    the rows not drawn, against logistic regression, HistGradientBoosting and XGBoost fitted on
    the same shots. Writes <out>/results.json and results.md (mean ± std over the seeds).

    Examples:

        splice boost-tabular --data breast_cancer --shots 16
        splice boost-tabular --data wine --shots 64 \\
            --seed 0 --seed 1 --seed 2 --test-rows 100
        splice boost-tabular --data my_table.csv --label-column outcome \\
            --rounds 1 --shrinkage 1 --features-only
    """
    from splice.boost.baselines import BASELINES
    from splice.boost.tabular_job import TabularJob, run_tabular_job

    with user_errors(), quieted(console, quiet) as tables:
        job = TabularJob(data=data, shots=shots, seeds=seeds or [0], model=model, label_column=label_column,
                         rounds=rounds, shrinkage=shrinkage, tree_depth=tree_depth,
                         views=("features",) if features_only else ("features", "path"), max_length=max_length,
                         test_rows=test_rows, baselines=BASELINES if baselines else (),
                         output_dir=output_dir or f"runs/boost-{Path(data).stem}-{shots}",
                         settings={"steps": steps, "lr": lr, "head_lr": head_lr})
        report = run_tabular_job(job, console=tables, overwrite=force)
    summary = "; ".join(f"{name} accuracy {m['accuracy']['mean']:.3f}, AUC "
                        + ("-" if m["auc"]["mean"] is None else f"{m['auc']['mean']:.3f}")
                        for name, m in report["summary"].items())
    console.print(f"{summary} ({report['wall_seconds']:.0f} s). Wrote {Path(job.output_dir) / 'results.md'}",
                  highlight=False)
