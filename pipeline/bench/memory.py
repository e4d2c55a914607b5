"""Benchmark the memory bound of the faces and features stages: their peak resident memory on a long
generated 720p video must stay under the same limit as on a short one.

``python -m pipeline.bench.memory [configs/bench_memory.yaml] [key=value ...]``. Each stage runs on
each video in a fresh interpreter, whose peak RSS (VmHWM, reset through /proc/self/clear_refs once
the imports are done) is its own. Prints a Markdown table, writes ``out`` (JSON) and exits 1 if a
peak exceeds ``limit_mb`` or a stage failed.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import h5py

from pipeline.atomic import write_json
from pipeline.bench import dotted_overrides, machine, stage_peak_in_child
from pipeline.bench.faces import make_long_video
from pipeline.cli import run_stage, setup_logging
from pipeline.config import Config, ConfigError, load_config
from pipeline.metrics import markdown_table
from pipeline.runs import local_device

log = logging.getLogger("pipeline")

STAGES = ("faces", "features")
QUICK_MINUTES = (0.25, 0.5)
METHOD = ("peak RSS: VmHWM of a fresh `python -c` process running the stage, reset through "
          "/proc/self/clear_refs after its imports (and, on a GPU, after CUDA's context started); baseline: "
          "its VmRSS at that moment (interpreter, torch, the pipeline modules, the CUDA context); work: peak "
          "minus baseline; GPU peak: torch.cuda.max_memory_allocated over the stage")


def faces_overrides(cfg: Config, video: Path, out_dir: Path) -> list[str]:
    """The faces stage on ``video`` alone, into ``out_dir``."""
    return [*cfg.faces, f"videos={video}", f"out_dir={out_dir}", f"stride={cfg.stride}",
            "subject=main", f"device={cfg.device}"]


def features_overrides(cfg: Config, faces_dir: Path, out_dir: Path) -> list[str]:
    """The features stage with ``cfg.extractor`` on the face files in ``faces_dir``, into ``out_dir``."""
    section = {k: v for k, v in cfg.extractor.items() if k != "name"}
    return [f"extractor={cfg.extractor.name}", *dotted_overrides("extractor", section), *cfg.features,
            f"faces_dir={faces_dir}", f"out_dir={out_dir}", f"device={cfg.device}"]


def count_frames(stage: str, out_dir: Path, video: str, extractor: str) -> tuple[int, int]:
    """(kept frames, frames with a face) in what ``stage`` wrote for ``video``."""
    path, group = (out_dir / f"{video}.h5", "/") if stage == "faces" else (out_dir / f"{extractor}.h5", video)
    with h5py.File(path, "r") as f:
        present = f[group]["present"][:]
    return len(present), int(present.sum())


def measure_video(cfg: Config, video: Path, minutes: float, work: Path) -> list[dict]:
    """Faces, then features on its output, each in its own process -> one row per stage."""
    dirs = {"faces": work / "faces", "features": work / "features"}
    overrides = {"faces": faces_overrides(cfg, video, dirs["faces"]),
                 "features": features_overrides(cfg, dirs["faces"], dirs["features"])}
    rows = []
    for stage in STAGES:
        row = {"stage": stage, "minutes": minutes, "video": str(video)}
        if rows and "error" in rows[-1]:
            rows.append(row | {"error": "skipped: the faces stage failed"})
            continue
        log.info("%s on %s ...", stage, video.name)
        row |= stage_peak_in_child(stage, overrides[stage], cfg.threads)
        if "error" in row:
            log.error("%s on %s failed: %s", stage, video, row["error"])
        else:
            row["frames"], row["faces"] = count_frames(stage, dirs[stage], video.stem, cfg.extractor.name)
            row["work_mb"] = row["peak_rss_mb"] - row["baseline_mb"]
            row["within_limit"] = row["peak_rss_mb"] <= cfg.limit_mb
            log.info("%s: %d frames in %.1fs, peak %.0f MB (baseline %.0f MB)", stage, row["frames"],
                     row["seconds"], row["peak_rss_mb"], row["baseline_mb"])
        rows.append(row)
    return rows


def ratios(rows: list[dict]) -> dict[str, dict]:
    """Per stage, the longest video's peak (and work above baseline) over the shortest one's."""
    out = {}
    for stage in STAGES:
        ok = sorted((r for r in rows if r["stage"] == stage and "error" not in r), key=lambda r: r["minutes"])
        if len(ok) >= 2 and ok[0]["minutes"] < ok[-1]["minutes"]:
            short, long = ok[0], ok[-1]
            out[stage] = {"short_minutes": short["minutes"], "long_minutes": long["minutes"],
                          "peak": long["peak_rss_mb"] / short["peak_rss_mb"],
                          "work": long["work_mb"] / short["work_mb"] if short["work_mb"] > 0 else None}
    return out


def report(rows: list[dict], ratio: dict[str, dict], limit_mb: float) -> str:
    """The runs and the long / short ratios as Markdown tables."""
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["stage"], f"{r['minutes']:g} min", "-", "-", "-", "-", "-", "-",
                         f"failed: {r['error'][:200]}"])
            continue
        body.append([r["stage"], f"{r['minutes']:g} min", r["frames"], f"{r['seconds']:.1f}",
                     f"{r['baseline_mb']:.0f}", f"{r['work_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                     f"{r['gpu_peak_mb']:.0f}" if "gpu_peak_mb" in r else "-", "yes" if r["within_limit"] else "NO"])
    text = markdown_table(["stage", "video length", "frames", "seconds", "baseline MB", "work MB", "peak RSS MB",
                           "GPU peak MB", f"within {limit_mb:g} MB"], body)
    if ratio:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        text += "\n\n" + markdown_table(
            ["stage", "long / short", "peak ratio", "work ratio"],
            [[s, f"{q['long_minutes']:g} / {q['short_minutes']:g} min", fmt(q["peak"]), fmt(q["work"])]
             for s, q in ratio.items()])
    return text


def check(cfg: Config) -> list[float]:
    """Refuse unusable settings before any work -> the video lengths in minutes."""
    minutes = list(QUICK_MINUTES) if cfg.quick else [float(m) for m in cfg.minutes]
    if not minutes or any(m <= 0 for m in minutes):
        raise ConfigError(f"minutes={cfg.minutes}: need one or more positive lengths")
    for key in ("width", "height", "fps", "stride"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be at least 1")
    # an unknown key or a bad type would otherwise surface only inside the first child
    load_config("faces", None, faces_overrides(cfg, Path("x.mp4"), Path("x")))
    load_config("features", None, features_overrides(cfg, Path("x"), Path("x")))
    return minutes


def main(cfg: Config) -> int:
    """Generate the videos, measure every (video, stage); print the tables, write ``cfg.out``."""
    setup_logging()
    minutes = check(cfg)
    host = machine(local_device(cfg.device), cfg.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for m in minutes:
            name = f"astronaut_{m:g}min_{cfg.width}x{cfg.height}_{cfg.fps}fps.mp4"
            t0 = time.perf_counter()
            video = make_long_video(Path(cfg.cache) / name, m * 60, cfg.width, cfg.height, cfg.fps)
            log.info("video %s ready in %.1fs", video, time.perf_counter() - t0)
            rows += measure_video(cfg, video, m, Path(tmp) / f"{m:g}min")
    ratio = ratios(rows)
    print(report(rows, ratio, cfg.limit_mb))
    print(f"{cfg.width}x{cfg.height} {cfg.fps} fps, faces stride {cfg.stride}, extractor {cfg.extractor.name}, "
          f"{cfg.threads or 'default'} thread(s). {METHOD}.")
    write_json(cfg.out, {"config": cfg.to_dict(), "machine": host, "limit_mb": cfg.limit_mb, "method": METHOD,
                         "runs": rows, "ratios": ratio})
    print(f"-> {cfg.out}")
    failed = [r for r in rows if "error" in r or not r["within_limit"]]
    return 1 if failed else 0


if __name__ == "__main__":
    run_stage("bench_memory", main)
