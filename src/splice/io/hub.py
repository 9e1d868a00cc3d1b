"""Adapters on the Hugging Face Hub: `splice.load(model, "user/repo")` and pushing a folder.

Loading: a string that is not an existing local path and has the form "owner/name" is a Hub
repo id. Only the adapter files are fetched (`adapter_config.json`, the weights and the
provenance manifest and its signature when there are some (`io.manifest`), at the root
or in `subfolder`, and in the subfolders of a folder of several adapters) with
`huggingface_hub.snapshot_download`, into the Hugging Face cache (`HF_HUB_CACHE`, or `HF_HOME`/hub),
laid out as every HF library lays it out, so files PEFT or transformers downloaded are reused.
With `HF_HUB_OFFLINE=1` (read when `load` runs, so setting it after import counts too) only the
cache is used; a repo or revision absent from it is refused naming both.

Pushing: `push_folder` checks that the folder holds at least one readable adapter, then creates
the repo if needed (`create_repo(exist_ok=True)`, private on request), the branch when a revision
is named, and uploads the folder with `upload_folder` (hidden entries, such as a live writer's
temporaries, left out). An `HfApi` can be passed in (a token, another endpoint); the default one
uses the login of `hf auth login`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import splice
from splice.core.errors import AdapterFileError, SpliceError
from splice.io.adapter_files import ADAPTER_FILES, read_adapter
from splice.io.base_names import is_repo_id
from splice.io.layout import saved_adapters
from splice.io.manifest import MANIFEST_NAME, SIGNATURE_NAME

# what `load` fetches of an adapter folder: its files, and its manifest and signature to verify them
FETCHED = (*ADAPTER_FILES, MANIFEST_NAME, SIGNATURE_NAME)


def resolve(source: str | Path, *, revision: str | None = None, subfolder: str | None = None,
            several: bool = False) -> Path:
    """The local folder of adapter `source`: a local path as it is (`subfolder` joined), or a Hub
    repo id's snapshot in the cache (downloaded unless offline). `several`: fetch the adapters in
    the folder's subfolders too."""
    if isinstance(source, Path) or os.path.exists(source) or not is_repo_id(source, namespaced=True):
        if revision is not None:
            raise SpliceError(f"revision={revision!r} is for Hub repos; {os.fspath(source)!r} is a local path")
        return Path(source) / (subfolder or "")
    return _download(source, revision, subfolder, several)


def adapter_patterns(subfolder: str | None, several: bool) -> list[str]:
    """The files of one adapter folder (and, with `several`, of its subfolders) as download patterns."""
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [f"{prefix}{name}" for name in FETCHED]
    return patterns + [f"{prefix}*/{name}" for name in FETCHED] if several else patterns


def offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now, or was when huggingface_hub loaded."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any((flag or "").upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


def _download(repo_id: str, revision: str | None, subfolder: str | None, several: bool) -> Path:
    """`snapshot_download` of the adapter files, with its errors said in terms of the repo."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    shown = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    local = f"; there is no local folder {repo_id!r} either"
    is_offline = offline()
    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=adapter_patterns(subfolder, several),
                                     local_files_only=is_offline, library_name="splice",
                                     library_version=splice.__version__)
    except LocalEntryNotFoundError as err:
        why = "HF_HUB_OFFLINE is set" if is_offline else f"the Hub could not be reached ({err})"
        raise AdapterFileError(f"Hub adapter {shown} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and "
                               f"{why}; download it once online (or point HF_HUB_CACHE at a cache that has it){local}"
                               ) from None
    except RevisionNotFoundError:
        raise AdapterFileError(f"Hub repo {repo_id!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise AdapterFileError(f"no Hub repo {repo_id!r} (or it is private or gated: log in with "
                               f"`hf auth login`){local}") from None
    except OSError as err:  # HfHubHTTPError and connection errors
        raise AdapterFileError(f"could not download Hub adapter {shown}: {err}") from None
    return Path(snapshot) / (subfolder or "")


def check_repo_id(repo_id: str) -> None:
    """Refuse a repo id to push to that is not "owner/name" (before anything is written)."""
    if not isinstance(repo_id, str) or not is_repo_id(repo_id, namespaced=True):
        raise SpliceError(f"{repo_id!r} is not a Hub repo id; expected 'owner/name'")


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, api: Any = None) -> str:
    """Upload adapter folder `folder` to Hub repo `repo_id` (created if missing; `private` on
    creation only; `revision`: a branch, created from main if missing). Returns the commit URL."""
    folder = Path(folder)
    check_repo_id(repo_id)
    if not folder.is_dir():
        raise AdapterFileError(f"adapter folder {folder} does not exist")
    adapters = saved_adapters(folder)
    if not adapters:
        raise AdapterFileError(f"{folder} holds no adapter to push (no adapter_config.json at its root or in a "
                               "subfolder)")
    for where in adapters.values():
        read_adapter(where)  # a corrupt or half-copied adapter is refused before anything is uploaded
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(library_name="splice")
    names = ", ".join(sorted(adapters))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                   commit_message=commit_message or f"Upload adapter{'s' * (len(adapters) > 1)} "
                                                                    f"{names} with splice",
                                   ignore_patterns=[".*", "*/.*"])
    except (OSError, ValueError) as err:  # HTTP, connection, token and offline (HF_HUB_OFFLINE) errors
        raise AdapterFileError(f"cannot push to {repo_id}: {type(err).__name__}: {err}") from None
    return str(getattr(commit, "commit_url", commit))
