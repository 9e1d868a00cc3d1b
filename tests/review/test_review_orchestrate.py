"""Review of splice.orchestrate (multi-tenant multiplexing, volume 2 §10 MuxTune) and
`splice train --tenants`: each test pins a defect found in review; it fails now and passes once
the defect is fixed.

The training itself was checked and holds (see the review report): tenants with different
ranks, forms (LoRA, DoRA, TinyLoRA, TT-LoRA, LoRETTA, MoELoRA), optimizers (AdamW, LoRA+),
bf16, accumulation, clipping and weight decay end where they end alone, and a tenant whose
adapter turns NaN leaves the others' losses bit for bit as alone. The defects are in how a run
of several tenants is set up, validated and driven.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import accelerate
import pytest
import torch
import typer
from helpers import save_tiny_bert
from packaging.version import Version
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from splice.cli import train_cmd
from splice.core.errors import SpliceError
from splice.orchestrate import Multiplexer, multiplex
from splice.train import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "orchestrate"))
from mux_helpers import text_rows  # noqa: E402

QUIET = Console(quiet=True)


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mux_bert_dir(tmp_path_factory) -> Path:
    """The tiny BERT without dropout (as tests/orchestrate uses), saved as a model folder."""
    return save_tiny_bert(tmp_path_factory.mktemp("review-mux-bert"), dropout=0.0)


@pytest.fixture(scope="module")
def mux_data(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("review-mux-data")
    return {"two": str(text_rows(folder / "two.jsonl", 24, 2, 6, 1)),
            "three": str(text_rows(folder / "three.jsonl", 24, 3, 4, 2))}


def tenant(model: Path | str, data: str, out: Path, **fields: Any) -> TrainConfig:
    """A tenant that takes a second or two: one or two steps of batch 8 on 24 rows."""
    return TrainConfig(**{"model": str(model), "data": data, "batch_size": 8, "max_steps": 1, "lr": 1e-2,
                          "output_dir": str(out), **fields})


# ------------------------------------------------------------------------------- findings


def test_multiplex_folders_refused_before_any_tenant_trains(mux_bert_dir, mux_data, tmp_path):
    """Bug: `multiplex` claims a tenant's output folder only when that tenant joins. A tenant whose
    folder is not empty is refused after the tenants before it loaded, wrote config.yaml and
    adapter/ and trained; the run is lost, and those folders now make the very same command fail
    again without --force (a lone `splice train` refuses before any work)."""
    a = tenant(mux_bert_dir, mux_data["two"], tmp_path / "a", max_steps=2)
    b = tenant(mux_bert_dir, mux_data["three"], tmp_path / "b", seed=3)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("the user's own file")
    with pytest.raises(SpliceError, match="notes.txt"):
        multiplex([a, b], join_at=[0, 1], console=QUIET)
    assert (tmp_path / "b" / "notes.txt").read_text() == "the user's own file"
    leftovers = sorted(p.name for p in (tmp_path / "a").iterdir() if not p.name.startswith(".")) \
        if (tmp_path / "a").exists() else []
    assert leftovers == [], f"tenant a was set up and trained before b was refused: {leftovers}"
    (tmp_path / "b" / "notes.txt").unlink()
    results = multiplex([a, b], join_at=[0, 1], console=QUIET)  # the same command, fixed: no --force needed
    assert set(results) == {"a", "b"}


def test_multiplexer_first_tenant_that_fails_to_join_leaves_no_shared_model(mux_bert_dir, mux_data, tmp_path):
    """Bug: the first tenant's model becomes the shared one (and its config the one every later
    tenant must match) before its trainer is built; when the trainer refuses it (here: a selection
    rule, which tenants cannot use), the Multiplexer keeps that model, accelerator and config. With
    no tenant training, the next tenant is refused for not matching the one that never joined."""
    mux = Multiplexer(console=QUIET)
    refused = tenant(mux_bert_dir, mux_data["two"], tmp_path / "refused", precision="bf16",
                     selection={"name": "gast"})
    with pytest.raises(SpliceError, match="selection"):
        mux.add(refused)
    assert not mux.tenants
    try:
        name = mux.add(tenant(mux_bert_dir, mux_data["three"], tmp_path / "good"))  # precision "no"
        assert name == "good"
        assert mux.tenants["good"].trainer.config.precision == "no"
    finally:
        mux.close()


@pytest.mark.parametrize("folder", ["train", "eval"])
def test_multiplex_tenant_named_after_its_output_folder_avoids_reserved_names(mux_bert_dir, mux_data, tmp_path,
                                                                             folder):
    """Bug: a tenant's adapter is named after its output folder (`_tenant_name`), which checks
    that the name is an identifier but not that it is free: runs/train or runs/eval (nn.Module
    methods) fail with "adapter name 'train' is reserved ... choose another", a name the user
    never chose and `splice train --tenants` has no way to change. A lone run into the same
    folder trains."""
    out = tmp_path / "runs" / folder
    results = multiplex([tenant(mux_bert_dir, mux_data["two"], out)], console=QUIET)
    (result,) = results.values()
    assert Path(result.paths["run_dir"]).resolve() == out.resolve()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("step", [-1, 1.5, "1"], ids=["negative", "fraction", "string"])
def test_multiplex_join_at_refuses_steps_that_are_not_whole_numbers_from_zero(mux_bert_dir, mux_data, tmp_path,
                                                                           step):
    """Bug: `join_at` is only checked for its length. A negative step is taken as 0 and a
    fraction as the next whole step, silently; a string fails deep in `sorted` with a TypeError.
    Each should be a SpliceError naming join_at and the value, before any tenant is set up."""
    a = tenant(mux_bert_dir, mux_data["two"], tmp_path / "a")
    b = tenant(mux_bert_dir, mux_data["three"], tmp_path / "b", seed=3)
    with pytest.raises(SpliceError, match=rf"join_at.*{re.escape(repr(step))}|join_at.*{re.escape(str(step))}"):
        multiplex([a, b], join_at=[0, step], console=QUIET)
    assert not (tmp_path / "a" / "config.yaml").exists()


def test_cli_tenants_join_at_that_is_not_a_number_is_a_clear_error(mux_bert_dir, mux_data, tmp_path):
    """Bug: `splice train --tenants a.yaml b.yaml --join-at 0,x` ends in a raw ValueError
    traceback ("invalid literal for int() with base 10: 'x'") from `_multiplex`'s int(); every
    other misuse gets `error: ...` naming the flag and exit status 1."""
    app = typer.Typer()
    train_cmd.register(app)

    @app.callback()
    def _main() -> None:
        """The `splice` app holds the command beside others."""

    paths = []
    for name, data in (("a", mux_data["two"]), ("b", mux_data["three"])):
        tenant(mux_bert_dir, data, tmp_path / name).to_yaml(tmp_path / f"{name}.yaml")
        paths.append(str(tmp_path / f"{name}.yaml"))
    result = CliRunner().invoke(app, ["train", "--tenants", *paths, "--join-at", "0,x"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "--join-at" in result.output and "'x'" in result.output


def test_multiplexer_tenants_naming_one_model_by_different_paths_share_it(mux_bert_dir, mux_data, tmp_path,
                                                                         monkeypatch):
    """Bug: "tenants must share model" compares the `model` strings as written, so one model
    folder given as an absolute path, with a trailing slash, or relative to the working folder is
    refused as a different model (output_dir, by contrast, is compared resolved)."""
    monkeypatch.chdir(mux_bert_dir.parent)
    mux = Multiplexer(console=QUIET)
    try:
        mux.add(tenant(mux_bert_dir, mux_data["two"], tmp_path / "absolute"))
        mux.add(tenant(f"{mux_bert_dir}/", mux_data["three"], tmp_path / "slash", seed=3))
        mux.add(tenant(mux_bert_dir.name, mux_data["two"], tmp_path / "relative", seed=4))
        assert sorted(mux.tenants) == ["absolute", "relative", "slash"]
    finally:
        mux.close()


WORKER = '''
import os, sys
from pathlib import Path
import torch
from rich.console import Console
from safetensors.torch import save_file
from splice.orchestrate import Multiplexer
from splice.train import Callback, TrainConfig


class Keep(Callback):
    def __init__(self):
        self.state = {}

    def on_step_end(self, trainer, entry):
        self.state = trainer.snapshot()


torch.set_num_threads(1)
dump, configs = Path(sys.argv[1]), sys.argv[2:]
rank = int(os.environ.get("RANK", "0"))
mux = Multiplexer(console=Console(quiet=True))
kept = {}
for path in configs:
    keep = Keep()
    kept[mux.add(TrainConfig.from_yaml(path), callbacks=[keep])] = keep
mux.run()
dump.mkdir(parents=True, exist_ok=True)
for name, keep in kept.items():
    save_file({k: v.contiguous() for k, v in keep.state.items()}, str(dump / f"{name}-rank{rank}.safetensors"))
'''


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.skipif(Version(accelerate.__version__) < Version("1.7"),
                    reason="accelerate < 1.7 does not pick a free port for --main_process_port 0")
def test_multiplexer_under_accelerate_launch_syncs_tenants_or_refuses_clearly(mux_bert_dir, mux_data, tmp_path):
    """Bug: under `accelerate launch` (two processes; a lone `splice train` works there) every rank
    claims every tenant's folder, so rank 1 is refused with "<folder> is in use by another training
    run (process N)", N being its sibling rank. And the claim is not all: the packed forward and
    backward run on the unwrapped shared model, not the DDP-prepared views, so no gradient would be
    all-reduced and the ranks' adapters would drift apart. Correct: equal adapters on every rank,
    or a refusal that says multiplexing runs in one process. (~25 s: two launched processes.)"""
    paths = []
    for name, data, seed in (("a", mux_data["two"], 1), ("b", mux_data["three"], 3)):
        tenant(mux_bert_dir, data, tmp_path / name, max_steps=2, batch_size=4, seed=seed).to_yaml(
            tmp_path / f"{name}.yaml")
        paths.append(str(tmp_path / f"{name}.yaml"))
    worker = tmp_path / "mux_worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", str(worker), str(tmp_path / "dump"), *paths]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        errors = re.findall(r"^splice\.[\w.]+: (.+)$", done.stderr, flags=re.MULTILINE)  # splice's exceptions
        assert errors, done.stderr[-3000:]
        assert not any("in use by another training run" in e for e in errors), errors
        assert any("process" in e for e in errors), errors
        return
    for name in ("a", "b"):
        rank0, rank1 = (load_file(tmp_path / "dump" / f"{name}-rank{r}.safetensors") for r in (0, 1))
        assert rank0.keys() == rank1.keys()
        for key in rank0:
            torch.testing.assert_close(rank1[key], rank0[key], atol=1e-6, rtol=1e-6,
                                       msg=lambda m, n=name, k=key: f"tenant {n}, {k} differs between ranks: {m}")
