"""Adapters on the Hugging Face Hub: `splice.load(model, "owner/name")` through huggingface_hub's
cache (offline here: a cache laid out exactly as huggingface_hub lays it out), and pushing a
folder up to the API boundary (an `HfApi` stand-in whose methods bind to the real signatures)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import assert_close, logits, make_bert, randomize
from huggingface_hub import HfApi, constants
from huggingface_hub.utils import filter_repo_objects
from peft import PeftModel
from typer.testing import CliRunner

import splice
from splice.cli.main import app
from splice.core.errors import AdapterFileError, SpliceError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TAGGED = "89abcdef0123456789abcdef0123456789abcdef"
IDS = torch.tensor([[1, 5, 9, 13, 17, 21]])


def lora_bert(name: str = "default", seed: int = 0) -> torch.nn.Module:
    model = make_bert()
    splice.attach(model, splice.LoRA(r=2, targets=["query", "value"]), name=name)
    randomize(model, name, seed=seed)
    return model


def cache_repo(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT, refs: tuple[str, ...] = ("main",),
               skip: tuple[str, ...] = ()) -> None:
    """Put every file of `folder` into `cache` as huggingface_hub stores a download: the content in
    blobs/<sha256>, a relative link to it in snapshots/<commit>/<path>, the commit hash in refs/<ref>."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder).as_posix()
        if relative in skip:
            continue
        blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = storage / "snapshots" / commit / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline (huggingface_hub read HF_HUB_CACHE when imported, so
    its resolved value is pointed here)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_repo_id_loads_from_the_cache_offline(hub_cache, tmp_path):
    model = lora_bert()
    splice.save(model, tmp_path / "adapter")
    cache_repo(hub_cache, "someone/bert-lora", tmp_path / "adapter")
    loaded = splice.load(make_bert(), "someone/bert-lora")
    assert_close(logits(loaded, input_ids=IDS), logits(model, input_ids=IDS))


def test_revision_and_subfolder_pick_the_files(hub_cache, tmp_path):
    old, new = lora_bert(seed=1), lora_bert(seed=2)
    splice.save(old, tmp_path / "v1" / "nested")
    splice.save(new, tmp_path / "v2" / "nested")
    cache_repo(hub_cache, "someone/bert-lora", tmp_path / "v1", commit=TAGGED, refs=("v1",))
    cache_repo(hub_cache, "someone/bert-lora", tmp_path / "v2")
    for revision, expected in ((None, new), ("v1", old), (TAGGED, old)):
        loaded = splice.load(make_bert(), "someone/bert-lora", revision=revision, subfolder="nested")
        assert_close(logits(loaded, input_ids=IDS), logits(expected, input_ids=IDS))


def test_several_adapters_from_a_repo(hub_cache, tmp_path):
    model = lora_bert("a", seed=1)
    splice.attach(model, splice.LoRA(r=2, targets=["key"]), name="b")
    randomize(model, "b", seed=2)
    splice.save(model, tmp_path / "both", adapters=["a", "b"])
    cache_repo(hub_cache, "someone/two", tmp_path / "both")
    loaded = splice.load(make_bert(), "someone/two", adapters="all")
    assert sorted(splice.adapters(loaded)) == ["a", "b"]
    for net in (model, loaded):
        splice.activate(net, ["a", "b"])
    assert_close(logits(loaded, input_ids=IDS), logits(model, input_ids=IDS))


def test_only_the_adapter_files_are_fetched():
    from splice.io.hub import adapter_patterns

    files = ["README.md", "adapter_config.json", "adapter_model.safetensors", "model.safetensors",
             "b/adapter_config.json", "b/adapter_model.safetensors", "sub/adapter_config.json", "sub/x.bin"]
    def fetched(subfolder: str | None, several: bool) -> list[str]:
        return list(filter_repo_objects(files, allow_patterns=adapter_patterns(subfolder, several)))

    assert fetched(None, False) == files[1:3]
    assert fetched(None, True) == files[1:3] + files[4:7]
    assert fetched("sub", False) == ["sub/adapter_config.json"]


