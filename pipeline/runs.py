"""What every stage does around its real work: find inputs, split them over workers, write
outputs atomically, skip finished ones, and keep going past a failure while recording it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import math
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
from tqdm import tqdm

log = logging.getLogger("pipeline")

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


DECODING_STAGES = ("faces", "predict")  # the stages that decode video, whose frames churn the heap


def command_line_process(stage: str) -> None:
    """The process-wide settings of a stage run from the command line (``python -m pipeline.<stage>``):
    log lines on stderr and, where video is decoded, glibc's allocator returning large buffers.
    Never applied by importing or calling the stages as a library."""
    setup_logging()
    if stage in DECODING_STAGES:
        release_large_buffers()


def list_inputs(source: str | Path, suffixes: Sequence[str] = VIDEO_SUFFIXES) -> list[Path]:
    """Inputs from a folder (searched recursively), a glob, a list file (one path per line,
    relative paths taken from the list's folder) or a single file; sorted, without duplicates."""
    text = str(source)
    path = Path(text)
    if any(c in text for c in "*?["):
        found = [Path(p) for p in glob.glob(text, recursive=True)]
    elif path.is_dir():
        found = [p for p in path.rglob("*") if p.suffix.lower() in suffixes and p.is_file()]
    elif path.suffix.lower() in (".txt", ".lst", ".list") and path.is_file():
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        found = [p if p.is_absolute() else path.parent / p for p in map(Path, lines)]
    elif path.exists() or path.suffix:
        found = [path]  # a single file; if it is missing, its own job reports it
    else:
        raise FileNotFoundError(f"{text}: no such folder, file or list")
    return sorted(set(found))


def shard_index(shard: str | None = None) -> tuple[int, int]:
    """``(i, n)`` from ``shard="i/n"``, else from torchrun's RANK/WORLD_SIZE, else ``(0, 1)``."""
    if shard:
        try:
            i, n = (int(x) for x in str(shard).split("/"))
        except ValueError:
            raise ValueError(f"shard={shard!r} must look like i/n, e.g. 0/4") from None
    else:
        i, n = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: index must be in [0, {n})")
    return i, n


def shard_of(items: Sequence, shard: str | None = None) -> list:
    """The items of worker ``i`` of ``n``: from ``shard="i/n"``, else torchrun's RANK/WORLD_SIZE."""
    i, n = shard_index(shard)
    return list(items[i::n])


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A killed or failed writer leaves at most a ``.partial`` file, which no reader takes as done
    and ``sweep_partials`` removes once its writer is gone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}~{socket.gethostname()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


PARTIAL = re.compile(r"\.(?P<pid>\d+)~(?P<host>[^~/]+)\.partial$")  # what atomic_output names


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    return True


def sweep_partials(folder: str | Path) -> int:
    """Delete the ``.partial`` files under ``folder`` whose writer, a process on this host, is gone
    (killed runs leave them; one can be as large as the file it was becoming). Files of live
    processes and of other hosts sharing the folder are left alone. Returns how many went."""
    host, gone = socket.gethostname(), 0
    for p in Path(folder).rglob(".*.partial"):
        m = PARTIAL.search(p.name)
        if m and m["host"] == host and not _alive(int(m["pid"])):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                gone += 1
    if gone:
        log.info("%s: removed %d temporary files left by killed runs", folder, gone)
    return gone


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


def release_large_buffers(threshold: int = 128 * 1024) -> None:
    """Have glibc's malloc give every buffer of ``threshold`` bytes or more straight back to the
    system when it is freed (Linux only; elsewhere nothing happens).

    By default glibc raises that threshold as large buffers come and go, and then carves frames and
    tensors out of a heap that fragments: a stage's resident memory crept up with the video's length
    although it kept nothing from one chunk to the next.
    """
    if sys.platform != "linux":
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old file or the new one."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def _json_ready(value: Any) -> Any:
    """``value`` with NaN and infinities as ``null``: JSON has no NaN, and strict readers refuse it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as strict JSON (NaN, an undefined score, becomes ``null``), atomically."""
    write_text(path, json.dumps(_json_ready(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


class RunLocked(RuntimeError):
    """Another live run holds the output folder; the message names it and its holder."""


class ForeignRun(RuntimeError):
    """The output folder holds a run made with other settings, which must never be replaced."""


def claim_run(out: Path, identity: str) -> bool:
    """Take the folder ``out`` for the run named by ``identity`` (kept in ``out/run.json``); True
    when that run already finished there. A folder holding another run, or results that record
    no run, is refused with ForeignRun. Call it holding ``stage_lock(out)``."""
    stamp = out / "run.json"
    if stamp.is_file():
        held = json.loads(stamp.read_text())
        if held.get("identity") != identity:
            raise ForeignRun(f"{out}: holds the run {held.get('identity')}, made with other settings; "
                             f"give another out_dir or remove that run")
        return bool(held.get("finished"))
    if out.is_dir() and any(p.name not in (".lock", "config.yaml") for p in out.iterdir()):
        raise ForeignRun(f"{out}: holds results that record no run; give another out_dir or remove them")
    write_json(stamp, {"identity": identity, "finished": False})
    return False


def finish_run(out: Path, identity: str) -> None:
    """Mark the run in ``out`` finished: every output is written; the next call with the same
    settings skips it."""
    write_json(out / "run.json", {"identity": identity, "finished": True})


def link_newest(out: Path, name: str) -> None:
    """Point ``<out's parent>/<name>`` at the run folder ``out`` (relative, replaced atomically)."""
    link = out.parent / name
    if link.is_dir() and not link.is_symlink():
        # a run written before runs had their own folders: kept whole under another name, so that
        # nothing reading <name> takes that older run for this one
        kept = link.with_name(f"{name}-unhashed")
        if kept.exists():
            log.warning("%s is a folder, not a link to the newest run, and %s exists; both left as they are",
                        link, kept)
            return
        link.rename(kept)
        log.warning("%s held a run made before run folders were named by their settings; moved to %s",
                    link, kept)
    tmp = link.with_name(f".{name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(out.name)
    os.replace(tmp, link)


@contextlib.contextmanager
def stage_lock(out_dir: str | Path, shard: str | None = None) -> Iterator[Path]:
    """Hold ``<out_dir>/.lock`` for the block, or raise ``RunLocked`` naming the holder's pid and host.

    Shards of one run (``shard="i/n"``, else torchrun's RANK/WORLD_SIZE) split the work without
    overlap, so each takes its own lock, ``.lock.<i>of<n>``. ``flock`` is dropped by the kernel
    when its holder dies, even by SIGKILL, so a lock file left by a killed run never blocks the
    next one; the file stays, only its lock matters.
    """
    out_dir = Path(out_dir)
    i, n = shard_index(shard)
    path = out_dir / (".lock" if n == 1 else f".lock.{i}of{n}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OSError(e.errno, f"{out_dir}: cannot write to the output folder ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = Path(path).read_text().strip() or "a process that has not written its name yet"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise RunLocked(f"{out_dir}: another run is writing here ({holder}); wait for it to finish, "
                        f"or give this run another out_dir (shards of one data set need one each)") from None
    try:
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode())
        yield path
    finally:
        os.close(fd)  # releases the lock


@dataclass
class RunSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        return f"{len(self.done)} done, {len(self.skipped)} already done, {len(self.failed)} failed"


def _record_failure(path: Path, key: str, reason: str) -> None:
    # a full disk or read-only folder must not turn one item's failure into the whole run's
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps({"item": key, "error": reason, "time": time.time()}) + "\n")
    except OSError as e:
        log.error("%s: cannot record the failure of %s there (%s)", path, key, e)


def run_each(
    items: Sequence[Any],
    work: Callable[[Any], None],
    *,
    name: Callable[[Any], str] = str,
    is_done: Callable[[Any], bool] = lambda item: False,
    failures_file: str | Path | None = None,
    desc: str = "",
) -> RunSummary:
    """Run ``work`` on each item that is not done yet; a failure is logged, written to
    ``failures_file`` (one JSON line per item) and costs only its own item."""
    summary = RunSummary()
    bar = tqdm(items, desc=desc, unit="item", dynamic_ncols=True, disable=None)
    for item in bar:
        key = name(item)
        if is_done(item):
            summary.skipped.append(key)
            continue
        start = time.perf_counter()
        try:
            work(item)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one bad input must not stop the run
            reason = f"{type(e).__name__}: {e}"
            summary.failed[key] = reason
            log.error("%s failed: %s", key, reason)
            log.debug("%s", traceback.format_exc())
            if failures_file:
                _record_failure(Path(failures_file), key, reason)
        else:
            summary.done.append(key)
            log.debug("%s done in %.1fs", key, time.perf_counter() - start)
        bar.set_postfix(done=len(summary.done), failed=len(summary.failed), refresh=False)
    log.info("%s: %s", desc or "run", summary.line())
    return summary
