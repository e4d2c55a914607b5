"""Run bookkeeping shared by every stage: find the inputs and split them over workers, lock an
output folder, claim it for one run and mark that run finished, link the newest run, end a stage
that cannot use its folder, and carry on past one input's failure while recording it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.atomic import atomic_output, write_json
from pipeline.config import InputError

log = logging.getLogger("pipeline")

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")


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


# How a scheduler tells a process which of its worker processes it is, outermost first: a Slurm
# job array (each array task a set of videos), then the processes of one launch (torchrun's, or
# srun's tasks when torchrun did not start them). Each names (index, count) and, for the
# processes of one launch on a node, the local index that picks the GPU.
ARRAY = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
LAUNCHES = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))


def _launch(environ: Mapping[str, str]) -> tuple[int, int, int]:
    """``(index, count, local index)`` of this process among the processes of its launch."""
    for rank, size, local in LAUNCHES:
        if int(environ.get(size, 1)) > 1:
            return int(environ[rank]), int(environ[size]), int(environ.get(local, 0))
    return 0, 1, 0


def _local_processes(environ: Mapping[str, str]) -> int:
    """How many processes this one's launch starts on this machine (torchrun's LOCAL_WORLD_SIZE,
    srun's SLURM_NTASKS_PER_NODE, which reads like "8(x2)"); 1 without a launch."""
    given = environ.get("LOCAL_WORLD_SIZE") or environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    return max(1, int(given or 1))


def cores_share(environ: Mapping[str, str] | None = None) -> int:
    """This process's share of the cores it may run on: the cores over the processes its launch
    starts on this machine, at least 1."""
    env = os.environ if environ is None else environ
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // _local_processes(env))


def share_threads(environ: Mapping[str, str] | None = None) -> None:
    """Torch's CPU threads set to :func:`cores_share` in a process of a launch of several on one
    machine, unless OMP_NUM_THREADS says otherwise (torchrun sets it to 1): 8 processes that each
    take every core slow each other down several times over."""
    env = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" in env or _local_processes(env) == 1:
        return
    import torch

    torch.set_num_threads(cores_share(env))


def _array(environ: Mapping[str, str]) -> tuple[int, int]:
    """``(index, count)`` of this Slurm array task (from 0, whatever the array's first id)."""
    task, count = environ.get(ARRAY[0]), environ.get(ARRAY[1])
    if task is None or count is None:
        return 0, 1
    return int(task) - int(environ.get("SLURM_ARRAY_TASK_MIN", 0)), int(count)


def shard_index(shard: str | None = None, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(i, n)`` from ``shard="i/n"``, else from the scheduler: a Slurm array task's share split
    again over the processes of its launch (torchrun's RANK / WORLD_SIZE, or srun's SLURM_PROCID /
    SLURM_NTASKS), so array task ``a`` of ``A`` with ``W`` processes gives shard ``a * W + rank``
    of ``A * W``; else ``(0, 1)``."""
    if shard:
        try:
            i, n = (int(x) for x in str(shard).split("/"))
        except ValueError:
            raise ValueError(f"shard={shard!r} must look like i/n, e.g. 0/4") from None
    else:
        environ = os.environ if environ is None else environ
        (a, count), (rank, size, _) = _array(environ), _launch(environ)
        i, n = a * size + rank, count * size
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: index must be in [0, {n})")
    return i, n


def local_device(device: str, environ: Mapping[str, str] | None = None) -> str:
    """The device of this process, checked: ``cuda`` without an index becomes ``cuda:<local
    index>`` for a process of a launch of several (torchrun's LOCAL_RANK, srun's SLURM_LOCALID),
    wrapped round the GPUs it sees (a task that Slurm gives one GPU sees it as ``cuda:0``; 8
    processes may share one GPU); any other device as given. A device this torch cannot use is
    refused (:class:`~pipeline.config.InputError`), never replaced by the CPU."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = torch.device(device).index
        if not seen or (index is not None and index >= seen):
            raise InputError(f"device={device}, but this torch ({torch.__version__}) sees "
                             f"{seen or 'no'} CUDA device{'s' if seen != 1 else ''}")
        _, size, local = _launch(os.environ if environ is None else environ)
        if index is None and size > 1:
            return f"cuda:{local % seen}"
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device={device}, but this torch ({torch.__version__}) sees no MPS device")
    return device


def shard_of(items: Sequence, shard: str | None = None) -> list:
    """The items of worker ``i`` of ``n``: from ``shard="i/n"``, else the scheduler's (:func:`shard_index`)."""
    i, n = shard_index(shard)
    return list(items[i::n])


class RunStopped(RuntimeError):
    """A stage cannot go on with its output folder; the message names the folder and why."""


class RunLocked(RunStopped):
    """Another live run holds the output folder; the message names it and its holder."""


class ForeignRun(RunStopped):
    """The output folder holds a run made with other settings, which must never be replaced."""


# What ends a stage with status 2: its folder is locked, holds another run, or cannot be written
# (an OSError while taking or writing it: read-only, full, gone).
STOPS = (RunStopped, OSError)


def stop(stage: str, error: BaseException) -> int:
    """The one way a stage ends when its output folder cannot be used: one line,
    ``<stage>: stopped: <why>``, and exit status 2. What the stage finished before stays."""
    log.error("%s: stopped: %s", stage, error)
    return 2


def finished(out: Path, identity: str) -> bool:
    """Whether the run ``identity`` finished in the folder ``out`` (its ``run.json`` says so)."""
    try:
        held = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return held.get("identity") == identity and bool(held.get("finished"))


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


def link_newest(out: Path, link: Path) -> None:
    """Point ``link`` at the run folder ``out`` (a relative link, replaced atomically)."""
    with atomic_output(link) as tmp:
        tmp.symlink_to(os.path.relpath(out, link.parent))


@dataclass
class Claim:
    """A run folder held for one run: ``done`` when that run had finished there before."""

    out: Path
    identity: str
    done: bool

    def finish(self) -> None:
        """Every output is written: mark the run finished, so the same settings skip it."""
        finish_run(self.out, self.identity)
        self.done = True


@contextlib.contextmanager
def claimed(out: Path, identity: str, link: Path | None = None) -> Iterator[Claim]:
    """Hold ``out``'s lock for the block and claim the folder for the run ``identity``
    (:func:`claim_run`). Once the run is done there (before, or :meth:`Claim.finish` in the
    block), ``link`` points at it as the newest. Raises :class:`RunStopped` or ``OSError`` when
    the folder cannot be used: hand those to :func:`stop`."""
    with stage_lock(out, "0/1"):
        claim = Claim(Path(out), identity, claim_run(Path(out), identity))
        yield claim
        if claim.done and link is not None:
            link_newest(claim.out, link)


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