def test_a_repo_missing_from_the_cache_is_refused_naming_repo_and_cache(hub_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # set only in the environment, after import
    with pytest.raises(AdapterFileError) as err:
        splice.load(make_bert(), "someone/absent", revision="v2")
    message = str(err.value)
    assert "'someone/absent' (revision 'v2')" in message and str(hub_cache) in message
    assert "HF_HUB_OFFLINE is set" in message and "no local folder" in message


def test_a_cached_repo_without_an_adapter_names_the_snapshot(hub_cache, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("just a card\n")
    cache_repo(hub_cache, "someone/notes", tmp_path / "notes")
    with pytest.raises(AdapterFileError, match="models--someone--notes"):
        splice.load(make_bert(), "someone/notes")


def test_local_folders_win_and_revision_is_for_repos_only(hub_cache, tmp_path, monkeypatch):
    model = lora_bert()
    monkeypatch.chdir(tmp_path)
    splice.save(model, Path("someone") / "local")
    loaded = splice.load(make_bert(), "someone/local")  # a folder here, not a repo
    assert_close(logits(loaded, input_ids=IDS), logits(model, input_ids=IDS))
    with pytest.raises(SpliceError, match="revision='main' is for Hub repos"):
        splice.load(make_bert(), "someone/local", revision="main")
    with pytest.raises(AdapterFileError, match="does not exist"):
        splice.load(make_bert(), "not-a-folder")  # one word: a missing folder, never a repo


def test_hf_home_and_hf_hub_offline_from_the_environment(tmp_path):
    """A fresh process configured only by environment variables, as a user would."""
    model = lora_bert()
    splice.save(model, tmp_path / "adapter")
    cache_repo(tmp_path / "home" / "hub", "someone/bert-lora", tmp_path / "adapter")
    expected = logits(model, input_ids=IDS)
    script = (
        "import json, sys, torch, splice; sys.path.insert(0, sys.argv[1]); from helpers import make_bert, logits\n"
        "out = logits(splice.load(make_bert(), 'someone/bert-lora'), input_ids=torch.tensor([[1, 5, 9, 13, 17, 21]]))\n"
        "try:\n    splice.load(make_bert(), 'someone/absent')\nexcept splice.AdapterFileError as err:\n"
        "    print(json.dumps({'logits': out.tolist(), 'error': str(err)}))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parents[1])], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert_close(torch.tensor(result["logits"]), expected)
    assert str(tmp_path / "home" / "hub") in result["error"] and "HF_HUB_OFFLINE is set" in result["error"]


# -- pushing -----------------------------------------------------------------------------------


class RecordingHub:
    """An `HfApi` at the API boundary: each call is bound to the real method's signature (a wrong
    argument fails as it would against the Hub), recorded, and `upload_folder` copies what it
    would send, after the same pattern filtering, into `remote`."""

    def __init__(self, remote: Path | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.remote = remote

    def _record(self, method: str, *args, **kwargs) -> dict:
        bound = inspect.signature(getattr(HfApi, method)).bind(None, *args, **kwargs).arguments
        bound.pop("self")
        self.calls.append((method, bound))
        return bound

    def create_repo(self, *args, **kwargs) -> str:
        return f"https://huggingface.co/{self._record('create_repo', *args, **kwargs)['repo_id']}"

    def create_branch(self, *args, **kwargs) -> None:
        self._record("create_branch", *args, **kwargs)

    def upload_folder(self, *args, **kwargs) -> str:
        call = self._record("upload_folder", *args, **kwargs)
        folder = Path(call["folder_path"])
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        for relative in filter_repo_objects(files, allow_patterns=call.get("allow_patterns"),
                                            ignore_patterns=call.get("ignore_patterns")):
            (self.remote / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / relative, self.remote / relative)
        return f"https://huggingface.co/{call['repo_id']}/commit/{COMMIT}"


def test_save_pushes_a_complete_folder_peft_loads(tmp_path):
    model = lora_bert()
    hub = RecordingHub(tmp_path / "remote")
    splice.save(model, tmp_path / "adapter", push_to_hub="me/bert-lora", private=True, hub_api=hub)
    assert [(m, c["repo_id"]) for m, c in hub.calls] == [("create_repo", "me/bert-lora"),
                                                          ("upload_folder", "me/bert-lora")]
    assert hub.calls[0][1]["private"] is True and hub.calls[0][1]["exist_ok"] is True
    assert sorted(p.name for p in (tmp_path / "remote").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "splice_manifest.json"]
    peft_model = PeftModel.from_pretrained(make_bert(), str(tmp_path / "remote")).eval()
    assert_close(logits(peft_model, input_ids=IDS), logits(model, input_ids=IDS))


def test_push_creates_the_branch_and_leaves_hidden_entries_out(tmp_path):
    from splice.io import push_folder

    model = lora_bert("a")
    splice.attach(model, splice.LoRA(r=2, targets=["key"]), name="b")
    splice.save(model, tmp_path / "two", adapters="all")
    (tmp_path / "two" / ".two.splice-tmp-0123abcd").mkdir()  # a live writer's temporary, say
    (tmp_path / "two" / ".two.splice-tmp-0123abcd" / "x").write_text("half")
    hub = RecordingHub(tmp_path / "remote")
    url = push_folder(tmp_path / "two", "me/two", revision="dev", commit_message="two adapters", api=hub)
    assert url.endswith(COMMIT)
    assert [m for m, _ in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[1][1] == {"repo_id": "me/two", "branch": "dev", "exist_ok": True}
    upload = hub.calls[2][1]
    assert upload["revision"] == "dev" and upload["commit_message"] == "two adapters"
    assert sorted(p.relative_to(tmp_path / "remote").as_posix() for p in (tmp_path / "remote").rglob("*")
                  if p.is_file()) == sorted([f"{sub}{name}" for sub in ("", "a/", "b/") for name in (
                      "README.md", "adapter_config.json", "adapter_model.safetensors", "splice_manifest.json")
                      if sub or name in ("README.md", "splice_manifest.json")])  # the root's manifest lists a/, b/


def test_push_refuses_before_any_call(tmp_path):
    from splice.io import push_folder

    hub = RecordingHub()
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFileError, match="holds no adapter to push"):
        push_folder(tmp_path / "empty", "me/x", api=hub)
    splice.save(lora_bert(), tmp_path / "broken")
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterFileError, match="corrupt"):
        push_folder(tmp_path / "broken", "me/x", api=hub)
    with pytest.raises(SpliceError, match="not a Hub repo id"):
        push_folder(tmp_path / "broken", "me/x/y", api=hub)
    with pytest.raises(SpliceError, match="not a Hub repo id"):
        splice.save(lora_bert(), tmp_path / "never", push_to_hub="just-a-name", hub_api=hub)
    assert hub.calls == [] and not (tmp_path / "never").exists()


def test_push_command(tmp_path, monkeypatch):
    hub = RecordingHub(tmp_path / "remote")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **kwargs: hub)  # the default HfApi the command makes
    splice.save(lora_bert(), tmp_path / "adapter")
    runner = CliRunner()
    result = runner.invoke(app, ["push", str(tmp_path / "adapter"), "me/bert-lora", "--private",
                                 "--revision", "dev"])
    assert result.exit_code == 0, result.output
    assert "pushed" in result.output and COMMIT in result.output
    assert hub.calls[0][1]["private"] is True and hub.calls[1][1]["branch"] == "dev"
    assert (tmp_path / "remote" / "adapter_config.json").is_file()
    failed = runner.invoke(app, ["push", str(tmp_path / "nowhere"), "me/bert-lora"])
    assert failed.exit_code == 1 and "nowhere does not exist" in " ".join(failed.output.split())
