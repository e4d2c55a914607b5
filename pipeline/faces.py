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
from pipeline.config import DEVICE, Config, ConfigError, InputError, check_choices
from pipeline.hdf5 import h5_is_done, h5_writer
from pipeline.runs import STOPS, list_inputs, local_device, run_each, shard_of, share_threads, stage_lock, stop
from pipeline.vision.templates import TEMPLATES
from pipeline.vision.track import SUBJECTS, Detections, Subject, follow, link, subject_tracks
from pipeline.vision.video import VideoInfo, chunk_frames, decode_threads, iter_chunks, open_video, prefetched, shrunk

if TYPE_CHECKING:
    from pipeline.vision.detect import FaceDetector

log = logging.getLogger("pipeline")

# Keys that change what a face file holds; the rest (device, batch size, paths) do not.
# Crop sizes are not among them: a file holds the sizes it holds, and one lacking a size is given it
# from its stored landmarks (:func:`add_sizes`), without detecting again.
HASH_KEYS = ("stride", "detect_size", "min_face", "thresholds", "keyframe", "follow_score", "subject", "max_gap",
             "track", "template", "compression", "compression_level", "import_cropped")
# bump when a change to this stage changes what its files hold, so that finished files are redone
VERSION = 3
IMPORTED_SIZES = [112]  # ABAW's cropped_aligned JPEGs are 112 px: larger would only be resized up
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


def crop_sizes(sizes: list[int], extractors: list[str]) -> list[int]:
    """The crop sizes to write: ``sizes`` and, where it is larger than all of them, the crop side
    each of ``extractors`` reads (:func:`features.crop_size`), so that none is resized up."""
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 16 for s in sizes):
        raise InputError(f"sizes={sizes}: give crop sides in pixels, at least 16, such as [112]")
    out = set(sizes)
    if extractors:
        from features import crop_size  # torch, and timm for its backbones: only when asked

        for name in extractors:
            try:
                side = crop_size(str(name))
            except (ValueError, TypeError, ConfigError) as e:
                raise InputError(f"extractors: {e}") from None
            if side > max(sizes):
                out.add(side)
    return sorted(out)


def held_sizes(path: Path | h5py.File) -> set[int]:
    """The crop sizes a face file holds (``crops_<size>``); none if it cannot be read."""
    if isinstance(path, h5py.File):
        return {int(k.removeprefix("crops_")) for k in path if k.startswith("crops_")}
    try:
        with h5py.File(path, "r") as f:
            return held_sizes(f)
    except OSError:
        return set()


def _crops_dataset(f: h5py.File, size: int, n: int, cfg: Config) -> None:
    comp = dict(compression=cfg.compression or None)
    if cfg.compression == "gzip":
        comp["compression_opts"] = cfg.compression_level
    # one frame per HDF5 chunk so that a reader can fetch any frame alone
    f.create_dataset(f"crops_{size}", (n, size, size, 3), np.uint8, chunks=(1, size, size, 3), **comp)


@contextlib.contextmanager
def _new_h5(path: Path, n: int, cfg: Config, attrs: dict) -> Iterator[h5py.File]:
    with h5_writer(path) as f:  # on a full disk it fails the video, not the process at exit
        for size in cfg.sizes:
            _crops_dataset(f, size, n, cfg)
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
    with contextlib.ExitStack() as stack:
        # every temporary file is closed before any is renamed, and all are renamed only on success
        tmps = [stack.enter_context(atomic_output(o.path)) for o in outputs]
        files = [stack.enter_context(_new_h5(t, len(index), cfg, _attrs(info, cfg, o.subject)))
                 for t, o in zip(tmps, outputs, strict=True)]
        for f, sub in zip(files, subjects, strict=True):
            _write_meta(f, index, stamps, errors, sub)

        def lost(k: int, rows: np.ndarray) -> None:  # decoded once but not twice: no crop, so no face
            files[k]["present"][rows], files[k]["decode_error"][rows], files[k]["track"][rows] = False, True, -1

        faces = [(f, sub.present, sub.landmarks, cfg.sizes) for f, sub in zip(files, subjects, strict=True)]
        _write_crops(info, index, faces, cfg, lost)
        for f in files:
            f.attrs["complete"] = True
    took = time.perf_counter() - start
    share = ", ".join(f"{o.name}: {sub.present.mean():.0%} with face"
                      for o, sub in zip(outputs, subjects, strict=True))
    log.info("%s: %d frames in %.1fs (%.1f frames/s; whole-frame detection on %d); %s", video.name,
             len(index), took, len(index) / took, whole, share)


