"""Read cached frame features, from one extractor or several fused along the feature axis.

A cache ``runs/<data>/features/<extractor>.h5`` holds one entry per video, usually an external
link to ``<extractor>/<video>.h5``, each with ``features`` (n, D), ``present`` (n,) and
``frame`` (n,). Files are opened on first use, one handle per file per process, so a cache can be
handed to DataLoader workers (forked or spawned).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (checkpoints must not hold numpy scalars)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return value


def read_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    """File or group attributes as a dict; ``preprocessing`` (a JSON string on disk) is decoded."""
    out = {k: _plain(v) for k, v in attrs.items()}
    if isinstance(out.get("preprocessing"), str):
        out["preprocessing"] = json.loads(out["preprocessing"])
    return out


class FeatureCache:
    """Features of the videos present in every given cache; ``read`` fetches only a window."""

    def __init__(self, paths: Sequence[str | Path], max_open: int = 256):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("FeatureCache needs at least one cache file")
        self.attrs: list[dict[str, Any]] = []
        self._where: list[dict[str, tuple[Path, str]]] = []  # per cache: video -> (file, group)
        for path in self.paths:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no feature cache; run `python -m pipeline.features` first")
            try:
                with h5py.File(path, "r") as f:
                    self.attrs.append(read_attrs(f.attrs))
                    self._where.append({video: self._locate(path, f, video) for video in f})
            except OSError as e:
                raise OSError(f"{path}: not a readable feature cache: {e}") from e
            if "dim" not in self.attrs[-1]:
                raise ValueError(f"{path}: feature cache without a 'dim' attribute")
        common = set.intersection(*(set(w) for w in self._where))
        self.videos: list[str] = sorted(common)
        self.dims: list[int] = [int(a["dim"]) for a in self.attrs]
        self.dim: int = sum(self.dims)
        self.max_open = max_open
        self._files: OrderedDict[Path, h5py.File] = OrderedDict()
        self._pid = os.getpid()
        self._lengths: dict[str, int] = {}

    @staticmethod
    def _locate(path: Path, f: h5py.File, video: str) -> tuple[Path, str]:
        link = f.get(video, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            # relative link targets are relative to the cache file's folder, as HDF5 resolves them
            return path.parent / link.filename, link.path
        return path, f"/{video}"

    def _open(self, path: Path) -> h5py.File:
        if self._pid != os.getpid():  # a forked worker must not share the parent's handles
            self._files = OrderedDict()
            self._pid = os.getpid()
        f = self._files.get(path)
        if f is None:
            if len(self._files) >= self.max_open:
                self._files.popitem(last=False)[1].close()
            f = self._files[path] = h5py.File(path, "r")
        self._files.move_to_end(path)
        return f

    def _group(self, i: int, video: str) -> h5py.Group:
        try:
            path, group = self._where[i][video]
        except KeyError:
            raise KeyError(f"video {video!r} is not in {self.paths[i]}") from None
        return self._open(path)[group]

    def length(self, video: str) -> int:
        """Number of frames (rows) cached for ``video``."""
        if video not in self._lengths:
            lengths = [self._group(i, video)["present"].shape[0] for i in range(len(self.paths))]
            if len(set(lengths)) > 1:
                where = ", ".join(map(str, self.paths))
                raise ValueError(f"video {video!r} has different lengths in {where}: {lengths}")
            self._lengths[video] = lengths[0]
        return self._lengths[video]

    def index(self, video: str) -> tuple[np.ndarray, np.ndarray]:
        """Without the features: present (n,) bool (a face in every cache) and frame (n,) int64 of
        every row cached for ``video``."""
        present = np.logical_and.reduce([self._group(i, video)["present"][:].astype(bool)
                                         for i in range(len(self.paths))])
        return present, self._group(0, video)["frame"][:].astype(np.int64)

    def read(self, video: str, start: int = 0,
             stop: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``start:stop`` of ``video``: features (t, D) float32, present (t,) bool (a face in
        every cache), frame (t,) int64."""
        stop = self.length(video) if stop is None else min(stop, self.length(video))
        feats, present, frame = [], None, None
        for i in range(len(self.paths)):
            g = self._group(i, video)
            feats.append(g["features"][start:stop].astype(np.float32))
            p, fr = g["present"][start:stop].astype(bool), g["frame"][start:stop].astype(np.int64)
            bad = ~np.isfinite(feats[-1][p]).all(1)
            if bad.any():  # one NaN would spread through the normaliser to every prediction
                row = int(np.flatnonzero(p)[np.flatnonzero(bad)[0]]) + start
                raise ValueError(f"{self._where[i][video][0]}: video {video!r} has non-finite features "
                                 f"(NaN or inf) at row {row}, frame {int(fr[row - start])}; re-run the features stage")
            if frame is None:
                present, frame = p, fr
            elif not np.array_equal(frame, fr):
                raise ValueError(
                    f"video {video!r}: frame indices differ between {self.paths[0]} and {self.paths[i]}")
            else:
                present = present & p
        return np.concatenate(feats, axis=1), present, frame

    def probabilities(self, video: str) -> tuple[np.ndarray, list[str]]:
        """The class probabilities (n, k) that a classifying extractor stored for ``video`` (NaN
        where there was no face) and the class names, from the first cache that has them."""
        for i in range(len(self.paths)):
            g = self._group(i, video)
            if "probabilities" in g:
                return g["probabilities"][:].astype(np.float32), [str(c) for c in g["probabilities"].attrs["classes"]]
        raise ValueError(f"video {video!r}: no class probabilities in {', '.join(map(str, self.paths))}; "
                         "only an extractor that classifies (fer_xception) stores them")

    def valence_arousal(self, video: str) -> np.ndarray | None:
        """The valence and arousal (n, 2) an extractor that regresses them stored for ``video``
        (NaN where there was no face), from the first cache that has them; None if none has."""
        for i in range(len(self.paths)):
            g = self._group(i, video)
            if "valence_arousal" in g:
                return g["valence_arousal"][:].astype(np.float32)
        return None

    def identity(self) -> list[dict[str, Any]]:
        """What the features are made of, per cache: the extractor's settings and weights (its
        ``config_hash``) and, per video, the hash of the face file behind its part. Two caches with
        the same identity hold the same features; a training run is named by it."""
        return [{"config_hash": attrs.get("config_hash", ""),
                 "videos": {video: _plain(self._group(i, video).attrs.get("source_config_hash", ""))
                            for video in self.videos}}
                for i, attrs in enumerate(self.attrs)]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()  # handles do not pickle; each process opens its own
        return state

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PooledCache:
    """Several data sets' caches as one, for a run that trains on all of them: each video is
    ``<data set>/<video>``. Every data set must give features of the same width."""

    def __init__(self, caches: Mapping[str, FeatureCache]) -> None:
        self.caches = dict(caches)
        bad = [name for name in self.caches if "/" in name]
        if bad:
            raise ValueError(f"data set names cannot hold '/': {', '.join(bad)}")
        dims = {name: cache.dim for name, cache in self.caches.items()}
        if len(set(dims.values())) > 1:
            raise ValueError(f"the data sets' features differ in width: {dims}; use the same extractors for all")
        first = next(iter(self.caches.values()))
        self.dim, self.dims, self.attrs = first.dim, first.dims, first.attrs
        self.paths = [p for cache in self.caches.values() for p in cache.paths]
        self.videos = [f"{name}/{v}" for name, cache in self.caches.items() for v in cache.videos]

    def _split(self, video: str) -> tuple[FeatureCache, str]:
        name, _, inner = video.partition("/")
        return self.caches[name], inner

    def length(self, video: str) -> int:
        cache, inner = self._split(video)
        return cache.length(inner)

    def index(self, video: str) -> tuple[np.ndarray, np.ndarray]:
        cache, inner = self._split(video)
        return cache.index(inner)

    def read(self, video: str, start: int = 0,
             stop: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cache, inner = self._split(video)
        return cache.read(inner, start, stop)

    def identity(self) -> dict[str, list[dict[str, Any]]]:
        return {name: cache.identity() for name, cache in self.caches.items()}

    def close(self) -> None:
        for cache in self.caches.values():
            cache.close()
