"""Stage 2: run a frame-level extractor over face crops -> ``runs/<data>/features/<extractor>.h5``.

``python -m pipeline.features [configs/features.yaml] [key=value ...]``, e.g. ``extractor=iresnet50
extractor.weights=backbone.pth``. The input is the face stage's ``<video>.h5`` files, or an ABAW
``cropped_aligned/<video>/00001.jpg`` tree (a missing number is a frame without a face). Each video
is written to its own part file ``<extractor>/<video>.h5``; the cache ``<extractor>.h5`` is then
rebuilt as a small file of external links to the current parts. A killed run loses at most the
video in progress; a part made with another configuration is stale and recomputed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch
from einops import rearrange
from torch.utils.data import DataLoader, Dataset

from features import Extractor, build_extractor, crop_size
from pipeline.atomic import atomic_output, sweep_partials
from pipeline.cli import run_stage
from pipeline.config import DEVICE, Config, ConfigError, InputError, check_choices
from pipeline.hdf5 import h5_is_done
from pipeline.precision import autocast_dtype, defining, precision
from pipeline.runs import STOPS, list_inputs, local_device, run_each, shard_of, share_threads, stage_lock, stop

log = logging.getLogger("pipeline")

DTYPES = ("float16", "float32")
CHOICES = {"dtype": DTYPES, "device": DEVICE}


class FaceBatches(Dataset):
    """Batches of one video's frames with a face; item k -> (rows (m,) int64, crops (m, h, w, 3) uint8).

    ``frame`` and ``present`` cover every kept frame; only ``present`` rows are ever read.
    """

    video: str
    source_hash: str = ""

    def __init__(self, frame: np.ndarray, present: np.ndarray, batch_size: int):
        self.frame, self.present, self.batch_size = frame, present, batch_size
        self.rows = np.flatnonzero(present)

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[k * self.batch_size:(k + 1) * self.batch_size]
        return torch.from_numpy(rows), torch.from_numpy(self.read(rows))

    def read(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError


_UPSCALED: set[tuple[Path, int]] = set()  # (faces folder, size) already warned about


def crop_key(sizes: list[int], size: int) -> str:
    """The crops an extractor reading ``size`` pixels takes from a face file holding ``sizes``
    (sorted): the smallest of at least that size, else the largest. A size added later for
    another extractor changes what it reads only if it reads crops resized up."""
    return f"crops_{next((s for s in sizes if s >= size), sizes[-1])}"


def source_id(config_hash: str, key: str) -> str:
    """What a feature part is computed from: the face file's settings and the crops it read, so
    that a part made from crops resized up is redone once the faces stage writes the size."""
    return f"{config_hash} {key}" if config_hash else ""


class FaceFile(FaceBatches):
    """Crops from a face-stage HDF5 file: those :func:`crop_key` picks for ``size``."""

    def __init__(self, path: Path, size: int, batch_size: int, extractor: str = ""):
        self.path, self.video, self._file, self._pid = path, path.stem, None, os.getpid()
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise ValueError(f"{path}: cannot open face file: {e}") from e
        with f:
            if not f.attrs.get("complete", False):
                raise ValueError(f"{path}: face file is incomplete (no complete=True); re-run the face stage")
            sizes = sorted(int(k.removeprefix("crops_")) for k in f if k.startswith("crops_"))
            missing = [k for k in ("frame", "present") if k not in f]
            if missing or not sizes:
                raise ValueError(f"{path}: face file lacks {', '.join(missing) or 'crops_<size>'}")
            self.key = crop_key(sizes, size)
            if sizes[-1] < size and (path.parent, size) not in _UPSCALED:  # once per folder and size
                _UPSCALED.add((path.parent, size))
                log.warning("%s: no %d-pixel crops, the largest are %d: they are resized up for the extractor; "
                            "the faces stage writes them with extractors=[%s] (make train and make features "
                            "pass the run's own)", path.parent, size, sizes[-1], extractor or "<name>")
            frame, present = f["frame"][:].astype(np.int64), f["present"][:].astype(bool)
            if not len(frame) == len(present) == f[self.key].shape[0]:
                raise ValueError(f"{path}: frame, present and {self.key} differ in length")
            self.source_hash = source_id(str(f.attrs.get("config_hash", "")), self.key)
        super().__init__(frame, present, batch_size)

    def read(self, rows: np.ndarray) -> np.ndarray:
        if self._file is None or self._pid != os.getpid():  # open in the process that reads
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        crops = self._file[self.key]
        # one slice per run of consecutive rows: cheap on chunked data, unlike fancy indexing
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
        return np.concatenate([crops[r[0]:r[-1] + 1] for r in runs])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}


class JpegFolder(FaceBatches):
    """Crops from an ABAW ``cropped_aligned/<video>/`` folder: ``00001.jpg`` is frame 0."""

    def __init__(self, folder: Path, batch_size: int):
        self.video = folder.name
        numbered = (p for p in folder.glob("*.jpg") if p.stem.isdigit() and int(p.stem) > 0)
        self.files = {int(p.stem) - 1: p for p in numbered}
        if not self.files:
            raise ValueError(f"{folder}: no numbered JPEGs (00001.jpg, ...)")
        n = max(self.files) + 1  # trailing frames without a face cannot be seen here
        present = np.zeros(n, bool)
        present[list(self.files)] = True
        super().__init__(np.arange(n, dtype=np.int64), present, batch_size)

    def read(self, rows: np.ndarray) -> np.ndarray:
        from torchvision.io import ImageReadMode, decode_image, read_file

        imgs = [decode_image(read_file(str(self.files[r])), mode=ImageReadMode.RGB) for r in rows]
        shapes = {tuple(im.shape) for im in imgs}
        if len(shapes) > 1:
            raise ValueError(f"{self.files[rows[0]].parent}: crops of different sizes {sorted(shapes)}")
        return rearrange(torch.stack(imgs), "b c h w -> b h w c").numpy()

    def close(self) -> None:
        pass


def find_sources(faces_dir: str | Path) -> list[Path]:
    """Face files under ``faces_dir`` (a folder, glob or list), else its ABAW JPEG sub-folders."""
    files = list_inputs(faces_dir, suffixes=(".h5",))
    if any(p.suffix == ".h5" for p in files):
        return files
    folder = Path(faces_dir)
    subfolders = folder.iterdir() if folder.is_dir() else ()
    found = sorted(d for d in subfolders if d.is_dir() and any(d.glob("*.jpg")))
    if not found:
        raise FileNotFoundError(
            f"{faces_dir}: no face files (<video>.h5) and no cropped_aligned/<video>/*.jpg folders")
    return found


def open_source(path: Path, size: int, batch_size: int, extractor: str = "") -> FaceBatches:
    return JpegFolder(path, batch_size) if path.is_dir() else FaceFile(path, size, batch_size, extractor)


def part_status(part: Path, config_hash: str, source_hash: str) -> str:
    """``"done"``, ``"missing"`` or why the part must be recomputed."""
    if not part.is_file():
        return "missing"
    try:
        with h5py.File(part, "r") as f:
            if not f.attrs.get("complete", False):
                return "incomplete"
            if f.attrs.get("config_hash") != config_hash:
                return f"stale: made with config {f.attrs.get('config_hash')}, now {config_hash}"
            if str(f.attrs.get("source_config_hash", "")) != source_hash:
                return "stale: its face file was re-made"
    except OSError as e:
        return f"unreadable ({e})"
    return "done"


def extract_video(src: FaceBatches, extractor: Extractor, part: Path, attrs: dict, cfg: Config,
                  device: torch.device) -> None:
    """Features of one video's present frames, zeros elsewhere, written atomically to ``part``;
    with an extractor that also classifies (``forward_with_probabilities``), its class
    probabilities beside them, and its valence and arousal (``valence_arousal``) where it has them
    (NaN where there is no face)."""
    n, dtype = len(src.frame), np.dtype(cfg.dtype)
    feats = np.zeros((n, extractor.dim), dtype)
    classes = list(getattr(extractor, "classes", ())) if hasattr(extractor, "forward_with_probabilities") else []
    probs = np.full((n, len(classes)), np.nan, np.float32) if classes else None
    # a network that also regresses valence and arousal (HSEmotion's _va_mtl): its outputs too
    va = np.full((n, 2), np.nan, np.float32) if probs is not None and getattr(extractor, "has_va", False) else None
    amp_dtype = autocast_dtype(device, cfg.amp)  # the precision cache_attrs recorded
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    loader = DataLoader(src, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda")
    try:
        with torch.inference_mode():
            for rows, crops in loader:
                x = extractor.preprocess(crops.to(device, non_blocking=True))
                with autocast:
                    x = x.contiguous(memory_format=torch.channels_last)
                    if probs is None:
                        y = extractor(x)
                    elif va is None:
                        y, p = extractor.forward_with_probabilities(x)
                        probs[rows.numpy()] = p.float().cpu().numpy()
                    else:
                        y = extractor(x)
                        heads = extractor.heads(y)
                        probs[rows.numpy()] = heads["expr"].float().cpu().numpy()
                        va[rows.numpy()] = heads["va"].float().cpu().numpy()
                if y.shape != (len(rows), extractor.dim):
                    expected = (len(rows), extractor.dim)
                    raise ValueError(f"extractor gave {tuple(y.shape)}, expected {expected}")
                feats[rows.numpy()] = y.float().cpu().numpy()
    finally:
        src.close()
    if not np.isfinite(feats).all():
        raise ValueError(f"non-finite features (overflow in {cfg.dtype}? try dtype=float32)")
    with h5_in_memory(part) as f:
        f["features"] = feats
        f["present"] = src.present
        f["frame"] = src.frame
        if probs is not None:
            f["probabilities"] = probs
            f["probabilities"].attrs["classes"] = classes
        if va is not None:
            f["valence_arousal"] = va
        f.attrs.update({**attrs, "video": src.video, "source_config_hash": src.source_hash})
        f.attrs["complete"] = True


@contextlib.contextmanager
def h5_in_memory(path: Path) -> Iterator[h5py.File]:
    """An HDF5 file built in memory, then written to ``path`` atomically with plain file I/O.

    HDF5 writing straight to a full disk cannot close its file, and the library then crashes the
    process at exit; a plain write fails with a clean ENOSPC instead.
    """
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        yield f
    with atomic_output(path) as tmp:
        tmp.write_bytes(image.getbuffer())


def write_links(cache: Path, parts_dir: Path, videos: list[str], config_hash: str, attrs: dict) -> list[str]:
    """(Re)write ``cache`` atomically as external links to every current part; returns the videos linked."""
    linked = [v for v in videos if h5_is_done(parts_dir / f"{v}.h5", config_hash)]
    with h5_in_memory(cache) as f:
        for video in linked:
            f[video] = h5py.ExternalLink(f"{parts_dir.name}/{video}.h5", "/")
        f.attrs.update({**attrs, "videos": len(linked)})
        f.attrs["complete"] = True
    return linked


def resolve(cfg: Config) -> Config:
    """Fill the defaults that depend on the data set and check the choices."""
    cfg = Config(cfg)
    name = cfg.data.get("name", "data") if isinstance(cfg.get("data"), dict) else str(cfg.get("data"))
    cfg.faces_dir = cfg.faces_dir or str(Path(cfg.runs_dir) / name / "faces")
    cfg.out_dir = cfg.out_dir or str(Path(cfg.runs_dir) / name / "features")
    check_choices(cfg, CHOICES)
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size}: must be at least 1")
    return cfg


def cache_attrs(cfg: Config, extractor: Extractor, device: torch.device | str = "cpu") -> dict:
    """The attributes every part and the cache carry, including the hash that decides staleness:
    the extractor, its weights, preprocessing, storage dtype, and the precision it computes in on
    ``device`` (device type and autocast dtype; the CPU in fp32 adds nothing, so caches made before
    keep their hash), so that one cache never holds parts of two precisions."""
    sha = extractor.weights_sha256 or f"random-init-seed-{cfg.seed}"
    preprocessing = extractor.describe()
    section = {k: v for k, v in cfg.extractor.items() if k != "weights"}  # the checksum stands for the file
    dtype = autocast_dtype(device, cfg.amp)
    identity = Config({"extractor": section, "weights_sha256": sha, "preprocessing": preprocessing,
                       "dtype": cfg.dtype, **defining(device, dtype)})
    return {"extractor": cfg.extractor.name, "dim": int(extractor.dim), "weights_sha256": sha,
            "weights_file": extractor.weights_file or "",
            "preprocessing": json.dumps(preprocessing, sort_keys=True), "dtype": cfg.dtype,
            "precision": json.dumps(precision(device, dtype), sort_keys=True), "config_hash": identity.hash()}


def _face_source(path: Path, size: int) -> str:
    """:func:`source_id` of a face file for an extractor reading ``size`` pixels; empty if unreadable."""
    try:
        with h5py.File(path, "r") as f:
            sizes = sorted(int(k.removeprefix("crops_")) for k in f if k.startswith("crops_"))
            return source_id(str(f.attrs.get("config_hash", "")), crop_key(sizes, size)) if sizes else ""
    except OSError:
        return ""


def main(cfg: Config) -> int:
    """Extract features for every face source of this shard; exit status 1 if any video failed,
    2 if the run could not go on (output folder locked by another run, unwritable or full)."""
    cfg = resolve(cfg)
    share_threads()  # one of several processes on this machine takes its share of the cores
    name = cfg.extractor.name
    torch.manual_seed(cfg.seed)  # random-init smoke runs stay reproducible, hence resumable
    try:
        extractor = build_extractor(name, **{k: v for k, v in cfg.extractor.items() if k != "name"})
    except (OSError, ValueError, TypeError) as e:  # missing or unfitting weights, a broken plug-in
        raise InputError(str(e)) from None
    if extractor.weights_sha256 is None:
        log.warning("!" * 78)
        log.warning("!! %s has RANDOM weights: its features are meaningless (smoke tests only)", name)
        log.warning("!" * 78)
    device = torch.device(local_device(cfg.device))  # a process of several takes its own GPU
    extractor.to(device, memory_format=torch.channels_last)
    attrs = cache_attrs(cfg, extractor, device)
    try:
        sources = find_sources(cfg.faces_dir)
    except OSError as e:  # no input to read is the user's error (exit 1), not a run that cannot go on (2)
        raise InputError(str(e)) from None

    out_dir = Path(cfg.out_dir)
    try:
        with stage_lock(out_dir, cfg.shard or None):
            sweep_partials(out_dir)
            return extract_all(cfg, extractor, attrs, device, out_dir, sources)
    except STOPS as e:  # the whole run cannot go on (a video's own failure is only its own): say why
        return stop("features", e)


def extract_all(cfg: Config, extractor: Extractor, attrs: dict, device: torch.device, out_dir: Path,
                sources: list[Path]) -> int:
    """Every video of this shard into ``out_dir``, then the cache of links; 1 if a video failed."""
    name = cfg.extractor.name
    parts_dir, cache = out_dir / name, out_dir / f"{name}.h5"
    parts_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / f"{name}.yaml")
    mine = shard_of(sources, cfg.shard or None)
    size = crop_size(extractor)
    log.info("%s: %d of %d videos in this shard, %d-d, weights %s", name, len(mine), len(sources),
             extractor.dim, extractor.weights_sha256 or "random")

    def video_of(path: Path) -> str:
        return path.name if path.is_dir() else path.stem

    def is_done(path: Path) -> bool:
        source_hash = "" if path.is_dir() else _face_source(path, size)
        status = part_status(parts_dir / f"{video_of(path)}.h5", attrs["config_hash"], source_hash)
        if status.startswith("stale"):
            log.info("%s: %s; recomputing", video_of(path), status)
        return status == "done"

    def work(path: Path) -> None:
        src = open_source(path, size, cfg.batch_size, name)
        extract_video(src, extractor, parts_dir / f"{src.video}.h5", attrs, cfg, device)

    summary = run_each(mine, work, name=video_of, is_done=is_done,
                       failures_file=out_dir / f"{name}.failures.jsonl", desc=f"features {name}")
    videos = [video_of(p) for p in sources]
    linked = write_links(cache, parts_dir, videos, attrs["config_hash"], attrs)
    if len(linked) < len(videos):
        log.warning("%s: %d of %d videos have no current features yet (other shards or failures)",
                    cache, len(videos) - len(linked), len(videos))
    print(f"features: {summary.line()} -> {cache} ({len(linked)} videos)")
    for key, reason in summary.failed.items():
        print(f"  failed: {key}: {reason}")
    return 0 if summary.ok else 1


def cli() -> None:
    """The ``affect-features`` command, the same as ``python -m pipeline.features``."""
    run_stage("features", main)


if __name__ == "__main__":
    cli()
