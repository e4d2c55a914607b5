"""Benchmark the features stage: its frame rate against the bare model forward on the same
batches, measured in one run, and the speed of reading random windows back from its cache.

``python -m pipeline.bench.features [configs/bench_features.yaml] [key=value ...]``. Without
``faces_dir`` it writes face-stage style files of synthetic crops (chunked and compressed as the
face stage writes them). Prints a Markdown table and writes ``out`` (JSON).
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from features import Extractor, build_extractor, crop_size
from pipeline import features as stage
from pipeline.atomic import write_json
from pipeline.bench import machine
from pipeline.cli import run_stage, setup_logging
from pipeline.config import Config, load_config
from pipeline.faces import crop_sizes
from pipeline.feature_cache import FeatureCache
from pipeline.metrics import markdown_table

log = logging.getLogger("pipeline")


def make_face_files(folder: Path, videos: int, frames: int, absent: float, sizes: list[int],
                    seed: int = 0) -> list[Path]:
    """``videos`` face files of ``frames`` rows each: smooth random crops (n, s, s, 3) uint8 where
    ``present``, zeros elsewhere; chunks of one crop, gzip level 4, like the face stage's output."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for v in range(videos):
        present = rng.random(frames) >= absent
        path = folder / f"synthetic_{v:02d}.h5"
        with h5py.File(path, "w") as f:
            f["frame"] = np.arange(frames, dtype=np.int64)
            f["timestamp"] = np.arange(frames) / 30.0
            f["present"] = present
            for s in sizes:
                # low-frequency shapes plus sensor noise compress (and decompress) like real faces
                coarse = torch.from_numpy(rng.uniform(0, 255, (frames, 3, 8, 8)).astype(np.float32))
                smooth = F.interpolate(coarse, size=(s, s), mode="bicubic", align_corners=False)
                noisy = smooth + torch.from_numpy(rng.normal(0, 6, (frames, 3, s, s)).astype(np.float32))
                crops = rearrange(noisy.clamp(0, 255).to(torch.uint8), "n c h w -> n h w c").numpy()
                crops[~present] = 0
                f.create_dataset(f"crops_{s}", data=crops, chunks=(1, s, s, 3),
                                 compression="gzip", compression_opts=4)
            f.attrs.update({"video": f"synthetic_{v:02d}.mp4", "fps": 30.0, "n_frames": frames, "stride": 1,
                            "width": 640, "height": 360, "subject": "main", "config_hash": "synthetic"})
            f.attrs["complete"] = True
        paths.append(path)
    return paths


def stage_config(cfg: Config, name: str, faces_dir: Path, out_dir: Path) -> Config:
    """The features-stage config the benchmark runs: ``name`` with random weights into ``out_dir``."""
    overrides = [f"extractor={name}", "extractor.random_init=true", f"faces_dir={faces_dir}",
                 f"out_dir={out_dir}", f"batch_size={cfg.batch_size}", f"device={cfg.device}",
                 f"num_workers={cfg.num_workers}", f"seed={cfg.seed}"]
    return load_config("features", None, overrides)


def load_batches(sources: list[Path], extractor: Extractor, batch_size: int,
                 device: torch.device) -> tuple[list[torch.Tensor], dict[str, float]]:
    """The stage's batches, preprocessed: list of (b, 3, s, s) channels-last tensors, and the
    seconds spent reading (HDF5 + decompression) and preprocessing them."""
    batches, spent = [], {"read": 0.0, "preprocess": 0.0}
    with torch.inference_mode():
        for path in sources:
            src = stage.open_source(path, crop_size(extractor), batch_size)
            try:
                for k in range(len(src)):
                    t0 = time.perf_counter()
                    _, crops = src[k]
                    t1 = time.perf_counter()
                    x = extractor.preprocess(crops.to(device)).contiguous(memory_format=torch.channels_last)
                    spent["read"] += t1 - t0
                    spent["preprocess"] += time.perf_counter() - t1
                    batches.append(x)
            finally:
                src.close()
    return batches, spent


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) taken by ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def forward_all(extractor: Extractor, batches: list[torch.Tensor]) -> None:
    with torch.inference_mode():
        for x in batches:
            extractor(x)


def run_features_stage(cfg: Config) -> None:
    """One whole features-stage run, quietly; a failure is an error, not a fast time."""
    quiet = io.StringIO()
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(quiet):
            status = stage.main(cfg)
    finally:
        log.setLevel(level)
    if status != 0:
        raise RuntimeError(f"features stage failed: {quiet.getvalue().strip()}")


