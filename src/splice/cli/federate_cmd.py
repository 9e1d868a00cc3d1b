"""`splice federate`: federated fine-tuning of an adapter on Flower (simulation or deployment)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from splice.cli.errors import user_errors
from splice.cli.output import Quiet, command, quieted

console = Console()


def register(app: typer.Typer) -> None:
    command(app, "federate", federate)


def federate(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG", help="Federated run YAML: data, model, adapter, "
                                                "train, clients, rounds, local_steps, partition, aggregation, ...",
                                                show_default=False)],
    clients: Annotated[int | None, typer.Option(help="Override the number of clients.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Override the number of rounds.")] = None,
    aggregation: Annotated[str | None, typer.Option(help="Override the rule: fedavg (A and B separately) or "
                                                    "exact (the mean of B A, re-factored).")] = None,
    method: Annotated[str | None, typer.Option(help="Override the method: fedavg, dual (Med-DualLoRA), fedeu (FedEU), "
                                               "fstq (FED-FSTQ) or, with tasks, prism (PRISM).")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the seed.")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Run folder (default: the file's, else "
                                                   "runs/federated-<data>-<method>-<aggregation>).")] = None,
    superlink: Annotated[str | None, typer.Option(help="Run on Flower's deployment engine: the HOST:PORT of a "
                                                  "running SuperLink's control API, whose SuperNodes (one per "
                                                  "client, node config partition-id=I) have splice installed.")] = None,
    local_deployment: Annotated[bool, typer.Option("--local-deployment", help="Start a SuperLink and one "
                                                   "SuperNode per client on this machine and run on the "
                                                   "deployment engine (a rehearsal of a real federation).")] = False,
    timeout: Annotated[float, typer.Option(help="Deployment engine: give up after this many seconds.")] = 3600.0,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty run folder (with --superlink: also the "
                                                           "earlier run the ServerApp finds there).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's and Ray's logs.")] = False,
    quiet: Quiet = False,
) -> None:
    """Train one adapter across clients that keep their data: each round the server sends the
    global adapter, every sampled client trains it on its own shard for local_steps steps and
    sends back only the adapter's tensors, and the server aggregates them. Prints a table per
    round (global and mean per-client metric, training loss, cumulative megabytes each way)
    and writes <run>/global-adapter (HF PEFT's format for LoRA), <run>/clients/ (personal parts)
    and <run>/report/: results.json, results.md, curves.png, bytes.png.

    A file with `tasks` instead of `data` runs the tasks in order (federated continual learning;
    each task its own head): the report adds the accuracy on every task after each, backward
    transfer and forgetting; method prism protects the earlier tasks (PRISM).

    By default Flower's simulation engine runs every client on this machine; --superlink sends
    the run to a real federation (Flower's deployment engine).

    Examples:

        splice federate examples/federated_minilm.yaml
        splice federate examples/federated_minilm.yaml \\
            --aggregation exact --clients 8 --seed 1
        splice federate examples/federated_minilm.yaml --local-deployment
        splice federate examples/federated_prism.yaml
        splice federate examples/federated_minilm.yaml --superlink 10.0.0.5:9093

    Needs the federated extra: pip install 'splice\\[federated]'.
    """
    from splice.core.errors import SpliceError
    from splice.federated import FederatedConfig, run_federated

    with user_errors(), quieted(console, quiet) as tables:
        if superlink is not None and local_deployment:
            raise SpliceError("--superlink names a running federation and --local-deployment starts one: give one")
        config = FederatedConfig.from_yaml(config_file, clients=clients, rounds=rounds, aggregation=aggregation,
                                           method=method, seed=seed, output_dir=output_dir)
        if superlink is None and not local_deployment:
            result = run_federated(config, console=tables, overwrite=force, verbose=verbose)
        else:
            from splice.federated.deployment import deploy

            result = deploy(config, superlink, timeout=timeout, console=tables, overwrite=force)
    tables.print(rounds_table(result))
    if result.config.tasks is not None:
        tables.print(matrix_table(result))
    console.print(f"wrote {result.paths['global_adapter']} and {result.paths['report']} "
                  f"({result.final['seconds']:.0f} s)")


def rounds_table(result) -> Table:
    """Round by round: the global and mean per-client metric, training loss, cumulative MB."""
    metric = "accuracy" if result.config.task == "classification" else "loss"
    config = result.config
    subject = config.data if config.tasks is None else " -> ".join(task.name for task in config.tasks)
    table = Table(title=f"{config.method} / {config.aggregation}: {config.clients} clients on {subject}")
    for column in ("round", f"global {metric}", f"mean client {metric}", "train loss", "uplink MB", "downlink MB"):
        table.add_column(column, justify="right")
    up, down = result.results["cumulative_uplink_bytes"], result.results["cumulative_downlink_bytes"]
    for record, u, d in zip(result.rounds, up, down, strict=True):
        clients = [m[metric] for m in record["evaluate"].values() if metric in m]
        losses = [m["train_loss"] for m in record["train"].values()]
        label = f"{record['round']} ({record['task']})" if "task" in record else str(record["round"])
        table.add_row(label, _cell(record["global"].get(metric)),
                      _cell(sum(clients) / len(clients) if clients else None),
                      _cell(sum(losses) / len(losses) if losses else None), f"{u / 1e6:.2f}", f"{d / 1e6:.2f}")
    return table


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def matrix_table(result) -> Table:
    """A task sequence's global accuracy on every task after each, and its continual scores."""
    names = [task.name for task in result.config.tasks]
    scores = result.final.get("continual")
    caption = None if scores is None else (f"average accuracy {scores['average_accuracy']:.3f}, backward transfer "
                                           f"{scores['backward_transfer']:+.3f}, mean forgetting "
                                           f"{scores['mean_forgetting']:.3f}")
    table = Table(title="global accuracy after each task", caption=caption)
    table.add_column("after \\ on")
    for name in names:
        table.add_column(name, justify="right")
    for name, row in zip(names, result.results.get("accuracy_matrix", []), strict=False):
        table.add_row(name, *[_cell(v) for v in row])
    return table
