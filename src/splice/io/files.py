"""Writing folders whole or not at all, and the files in them.

Every folder splice writes (an adapter, a merged or compressed adapter, a factorised model, a
command's --out folder) is written whole or not at all, by `atomic_directory`:

1. the files are written, fresh, into an empty temporary sibling `.NAME.splice-tmp-XXXXXXXX`
   that this process holds an exclusive `flock` on while it exists (`io.temporaries`);
2. every file and folder in it is fsync'ed, so what is swapped in is on disk;
3. the temporary folder is swapped into place: on Linux with `renameat2(RENAME_EXCHANGE)`, which
   exchanges the two folders in one step, so a reader of `NAME` sees the old complete folder or
   the new complete one and `NAME` never stops existing; where the file system or OS lacks it,
   with two renames (old -> `.NAME.splice-old-XXXXXXXX`, temporary -> NAME), where a reader may
   briefly find no folder at all (an error, never a mixture) and a kill between the two renames
   leaves the old folder aside, put back by the next write to `NAME`;
4. the parent folder is fsync'ed and the old folder, now under the temporary name, removed.

An exception, a full disk or a kill before step 3 leaves `NAME` as it was. A temporary left by a
killed process is removed by the next write to the same `NAME` (`io.temporaries`).

Nothing is written through a symbolic link: a target folder that is a link is refused, files
are created fresh (`O_EXCL | O_NOFOLLOW`) in the temporary folder, and a link inside the old
folder is removed with it, its target untouched. Replacing means replacing: files of the old
folder that the new one does not write are gone afterwards, which is why the current directory,
a folder above it, the home folder and a git checkout are refused as targets. (A model card a
user wrote in the old folder is the one exception, carried over by `io.model_card`.)

Blocks nest: a folder written inside a temporary folder (`run/adapter` while `run` is written)
gets its own swap there, and a writer handed the temporary folder itself (`splice.save(model,
temporary)` inside `with atomic_directory(run) as temporary`) writes into it in place, the
enclosing block swapping it in. Reading an adapter folder is `io.adapter_files`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from splice.core.errors import OutputExistsError, SpliceError
from splice.core.validation import nonfinite_problem
from splice.io.adapter_files import (  # noqa: F401  (re-exported: imported from here elsewhere)
    CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    paired_tensors,
    read_adapter,
    read_config,
    read_weights,
)
from splice.io.base_names import base_model_name  # noqa: F401  (re-exported)
from splice.io.output_dirs import check_output_dir
from splice.io.temporaries import (  # noqa: F401  (clean_temporaries re-exported)
    ASIDE,
    CLOEXEC,
    DIRECTORY,
    NOFOLLOW,
    TEMPORARY,
    clean_temporaries,
    lock,
    put_back_aside,
    remove_folder,
    stem,
)

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
        put_back_aside(target)
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


_LIVE: set[Path] = set()  # this process's temporary folders, while their blocks run


class _Temporary:
    """The temporary sibling folder of one write, locked from its creation to its removal."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.parent_fd = os.open(target.parent, os.O_RDONLY | DIRECTORY | CLOEXEC)
        self.fds: list[int] = []
        self.aside: str | None = None
        try:
            for _ in range(100):
                self.suffix = secrets.token_hex(4)
                self.name = f".{stem(target.name)}.{TEMPORARY}-{self.suffix}"
                try:
                    os.mkdir(self.name, 0o777, dir_fd=self.parent_fd)
                except FileExistsError:
                    continue
                fd = lock(self.parent_fd, self.name)
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
        aside = f".{stem(name)}.{ASIDE}-{self.suffix}"
        locked = lock(fd, name)
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
                    remove_folder(self.target.parent / name)
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


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (links are not followed), deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            file = os.path.join(folder, name)
            if not os.path.islink(file):
                _fsync(file, os.O_RDONLY | NOFOLLOW)
        _fsync(folder, os.O_RDONLY | DIRECTORY)


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags | CLOEXEC)
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
    write_text(file, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def write_text(file: Path, text: str) -> None:
    """`text` (UTF-8; undecodable bytes read with "surrogateescape" are written back as they were)
    in a new file (an existing entry, a link included, is replaced)."""
    _write_new(Path(file), text.encode("utf-8", "surrogateescape"))


def write_bytes(file: Path, data: bytes, mode: int = 0o666) -> None:
    """`data` in a new file (an existing entry, a link included, is replaced); `mode` before the
    umask (0o600: a secret, never readable by others, not even for a moment)."""
    _write_new(Path(file), data, mode)


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
    """safetensors with PEFT's metadata; tensors detached, contiguous and unaliased. A tensor
    with NaN or infinite values (a diverged adapter) is refused by name: loading would refuse
    the file, and PEFT would load it as NaN outputs."""
    for key, value in tensors.items():
        problem = nonfinite_problem(value)
        if problem:
            raise SpliceError(f"adapter tensor {key} {problem}; nothing was saved (weights must be finite)")
    tensors = {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}
    write_tensors(Path(path) / WEIGHTS_NAME, tensors, metadata={"format": "pt"})


def _unlink(file: Path) -> None:
    with suppress(FileNotFoundError):
        os.unlink(file)


def _write_new(file: Path, data: bytes, mode: int = 0o666) -> None:
    _unlink(file)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, mode)
    with open(fd, "wb") as f:
        f.write(data)
