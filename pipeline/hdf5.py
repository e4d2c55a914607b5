"""HDF5 outputs that survive a full disk, and the mark that says one is complete."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py


def h5_is_done(path: str | Path, config_hash: str) -> bool:
    """True when ``path`` opens as HDF5, is marked complete and was made with this config."""
    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("complete", False)) and f.attrs.get("config_hash") == config_hash
    except (OSError, KeyError):
        return False


class _DiskFile:
    """A binary file for h5py's file-object driver that never fails HDF5: the first ``OSError``
    is kept in ``error``, and from then on writes are dropped and reads are zero-filled.

    HDF5 that cannot write while closing (a full disk) keeps the file on its open list and crashes
    the interpreter at exit; an exception raised in here instead would stay set while HDF5 goes on
    calling back, and fail every later call. So the error is raised by ``h5_writer`` after closing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos = 0
        self.error: OSError | None = None

    def __repr__(self) -> str:
        return str(self.path)  # h5py takes this as the file's name

    def _try(self, op: Callable[[], Any]) -> None:
        if self.error is None:
            try:
                op()
            except OSError as e:
                self.error = OSError(e.errno, e.strerror, str(self.path))

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: os.fstat(self.fd).st_size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(os.fstat(self.fd).st_size - self.pos, 0)
        data = os.pread(self.fd, size, self.pos)
        if self.error is not None:  # what was dropped reads as zeros
            data = data.ljust(size, b"\0")
        self.pos += len(data)
        return data

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")

        def write_all() -> None:
            done = 0
            while done < len(view):  # pwrite may write only part, e.g. up to a full disk
                done += os.pwrite(self.fd, view[done:], self.pos + done)

        self._try(write_all)
        self.pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        self._try(lambda: os.ftruncate(self.fd, size))
        return size

    def flush(self) -> None:
        pass  # nothing is buffered here; like HDF5's default driver, no fsync

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                os.close(fd)
            except OSError as e:  # some network file systems report a lost write only here
                self.error = self.error or OSError(e.errno, e.strerror, str(self.path))


@contextlib.contextmanager
def h5_writer(path: str | Path, **kwargs: Any) -> Iterator[h5py.File]:
    """``h5py.File(path, "w", **kwargs)`` that survives a full disk.

    A write error (``ENOSPC``, ``EIO``, ...) is raised once HDF5 has closed the file, as an
    ``OSError`` naming ``path``; with a plain ``h5py.File`` the close fails and the process crashes
    at exit. Writes after the error are dropped, so the block runs to its end. Write to an
    ``atomic_output`` path so that the failed file goes away.
    """
    disk = _DiskFile(Path(path))
    try:
        with h5py.File(disk, "w", **kwargs) as f:
            yield f
    except Exception as e:
        if disk.error is None:
            raise
        raise disk.error from e  # whatever HDF5 made of the lost writes, the disk is the cause
    finally:
        disk.close()
    if disk.error is not None:
        raise disk.error