def _write_crops(info: VideoInfo, index: np.ndarray, faces: list[tuple[h5py.File, np.ndarray, np.ndarray, list[int]]],
                 cfg: Config, lost) -> None:
    """Decode the frames of ``index`` on which some face is present and write its aligned crops;
    ``faces``: (file, present (n,), landmarks (n, 5, 2), crop sizes) per face file. ``lost(k,
    rows)`` is told of face k's present rows whose frame did not decode this time."""
    from pipeline.vision.align import align_faces  # torch, imported only when a video has work to do

    wanted = np.flatnonzero(np.any([face[1] for face in faces], axis=0))
    pos = {int(fr): k for k, fr in enumerate(index)}
    for ch in prefetched(iter_chunks(None, info, chunk_frames(cfg.chunk, cfg.chunk_mb, (info.height, info.width)),
                                     frames=index[wanted], threads=decode_threads(cfg.decode_threads))):
        rows = np.array([pos[int(fr)] for fr in ch.index])
        for k, (f, present, landmarks, sizes) in enumerate(faces):
            ok = present[rows] & ~ch.error
            if (present[rows] & ch.error).any():
                lost(k, rows[present[rows] & ch.error])
            if not ok.any():
                continue
            frames = ch.frames if ok.all() else ch.frames[ok]  # no copy of whole frames when it can be helped
            for size in sizes:
                f[f"crops_{size}"][rows[ok]] = align_faces(frames, landmarks[rows[ok]], size, cfg.template)
            del frames
        del ch  # so that the next chunk decodes without this one held


def add_sizes(video: Path, outputs: list[Output], cfg: Config) -> None:
    """Give finished face files of ``video`` the crop sizes of ``cfg.sizes`` they lack, warped from
    their stored landmarks: the video is decoded again on the frames with a face, nothing is
    detected, and everything the files held stays as it was. Each file is replaced whole."""
    start = time.perf_counter()
    info = open_video(video)[1]
    with contextlib.ExitStack() as stack:
        olds = [stack.enter_context(h5py.File(o.path, "r")) for o in outputs]
        tmps = [stack.enter_context(atomic_output(o.path)) for o in outputs]
        news = [stack.enter_context(h5_writer(t)) for t in tmps]
        faces, added = [], set()
        for old, new in zip(olds, news, strict=True):
            for key in old:
                old.copy(old[key], new, key)
            new.attrs.update({k: v for k, v in old.attrs.items() if k != "complete"})
            missing = [s for s in cfg.sizes if f"crops_{s}" not in old]
            for size in missing:
                _crops_dataset(new, size, len(old["frame"]), cfg)
            added.update(missing)
            made = json.loads(old.attrs.get("config", "{}"))  # what it was made with, and now its sizes
            new.attrs["config"] = json.dumps({**made, "sizes": sorted(held_sizes(old) | set(missing))})
            faces.append((new, old["present"][:], old["landmarks"][:], missing))

        def lost(k: int, rows: np.ndarray) -> None:
            raise RuntimeError(f"{video}: frame {int(olds[k]['frame'][rows[0]])} had a face when the faces stage ran "
                               f"but does not decode now; delete {outputs[k].path} to redo the video")

        _write_crops(info, olds[0]["frame"][:], faces, cfg, lost)
        for new in news:
            new.attrs["complete"] = True
    log.info("%s: crops of %s pixels added from the stored landmarks in %.1fs", video.name,
             ", ".join(map(str, sorted(added))), time.perf_counter() - start)


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
    attrs = _attrs(info, cfg, "cropped_aligned") | {"source": str(folder)}
    with atomic_output(out_path) as tmp, _new_h5(tmp, n, Config({**cfg, "sizes": IMPORTED_SIZES}), attrs) as f:
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
    cfg.sizes = crop_sizes(list(cfg.sizes), list(cfg.get("extractors") or []))
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

    def lacking(path: Path, sizes) -> bool | None:
        """None: to be made; else whether the finished file lacks some of ``sizes``."""
        return not set(sizes) <= held_sizes(path) if h5_is_done(path, chash) else None

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
                           is_done=lambda p: lacking(out_dir / f"{p.name}.h5", IMPORTED_SIZES) is False)
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
            state = [lacking(o.path, cfg.sizes) for o in plan[video]]
            if None not in state:  # found before: only crop sizes are missing
                add_sizes(video, [o for o, more in zip(plan[video], state, strict=True) if more], cfg)
                return
            if detector is None:  # MTCNN, and torch, only once a video has work to do
                from pipeline.vision.detect import FaceDetector

                detector = FaceDetector.from_config(cfg)
            process_video(video, plan[video], cfg, detector)

        summary = run_each(
            items, work, name=str, failures_file=failures,
            is_done=lambda v: all(lacking(o.path, cfg.sizes) is False for o in plan[v]), desc="faces",
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
