"""Flower's deployment engine on localhost: a SuperLink and two SuperNodes as separate processes
(started and stopped by the test), the run submitted with `flwr run`, on the real MiniLM with a
tiny budget; the global adapter it saves loads with `splice.load` and equals, bit for bit, the
one the simulation engine gives for the same config; and no Flower process outlives the test."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import splice
from splice import assets
from splice.federated import FederatedConfig, run_federated
from splice.federated.deployment import local_federation, run_deployment
from splice.train import tasks

pytestmark = pytest.mark.slow

SETTINGS = dict(model="minilm", data="rotten_tomatoes", clients=2, rounds=1, local_steps=2,
                train={"batch_size": 8, "max_length": 32, "max_train_examples": 64}, eval_examples=16)


def flower_processes_under(folder: Path) -> list[str]:
    """Flower's processes (`pgrep -f`) whose Flower home lies under `folder`: the ones this test
    started (other sessions' Flower processes on the machine are not this test's business)."""
    if shutil.which("pgrep") is not None:
        found = subprocess.run(["pgrep", "-f", "flower-super|flwr-serverapp|flwr-clientapp"], capture_output=True,
                               text=True, check=False).stdout.split()
        pids = [int(pid) for pid in found]
    else:
        pids = [p.pid for p in psutil.process_iter(["cmdline"])
                if any(name in " ".join(p.info["cmdline"] or []) for name in ("flower-super", "flwr-"))]
    ours = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get("FLWR_HOME", "").startswith(str(folder)):
                ours.append(" ".join(proc.cmdline()))
        except psutil.Error:
            continue
    return ours


@pytest.fixture
def federation_dir(tmp_path):
    folder = tmp_path / "federation"
    yield folder
    assert flower_processes_under(folder) == []


def test_two_clients_on_the_deployment_engine_match_the_simulation(tmp_path, federation_dir):
    quiet = Console(quiet=True)
    config = FederatedConfig(**SETTINGS, output_dir=str(tmp_path / "deployment"))
    with local_federation(2, workdir=federation_dir, startup_timeout=90) as superlink, \
            ThreadPoolExecutor(1) as pool:
        # the deployment run (other processes; this thread only waits on them) and the simulation
        # at once: each spends much of its time waiting (polls, process starts) while the other computes
        deployment = pool.submit(run_deployment, config, superlink, timeout=240, console=quiet)
        simulated = run_federated(FederatedConfig(**SETTINGS, output_dir=str(tmp_path / "simulation")), console=quiet)
        result = deployment.result()
    assert flower_processes_under(federation_dir) == []  # stopped on leaving the block

    folder = Path(config.output_dir)
    assert (folder / "report" / "results.json").is_file() and (folder / "deployment.log").is_file()
    first = result.rounds[1]
    assert sorted(first["train"]) == ["0", "1"]
    for client in "01":
        assert first["train"][client]["num-examples"] > 0 and first["train"][client]["train_loss"] > 0
        assert first["uplink_bytes"][client] > 0 and first["downlink_bytes"][client] > 0
    assert sorted(first["evaluate"]) == ["0", "1"] and "accuracy" in first["global"]

    # the saved global adapter loads onto a fresh MiniLM, its LoRA factors as saved
    deployed = load_file(str(folder / "global-adapter" / "adapter_model.safetensors"))
    fresh, _ = tasks.load_model(config.train_config(), assets.dataset("rotten_tomatoes").label_names)
    loaded = splice.load(fresh, result.paths["global_adapter"])
    factors = {f"base_model.model.{name.replace('.splice.default', '')}.weight": p
               for name, p in loaded.named_parameters() if ".splice.default.lora_" in name}
    assert factors and factors.keys() == {k for k in deployed if ".lora_" in k}
    assert all(torch.equal(p, deployed[k]) for k, p in factors.items())

    # the two engines give the same numbers: same seeds, same clients, same aggregation
    reference = load_file(str(simulated.paths["global_adapter"] / "adapter_model.safetensors"))
    assert deployed.keys() == reference.keys()
    assert [k for k in deployed if not torch.equal(deployed[k], reference[k])] == []
    assert result.final["global_accuracy"] == simulated.final["global_accuracy"]
    assert first["train"] == simulated.rounds[1]["train"]