def read_windows(cache_path: Path, n: int, window: int, seed: int) -> dict[str, float]:
    """Read ``n`` random ``window``-frame windows through ``FeatureCache``; windows/s and MB/s of
    the float32 features it returns (files opened inside the timing, as a fresh reader would)."""
    rng = np.random.default_rng(seed)
    cache = FeatureCache([cache_path])
    lengths = {v: cache.length(v) for v in cache.videos}
    cache.close()
    picks = [(v, int(rng.integers(0, max(lengths[v] - window, 0) + 1)))
             for v in rng.choice(cache.videos, size=n)]
    cache = FeatureCache([cache_path])
    nbytes = 0
    start = time.perf_counter()
    for video, first in picks:
        feats, _, _ = cache.read(video, first, first + window)
        nbytes += feats.nbytes
    seconds = time.perf_counter() - start
    cache.close()
    return {"windows": n, "window": window, "seconds": seconds, "windows_per_s": n / seconds,
            "mb_per_s": nbytes / seconds / 1e6}


def bench_extractor(cfg: Config, name: str, faces_dir: Path, work: Path) -> dict:
    """Stage vs bare forward for one extractor, interleaved ``repeats`` times; medians and spreads."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    extractor = build_extractor(name, random_init=True).to(device, memory_format=torch.channels_last)
    sources = stage.find_sources(faces_dir)
    batches, spent = load_batches(sources, extractor, cfg.batch_size, device)
    frames = sum(len(x) for x in batches)
    if not frames:
        raise ValueError(f"{faces_dir}: no frames with a face to benchmark")
    for _ in range(cfg.warmup):
        forward_all(extractor, batches[:1])

    stage_runs, bare_runs = [], []
    for r in range(cfg.repeats):
        out_dir = work / f"{name}-{r}"  # a fresh folder, or the stage would skip finished videos
        stage_cfg = stage_config(cfg, name, faces_dir, out_dir)
        stage_runs.append(timed(lambda stage_cfg=stage_cfg: run_features_stage(stage_cfg)))
        bare_runs.append(timed(lambda: forward_all(extractor, batches)))
        log.info("%s repeat %d: stage %.2fs, bare forward %.2fs (%d frames)",
                 name, r + 1, stage_runs[-1][0], bare_runs[-1][0], frames)

    stage_s, bare_s = (statistics.median(w for w, _ in runs) for runs in (stage_runs, bare_runs))
    stage_cpu, bare_cpu = (statistics.median(c for _, c in runs) for runs in (stage_runs, bare_runs))
    windows = read_windows(work / f"{name}-0" / f"{name}.h5", cfg.windows, cfg.window, cfg.seed)
    return {
        "extractor": name, "frames": frames, "batches": len(batches), "input_size": int(extractor.input_size),
        "bare_fps": frames / bare_s, "stage_fps": frames / stage_s, "ratio": bare_s / stage_s,
        "ratio_cpu": bare_cpu / stage_cpu if cfg.num_workers == 0 else None,
        "stage_seconds": [w for w, _ in stage_runs], "bare_seconds": [w for w, _ in bare_runs],
        # the stage's own reading and preprocessing, as shares of the bare forward time
        "read_share": spent["read"] / bare_s, "preprocess_share": spent["preprocess"] / bare_s,
        "window_read": windows,
    }


def table(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    header = ["extractor", "frames", "bare forward fps", "stage fps", "stage / bare", "(CPU time)", "read",
              "preprocess", "windows/s", "MB/s"]
    cells = [[r["extractor"], r["frames"], f"{r['bare_fps']:.1f}", f"{r['stage_fps']:.1f}", f"{r['ratio']:.1%}",
              f"{r['ratio_cpu']:.1%}" if r["ratio_cpu"] is not None else "-", f"{r['read_share']:.1%}",
              f"{r['preprocess_share']:.1%}", f"{r['window_read']['windows_per_s']:.0f}",
              f"{r['window_read']['mb_per_s']:.1f}"] for r in rows]
    return markdown_table(header, cells)


def main(cfg: Config) -> int:
    """Benchmark every extractor in ``cfg.extractors``; print the table, write ``cfg.out``."""
    setup_logging()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    host = machine(cfg.device, cfg.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_features_") as tmp:
        work = Path(tmp)
        if cfg.faces_dir:
            faces_dir = Path(cfg.faces_dir)
        else:
            faces_dir = work / "faces"
            # and each extractor's own crop size, as the faces stage writes them for it
            sizes = crop_sizes(list(cfg.sizes), list(cfg.extractors))
            make_face_files(faces_dir, cfg.videos, cfg.frames, cfg.absent, sizes, cfg.seed)
        for name in cfg.extractors:
            rows.append(bench_extractor(cfg, name, faces_dir, work))
    print(table(rows))
    print("read / preprocess: the stage's own HDF5 reading and preprocessing, as shares of the bare "
          f"forward time; windows: random {cfg.window}-frame reads through FeatureCache (float32 MB).")
    write_json(cfg.out, {"config": cfg.to_dict(), "machine": host, "results": rows})
    print(f"-> {cfg.out}")
    return 0


if __name__ == "__main__":
    run_stage("bench_features", main)
