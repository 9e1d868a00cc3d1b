"""A federated run on Flower's deployment engine: a SuperLink, one SuperNode per client (on any
machines), and the run submitted to the SuperLink with `flwr run`, the way real federations run.

    with local_federation(2, workdir="fed") as superlink:     # or a SuperLink you started yourself
        result = run_deployment(config, superlink, timeout=600)
    result = deploy(config)                                   # the same, in one call (`--local-deployment`)

How Flower 1.42 does it, and what this module relies on:

- `flower-superlink --insecure --host H --port P` serves the Fleet API (SuperNodes), the Control
  API (`flwr` CLI) and the Runtime API (ServerApp processes) over HTTP on the one port P; its
  `/health` answers 200 once it listens. It starts a `flower-superexec`, which starts one
  `flwr-serverapp` process per run. It installs an app's dependencies with `uv sync` unless
  started with `--disable-runtime-dependency-installation`, which `local_federation` passes: the
  app needs nothing but the splice already installed.
- `flower-supernode --insecure --superlink H:P --port Q --node-config "partition-id=0
  num-partitions=2"` connects to the SuperLink; Q is its own Runtime API port (one free port per
  SuperNode on a machine). It starts a `flwr-clientapp` process for every message it receives, so
  a client loads the model anew for each training and each evaluation.
- `flwr run APP CONNECTION` builds a FAB (Flower App Bundle) from the app folder APP (its
  pyproject.toml and its .py files) and submits it. CONNECTION names a SuperLink connection in
  `$FLWR_HOME/config.toml` (default ~/.flwr): `run_deployment` writes one in a temporary
  FLWR_HOME, so the user's home is never read or written. With `--format json` the answer is
  JSON (`success`, `run-id`; exit status 0 even on failure). `flwr log RUN CONNECTION --stream`
  streams the ServerApp's log until the run ends; `flwr ls CONNECTION --run-id RUN --format json`
  gives its status (`finished:completed`, `finished:failed`, `finished:stopped`), `flwr stop`
  stops it, and `flwr supernode ls` lists the connected SuperNodes.
- The run carries the config in its run config: the app's `[tool.flwr.app.config]` key
  `splice-config` is the config's mapping as a JSON string (`client.config_from_context`).

The ServerApp writes the report and the global adapter under the config's `output_dir` on the
machine where the SuperLink runs, so `run_deployment` reads the result back when that is this
machine (or a shared file system).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from splice import assets
from splice.core.errors import SpliceError
from splice.federated.client import CONFIG_KEY, OVERWRITE_KEY
from splice.federated.config import FederatedConfig
from splice.federated.run import FederatedResult, read_result
from splice.federated.shards import check_shards
from splice.io.output_dirs import check_output_dir

CONNECTION = "splice"  # the SuperLink connection's name in the temporary $FLWR_HOME/config.toml
APP_MODULE = "splice_federated_app"  # the app folder's one module: the references to splice's apps
LOG_NAME = "deployment.log"  # the run's ServerApp log, kept in the run folder
TAIL_LINES = 40  # log lines an error message quotes

_APP_SOURCE = '''"""splice's federated apps by reference (written by splice.federated.deployment): the run's
config travels in its run config, under `splice-config`."""

from splice.federated import apps

server = apps.server
client = apps.client
'''


def app_folder(config: FederatedConfig, folder: str | Path, overwrite: bool = False) -> Path:
    """Write the Flower app folder (pyproject.toml and one small module) for `config` into
    `folder`; the folder. Everything in `folder` goes into the FAB `flwr run` builds, so give it
    an empty one. `overwrite` lets the ServerApp replace an earlier run in the output folder (it
    refuses one otherwise: that folder is on the SuperLink's machine).

    Paths in the config (the output folder, a data file, a local model folder) are made absolute
    first: the ServerApp and ClientApp processes run elsewhere, and must read and write where the
    user means. The components are the module's names, not `splice.federated.apps:server`
    itself: `flwr run` checks a component by finding its module, which imports the module's
    parent packages (splice, hence torch: ~10 s for each submission); its own module costs nothing.
    """
    import tomli_w  # a dependency of flwr, so there wherever this module can run

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    carried = portable(config)
    project = {
        "project": {"name": "splice-federated", "version": "1.0.0", "license": "Apache-2.0",
                    "description": f"splice federated run: {carried.method}, {carried.aggregation} aggregation, "
                                   f"{carried.clients} clients, {carried.data}",
                    "dependencies": []},  # splice is installed where the apps run: nothing to install
        "tool": {"flwr": {"app": {
            "publisher": "splice",
            "components": {"serverapp": f"{APP_MODULE}:server", "clientapp": f"{APP_MODULE}:client"},
            "config": {CONFIG_KEY: json.dumps(carried.to_dict(), sort_keys=True), OVERWRITE_KEY: overwrite},
        }}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    (folder / f"{APP_MODULE}.py").write_text(_APP_SOURCE)
    return folder


def portable(config: FederatedConfig) -> FederatedConfig:
    """`config` with its paths absolute (from this process's working directory): the output
    folder always, the data and the model when they name a file or folder, not a bundled one."""
    changes: dict[str, Any] = {"output_dir": str(Path(config.output_dir).absolute())}
    if config.tasks is None:
        changes["data"] = _absolute_data(config.data)
    else:
        changes["tasks"] = [dataclasses.replace(task, data=_absolute_data(task.data)) for task in config.tasks]
    if assets.bundled_model(config.model) is None and Path(config.model).exists():
        changes["model"] = str(Path(config.model).absolute())
    return dataclasses.replace(config, **changes)


def _absolute_data(data: str) -> str:
    """A data set's name as is; a file or folder's path made absolute."""
    return str(Path(data).absolute()) if data not in assets.DATASETS and Path(data).exists() else data


def run_deployment(config: FederatedConfig, superlink: str, *, timeout: float = 3600.0,
                   console: Console | None = None, overwrite: bool = False,
                   root_certificates: str | Path | None = None) -> FederatedResult:
    """Run `config` on the SuperLink whose Control API is at `superlink` (host:port), with the
    SuperNodes connected to it (`config.clients` of them, partition ids 0 to clients - 1), and
    return the result it wrote. Waits until the run ends, at most `timeout` seconds in all; a
    run that fails, is stopped or outlasts the timeout (then it is stopped) raises a SpliceError
    with the end of the run's log. The log is kept as `<output_dir>/deployment.log`.

    `overwrite` replaces an existing run folder, as in `run_federated`. Without
    `root_certificates` (the CA's PEM file of a SuperLink with TLS) the connection is insecure.
    """
    deadline = time.monotonic() + timeout
    carried = portable(config)
    fresh_folder(carried, overwrite)
    return _submit(carried, superlink, deadline, console or Console(), root_certificates, overwrite)


def deploy(config: FederatedConfig, superlink: str | None = None, *, timeout: float = 3600.0,
           console: Console | None = None, overwrite: bool = False) -> FederatedResult:
    """`run_deployment` on the SuperLink at `superlink`, or (None) on a federation started for
    the run on this machine and stopped after it (`local_federation`: a SuperLink and
    `config.clients` SuperNodes), whose logs and Flower home are kept in `<output_dir>/federation`.
    `timeout` bounds the whole: starting the federation and the run."""
    if superlink is not None:
        return run_deployment(config, superlink, timeout=timeout, console=console, overwrite=overwrite)
    deadline = time.monotonic() + timeout
    carried = portable(config)
    folder = fresh_folder(carried, overwrite)
    with local_federation(carried.clients, workdir=folder / "federation",
                          startup_timeout=min(120.0, timeout)) as address:
        return _submit(carried, address, deadline, console or Console(), None, overwrite)


def fresh_folder(config: FederatedConfig, overwrite: bool) -> Path:
    """The run folder, checked (as `run_federated` does), emptied when `overwrite`, and made."""
    folder = check_output_dir(config.output_dir, overwrite)
    check_shards(config)  # before an earlier run is replaced
    if folder.exists() and overwrite:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _submit(carried: FederatedConfig, superlink: str, deadline: float, console: Console,
            root_certificates: str | Path | None, overwrite: bool) -> FederatedResult:
    """Submit the run (its config's paths already absolute, its folder ready) with `flwr run`,
    follow its log until it ends, and read back its result."""
    flwr = executable("flwr")
    folder = Path(carried.output_dir)
    log_path = folder / LOG_NAME
    timeout = _left(deadline)
    with tempfile.TemporaryDirectory(prefix="splice-flwr-") as scratch:
        cli = FlowerCli(flwr, Path(scratch) / "flwr-home", superlink, root_certificates)
        app = app_folder(carried, Path(scratch) / "app", overwrite)
        answer = cli.json(["run", str(app), CONNECTION], _left(deadline), what=f"submitting the run to {superlink}")
        run_id = str(answer["run-id"])
        console.print(f"run {run_id} submitted to the SuperLink at {superlink}; waiting at most "
                      f"{_left(deadline):.0f} s (log: {log_path})")
        status = cli.follow(run_id, log_path, deadline)
    if status != "finished:completed":
        what = "did not finish" if status is None else f"ended as {status!r}"
        raise SpliceError(f"federated run {run_id} on {superlink} {what}"
                          + (f" within {timeout:.0f} s and was stopped" if status is None else "")
                          + f"; the end of its log ({log_path}):\n{tail(log_path)}")
    if not (folder / "report" / "results.json").is_file():
        raise SpliceError(f"federated run {run_id} finished, but {folder / 'report' / 'results.json'} is not there: "
                          "the ServerApp writes where the SuperLink runs; is it on another machine? The end of "
                          f"its log ({log_path}):\n{tail(log_path)}")
    console.print(f"run {run_id} finished: {folder}")
    return read_result(carried)


@contextlib.contextmanager
def local_federation(num_clients: int, *, workdir: str | Path, host: str = "127.0.0.1",
                     startup_timeout: float = 120.0, grace: float = 10.0) -> Iterator[str]:
    """A SuperLink and `num_clients` SuperNodes (partition ids 0 to num_clients - 1) as local
    processes on free ports, insecure; yields the SuperLink's address for `run_deployment`
    once every SuperNode is connected. Each process logs to `<workdir>/<name>.log`, and Flower's
    home for them is `<workdir>/flwr-home`. On leaving, however the block ends, every process
    they started is terminated, and killed after `grace` seconds if it is still there.
    """
    if num_clients < 1:
        raise SpliceError(f"a federation needs at least one SuperNode, got num_clients={num_clients}")
    superlink_exe, supernode_exe, flwr = (executable(n) for n in ("flower-superlink", "flower-supernode", "flwr"))
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    env = flower_env(workdir / "flwr-home", Path(superlink_exe).parent)
    ports = free_ports(num_clients + 1, host)
    address = f"{host}:{ports[0]}"
    deadline = time.monotonic() + startup_timeout
    processes: list[Started] = []
    try:
        processes.append(Started.launch(
            "superlink", [superlink_exe, "--insecure", "--host", host, "--port", str(ports[0]),
                          "--disable-runtime-dependency-installation"], workdir, env))
        _wait_for_health(processes[0], f"http://{address}/health", deadline)
        for client, port in enumerate(ports[1:]):
            processes.append(Started.launch(
                f"supernode-{client}", [supernode_exe, "--insecure", "--superlink", address, "--host", host,
                                        "--port", str(port), "--node-config",
                                        f"partition-id={client} num-partitions={num_clients}"], workdir, env))
        _wait_for_nodes(FlowerCli(flwr, workdir / "flwr-home", address), processes, num_clients, deadline)
        yield address
    finally:
        stop(processes, grace)


@dataclasses.dataclass
class Started:
    """A process `local_federation` started, and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def launch(cls, name: str, command: Sequence[str], workdir: Path, env: dict[str, str]) -> Started:
        """Start `command` in its own session (no terminal signal reaches it; `stop` ends it),
        its output into `<workdir>/<name>.log`."""
        log = workdir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, start_new_session=True)
        return cls(name, process, log)

    def check_alive(self) -> None:
        """Raise (with the end of the log) when the process has exited."""
        code = self.process.poll()
        if code is not None:
            raise SpliceError(f"{self.name} exited with status {code} while the federation started; the end of "
                              f"its log ({self.log}):\n{tail(self.log)}")


def stop(processes: Sequence[Started], grace: float = 10.0) -> None:
    """Terminate `processes` and everything they started (Flower's SuperExec and the app
    processes it runs, some in sessions of their own), wait `grace` seconds, kill what is left,
    and reap them all: no orphan survives."""
    family: dict[int, psutil.Process] = {}

    def gather() -> None:
        for started in processes:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(started.process.pid)
                for proc in [root, *root.children(recursive=True)]:
                    family.setdefault(proc.pid, proc)
        for proc in list(family.values()):
            with contextlib.suppress(psutil.Error):
                for child in proc.children(recursive=True):
                    family.setdefault(child.pid, child)

    gather()
    for started in processes:
        if started.process.poll() is None:
            started.process.terminate()
    _, alive = psutil.wait_procs(list(family.values()), timeout=grace)
    if alive:
        gather()  # anything started while they stopped
        alive = [proc for proc in family.values() if proc.is_running()]
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=grace)
    for started in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            started.process.wait(timeout=grace)


class FlowerCli:
    """The `flwr` command line, with its own Flower home that names one SuperLink connection."""

    def __init__(self, flwr: str, home: Path, superlink: str, root_certificates: str | Path | None = None) -> None:
        import tomli_w

        self.flwr, self.superlink = flwr, superlink
        self.env = flower_env(home, Path(flwr).parent)
        connection: dict[str, Any] = {"address": superlink}
        if root_certificates is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(Path(root_certificates).absolute())
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION,
                                                                       CONNECTION: connection}}))

    def json(self, args: Sequence[str], timeout: float, what: str) -> dict[str, Any]:
        """`flwr ARGS --format json`: its answer, or a SpliceError that says `what` failed and why."""
        if timeout <= 0:
            raise SpliceError(f"no time left for {what}")
        try:
            done = subprocess.run([self.flwr, *args, "--format", "json"], capture_output=True, text=True,
                                  env=self.env, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            raise SpliceError(f"{what}: `flwr {' '.join(args)}` did not answer within {timeout:.0f} s") from None
        try:
            answer = json.loads(done.stdout[done.stdout.index("{"):])
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or not answer.get("success"):
            message = answer.get("error-message") if isinstance(answer, dict) else None
            raise SpliceError(f"{what} failed: " + (message or f"`flwr {' '.join(args)}` exited with status "
                                                    f"{done.returncode}:\n{_last(done.stdout + done.stderr)}"))
        return answer

    def status(self, run_id: str, timeout: float = 60.0) -> str:
        """The run's status, e.g. "running" or "finished:completed"."""
        answer = self.json(["ls", CONNECTION, "--run-id", run_id], timeout, what=f"asking for run {run_id}'s status")
        return str(answer["runs"][0]["status"])

    def follow(self, run_id: str, log_path: Path, deadline: float) -> str | None:
        """Stream the run's log into `log_path` until the run ends or the deadline passes; its
        final status, or None when the deadline passed (the run is then stopped)."""
        with log_path.open("ab") as out:
            streamer = subprocess.Popen([self.flwr, "log", run_id, CONNECTION, "--stream"], stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
            try:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    streamer.wait(timeout=max(_left(deadline), 0.0))
            finally:
                if streamer.poll() is None:
                    streamer.terminate()
                    try:
                        streamer.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        streamer.kill()
                        streamer.wait()
        while True:  # the stream ends with the run; should it break off early, poll instead
            status = self.status(run_id, timeout=max(min(_left(deadline), 60.0), 10.0))
            if status.startswith("finished"):
                return status
            if _left(deadline) <= 0:
                with contextlib.suppress(SpliceError):
                    self.json(["stop", run_id, CONNECTION], 60.0, what=f"stopping run {run_id}")
                return None
            time.sleep(min(5.0, max(_left(deadline), 0.1)))

    def online_nodes(self) -> int:
        """How many SuperNodes are connected to the SuperLink now."""
        answer = self.json(["supernode", "ls", CONNECTION], 60.0, what="listing the SuperNodes")
        return sum(1 for node in answer.get("nodes", []) if node.get("status") == "online")


def executable(name: str) -> str:
    """The path of one of Flower's commands: next to this Python (a virtual environment's
    scripts need not be on PATH), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SpliceError(f"{name} not found (next to {sys.executable} or on PATH): Flower's deployment engine "
                          "needs Flower's command-line tools; install them with `pip install 'splice[federated]'`")
    return found


def flower_env(home: Path, bin_dir: Path) -> dict[str, str]:
    """The environment of Flower's processes: their own Flower home, Flower's commands on PATH
    (the SuperLink and SuperNodes start `flower-superexec`, `flwr-serverapp`, `flwr-clientapp`
    by name), no update check or telemetry (nothing reaches the network) and no dependency
    installation."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(FLWR_HOME=str(home), FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=os.pathsep.join([str(bin_dir), env.get("PATH", "")]))
    return env


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports the OS reports free on `host` now (held open together, so they
    differ)."""
    with contextlib.ExitStack() as stack:
        sockets = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET))
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a log file (the access lines of Flower's HTTP server left out)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"(no log: {err})"
    return _last(text, lines)


def _last(text: str, lines: int = TAIL_LINES) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # Flower's log levels come in colour
    kept = [line for line in text.splitlines() if "uvicorn.access" not in line and "HTTP/1.1\"" not in line]
    return "\n".join(kept[-lines:]) or "(empty)"


def _left(deadline: float) -> float:
    return deadline - time.monotonic()


def _wait_for_health(superlink: Started, url: str, deadline: float) -> None:
    """Until the SuperLink answers `/health` with 200 (or exits, or the deadline passes)."""
    while True:
        superlink.check_alive()
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        if _left(deadline) <= 0:
            raise SpliceError(f"the SuperLink did not answer at {url} in time; the end of its log "
                              f"({superlink.log}):\n{tail(superlink.log)}")
        time.sleep(0.25)


def _wait_for_nodes(cli: FlowerCli, processes: Sequence[Started], count: int, deadline: float) -> None:
    """Until `count` SuperNodes are online at the SuperLink (or one exits, or the deadline passes)."""
    while True:
        for started in processes:
            started.check_alive()
        online = cli.online_nodes()
        if online >= count:
            return
        if _left(deadline) <= 0:
            logs = "\n\n".join(f"{s.name} ({s.log}):\n{tail(s.log, 10)}" for s in processes)
            raise SpliceError(f"only {online} of {count} SuperNodes connected to the SuperLink in time; the ends "
                              f"of the logs:\n{logs}")
        time.sleep(0.5)
