"""Which folders splice may write as a whole, checked before any work is done.

`io.files.atomic_directory` replaces an output folder as a whole: files of the old folder that
the new one does not write are gone afterwards. So a link is never written through, a non-empty
folder is replaced only when asked, and folders that are never an output (the current directory
or one above it, the home folder, a git checkout) are refused. Commands call `check_output_dir`
first, so that a refusal comes before minutes of training or merging, not after.
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

from splice.core.errors import OutputExistsError


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, a `path` that `atomic_directory(path, overwrite)` would refuse:
    a symbolic link, something that is not a folder, a non-empty folder unless `overwrite`, and
    folders never replaced as a whole (the current directory or one above it, the home folder, a
    git checkout). Creates nothing; returns `path` as a Path."""
    path = Path(path)
    if path.is_symlink():
        raise OutputExistsError(f"{path} is a symbolic link (to {os.readlink(path)}); splice does not write through "
                                "links: pass the folder it points to, or another path")
    if not path.exists():
        return path
    if not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory")
    real = Path(os.path.realpath(path))
    with suppress(OSError):  # the current directory may have been removed
        here = Path(os.path.realpath(os.getcwd()))
        if real == here or real in here.parents:
            raise OutputExistsError(f"{path} is the current directory or holds it; splice replaces an output folder "
                                    "as a whole, so write into a sub-folder")
    if any(path.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{path} already exists and is not empty; pass overwrite=True (CLI: --force) "
                                    "to replace it")
        if real == _home() or (path / ".git").exists():
            raise OutputExistsError(f"refusing to replace {path} as a whole (it is the home folder or a git "
                                    "checkout); write into a sub-folder")
    return path


def _home() -> Path | None:
    try:
        return Path(os.path.realpath(Path.home()))
    except (RuntimeError, KeyError):  # no HOME and no password entry
        return None
