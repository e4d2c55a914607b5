"""Windows of cached features with their labels and masks, for the temporal models.

A window is ``t`` consecutive kept frames of one video. Each item holds

- ``x``: (t, d) float32 features, standardised with the training split's statistics;
- ``mask``: (t,) bool, True where the step is inside the video and the face is present;
- ``va`` (t, 2) float32, ``expr`` (t,) int64, ``au`` (t, 12) int64 with the ABAW sentinels
  (-5 / -1) where a frame has no label, lies past the labels' end, or is padding;
- ``video`` (index into ``dataset.videos``) and ``start``.

With ``frames="labelled"`` a training video is the sequence of its frames that have a face and a
label of a task trained, in order (s-Aff-Wild2 lists only its labelled images, and a listed image
without features is skipped); windows are cut from that sequence.

Only the windows being served are read from disk, unless ``cache_in_memory`` is set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from models.abaw import INVALID, TASK_SIZES, TASKS
from pipeline.feature_cache import FeatureCache
from pipeline.labels import Labels

log = logging.getLogger("pipeline")


@dataclass
class Normaliser:
    """Per-dimension standardisation, fitted on present frames of the training split."""

    mean: np.ndarray  # (d,)
    std: np.ndarray  # (d,)

    @classmethod
    def fit(cls, cache: FeatureCache, videos: Sequence[str], eps: float = 1e-6) -> Normaliser:
        # Sums in float64, one video in memory at a time.
        count, total, squares = 0, np.zeros(cache.dim), np.zeros(cache.dim)
        for video in videos:
            feats, present, _ = cache.read(video)
            feats = feats[present].astype(np.float64)
            count += len(feats)
            total += feats.sum(0)
            squares += (feats**2).sum(0)
        if count == 0:
            raise ValueError(f"no frame with a face in the {len(videos)} training videos: cannot fit the normaliser")
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
        return cls(mean.astype(np.float32), np.maximum(std, eps).astype(np.float32))

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        return (feats - self.mean) / self.std

    def state(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> Normaliser:
        return cls(np.asarray(state["mean"], np.float32), np.asarray(state["std"], np.float32))


def window_starts(n: int, length: int, stride: int) -> list[int]:
    """Starts of windows of ``length`` every ``stride`` frames that together cover ``[0, n)``."""
    if n <= length:
        return [0]
    starts = list(range(0, n - length + 1, stride))
    if starts[-1] + length < n:
        starts.append(n - length)
    return starts


def chunk_starts(n: int, length: int) -> list[int]:
    """Starts of the non-overlapping chunks of ``length`` that cover ``[0, n)``; the last may be short."""
    return list(range(0, max(n, 1), length))


def labels_at(labels: Labels | None, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels of the given frame indices; frames past the labels' end are invalid."""
    t = len(frames)
    va = np.full((t, TASK_SIZES["va"]), INVALID["va"], np.float32)
    expr = np.full(t, INVALID["expr"], np.int64)
    au = np.full((t, TASK_SIZES["au"]), INVALID["au"], np.int64)
    if labels is not None:
        inside = (frames >= 0) & (frames < len(labels.expr))
        idx = frames[inside]
        va[inside], expr[inside], au[inside] = labels.va[idx], labels.expr[idx], labels.au[idx]
    return va, expr, au


FRAMES = ("all", "labelled")  # every cached frame, or only those labelled for a task trained


def labelled_rows(labels: Labels | None, frames: np.ndarray, tasks: Sequence[str],
                  present: np.ndarray | None = None) -> np.ndarray:
    """Positions (k,) int64 of the rows whose ``frames`` are labelled for any of ``tasks`` (and,
    given ``present``, have a face): VA labelled when valence and arousal both are, AUs when all
    twelve are, as s-Aff-Wild2 marks a task it did not annotate on a frame."""
    if labels is None:
        return np.zeros(0, np.int64)
    va, expr, au = labels_at(labels, frames)
    valid = np.zeros(len(frames), bool)
    if "va" in tasks:
        valid |= ((va != INVALID["va"]) & np.isfinite(va)).all(-1)
    if "expr" in tasks:
        valid |= expr >= 0
    if "au" in tasks:
        valid |= (au >= 0).all(-1)
    if present is not None:
        valid &= present
    return np.flatnonzero(valid)


