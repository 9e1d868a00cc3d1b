"""Folders are written whole or not at all (issue 13, `splice.io.files.atomic_directory`).

A failure at any step (an exception, a full disk, a kill) leaves the old folder as it was, bytes
and outputs; nothing is written through a symbolic link; temporaries of killed writers are removed
by the next write, and nothing else is. The SIGKILL test drives bench/bench_fault_injection.py's
harness (the bench runs the same with 500 kills and the HEAD~3 writer for comparison).
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import os
import resource
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import logits, make_bert, randomize
from safetensors.torch import load_file
from typer.testing import CliRunner

import splice
from splice.cli.main import app
from splice.compression import compress
from splice.compression.factorized import FactorizedLinear, load_factorized, save_factorized
from splice.core.errors import OutputExistsError, SpliceError
from splice.io import files
from splice.io.adapter_states import adapter_state, save_state
from splice.io.manifest import MANIFEST_NAME
from splice.merging import load_unified, merge_adapters, unify_adapters

pytestmark = pytest.mark.guards("lost")  # the old folder (or a file outside it) lost or mixed; overridden below

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_fault_injection.py"
TEMPORARY_NAMES = (".splice-tmp-", ".splice-old-")


def bench():
    """bench/bench_fault_injection.py as a module (its harness is the test's)."""
    if "bench_fault_injection" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_fault_injection", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_fault_injection"]


def lora_model(r: int = 2, alpha: float = 4, seed: int = 0, targets=("query", "value")):
    model = make_bert()
    splice.attach(model, splice.LoRA(r=r, alpha=alpha, targets=list(targets)))
    randomize(model, seed=seed)
    return model


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if any(t in p.name for t in TEMPORARY_NAMES))


def loaded_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    return logits(splice.load(make_bert(), folder), input_ids=ids)


@pytest.fixture
def old(tmp_path, ids):
    """An adapter folder (version "old") with its bytes and its outputs."""
    folder = splice.save(lora_model(), tmp_path / "adapter")
    return folder, snapshot(folder), loaded_logits(folder, ids)


def assert_unchanged(old, ids) -> None:
    folder, files_before, outputs = old
    assert snapshot(folder) == files_before
    assert torch.equal(loaded_logits(folder, ids), outputs)
    assert temporaries(folder) == []


# -- the swap ------------------------------------------------------------------------------------


@pytest.mark.guards("silent")
def test_overwrite_replaces_the_folder_whole_and_keeps_its_permissions(old, ids):
    folder = old[0]
    (folder / "notes.txt").write_text("from the old version")
    folder.chmod(0o750)
    new = lora_model(r=3, alpha=8, seed=1)
    assert splice.save(new, folder, overwrite=True) == folder
    replaced = sorted(p.name for p in folder.iterdir())
    assert replaced == ["README.md", files.CONFIG_NAME, files.WEIGHTS_NAME, MANIFEST_NAME]  # replaced whole
    assert json.loads((folder / files.CONFIG_NAME).read_text())["r"] == 3
    assert torch.equal(loaded_logits(folder, ids), logits(new, input_ids=ids))
    assert (folder.stat().st_mode & 0o777) == 0o750
    assert temporaries(folder) == []


@pytest.mark.guards("silent")
def test_without_rename_exchange_two_renames_do_the_same(old, ids, monkeypatch):
    monkeypatch.setattr(files, "_rename2", lambda *args: False)  # an OS or file system without renameat2
    new = lora_model(r=3, alpha=8, seed=1)
    splice.save(new, old[0], overwrite=True)
    assert torch.equal(loaded_logits(old[0], ids), logits(new, input_ids=ids))
    assert temporaries(old[0]) == []
    splice.save(new, old[0].parent / "fresh")  # a fresh folder: a plain rename
    assert torch.equal(loaded_logits(old[0].parent / "fresh", ids), logits(new, input_ids=ids))


