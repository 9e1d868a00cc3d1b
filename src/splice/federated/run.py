"""A federated run on one machine: Flower's simulation engine runs the ServerApp and one
ClientApp per client (in Ray workers), and the report is read back.

    from splice.federated import FederatedConfig, run_federated
    result = run_federated(FederatedConfig.from_yaml("examples/federated_minilm.yaml"))
    result.final["global_accuracy"]

For clients on other machines, the same apps run on Flower's deployment engine
(`splice federate CONFIG.yaml --superlink HOST:PORT`, `splice.federated.deployment`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.simulation import run_simulation
from rich.console import Console

from splice.core import progress
from splice.core.errors import SpliceError
from splice.federated.client import client_app
from splice.federated.config import FederatedConfig
from splice.federated.history import History
from splice.federated.report import main_metric
from splice.federated.server import ServerRun, server_app
from splice.federated.shards import check_shards
from splice.io.output_dirs import check_output_dir


@dataclass
class FederatedResult:
    """A finished run: its report (`results.json` as a dict) and where things were written."""

    config: FederatedConfig
    results: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        return self.results["final"]

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.results["rounds"]


def run_federated(config: FederatedConfig, *, console: Console | None = None, overwrite: bool = False,
                  verbose: bool = False) -> FederatedResult:
    """Run `config` on Flower's simulation engine, one SuperNode per client; the result.
    `overwrite` replaces an existing run folder; `verbose` shows Flower's and Ray's logs."""
    console = console or Console()
    folder = check_output_dir(config.output_dir, overwrite)
    check_shards(config)  # before an earlier run is replaced
    if folder.exists() and overwrite:
        shutil.rmtree(folder)
    finished: list[ServerRun] = []
    metric = main_metric(config)
    with progress.use(console), progress.task("rounds", total=config.rounds) as bar, flower_logs(verbose):
        def on_round(number: int, history: History) -> None:
            value = history.rounds[number].global_metrics.get(metric)
            if number > 0:
                bar.advance()
            console.print(f"round {number}: global {metric} {value:.4f}" if value is not None else f"round {number}")

        with signal_handlers_kept():
            run_simulation(server_app(config, on_round, finished.append), client_app(config),
                           num_supernodes=config.clients, backend_config=backend_config(config, verbose),
                           verbose_logging=verbose)
    if not finished:
        raise SpliceError("the federated run ended without a result; run again with --verbose for Flower's log")
    return read_result(config)


def read_result(config: FederatedConfig) -> FederatedResult:
    """The result a run left in its folder (`report/results.json`)."""
    folder = Path(config.output_dir)
    report = folder / "report"
    results = json.loads((report / "results.json").read_text())
    paths = {"global_adapter": folder / "global-adapter", "report": report,
             "results": report / "results.json", "table": report / "results.md",
             "curves": report / "curves.png", "bytes": report / "bytes.png"}
    if config.method == "dual":
        paths["clients"] = folder / "clients"
    if config.tasks is not None:
        paths["forgetting"] = report / "forgetting.png"
        paths["task_heads"] = folder / "task-heads.safetensors"
    if config.method == "prism":
        paths["blocks"] = folder / "blocks"
    return FederatedResult(config, results, paths)


def backend_config(config: FederatedConfig, verbose: bool) -> dict[str, Any]:
    """Ray's resources: one CPU per client worker (a GPU share per worker where CUDA is there),
    as many workers at once as the machine's CPUs allow."""
    gpus = 1.0 / min(config.clients, 4) if torch.cuda.is_available() else 0.0
    return {"client_resources": {"num_cpus": 1, "num_gpus": gpus},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": verbose,
                          "logging_level": logging.INFO if verbose else logging.ERROR}}


@contextmanager
def signal_handlers_kept() -> Iterator[None]:
    """The process's SIGINT and SIGTERM handlers as they were: Ray's driver installs its own (which
    exit the process) and leaves them, and a later `Trainer` run in the same process must still
    checkpoint on SIGTERM."""
    main = threading.current_thread() is threading.main_thread()  # only it may set handlers
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            if handler is not None:
                signal.signal(sig, handler)


@contextmanager
def flower_logs(verbose: bool) -> Iterator[None]:
    """Flower's INFO lines (every round's sampling and aggregation) only when `verbose`."""
    logger = logging.getLogger("flwr")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
