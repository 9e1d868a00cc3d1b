"""Reading and writing adapter directories, with errors that say why.

Every folder splice writes (an adapter, a merged or compressed adapter, a factorised model, a
command's --out folder) is written whole or not at all, by `atomic_directory`:

1. the files are written, fresh, into an empty temporary sibling `.NAME.splice-tmp-XXXXXXXX`
   that this process holds an exclusive `flock` on while it exists;
2. every file and folder in it is fsync'ed, so what is swapped in is on disk;
3. the temporary folder is swapped into place: on Linux with `renameat2(RENAME_EXCHANGE)`, which
   exchanges the two folders in one step, so a reader of `NAME` sees the old complete folder or
   the new complete one and `NAME` never stops existing; where the file system or OS lacks it,
   with two renames (old -> `.NAME.splice-old-XXXXXXXX`, temporary -> NAME), where a reader may
   briefly find no folder at all (an error, never a mixture) and a kill between the two renames
   leaves the old folder aside, put back by the next write to `NAME`;
4. the parent folder is fsync'ed and the old folder, now under the temporary name, removed.

An exception, a full disk or a kill before step 3 leaves `NAME` as it was. A temporary left by a
killed process is removed by the next write to the same `NAME`: it is recognised by its exact name
pattern and by nobody holding its lock (a lock dies with its process, whatever killed it), so a
live writer's temporary, or anything that merely resembles one, is never touched.

Nothing is written through a symbolic link: a target folder that is a link is refused, files
are created fresh (`O_EXCL | O_NOFOLLOW`) in the temporary folder, and a link inside the old
folder is removed with it, its target untouched. Replacing means replacing: files of the old
folder that the new one does not write are gone afterwards, which is why the current directory,
a folder above it, the home folder and a git checkout are refused as targets.

Blocks nest: a folder written inside a temporary folder (`run/adapter` while `run` is written)
gets its own swap there, and a writer handed the temporary folder itself (`splice.save(model,
temporary)` inside `with atomic_directory(run) as temporary`) writes into it in place, the
enclosing block swapping it in.

`read_adapter` reads the two files of an adapter folder from one folder version, so even a
reader racing a writer in another process gets one version.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from splice.core.errors import AdapterFileError, OutputExistsError, ShapeMismatchError, SpliceError

try:
    import fcntl
except ImportError:  # not POSIX: temporaries are recognised by name and age instead of by lock
    fcntl = None  # type: ignore[assignment]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"

TEMPORARY = "splice-tmp"
ASIDE = "splice-old"
STALE_AGE_WITHOUT_LOCKS = 3600.0  # seconds; only where fcntl is missing

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


# -- checks ------------------------------------------------------------------------------------


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


def prepare_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Create `path`, refusing to write into a folder that already holds files unless asked.

    Writes into the folder itself, so a crash leaves a mixture: prefer `atomic_directory`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{path} already exists and is not empty; pass overwrite=True (CLI: --force) to replace it"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- whole folders -----------------------------------------------------------------------------


class _WriteFailed(SpliceError):
    """The disk (or the OS) refused a write; the target folder is as it was."""


@contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Write folder `path` whole or not at all (see the module doc): yields an empty temporary
    sibling folder to fill; when the block ends normally it is fsync'ed and swapped into place
    (the old folder, if any, removed); when the block raises, or the process dies, `path` is as
    it was and the temporary folder is removed (by the next write, after a kill).

    Refused before the block runs, with `splice.OutputExistsError`: what `check_output_dir`
    refuses. A write the disk refuses (full, quota, `ulimit -f`, read-only) raises `SpliceError`
    saying so; `path` is then unchanged.
    """
    shown = Path(path)
    target = Path(os.path.abspath(shown))
    if not target.name:
        raise OutputExistsError(f"{shown} has no name to write a folder under")
    if target in _LIVE:  # a writer handed the temporary folder of an enclosing block: fill it in place
        with _within(target, shown, overwrite):
            yield target
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _put_back_aside(target)
    except OSError as err:
        raise _failure(shown, err, existed=False) from err
    clean_temporaries(target)
    check_output_dir(shown, overwrite)
    existed = target.is_dir()
    try:
        temporary = _Temporary(target)
    except OSError as err:
        raise _failure(shown, err, existed) from err
    try:
        try:
            yield temporary.path
            _fsync_tree(temporary.path)
            temporary.swap_in(overwrite)
        except _WriteFailed as err:  # a nested atomic_directory: report the outermost folder
            raise _failure(shown, err.__cause__ or err, existed) from err.__cause__
        except (OSError, SafetensorError) as err:
            raise _failure(shown, err, existed) from err
    finally:
        temporary.discard()