def test_a_kill_between_the_two_renames_is_put_right_by_the_next_write(old, ids):
    """The fallback's only window: the old folder aside, the new one not yet in. A reader gets a
    clear error; the next write puts the old folder back first (and so refuses to replace it
    without overwrite=True)."""
    folder, files_before, outputs = old
    aside = folder.parent / f".{folder.name}.splice-old-0123abcd"
    folder.rename(aside)
    new = splice.save(lora_model(seed=1), folder.parent / "other")
    new.rename(folder.parent / f".{folder.name}.splice-tmp-0123abcd")
    with pytest.raises(SpliceError, match="does not exist"):
        splice.load(make_bert(), folder)
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        splice.save(lora_model(seed=2), folder)
    assert_unchanged(old, ids)


# -- failures at each step -----------------------------------------------------------------------


def _raise(error: BaseException):
    def fail(*args, **kwargs):
        raise error
    return fail


STEPS = {
    # the config is written, then the weights fail (HEAD~3's mixture) ...
    "weights raise": ("splice.io.files.save_file", OSError(errno.ENOSPC, "No space left on device"), SpliceError),
    "config raises": ("splice.io.files._write_new", OSError(errno.EDQUOT, "Disk quota exceeded"), SpliceError),
    "writer bug": ("splice.io.peft_format.write_weights", RuntimeError("a bug"), RuntimeError),
    "interrupted": ("splice.io.files.save_file", KeyboardInterrupt(), KeyboardInterrupt),
    "fsync fails": ("os.fsync", OSError(errno.EIO, "Input/output error"), SpliceError),
    "swap fails": ("splice.io.files._rename2", OSError(errno.EIO, "Input/output error"), SpliceError),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_a_failure_at_any_step_leaves_the_old_folder(step, old, ids, monkeypatch):
    target, error, raised = STEPS[step]
    monkeypatch.setattr(target, _raise(error))
    with pytest.raises(raised) as caught:
        splice.save(lora_model(r=3, alpha=8, seed=1), old[0], overwrite=True)
    if raised is SpliceError:
        assert "the folder already there is unchanged" in str(caught.value)
    monkeypatch.undo()
    assert_unchanged(old, ids)


def test_a_failed_fresh_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("splice.io.files.save_file", _raise(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(SpliceError, match="No space left on device; nothing was written"):
        splice.save(lora_model(), tmp_path / "sub" / "adapter")
    assert os.listdir(tmp_path / "sub") == []


@pytest.fixture
def file_size_limit():
    """`ulimit -f` for the block: writes past `limit` bytes fail with EFBIG (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limit(size: int | None) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft if size is None else size, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_a_full_disk_leaves_the_old_folder(old, ids, file_size_limit):
    big = lora_model(r=32, alpha=8, seed=1, targets=("query", "key", "value", "dense"))  # ~100 KB of weights
    file_size_limit(16_000)  # the config fits, the weights do not
    try:
        with pytest.raises(SpliceError, match="File too large; the folder already there is unchanged"):
            splice.save(big, old[0], overwrite=True)
    finally:
        file_size_limit(None)
    assert_unchanged(old, ids)


@pytest.mark.guards("crash")
def test_a_full_disk_in_the_cli_is_a_message_and_leaves_the_old_output(tmp_path, ids, file_size_limit):
    a = splice.save(lora_model(r=16, seed=1, targets=("query", "key", "value", "dense")), tmp_path / "a")
    b = splice.save(lora_model(r=16, seed=2, targets=("query", "key", "value", "dense")), tmp_path / "b")
    out = tmp_path / "merged"
    assert CliRunner().invoke(app, ["merge", str(a), str(b), "--out", str(out)]).exit_code == 0
    before = snapshot(out)
    file_size_limit(16_000)
    try:
        result = CliRunner().invoke(app, ["merge", str(a), str(b), "--method", "cat", "--out", str(out), "--force"])
    finally:
        file_size_limit(None)
    message = " ".join(result.output.split())  # rich wraps lines
    assert result.exit_code == 1 and "File too large; the folder already there is unchanged" in message
    assert "Traceback" not in result.output
    assert snapshot(out) == before and temporaries(out) == []


def test_a_writer_given_the_temporary_folder_fills_it_in_place(tmp_path, ids, monkeypatch):
    """`splice.save(model, temporary)` inside `with atomic_directory(run) as temporary` (the trainer
    does this): written in place, swapped in with the rest; a failure inside empties it again."""
    run, model = tmp_path / "run", lora_model()
    with files.atomic_directory(run) as temporary:
        splice.save(model, temporary, overwrite=True)
        (temporary / "metrics.json").write_text("{}")
    assert sorted(os.listdir(run)) == sorted(["README.md", files.CONFIG_NAME, files.WEIGHTS_NAME, MANIFEST_NAME,
                                              "metrics.json"])
    assert torch.equal(loaded_logits(run, ids), logits(model, input_ids=ids))
    assert os.listdir(tmp_path) == ["run"]
    with pytest.raises(OutputExistsError), files.atomic_directory(run, overwrite=True) as temporary:
        (temporary / "partial").write_text("x")
        splice.save(model, temporary)  # not empty, no overwrite
    monkeypatch.setattr("splice.io.files.save_file", _raise(OSError(errno.ENOSPC, "No space left on device")))
    with files.atomic_directory(run, overwrite=True) as temporary:
        with pytest.raises(SpliceError, match="No space left"):
            splice.save(model, temporary, overwrite=True)
        assert os.listdir(temporary) == []  # no half adapter left to swap in
    assert os.listdir(run) == [] and os.listdir(tmp_path) == ["run"]


# -- every folder writer goes through atomic_directory ---------------------------------------------


def _factorized(seed: int):
    model = make_bert().requires_grad_(False)
    layer = model.bert.encoder.layer[0].attention.self.query
    U, _ = torch.linalg.qr(torch.randn(layer.out_features, 4, generator=torch.Generator().manual_seed(seed)))
    V, _ = torch.linalg.qr(torch.randn(layer.in_features, 4, generator=torch.Generator().manual_seed(seed + 1)))
    model.bert.encoder.layer[0].attention.self.query = FactorizedLinear(U, torch.eye(4), V, layer.bias.detach())
    return model


WRITERS = {  # seed, folder, overwrite
    "save_state": lambda s, p, o: save_state(adapter_state(lora_model(seed=s)), p, overwrite=o),
    "merge": lambda s, p, o: merge_adapters([lora_model(seed=s), lora_model(seed=s + 1)]).save(p, overwrite=o),
    "compress": lambda s, p, o: compress(lora_model(seed=s), rank=1, out=p, overwrite=o),
    "unified": lambda s, p, o: unify_adapters([lora_model(seed=s), lora_model(seed=s + 1)]).save(p, overwrite=o),
    "factorized": lambda s, p, o: save_factorized(_factorized(s), p, overwrite=o),
}
READERS = {"save_state": adapter_state, "merge": adapter_state, "compress": adapter_state, "unified": load_unified,
           "factorized": lambda p: load_factorized(make_bert(), p)}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_folder_writer_is_all_or_nothing(writer, tmp_path, monkeypatch):
    write, folder = WRITERS[writer], tmp_path / writer
    write(1, folder, False)
    before = snapshot(folder)
    with pytest.raises(OutputExistsError, match="overwrite"):
        write(2, folder, False)
    monkeypatch.setattr("os.fsync", _raise(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(SpliceError, match="Input/output error; the folder already there is unchanged"):
        write(2, folder, True)
    monkeypatch.undo()
    assert snapshot(folder) == before and temporaries(folder) == []
    write(2, folder, True)
    assert snapshot(folder) != before and temporaries(folder) == []
    READERS[writer](folder)


def test_the_emr_output_is_one_folder(tmp_path, monkeypatch):
    a = splice.save(lora_model(seed=1), tmp_path / "a")
    b = splice.save(lora_model(seed=2), tmp_path / "b")
    out = tmp_path / "emr"
    assert CliRunner().invoke(app, ["merge", str(a), str(b), "--method", "emr", "--out", str(out)]).exit_code == 0
    before = snapshot(out)
    assert {p.split("/")[0] for p in before} == {"unified", "task-0-a", "task-1-b"}
    monkeypatch.setattr("splice.io.files.write_tensors", _raise(OSError(errno.ENOSPC, "No space left on device")))
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "--method", "emr", "--out", str(out), "--force"])
    message = " ".join(result.output.split())  # rich wraps lines
    assert result.exit_code == 1 and "No space left on device; the folder already there is unchanged" in message
    assert snapshot(out) == before and temporaries(out) == []


# -- symbolic links ------------------------------------------------------------------------------


def test_a_linked_file_in_the_folder_is_replaced_not_written_through(old, ids, tmp_path):
    folder = old[0]
    victims = {name: tmp_path / f"victim-{name}" for name in (files.CONFIG_NAME, files.WEIGHTS_NAME)}
    for name, victim in victims.items():
        victim.write_bytes((folder / name).read_bytes())
        (folder / name).unlink()
        (folder / name).symlink_to(victim)
    kept = {name: victim.read_bytes() for name, victim in victims.items()}
    new = lora_model(r=3, alpha=8, seed=1)
    splice.save(new, folder, overwrite=True)
    assert {name: victim.read_bytes() for name, victim in victims.items()} == kept
    assert not any((folder / name).is_symlink() for name in victims)
    assert torch.equal(loaded_logits(folder, ids), logits(new, input_ids=ids))


def test_the_file_writers_never_open_an_existing_file(tmp_path):
    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / files.CONFIG_NAME).symlink_to(victim)
    (folder / files.WEIGHTS_NAME).symlink_to(victim)
    files.write_config(folder, {"r": 1})
    files.write_weights(folder, {"x": torch.ones(2)})
    assert victim.read_text() == "precious"
    assert json.loads((folder / files.CONFIG_NAME).read_text()) == {"r": 1}
    assert torch.equal(load_file(str(folder / files.WEIGHTS_NAME))["x"], torch.ones(2))


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_linked_output_folder_is_refused(old, tmp_path, ids, overwrite):
    link = tmp_path / "link"
    link.symlink_to(old[0])
    with pytest.raises(OutputExistsError, match="symbolic link"):
        splice.save(lora_model(seed=1), link, overwrite=overwrite)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExistsError, match="symbolic link"):
        splice.save(lora_model(seed=1), dangling, overwrite=overwrite)
    assert not (tmp_path / "nowhere").exists() and link.is_symlink()
    assert_unchanged(old, ids)


def test_folders_never_replaced_as_a_whole(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    with pytest.raises(OutputExistsError, match="git checkout"):
        splice.save(lora_model(), project, overwrite=True)
    monkeypatch.chdir(project)
    for path in (".", tmp_path):
        with pytest.raises(OutputExistsError, match="current directory"):
            splice.save(lora_model(), path, overwrite=True)
    assert os.listdir(project) == [".git"]


# -- temporaries ---------------------------------------------------------------------------------


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(old, ids):
    folder = old[0]
    for name in (f".{folder.name}.splice-tmp-0123abcd", f".{folder.name}.splice-old-89abcdef"):
        (folder.parent / name / "sub").mkdir(parents=True)
        (folder.parent / name / "sub" / "big.tmp").write_bytes(b"x" * 1000)
    splice.save(lora_model(seed=1), folder, overwrite=True)
    assert temporaries(folder) == []


def test_only_dead_writers_temporaries_are_removed(old, tmp_path):
    folder, parent = old[0], old[0].parent
    keep = tmp_path / "elsewhere"
    keep.mkdir()
    (keep / "precious").write_text("mine")
    live = parent / f".{folder.name}.splice-tmp-aaaaaaaa"  # a writer at work: it holds the lock
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    lookalikes = [f".{folder.name}.splice-tmp-notours", f".{folder.name}.splice-tmp-0123abcd.bak",
                  ".other.splice-tmp-0123abcd", f"{folder.name}.splice-tmp-0123abcd"]
    for name in lookalikes:
        (parent / name).mkdir()
    (parent / f".{folder.name}.splice-tmp-bbbbbbbb").write_text("a file, not a folder of ours")
    (parent / f".{folder.name}.splice-tmp-cccccccc").symlink_to(keep)
    try:
        assert files.clean_temporaries(folder) == []
        splice.save(lora_model(seed=1), folder, overwrite=True)
        assert live.is_dir() and (keep / "precious").read_text() == "mine"
        assert all((parent / name).is_dir() for name in lookalikes)
        assert (parent / f".{folder.name}.splice-tmp-bbbbbbbb").is_file()
        assert (parent / f".{folder.name}.splice-tmp-cccccccc").is_symlink()
    finally:
        os.close(fd)
    assert files.clean_temporaries(folder) == [live]  # its writer is gone now


@pytest.mark.guards("silent")
def test_a_reader_racing_swaps_gets_one_version(tmp_path):
    """`load` reads config and weights of one folder version even while the folder is swapped as
    fast as the OS can (a thread exchanging two complete versions; reading the two files by name
    mixes them in a few percent of reads here)."""
    if not files._load_renameat2():
        pytest.skip("needs renameat2")
    folder = splice.save(lora_model(alpha=4, seed=4), tmp_path / "adapter")
    splice.save(lora_model(alpha=8, seed=8), tmp_path / "spare")
    expected = {4: files.read_weights(folder), 8: files.read_weights(tmp_path / "spare")}
    parent = os.open(tmp_path, os.O_RDONLY)
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            files._rename2(parent, "spare", "adapter", files._RENAME_EXCHANGE)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        for _ in range(500):
            config, tensors = files.read_adapter(folder)
            version = expected[config["lora_alpha"]]
            assert all(torch.equal(tensors[k], version[k]) for k in version)
    finally:
        stop.set()
        swapper.join()
        sys.setswitchinterval(interval)
        os.close(parent)


# -- SIGKILL -------------------------------------------------------------------------------------


@pytest.mark.guards("silent")
def test_the_harness_sees_the_mixture_head3_left(tmp_path, monkeypatch):
    """HEAD~3's writer failing between its two files leaves a folder the harness calls mixed."""
    fi = bench()
    base, x = fi.base_model(), fi.inputs()
    references = {v: splice.save(fi.adapter_model(v), tmp_path / v) for v in fi.VERSIONS}
    expected = {v: fi.outputs(folder, base, x) for v, folder in references.items()}
    folder = tmp_path / "adapter"
    fi.head3_save(json.loads((references["A"] / files.CONFIG_NAME).read_text()),
                  load_file(str(references["A"] / files.WEIGHTS_NAME)), folder)
    assert fi.judge(folder, base, x, expected, "A", "B") == ("old", "")
    monkeypatch.setattr("safetensors.torch.save_file", _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        fi.head3_save(json.loads((references["B"] / files.CONFIG_NAME).read_text()),
                      load_file(str(references["B"] / files.WEIGHTS_NAME)), folder)
    assert fi.judge(folder, base, x, expected, "A", "B")[0] == "mixed"


@pytest.mark.slow
@pytest.mark.guards("silent")
def test_random_sigkills_during_overwrites_leave_the_old_or_the_new_folder(tmp_path):
    result = bench().inject(tmp_path, "after", kills=60, seed=13)
    assert result["mixed"] == 0 and result["other"] == 0, result["details"]
    if files._load_renameat2():  # with two renames a reader may find no folder for a moment: a clear refusal
        assert result["refused"] == 0, result["details"]
    assert result["old"] > 0 and result["new"] > 0, result  # the kills did land inside saves
    assert result["leftovers_after_final_save"] == []
