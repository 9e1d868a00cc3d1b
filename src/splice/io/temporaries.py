"""The temporary folders of `io.files.atomic_directory`: their names, their locks, and removing
the ones a killed writer left behind.

A write of folder NAME fills `.NAME.splice-tmp-XXXXXXXX` (and, where renameat2 is missing, moves
the old folder aside as `.NAME.splice-old-XXXXXXXX`). Its writer holds an exclusive `flock` on it
for as long as it exists, and a lock dies with its process, whatever killed it; so a temporary is
stale exactly when its name has this pattern and nobody holds its lock. Only such folders are
ever removed: a live writer's temporary, or anything that merely resembles one, is left alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: temporaries are recognised by name and age instead of by lock
    fcntl = None  # type: ignore[assignment]

TEMPORARY = "splice-tmp"
ASIDE = "splice-old"
STALE_AGE_WITHOUT_LOCKS = 3600.0  # seconds; only where fcntl is missing

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
DIRECTORY = getattr(os, "O_DIRECTORY", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def stem(name: str) -> str:
    """The folder's name as temporaries carry it (shortened where a long name would not fit)."""
    if len(name) <= 200:
        return name
    return f"{name[:150]}~{hashlib.sha1(name.encode(errors='surrogateescape')).hexdigest()[:12]}"


def siblings(target: Path, kinds: tuple[str, ...]) -> list[Path]:
    """Entries next to `target` named exactly as its temporaries of these kinds are."""
    pattern = re.compile(rf"\.{re.escape(stem(target.name))}\.(?:{'|'.join(kinds)})-[0-9a-f]{{8}}")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return [target.parent / n for n in sorted(names) if pattern.fullmatch(n)]


def lock(dir_fd: int, name: str) -> int | None:
    """An open, exclusively locked descriptor of folder `name`, or None if it is not a real
    folder, is locked by someone else, or is no longer at `name` once locked."""
    try:
        fd = os.open(name, os.O_RDONLY | DIRECTORY | NOFOLLOW | CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held, there = os.fstat(fd), os.lstat(name, dir_fd=dir_fd)
        if held.st_nlink and (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


@contextmanager
def stale(candidate: Path) -> Iterator[bool]:
    """Whether `candidate` is a temporary whose writer is gone; locked for the block if so."""
    try:
        parent_fd = os.open(candidate.parent, os.O_RDONLY | DIRECTORY | CLOEXEC)
    except OSError:
        yield False
        return
    fd = lock(parent_fd, candidate.name)
    try:
        if fd is not None and fcntl is None:
            fresh = time.time() - os.fstat(fd).st_mtime < STALE_AGE_WITHOUT_LOCKS
            yield not fresh
        else:
            yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)
        os.close(parent_fd)


def clean_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries that writes of folder `path` left when their process was killed
    (`.NAME.splice-tmp-*` and `.NAME.splice-old-*` folders nobody holds the lock of); returns
    them. Anything else, a live writer's temporary included, is left alone."""
    target = Path(os.path.abspath(path))
    removed = []
    for candidate in siblings(target, (TEMPORARY, ASIDE)):
        with stale(candidate) as is_stale:
            if is_stale:
                shutil.rmtree(candidate, ignore_errors=True)
                if not os.path.lexists(candidate):
                    removed.append(candidate)
    return removed


def put_back_aside(target: Path) -> None:
    """After a kill between the two renames of the fallback swap: the target is missing and the
    old folder sits aside, unlocked. Put it back (the newest such, if several)."""
    if os.path.lexists(target):
        return
    candidates = []
    for aside in siblings(target, (ASIDE,)):
        with suppress(OSError):
            candidates.append((os.lstat(aside).st_ctime_ns, aside))
    for _, aside in sorted(candidates, reverse=True):
        with stale(aside) as is_stale:
            if is_stale and not os.path.lexists(target):
                os.rename(aside, target)
                return


def remove_folder(path: Path) -> None:
    """Remove folder `path` if it is one (never through a link); errors are ignored."""
    with suppress(OSError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
