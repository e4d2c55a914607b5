"""Stage 1, faces: decode, detect, track and align the subject's face in every video.

``python -m pipeline.faces [config.yaml] [key=value ...]`` writes one HDF5 per video (or per
person, for videos annotated as ``<video>_left`` / ``<video>_right``) under ``out_dir``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from pipeline.atomic import atomic_output, sweep_partials
from pipeline.cli import run_stage
from pipeline.config import DEVICE, Config, InputError, check_choices
from pipeline.hdf5 import h5_is_done, h5_writer
from pipeline.runs import STOPS, list_inputs, local_device, run_each, shard_of, share_threads, stage_lock, stop
from pipeline.vision.templates import TEMPLATES
from pipeline.vision.track import SUBJECTS, Detections, Subject, follow, link, subject_tracks
from pipeline.vision.video import VideoInfo, chunk_frames, decode_threads, iter_chunks, open_video, prefetched, shrunk

if TYPE_CHECKING:
    from pipeline.vision.detect import FaceDetector

log = logging.getLogger("pipeline")

# Keys that change what a face file holds; the rest (device, batch size, paths) do not.
HASH_KEYS = ("stride", "detect_size", "min_face", "thresholds", "keyframe", "follow_score", "subject", "max_gap",
             "track", "sizes", "template", "compression", "compression_level", "import_cropped")
# bump when a change to this stage changes what its files hold, so that finished files are redone
VERSION = 3
SIDE = re.compile(r"^(?P<stem>.+)_(?P<side>left|right)$")
CHOICES = {"subject": ("auto", *SUBJECTS), "template": tuple(TEMPLATES), "compression": ("gzip", "lzf", ""),
           "device": DEVICE}


@dataclass
class Output:
    """One face file: where it goes and whose face it holds."""

    name: str
    path: Path
    subject: str


def outputs_for(video: Path, cfg: Config, annotated: set[str]) -> list[Output]:
    """The face files a video yields: one per annotated person (``_left`` / ``_right``), else one;
    ``subject=left`` / ``right`` names its file ``<video>_left`` / ``_right``, as the annotations
    and the submissions name that person."""
    out_dir, stem = Path(cfg.out_dir), video.stem
    mk = lambda name, subject: Output(name, out_dir / f"{name}.h5", subject)
    m = SIDE.match(stem)
    if cfg.subject in ("left", "right") and not m:  # one of two persons: named as ABAW names them
        return [mk(f"{stem}_{cfg.subject}", cfg.subject)]
    if cfg.subject != "auto":
        return [mk(stem, cfg.subject)]
    if m:  # the file itself is named after one person
        return [mk(stem, m["side"])]
    sides = [s for s in ("left", "right") if f"{stem}_{s}" in annotated]
    return [mk(f"{stem}_{s}", s) for s in sides] or [mk(stem, "main")]


def annotation_names(cfg: Config) -> set[str]:
    """Stems of every annotation file under ``data.annotations`` (empty if there is none)."""
    root = cfg.data.get("annotations") if isinstance(cfg.get("data"), dict) else None
    if not root or not Path(root).is_dir():
        return set()
    return {p.stem for p in Path(root).rglob("*.txt")}


def config_hash(cfg: Config) -> str:
    """The hash stored in and checked against face files: the output-changing keys and ``VERSION``."""
    return f"{cfg.hash(HASH_KEYS)}-v{VERSION}"


@contextlib.contextmanager
def _new_h5(path: Path, n: int, cfg: Config, attrs: dict) -> Iterator[h5py.File]:
    with h5_writer(path) as f:  # on a full disk it fails the video, not the process at exit
        comp = dict(compression=cfg.compression or None)
        if cfg.compression == "gzip":
            comp["compression_opts"] = cfg.compression_level
        for size in cfg.sizes:
            # one frame per HDF5 chunk so that a reader can fetch any frame alone
            f.create_dataset(f"crops_{size}", (n, size, size, 3), np.uint8, chunks=(1, size, size, 3), **comp)
        for k, v in attrs.items():
            f.attrs[k] = v
        yield f


def _write_meta(f: h5py.File, index, timestamp, error, sub: Subject) -> None:
    f["frame"] = index.astype(np.int64)
    f["timestamp"] = timestamp.astype(np.float64)
    f["present"] = sub.present
    f["interpolated"] = sub.interpolated
    f["decode_error"] = error
    f["box"] = sub.box.astype(np.float32)
    f["landmarks"] = sub.landmarks.astype(np.float32)
    f["score"] = sub.score.astype(np.float32)
    f["track"] = sub.track.astype(np.int32)


def _attrs(info: VideoInfo, cfg: Config, subject: str) -> dict:
    return {"video": info.path, "fps": info.fps, "n_frames": info.n_frames, "width": info.width,
            "height": info.height, "stride": cfg.stride, "subject": subject, "template": cfg.template,
            "config_hash": config_hash(cfg), "config": json.dumps(cfg.to_dict())}


def process_video(video: Path, outputs: list[Output], cfg: Config, detector: FaceDetector) -> None:
    """Detect, track and align one video into each of ``outputs``; files appear only when complete."""
    from pipeline.vision.align import align_faces  # torch, imported only when a video has work to do

    start = time.perf_counter()
    info = open_video(video)[1]  # its reader is dropped at once: iter_chunks opens one per chunk
    full = (info.height, info.width)
    small = shrunk(full, cfg.detect_size)
    detector.reset()
    # pass 1: detections on every kept frame, decoded straight to the detector's size; frames are
    # not kept, so memory stays bounded
    index, stamps, errors, dets = [], [], [], []
    threads = decode_threads(cfg.decode_threads)
    for ch in prefetched(iter_chunks(None, info, chunk_frames(cfg.chunk, cfg.chunk_mb, small), cfg.stride,
                                     size=small, threads=threads)):
        found = detector(ch.frames, full=full)
        dets += [Detections.empty() if e else d for d, e in zip(found, ch.error, strict=True)]
        index.append(ch.index)
        stamps.append(ch.timestamp)
        errors.append(ch.error)
        del ch  # so that the next chunk decodes without this one held
    index, stamps, errors = np.concatenate(index), np.concatenate(stamps), np.concatenate(errors)
    if errors.all():
        raise RuntimeError(f"{video}: none of its {len(index)} frames could be decoded")
    whole = detector.full
    ids = link(dets, cfg.track.max_lost, cfg.track.min_iou, cfg.track.max_landmark)
    subjects = [follow(dets, ids, subject_tracks(dets, ids, o.subject, cfg.track.min_frames, cfg.track.min_score),
                       cfg.max_gap, ~errors) for o in outputs]

    # pass 2: decode only the frames some subject is present in, and warp them
    wanted = np.flatnonzero(np.any([s.present for s in subjects], axis=0))
    with contextlib.ExitStack() as stack:
        # every temporary file is closed before any is renamed, and all are renamed only on success
        tmps = [stack.enter_context(atomic_output(o.path)) for o in outputs]
        files = [stack.enter_context(_new_h5(t, len(index), cfg, _attrs(info, cfg, o.subject)))
                 for t, o in zip(tmps, outputs, strict=True)]
        for f, sub in zip(files, subjects, strict=True):
            _write_meta(f, index, stamps, errors, sub)
        pos = {int(fr): k for k, fr in enumerate(index)}
        for ch in prefetched(iter_chunks(None, info, chunk_frames(cfg.chunk, cfg.chunk_mb, full), frames=index[wanted],
                                         threads=threads)):
            rows = np.array([pos[int(fr)] for fr in ch.index])
            for f, sub in zip(files, subjects, strict=True):
                ok = sub.present[rows] & ~ch.error
                lost = rows[sub.present[rows] & ch.error]
                if len(lost):  # decoded once but not twice: no crop, so no face
                    f["present"][lost], f["decode_error"][lost], f["track"][lost] = False, True, -1
                if not ok.any():
                    continue
                frames = ch.frames if ok.all() else ch.frames[ok]  # no copy of whole frames when it can be helped
                for size in cfg.sizes:
                    f[f"crops_{size}"][rows[ok]] = align_faces(frames, sub.landmarks[rows[ok]], size, cfg.template)
                del frames
            del ch  # so that the next chunk decodes without this one held
        for f in files:
            f.attrs["complete"] = True
    took = time.perf_counter() - start
    share = ", ".join(f"{o.name}: {sub.present.mean():.0%} with face"
                      for o, sub in zip(outputs, subjects, strict=True))
    log.info("%s: %d frames in %.1fs (%.1f frames/s; whole-frame detection on %d); %s", video.name,
             len(index), took, len(index) / took, whole, share)


def export_cropped(h5_path: str | Path, out_dir: str | Path, size: int = 112, quality: int = 95) -> int:
    """Write the present frames of a face file as ``out_dir/<video>/00001.jpg`` (frame 0 -> 00001).

    Returns the number of JPEGs written.
    """
    from PIL import Image

    h5_path = Path(h5_path)
    folder = Path(out_dir) / h5_path.stem
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(h5_path, "r") as f:
        crops, frames = f[f"crops_{size}"], f["frame"][:]
        present = np.flatnonzero(f["present"][:])
        for k in present:
            Image.fromarray(crops[k]).save(folder / f"{frames[k] + 1:05d}.jpg", quality=quality)
    return len(present)


def import_cropped(
    folder: str | Path, out_path: str | Path, cfg: Config, info: VideoInfo | None = None
) -> None:
    """Turn an ABAW ``cropped_aligned/<video>/`` folder into a face file with no detection.

    JPEG ``00001.jpg`` is frame 0; numbers that are missing become frames without a face. With the
    source video's ``info`` the frame count, rate and size come from it, otherwise from the JPEGs.
    """
    from PIL import Image

    folder = Path(folder)
    jpegs = {int(p.stem) - 1: p for p in folder.glob("*.jpg") if p.stem.isdigit() and int(p.stem) > 0}
    if not jpegs:
        raise ValueError(f"{folder}: no numbered JPEGs such as 00001.jpg")
    n = max(max(jpegs) + 1, info.n_frames if info else 0)
    if info is None:
        info = VideoInfo(str(folder), float(cfg.fps), n, 0, 0)
    index = np.arange(n, dtype=np.int64)
    present = np.isin(index, list(jpegs))
    sub = Subject(np.full((n, 4), np.nan, np.float32), np.full((n, 5, 2), np.nan, np.float32),
                  np.zeros(n, np.float32), np.where(present, 0, -1), present, np.zeros(n, bool))
    sizes = [s for s in cfg.sizes if s == 112] or [112]  # ABAW crops are 112 px; larger would be upsampled
    attrs = _attrs(info, cfg, "cropped_aligned") | {"source": str(folder)}
    with atomic_output(out_path) as tmp, _new_h5(tmp, n, Config({**cfg, "sizes": sizes}), attrs) as f:
        _write_meta(f, index, index / info.fps, np.zeros(n, bool), sub)
        for k in np.flatnonzero(present):
            img = Image.open(jpegs[k]).convert("RGB")
            if img.size != (112, 112):
                img = img.resize((112, 112), Image.BILINEAR)
            f["crops_112"][k] = np.asarray(img)
        f.attrs["complete"] = True


def resolve(cfg: Config) -> Config:
    """Fill the defaults that depend on other keys: ``out_dir`` and the video source."""
    cfg = Config(cfg)
    check_choices(cfg, CHOICES)
    name = cfg.data.get("name", "data") if isinstance(cfg.get("data"), dict) else str(cfg.get("data"))
    cfg.out_dir = cfg.out_dir or f"runs/{name}/faces"
    if not cfg.videos:
        cfg.videos = cfg.data.get("videos", "") if isinstance(cfg.get("data"), dict) else ""
    cfg.device = local_device(cfg.device)  # a process of several takes its own GPU
    return cfg


def main(cfg: Config) -> int:
    """Run the face stage over every video of this shard; exit status 1 if any failed, 2 if the
    output folder is locked by another run or cannot be written."""
    cfg = resolve(cfg)
    share_threads()  # one of several processes on this machine takes its share of the cores
    out_dir = Path(cfg.out_dir)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(stage_lock(out_dir, cfg.shard or None))
            cfg.save(out_dir / "config.yaml")
        except STOPS as e:
            return stop("faces", e)
        return run(cfg, out_dir)


def run(cfg: Config, out_dir: Path) -> int:
    sweep_partials(out_dir)
    chash = config_hash(cfg)
    failures = out_dir / "failures.jsonl"
    try:
        videos = list_inputs(cfg.videos) if cfg.videos else []
    except FileNotFoundError as e:
        if not cfg.import_cropped:  # imported crops only borrow frame rate and count from videos
            raise InputError(str(e)) from None
        videos = []

    if cfg.import_cropped:
        found = {v.stem: v for v in videos}
        folders = sorted(p for p in Path(cfg.import_cropped).iterdir() if p.is_dir())
        items = shard_of(folders, cfg.shard or None)

        def work(folder: Path) -> None:
            info = open_video(found[folder.name])[1] if folder.name in found else None
            import_cropped(folder, out_dir / f"{folder.name}.h5", cfg, info)

        summary = run_each(items, work, name=lambda p: p.name, failures_file=failures, desc="import",
                           is_done=lambda p: h5_is_done(out_dir / f"{p.name}.h5", chash))
    else:
        if not videos:
            log.error("no videos: set data.videos or videos=<folder|glob|list>")
            return 1
        annotated = annotation_names(cfg)
        items = shard_of(videos, cfg.shard or None)
        plan = {v: outputs_for(v, cfg, annotated) for v in items}
        detector = None

        def work(video: Path) -> None:
            nonlocal detector
            if detector is None:  # MTCNN, and torch, only once a video has work to do
                from pipeline.vision.detect import FaceDetector

                detector = FaceDetector.from_config(cfg)
            process_video(video, plan[video], cfg, detector)

        summary = run_each(
            items, work, name=str, failures_file=failures,
            is_done=lambda v: all(h5_is_done(o.path, chash) for o in plan[v]), desc="faces",
        )
    if cfg.export_cropped:
        for h5 in sorted(out_dir.glob("*.h5")):
            export_cropped(h5, out_dir / "cropped_aligned", 112, cfg.jpeg_quality)
    print(f"faces: {summary.line()} -> {out_dir}")
    for key, reason in summary.failed.items():
        print(f"  failed: {key}: {reason}")
    return 0 if summary.ok else 1


def cli() -> None:
    """The ``affect-faces`` command, the same as ``python -m pipeline.faces``."""
    run_stage("faces", main)


if __name__ == "__main__":
    cli()