def check_label_length(video: str, n_labels: int, frames: np.ndarray) -> None:
    """``frames`` (k,) the last cached frame indices, k >= 1. Warn, naming ``video``, when its
    label rows do not span them: fewer rows leave the last frames unlabelled, more rows than
    frames are never used. Aff-Wild2 files are often a frame or two off, so this only warns."""
    if not len(frames):
        return
    last = int(frames[-1])
    step = int(frames[-1] - frames[-2]) if len(frames) > 1 else 1  # the face stage's stride
    if n_labels <= last:
        log.warning("%s: %d label rows but features up to frame %d: the last %d frames have no label",
                    video, n_labels, last, last + 1 - n_labels)
    elif n_labels > last + step:
        log.warning("%s: %d label rows but features end at frame %d: %d rows are past the video's end",
                    video, n_labels, last, n_labels - last - step)


class SequenceDataset(Dataset):
    """Fixed-length windows over cached features of ``videos``.

    In training mode (``train=True``) call ``set_epoch`` each epoch: window starts then move by
    a random offset so that every frame is seen at every position over the epochs. In evaluation
    mode the windows overlap by ``length - stride`` and cover every frame. With ``consecutive``
    the windows are the video's non-overlapping chunks 0, length, 2 length, ... in every epoch
    (the last one padded), as the ABAW4 winner cut its videos.
    """

    def __init__(
        self,
        cache: FeatureCache,
        labels: dict[str, Labels],
        videos: Sequence[str],
        length: int,
        stride: int,
        normaliser: Normaliser | None = None,
        train: bool = False,
        noise: bool = False,
        cache_in_memory: bool = False,
        seed: int = 0,
        consecutive: bool = False,
        frames: str = "all",
        tasks: Sequence[str] = TASKS,
    ) -> None:
        if frames not in FRAMES:
            raise ValueError(f"frames {frames!r}: choose one of {', '.join(FRAMES)}")
        if length < 1 or stride < 1:
            raise ValueError(f"window length and stride must be positive, got {length} and {stride}")
        missing = [v for v in videos if v not in cache.videos]
        if missing:
            raise KeyError(f"{len(missing)} videos have no cached features, e.g. {missing[:3]}")
        self.cache, self.labels, self.videos = cache, labels, list(videos)
        self.length, self.stride, self.train = length, stride, train
        self.normaliser, self.noise, self.seed = normaliser, noise, seed
        self.consecutive, self.frames = consecutive, frames
        self.lengths = [cache.length(v) for v in self.videos]
        for video, n in zip(self.videos, self.lengths, strict=True):
            if video in labels and n:
                check_label_length(video, len(labels[video]), cache.read(video, max(0, n - 2), n)[2])
        self._memory = {v: cache.read(v) for v in self.videos} if cache_in_memory else None
        # with frames="labelled", the cached rows each video's sequence is made of
        self.rows: list[np.ndarray | None] = [None] * len(self.videos)
        self.epoch = 0
        self.set_tasks(tasks)

    def set_tasks(self, tasks: Sequence[str]) -> None:
        """Train on frames labelled for ``tasks`` (with ``frames="labelled"``; else every frame is
        kept whatever the tasks): a stage of staged training reads its own tasks' frames."""
        if self.frames == "labelled":
            self.rows = []
            for video in self.videos:  # frames without a face have no features to learn from
                present, frames = self._index(video)
                self.rows.append(labelled_rows(self.labels.get(video), frames, tasks, present))
            self.lengths = [len(r) for r in self.rows]
        self.set_epoch(self.epoch)

    def labels_read(self) -> dict[str, Labels]:
        """The labels of the frames this set can train on: with ``frames="labelled"`` those of frames
        with a face (a label without features is never read, as the seed systems' data holds no image
        without one), else every label."""
        if self.frames != "labelled":
            return dict(self.labels)
        out = {}
        for video in self.videos:
            lab = self.labels.get(video)
            if lab is None:
                continue
            present, frames = self._index(video)
            seen = frames[present]
            keep = np.zeros(len(lab), bool)
            keep[seen[(seen >= 0) & (seen < len(lab))]] = True
            out[video] = Labels(np.where(keep[:, None], lab.va, INVALID["va"]),
                                np.where(keep, lab.expr, INVALID["expr"]),
                                np.where(keep[:, None], lab.au, INVALID["au"]))
        return out

    def _index(self, video: str) -> tuple[np.ndarray, np.ndarray]:
        return self._memory[video][1:] if self._memory is not None else self.cache.index(video)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rng = np.random.default_rng((self.seed, epoch))
        self.items = []
        for i, n in enumerate(self.lengths):
            if n == 0 and self.rows[i] is not None:
                continue  # no frame labelled for the tasks trained: nothing to learn from
            if self.consecutive:
                self.items.extend((i, s) for s in chunk_starts(n, self.length))
                continue
            starts = window_starts(n, self.length, self.stride)
            if self.train and n > self.length:
                shift = int(rng.integers(0, self.stride))
                starts = sorted({min(s + shift, n - self.length) for s in starts} | {0})
            self.items.extend((i, s) for s in starts)

    def __len__(self) -> int:
        return len(self.items)

    def empty_item(self, i: int) -> int:
        """An index past ``len(self)`` whose item lies past the end of video ``i``: all padding,
        every label invalid."""
        return len(self.items) + i

    def _read(self, i: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        video, rows = self.videos[i], self.rows[i]
        if rows is not None:  # the labelled rows start:stop of the sequence, read as one span
            rows = rows[start:stop]
            if not len(rows):
                return self._span(video, 0, 0)
            feats, present, frames = self._span(video, int(rows[0]), int(rows[-1]) + 1)
            at = rows - rows[0]
            return feats[at], present[at], frames[at]
        return self._span(video, start, stop)

    def _span(self, video: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._memory is not None:
            feats, present, frames = self._memory[video]
            return feats[start:stop], present[start:stop], frames[start:stop]
        return self.cache.read(video, start, stop)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        i, start = self.items[index] if index < len(self.items) else (index - len(self.items), None)
        start = self.lengths[i] if start is None else start
        video = self.videos[i]
        feats, present, frames = self._read(i, start, start + self.length)
        if self.noise:
            # The control: features replaced by noise of the same shape, fixed per frame.
            rng = np.random.default_rng((self.seed, i, start))
            feats = rng.standard_normal(feats.shape).astype(np.float32)
        elif self.normaliser is not None:
            feats = self.normaliser(feats)
        feats = np.where(present[:, None], feats, 0.0).astype(np.float32)
        va, expr, au = labels_at(self.labels.get(video), frames)
        t, pad = len(frames), self.length - len(frames)
        mask = np.concatenate([present, np.zeros(pad, bool)])
        return {
            "x": torch.from_numpy(np.pad(feats, ((0, pad), (0, 0)))),
            "mask": torch.from_numpy(mask),
            "va": torch.from_numpy(np.pad(va, ((0, pad), (0, 0)), constant_values=INVALID["va"])),
            "expr": torch.from_numpy(np.pad(expr, (0, pad), constant_values=INVALID["expr"])),
            "au": torch.from_numpy(np.pad(au, ((0, pad), (0, 0)), constant_values=INVALID["au"])),
            "video": i,
            "start": start,
            "steps": t,
        }


def feature_paths(runs_dir: str | Path, data_name: str, extractors: Sequence[str]) -> list[Path]:
    """Where the features stage wrote each extractor's cache for a data set; a cache there that
    another extractor wrote (copied or renamed) is refused rather than fed to the wrong model."""
    paths = [Path(runs_dir) / data_name / "features" / f"{name}.h5" for name in extractors]
    for name, path in zip(extractors, paths, strict=True):
        try:
            with h5py.File(path, "r") as f:
                made_by = f.attrs.get("extractor", name)
        except OSError:
            continue  # missing or unreadable: FeatureCache says which
        made_by = made_by.decode() if isinstance(made_by, bytes) else str(made_by)
        if made_by != name:
            raise ValueError(f"{path}: written by extractor {made_by!r}, not {name!r}; re-run the features stage")
    return paths


class VideoChunkBatches(Sampler):
    """Batches for encoders that carry their state from chunk to chunk: the videos are shuffled
    into groups of ``size``, and batch k of a group holds chunk k of each of its videos (an empty,
    fully masked chunk once a video has ended), so each row stays one video. Needs a dataset of
    consecutive chunks; a group's first batch is the one whose windows all start at frame 0."""

    def __init__(self, dataset: SequenceDataset, size: int, generator: torch.Generator) -> None:
        if not dataset.consecutive:
            raise ValueError("chunk-by-chunk batches need consecutive windows (train_windows: consecutive)")
        self.dataset, self.size, self.generator = dataset, size, generator

    def _groups(self) -> list[list[int]]:
        videos = sorted({i for i, _ in self.dataset.items})  # a video with no frame to train on is left out
        order = [videos[j] for j in torch.randperm(len(videos), generator=self.generator).tolist()]
        return [order[i : i + self.size] for i in range(0, len(order), self.size)]

    def __iter__(self):
        chunks: dict[int, list[int]] = {}
        for index, (i, _) in enumerate(self.dataset.items):
            chunks.setdefault(i, []).append(index)
        for group in self._groups():
            for k in range(max(len(chunks.get(i, [])) for i in group)):
                yield [chunks[i][k] if k < len(chunks.get(i, [])) else self.dataset.empty_item(i) for i in group]

    def __len__(self) -> int:
        per_video = [0] * len(self.dataset.lengths)
        for i, _ in self.dataset.items:
            per_video[i] += 1
        state = self.generator.get_state()
        groups = self._groups()
        self.generator.set_state(state)
        return sum(max(per_video[i] for i in group) for group in groups)