@contextmanager
def _within(folder: Path, shown: Path, overwrite: bool) -> Iterator[None]:
    """`atomic_directory` of a temporary folder this process is filling (e.g. `splice.save(model,
    temporary)` inside `with atomic_directory(run) as temporary`): the enclosing block swaps it in
    whole, so write in place; on failure empty it again, so that a caller who catches the error
    does not swap in half a folder."""
    if any(folder.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{shown} already exists and is not empty; pass overwrite=True (CLI: --force) "
                                    "to replace it")
        _empty(folder)
    try:
        yield
    except (OSError, SafetensorError) as err:
        _empty(folder)
        raise _failure(shown, err, existed=False) from err
    except BaseException:
        _empty(folder)
        raise


def _empty(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def clean_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries that writes of folder `path` left when their process was killed
    (`.NAME.splice-tmp-*` and `.NAME.splice-old-*` folders nobody holds the lock of); returns
    them. Anything else, a live writer's temporary included, is left alone."""
    target = Path(os.path.abspath(path))
    removed = []
    for candidate in _siblings(target, (TEMPORARY, ASIDE)):
        with _stale(candidate) as stale:
            if stale:
                shutil.rmtree(candidate, ignore_errors=True)
                if not os.path.lexists(candidate):
                    removed.append(candidate)
    return removed


_LIVE: set[Path] = set()  # this process's temporary folders, while their blocks run


class _Temporary:
    """The temporary sibling folder of one write, locked from its creation to its removal."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.parent_fd = os.open(target.parent, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        self.fds: list[int] = []
        self.aside: str | None = None
        try:
            for _ in range(100):
                self.suffix = secrets.token_hex(4)
                self.name = f".{_stem(target.name)}.{TEMPORARY}-{self.suffix}"
                try:
                    os.mkdir(self.name, 0o777, dir_fd=self.parent_fd)
                except FileExistsError:
                    continue
                fd = _lock(self.parent_fd, self.name)
                if fd is not None:  # else a cleaner took it between mkdir and lock: try another name
                    self.fds.append(fd)
                    break
            else:
                raise OSError(errno.EEXIST, "no free temporary folder name", str(target.parent))
        except BaseException:
            os.close(self.parent_fd)
            raise
        self.path = target.parent / self.name
        _LIVE.add(self.path)

    def swap_in(self, overwrite: bool) -> None:
        """Put the temporary folder at the target's name, the old folder (if any) at its own name."""
        name, fd = self.target.name, self.parent_fd
        for _ in range(5):
            try:
                old = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                if _rename_new(fd, self.name, name):
                    break
                continue  # something appeared at the name meanwhile: look again
            if stat.S_ISLNK(old.st_mode):
                raise OutputExistsError(f"{self.target} became a symbolic link while being written; left as it is")
            if not stat.S_ISDIR(old.st_mode):
                raise OutputExistsError(f"{self.target} exists and is not a directory")
            if not overwrite and os.listdir(self.target):
                raise OutputExistsError(f"{self.target} was filled by someone else while being written; pass "
                                        "overwrite=True (CLI: --force) to replace it")
            os.chmod(self.name, stat.S_IMODE(old.st_mode), dir_fd=fd)  # the folder keeps its permissions
            if not _rename2(fd, self.name, name, _RENAME_EXCHANGE):
                self._swap_by_renames()
            break
        else:
            raise OSError(errno.EBUSY, "the output folder kept changing while being replaced", str(self.target))
        with suppress(OSError):  # the swap is done and visible; this only hurries it to the disk
            os.fsync(fd)

    def _swap_by_renames(self) -> None:
        """Where RENAME_EXCHANGE is missing: old folder aside, then the new one in; the old one
        is locked meanwhile, so that only a killed swap's leftover is ever put back."""
        name, fd = self.target.name, self.parent_fd
        aside = f".{_stem(name)}.{ASIDE}-{self.suffix}"
        locked = _lock(fd, name)
        if locked is None:
            raise OSError(errno.EBUSY, "another process is replacing this folder", str(self.target))
        self.fds.append(locked)
        os.rename(name, aside, src_dir_fd=fd, dst_dir_fd=fd)
        self.aside = aside
        try:
            os.rename(self.name, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            with suppress(OSError):
                os.rename(aside, name, src_dir_fd=fd, dst_dir_fd=fd)
                self.aside = None
            raise

    def discard(self) -> None:
        """Remove what is left at the temporary names (the new folder if the swap did not happen,
        the old one if it did), then unlock."""
        _LIVE.discard(self.path)
        try:
            for name in (self.name, self.aside):
                if name is not None:
                    _remove_folder(self.target.parent / name)
        finally:
            for fd in self.fds:
                os.close(fd)
            os.close(self.parent_fd)


def _failure(path: Path, err: BaseException, existed: bool) -> _WriteFailed:
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    # safetensors' wordings of an OSError: 0.5+ "I/O error: File too large (os error 27)",
    # 0.4 'IoError(Os { code: 27, kind: FileTooLarge, message: "File too large" })'
    found = re.search(r'I/O error: (.+) \(os error \d+\)|IoError\(Os \{.*message: "([^"]+)"', reason)
    reason = (found.group(1) or found.group(2)) if found else reason
    state = "the folder already there is unchanged" if existed else "nothing was written"
    return _WriteFailed(f"could not write {path}: {reason}; {state}")


def _stem(name: str) -> str:
    """The folder's name as temporaries carry it (shortened where a long name would not fit)."""
    if len(name) <= 200:
        return name
    return f"{name[:150]}~{hashlib.sha1(name.encode(errors='surrogateescape')).hexdigest()[:12]}"


def _siblings(target: Path, kinds: tuple[str, ...]) -> list[Path]:
    """Entries next to `target` named exactly as its temporaries of these kinds are."""
    pattern = re.compile(rf"\.{re.escape(_stem(target.name))}\.(?:{'|'.join(kinds)})-[0-9a-f]{{8}}")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return [target.parent / n for n in sorted(names) if pattern.fullmatch(n)]


def _lock(dir_fd: int, name: str) -> int | None:
    """An open, exclusively locked descriptor of folder `name`, or None if it is not a real
    folder, is locked by someone else, or is no longer at `name` once locked."""
    try:
        fd = os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
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
def _stale(candidate: Path) -> Iterator[bool]:
    """Whether `candidate` is a temporary whose writer is gone; locked for the block if so."""
    try:
        parent_fd = os.open(candidate.parent, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except OSError:
        yield False
        return
    fd = _lock(parent_fd, candidate.name)
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


def _put_back_aside(target: Path) -> None:
    """After a kill between the two renames of the fallback swap: the target is missing and the
    old folder sits aside, unlocked. Put it back (the newest such, if several)."""
    if os.path.lexists(target):
        return
    candidates = []
    for aside in _siblings(target, (ASIDE,)):
        with suppress(OSError):
            candidates.append((os.lstat(aside).st_ctime_ns, aside))
    for _, aside in sorted(candidates, reverse=True):
        with _stale(aside) as stale:
            if stale and not os.path.lexists(target):
                os.rename(aside, target)
                return


def _remove_folder(path: Path) -> None:
    with suppress(OSError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (links are not followed), deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            file = os.path.join(folder, name)
            if not os.path.islink(file):
                _fsync(file, os.O_RDONLY | _NOFOLLOW)
        _fsync(folder, os.O_RDONLY | _DIRECTORY)


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# renameat2(2): RENAME_EXCHANGE swaps two existing entries atomically (Linux 3.15+, in ext4, xfs,
# btrfs, tmpfs, f2fs, overlayfs, ...); RENAME_NOREPLACE renames only onto a missing name.
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
_renameat2: Any = None


def _load_renameat2() -> Any:
    """libc's renameat2 (glibc 2.28+), or False where there is none (not Linux, older libc)."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if platform.system() == "Linux":
            with suppress(OSError, AttributeError):
                function = ctypes.CDLL(None, use_errno=True).renameat2
                function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                function.restype = ctypes.c_int
                _renameat2 = function
    return _renameat2


def _rename2(dir_fd: int, source: str, destination: str, flags: int) -> bool:
    """renameat2 within folder `dir_fd`; False where the OS or the file system lacks it."""
    function = _load_renameat2()
    if not function:
        return False
    if function(dir_fd, os.fsencode(source), dir_fd, os.fsencode(destination), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), destination)


def _rename_new(dir_fd: int, source: str, destination: str) -> bool:
    """Rename onto a missing name; False if something is there by now (it is left alone; without
    RENAME_NOREPLACE, an empty folder that appeared meanwhile is replaced)."""
    try:
        if not _rename2(dir_fd, source, destination, _RENAME_NOREPLACE):
            os.rename(source, destination, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return True
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            return False
        raise


# -- files -------------------------------------------------------------------------------------


def write_json(file: Path, data: Any, *, sort_keys: bool = False) -> None:
    """`data` as indented JSON in a new file (an existing entry, a link included, is replaced)."""
    _write_new(Path(file), (json.dumps(data, indent=2, sort_keys=sort_keys) + "\n").encode())


def write_tensors(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A new safetensors file (an existing entry, a link included, is replaced, never written through)."""
    file = Path(file)
    _unlink(file)
    save_file(tensors, str(file), metadata=metadata)
    os.chmod(file, 0o666 & ~_umask())  # safetensors' own temporary file is private (0600); make it like any new file


def _umask() -> int:
    """The process's umask, read without changing it (Linux); 0o022 where it cannot be read."""
    with suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def write_config(path: Path, config: dict[str, Any]) -> None:
    write_json(Path(path) / CONFIG_NAME, config, sort_keys=True)


def write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors with PEFT's metadata; tensors detached, contiguous and unaliased."""
    tensors = {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}
    write_tensors(Path(path) / WEIGHTS_NAME, tensors, metadata={"format": "pt"})


def _unlink(file: Path) -> None:
    with suppress(FileNotFoundError):
        os.unlink(file)


def _write_new(file: Path, data: bytes) -> None:
    _unlink(file)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
    with open(fd, "wb") as f:
        f.write(data)


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of adapter folder `path`, both of one version even while another
    process swaps a new version in: on Linux both files are read through one open descriptor of
    the folder (`/proc/self/fd/N`), so from one folder whatever its name; elsewhere the folder's
    identity is compared before and after. Read again if the folder went away meanwhile."""
    path = Path(path)
    for _ in range(5):
        try:
            fd: int | None = os.open(path, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        except OSError:
            fd = None  # read_config says what is wrong
        try:
            pinned = Path(f"/proc/self/fd/{fd}") if fd is not None and os.path.isdir(f"/proc/self/fd/{fd}") else None
            here = pinned or path
            try:
                config, tensors = read_config(here), read_weights(here)
            except AdapterFileError as err:
                if fd is not None and _moved(path, fd):
                    continue  # swapped out and being removed while read: read the new one
                if pinned is not None:
                    raise AdapterFileError(str(err).replace(str(pinned), str(path))) from None
                raise
            if pinned is not None or fd is None or not _moved(path, fd):
                return config, tensors
        finally:
            if fd is not None:
                os.close(fd)
    raise AdapterFileError(f"{path} was replaced again and again while being read; try again once its writer is done")


def _moved(path: Path, fd: int) -> bool:
    """Whether `path` no longer names the folder open as `fd`."""
    try:
        there, held = os.stat(path), os.fstat(fd)
    except OSError:
        return True
    return (there.st_dev, there.st_ino) != (held.st_dev, held.st_ino)


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"adapter directory {path} does not exist")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        nested = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_NAME}"))
        hint = f"; adapters in sub-folders: {nested}" if nested else ""
        present = sorted(p.name for p in path.iterdir())
        raise AdapterFileError(f"no {CONFIG_NAME} in {path} (found {present}){hint}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_file} must hold a JSON object, not {type(config).__name__}")
    return config


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    safetensors_file, legacy_file = path / WEIGHTS_NAME, path / LEGACY_WEIGHTS_NAME
    try:
        if safetensors_file.is_file():
            return load_file(str(safetensors_file))
        if legacy_file.is_file():
            return torch.load(legacy_file, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling garbage raises almost any error type
        name = safetensors_file if safetensors_file.is_file() else legacy_file
        raise AdapterFileError(f"{name} is corrupt or unreadable: {err}") from None
    raise AdapterFileError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {path}")


def paired_tensors(targets: dict[str, torch.Tensor], values: dict[str, torch.Tensor],
                   where: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(target, value) pairs for copying a file's tensors into an adapter: refuses, before anything
    is copied, tensors missing on either side and shapes that differ, naming `where`."""
    missing, unexpected = sorted(set(targets) - set(values)), sorted(set(values) - set(targets))
    if missing or unexpected:
        raise AdapterFileError(f"{where} does not match the adapter: missing tensors {missing[:5]}, "
                               f"unexpected tensors {unexpected[:5]}")
    for key, target in targets.items():
        if target.shape != values[key].shape:
            raise ShapeMismatchError(f"{where}: {key} has shape {tuple(values[key].shape)}, the model needs "
                                     f"{tuple(target.shape)}")
    return [(target, values[key]) for key, target in targets.items()]


def base_model_name(model: torch.nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None)
    if not name:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None
