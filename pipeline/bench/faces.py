"""Benchmark the faces stage: its frame rate against a plain per-frame facenet-pytorch loop on a real
clip, measured in one run, how many of the plain loop's faces it also finds, and its peak memory on
a generated long video, measured in a fresh process.

``python -m pipeline.bench.faces [configs/bench_faces.yaml] [key=value ...]``. Prints a Markdown
table and writes ``out`` (JSON).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import faces
from pipeline.atomic import atomic_output, write_json
from pipeline.bench import machine, stage_peak_in_child
from pipeline.cli import run_stage, setup_logging
from pipeline.config import Config, ConfigError, load_config
from pipeline.metrics import markdown_table
from pipeline.runs import local_device
from pipeline.vision.detect import FaceDetector
from pipeline.vision.track import iou

log = logging.getLogger("pipeline")


def plain_loop(frames: list, mtcnn) -> list[np.ndarray | None]:
    """facenet-pytorch as its README uses it, one frame at a time: what ``mtcnn(img)`` does
    (detect, keep the largest face, crop it), keeping the box -> per frame (4,) or None."""
    boxes = []
    for img in frames:
        b, p, pts = mtcnn.detect(img, landmarks=True)
        b, p, pts = mtcnn.select_boxes(b, p, pts, img, method=mtcnn.selection_method)
        mtcnn.extract(img, b, None)
        boxes.append(None if b is None else np.asarray(b, np.float32).reshape(-1, 4)[0])
    return boxes


def run_faces_stage(video: Path, cfg: Config, detector: FaceDetector, out_dir: Path) -> dict:
    """One video through the stage (decode, detect, track, align, write HDF5) -> its datasets."""
    import h5py

    out = faces.Output(video.stem, out_dir / f"{video.stem}.h5", "main")
    faces.process_video(video, [out], cfg, detector)
    with h5py.File(out.path, "r") as f:
        return {k: f[k][:] for k in ("frame", "box", "present", "interpolated")}


def agreement(plain: list[np.ndarray | None], stage: dict, min_iou: float) -> dict:
    """How many plain-loop faces the stage's subject box matches with IoU >= ``min_iou``: counting
    only detected frames, and counting interpolated frames too."""
    row = {int(fr): k for k, fr in enumerate(stage["frame"])}
    want = [(i, b) for i, b in enumerate(plain) if b is not None and i in row]
    hit = hit_detected = 0
    for i, b in want:
        k = row[i]
        if not stage["present"][k]:
            continue
        ok = bool(iou(b[None], stage["box"][k][None])[0, 0] >= min_iou)
        hit += ok
        hit_detected += ok and not bool(stage["interpolated"][k])
    n = max(len(want), 1)
    return {"plain_faces": len(want), "found": hit_detected, "found_share": hit_detected / n,
            "found_with_interpolated": hit, "found_with_interpolated_share": hit / n}


def bench_speed(cfg: Config, clip: Path, work: Path) -> dict:
    """Stage vs plain loop on ``clip``, interleaved ``cfg.repeats`` times; medians."""
    import decord
    from facenet_pytorch import MTCNN
    from PIL import Image

    stage_cfg = faces.resolve(load_config("faces", None, [*cfg.stage, f"device={cfg.device}"]))
    detector = FaceDetector.from_config(stage_cfg)
    mtcnn = MTCNN(device=stage_cfg.device)  # both sides on the same device
    vr = decord.VideoReader(str(clip), ctx=decord.cpu(0), num_threads=1)
    # the plain loop gets its frames decoded beforehand: decoding is not in its time
    frames = [Image.fromarray(vr[i].asnumpy()) for i in range(0, len(vr), stage_cfg.stride)]
    del vr
    stage_s, plain_s, result, plain = [], [], None, None
    for r in range(cfg.repeats):
        t0 = time.perf_counter()
        result = run_faces_stage(clip, stage_cfg, detector, work / f"stage-{r}")
        stage_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        plain = plain_loop(frames, mtcnn)
        plain_s.append(time.perf_counter() - t0)
        log.info("repeat %d: stage %.1fs, plain loop %.1fs (%d frames)", r + 1, stage_s[-1], plain_s[-1],
                 len(frames))
    n = len(frames)
    stage_t, plain_t = statistics.median(stage_s), statistics.median(plain_s)
    return {"clip": str(clip), "frames": n, "width": frames[0].width, "height": frames[0].height,
            "stage_fps": n / stage_t, "plain_fps": n / plain_t, "ratio": plain_t / stage_t,
            "stage_seconds": stage_s, "plain_seconds": plain_s, "stage_config": dict(stage_cfg.to_dict()),
            **agreement(plain, result, cfg.min_iou)}


def make_long_video(path: Path, seconds: float, width: int, height: int, fps: int) -> Path:
    """A ``seconds`` long H.264 video of the scikit-image astronaut photo drifting slowly over a grey
    background, so that the detector finds a real face in every frame; written once, then reused."""
    import av
    from skimage.data import astronaut

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    face = astronaut()[:300, 80:380]  # (300, 300, 3): the head and shoulders
    fh, fw = face.shape[:2]
    n = int(round(seconds * fps))
    with atomic_output(path) as tmp, av.open(str(tmp), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "28"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        canvas = np.full((height, width, 3), 110, np.uint8)
        for k in range(n):
            # a slow sweep, a few pixels a second: little motion keeps encoding fast
            x = int((width - fw) * (0.5 + 0.4 * np.sin(2 * np.pi * k / (fps * 60))))
            y = (height - fh) // 2
            canvas[:] = 110
            canvas[y : y + fh, x : x + fw] = face
            out.mux(stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")))
        out.mux(stream.encode())
    return path


def bench_memory(cfg: Config, video: Path, out_dir: Path) -> dict:
    """Peak resident memory of ``python -m pipeline.faces``-equivalent work on ``video``, measured in
    a fresh interpreter started with ``subprocess`` (VmHWM after resetting it via clear_refs)."""
    overrides = [*cfg.stage, f"data.videos={video}", f"out_dir={out_dir}", f"stride={cfg.memory_stride}",
                 f"device={cfg.device}"]
    res = stage_peak_in_child("faces", overrides, cfg.threads)
    if "error" in res:
        raise RuntimeError(f"memory run on {video}: {res['error']}")
    return {"video": str(video), "stride": cfg.memory_stride, **res}


def table(speed: dict, lengths: list[dict]) -> str:
    """The results as Markdown tables: the clip against the plain loop, then each long video."""
    s = speed
    header = ["clip", "frames", "plain loop fps", "stage fps", "stage / plain",
              f"plain faces found (IoU >= {s['min_iou']})"]
    row = [f"{Path(s['clip']).name} {s['width']}x{s['height']}", s["frames"], f"{s['plain_fps']:.1f}",
           f"{s['stage_fps']:.1f}", f"{s['ratio']:.2f}x", f"{s['found']}/{s['plain_faces']} ({s['found_share']:.1%})"]
    text = markdown_table(header, [row])
    if lengths:
        rows = [[f"{m['minutes']:g} min {m['size']}", m["frames"], f"{m['seconds']:.1f}", f"{m['fps']:.1f}",
                 f"{m['peak_rss_mb']:.0f}"] for m in lengths]
        text += "\n\n" + markdown_table(["generated video", "frames", "stage seconds", "frames/s", "peak RSS (MB)"],
                                         rows)
        if len(lengths) > 1:
            rates = [m["fps"] for m in lengths]
            text += f"\n\nrate from the shortest to the longest video: {rates[-1] / rates[0]:.2f}x (flat is 1.00x)"
    return text


def main(cfg: Config) -> int:
    """Run the speed comparison and the memory run; print the table, write ``cfg.out``."""
    setup_logging()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    host = machine(local_device(cfg.device), cfg.threads)
    if cfg.clip:
        clip = Path(cfg.clip)
    else:
        from pipeline.bench.clips import fetch_pyfeat_clips

        clip = fetch_pyfeat_clips() / ("single_face.mp4" if cfg.quick else "WolfgangLanger_Pexels.mp4")
    if not cfg.minutes or any(m <= 0 for m in cfg.minutes):
        raise ConfigError(f"minutes={list(cfg.minutes)}: one or more lengths above 0, e.g. [1, 10]")
    minutes = [0.5] if cfg.quick else sorted(float(m) for m in cfg.minutes)
    with tempfile.TemporaryDirectory(prefix="bench_faces_") as tmp:
        speed = bench_speed(cfg, clip, Path(tmp)) | {"min_iou": cfg.min_iou}
        lengths = []
        for length in minutes if cfg.memory else []:
            name = f"astronaut_{length:g}min_{cfg.width}x{cfg.height}_{cfg.fps}fps.mp4"
            t0 = time.perf_counter()
            video = make_long_video(Path(cfg.cache) / name, length * 60, cfg.width, cfg.height, cfg.fps)
            log.info("long video %s ready in %.1fs", video, time.perf_counter() - t0)
            run = bench_memory(cfg, video, Path(tmp) / f"memory_{length:g}")
            frames = int(round(length * 60 * cfg.fps)) // cfg.memory_stride
            lengths.append(run | {"minutes": length, "size": f"{cfg.width}x{cfg.height}", "frames": frames,
                                  "fps": frames / run["seconds"]})
    print(table(speed, lengths))
    print("stage: decode (both passes), detection, tracking, alignment and gzip HDF5 writing of the clip; "
          "plain loop: MTCNN() detect + select + crop per frame on PIL frames decoded beforehand (not timed). "
          "Found: plain-loop faces matched by a detected (not interpolated) stage box. Peak RSS: VmHWM of a "
          "fresh subprocess running the stage, reset via /proc/self/clear_refs.")
    write_json(cfg.out, {"config": cfg.to_dict(), "machine": host, "speed": speed,
                         "memory": lengths[-1] if lengths else None, "lengths": lengths})
    print(f"-> {cfg.out}")
    return 0


if __name__ == "__main__":
    run_stage("bench_faces", main)
