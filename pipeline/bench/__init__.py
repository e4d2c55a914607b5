"""Benchmarks: make targets that print Markdown tables and write JSON (and a PNG where a plot helps)
under ``runs/bench/``. One module per question, each ``python -m pipeline.bench.<name>``:

- ``encoders``: temporal encoders side by side (``make bench``);
- ``faces``: the faces stage against the plain facenet-pytorch loop (``make bench-faces``);
- ``features``: the features stage against the bare model forward (``make bench-features``);
- ``memory``: peak memory of faces and features on long videos (``make bench-memory``);
- ``pipeline``: every step on the same clips and the projection for Aff-Wild2 (``make bench-pipeline``).

This module holds what they share: timing, peak memory in a child process, the machine description.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.cli import command_line_process
from pipeline.config import load_config
from pipeline.runs import local_device

log = logging.getLogger("pipeline")


def time_call(
    fn: Callable[[], object],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each reading of the clock, so queued
    device work is charged to the call that queued it.
    """
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        if sync:
            sync()
        times.append(clock() - start)
    return times


def status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc/self/status, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**10
    raise OSError(f"/proc/self/status has no {field}")


def _stage_child(stage: str, overrides: list[str]) -> None:
    """Entry point of a measuring process: import the stage, start CUDA if the stage runs there (its
    context, some hundreds of MB of host memory, is not the stage's work), note the RSS, reset the
    peaks, run the stage, print ``{"status", "baseline_mb", "peak_rss_mb", "seconds"}`` (and
    ``gpu_peak_mb``, the most memory the stage's tensors held on the GPU) as the last JSON line."""
    module = importlib.import_module(f"pipeline.{stage}")
    command_line_process(stage)  # as python -m pipeline.<stage> would
    cfg = load_config(stage, None, overrides)
    gpu = gpu_meter(cfg.get("device") or "cpu")
    baseline = status_mb("VmRSS")
    # the high-water mark may carry the parent's over fork/exec; resetting makes it this process's alone
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    status = module.main(cfg)
    took = time.perf_counter() - t0
    print(json.dumps({"status": status, "baseline_mb": baseline, "peak_rss_mb": status_mb("VmHWM"),
                      "seconds": took, **({"gpu_peak_mb": gpu()} if gpu else {})}))


def gpu_meter(device: str) -> Callable[[], float] | None:
    """For a CUDA ``device``: start its context now, reset its peak, and return a function giving
    the most memory tensors held on it since, MB (``torch.cuda.max_memory_allocated``); else None."""
    dev = torch.device(local_device(device))
    if dev.type != "cuda":
        return None
    torch.empty(1, device=dev)  # the context and the allocator, before any baseline is read
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    return lambda: torch.cuda.max_memory_allocated(dev) / 2**20


def synchronizer(device: str | torch.device) -> Callable[[], None] | None:
    """What to call before each reading of a clock so that queued work on ``device`` is counted:
    ``torch.cuda.synchronize`` on CUDA, nothing on the CPU."""
    dev = torch.device(device)
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None


def stage_peak_in_child(stage: str, overrides: list[str], threads: int) -> dict:
    """Run ``pipeline.<stage>`` with ``overrides`` in a fresh interpreter -> what :func:`_stage_child`
    printed; a stage that fails or a process that dies comes back as ``{"error": ...}``."""
    code = f"from pipeline.bench import _stage_child; _stage_child({stage!r}, {overrides!r})"
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads > 0 else {})
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": f"process exited with {done.returncode}: {done.stderr.strip()[-1500:]}"}
    res = json.loads(lines[-1])
    if res["status"] != 0:
        # the stage names each failed input and why on a "failed:" line; else its last words
        said = [ln.strip() for ln in done.stdout.splitlines() if ln.strip().startswith("failed:")]
        said = said or [ln for ln in done.stdout.splitlines() if not ln.startswith("{")][-3:]
        return {**res, "error": f"stage exited with {res['status']}: {' '.join(said)[-1500:]}"}
    return res


def cpu_peak_meter() -> tuple[Callable[[], float], str]:
    """A function giving this process's peak RSS above its RSS now, MB, and how it is measured.

    On Linux the peak (VmHWM) is reset to the current RSS through /proc/self/clear_refs. Not
    ``ru_maxrss``: a spawned child inherits its parent's high-water mark across fork and exec, so
    a child's baseline would be the parent's size. Elsewhere ``ru_maxrss`` is the fallback.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = status_mb("VmRSS")
        return (lambda: max(0.0, status_mb("VmHWM") - base)), "peak RSS (VmHWM, reset) above RSS"
    except OSError:
        scale = 2**20 if sys.platform == "darwin" else 2**10  # macOS reports bytes, Linux KB
        maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
        base = maxrss()
        return (lambda: max(0.0, maxrss() - base)), "ru_maxrss above its value"


def machine(device: str, threads: int) -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads if threads > 0 else torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        # other work on the machine slows every number; this says how busy it was at the start
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.device(device).type == "cuda":
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        info |= {"gpu": torch.cuda.get_device_name(dev), "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                 "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                 "bf16": torch.cuda.is_bf16_supported()}
    return info


def read_rates(kind: str, path: str | Path, window: int = 0) -> dict:
    """The frames/s another benchmark wrote to ``path``, read the one way every benchmark reads them:
    ``{"path", "rates": {name: frames/s}}`` (plus ``"lengths"`` for encoders), or ``{}`` when the
    file is missing or holds no rate (a warning says so for a file that exists).

    ``kind``: ``faces`` (``bench-faces``: the whole stage, ``{"stage": ...}``), ``features``
    (``bench-features``: by extractor) or ``encoders`` (``make bench``: training frames/s by
    encoder, at the measured length nearest to ``window``).
    """
    if not path or not Path(path).is_file():
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s: not readable as JSON (%s); left out", path, e)
        return {}
    found: dict = {"path": str(path), "rates": {}}
    with contextlib.suppress(KeyError, TypeError, AttributeError, ValueError):
        if kind == "faces":
            found["rates"] = {"stage": float(data["speed"]["stage_fps"])}
        elif kind == "features":
            found["rates"] = {r["extractor"]: float(r["stage_fps"]) for r in data["results"] if "stage_fps" in r}
        elif kind == "encoders":
            found["lengths"] = {}
            for name, enc in data["encoders"].items():
                cells = [c for c in enc.get("speed", []) if "train_frames_s" in c]
                if cells:
                    cell = min(cells, key=lambda c: (abs(int(c["length"]) - window), -int(c["length"])))
                    found["rates"][name] = float(cell["train_frames_s"])
                    found["lengths"][name] = int(cell["length"])
    if not found["rates"]:
        log.warning("%s: no frames/s found in the layout expected of the %s benchmark; left out", path, kind)
        return {}
    return found


def dotted_overrides(prefix: str, value) -> list[str]:
    """``key=value`` strings for ``pipeline.train``; a mapping becomes one per leaf, since a whole
    section given at once would replace the section rather than update it."""
    if isinstance(value, dict):
        return [o for k, v in value.items() for o in dotted_overrides(f"{prefix}.{k}" if prefix else k, v)]
    # JSON is YAML, so lists and numbers parse back typed; strings go bare to stay strings
    return [f"{prefix}={value if isinstance(value, str) else json.dumps(value)}"]
