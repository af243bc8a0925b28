"""Write files and folders so that a crash never leaves a half-written one under its real name.

Everything is written beside the target under a hidden temporary name, flushed, and renamed into place
(`os.replace` is atomic on one filesystem). A reader sees the old file, or the new one, never a part.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temporary file beside `path`; on success it replaces `path`, on error it is removed
    (a set of one file: see `atomic_file_set`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file_set(path.parent) as files, files.open(path.name, mode, encoding) as f:
        yield f


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_dir(path: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it is renamed to `path`, on error it is deleted.

    If `path` exists: with `replace` the old folder is swapped out and deleted only after the new one
    is in place; without, theirs is kept (another process finished the same work first) and ours dropped.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if replace and path.exists():
            if _exchange(tmp, path):  # tmp now holds the old folder
                shutil.rmtree(tmp, ignore_errors=True)
                return
            # Without an atomic exchange there is a moment with no folder under the real name.
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE): a reader of `b` sees the old folder
    or the new one, at every moment. False where the kernel, libc or filesystem cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


class FileSet:
    """Files of one folder written as a set (see `atomic_file_set`)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.staged: dict[str, str] = {}
        self.removed: set[str] = set()

    @contextlib.contextmanager
    def open(self, name: str, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.folder)
        self.staged[name] = tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())

    def remove(self, name: str) -> None:
        """Delete `name` when the set is committed (a stale file the new set has no counterpart for)."""
        self.removed.add(name)


@contextlib.contextmanager
def atomic_file_set(folder: Path) -> Iterator[FileSet]:
    """Write several files of `folder` as one set: all go to hidden temporaries first, and only when every
    one is written and flushed are they renamed into place, in the order they were opened. Any error (or a
    kill) before that leaves every old file as it was; other files in the folder are never touched."""
    files = FileSet(folder)
    try:
        yield files
    except BaseException:
        for tmp in files.staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    for name, tmp in files.staged.items():
        os.replace(tmp, files.folder / name)
    for name in files.removed - files.staged.keys():
        (files.folder / name).unlink(missing_ok=True)
