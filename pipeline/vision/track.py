"""Link per-frame face detections into tracks, choose the subject, bridge short gaps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUBJECTS = ("main", "left", "right")


@dataclass
class Detections:
    """Faces found in one kept frame: ``box`` (k, 4) x1,y1,x2,y2, ``score`` (k,), ``landmarks`` (k, 5, 2)."""

    box: np.ndarray
    score: np.ndarray
    landmarks: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))

    def __len__(self) -> int:
        return len(self.box)


@dataclass
class Subject:
    """The chosen face over the n kept frames; NaN / -1 where absent."""

    box: np.ndarray  # (n, 4) float32
    landmarks: np.ndarray  # (n, 5, 2) float32
    score: np.ndarray  # (n,) float32, 0 where interpolated
    track: np.ndarray  # (n,) int32
    present: np.ndarray  # (n,) bool
    interpolated: np.ndarray  # (n,) bool


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (m, 4) and (k, 4) boxes -> (m, k)."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def _landmark_distance(a: np.ndarray, b: np.ndarray, box_a: np.ndarray) -> np.ndarray:
    """Mean landmark distance of (m, 5, 2) vs (k, 5, 2), in units of the first boxes' size -> (m, k)."""
    d = np.linalg.norm(a[:, None] - b[None], axis=-1).mean(-1)
    size = np.sqrt(np.clip((box_a[:, 2:] - box_a[:, :2]).prod(-1), 1e-9, None))
    return d / size[:, None]


def link(
    dets: list[Detections], max_lost: int = 15, min_iou: float = 0.3, max_landmark: float = 0.5
) -> list[np.ndarray]:
    """Greedy frame-to-frame linking; returns per kept frame the (k,) int track id of each face.

    A detection joins the track whose last face it overlaps most (IoU >= ``min_iou``) or whose
    landmarks are within ``max_landmark`` face sizes; a track stays open ``max_lost`` kept frames
    without a face so that a blink of the detector or a passing hand does not split it.
    """
    ids: list[np.ndarray] = []
    last_box, last_lm, last_seen = [], [], []  # per track
    for t, d in enumerate(dets):
        out = np.full(len(d), -1, np.int64)
        open_ = [j for j, s in enumerate(last_seen) if t - s <= max_lost + 1]
        if len(d) and open_:
            boxes = np.stack([last_box[j] for j in open_])
            lms = np.stack([last_lm[j] for j in open_])
            overlap = iou(boxes, d.box)
            near = _landmark_distance(lms, d.landmarks, boxes)
            # one score that prefers overlap and falls back on landmark closeness
            cost = np.where((overlap >= min_iou) | (near <= max_landmark), overlap - near, -np.inf)
            while np.isfinite(cost).any():
                r, c = np.unravel_index(np.argmax(cost), cost.shape)
                out[c] = open_[r]
                cost[r, :] = -np.inf
                cost[:, c] = -np.inf
        for c in range(len(d)):
            if out[c] < 0:
                out[c] = len(last_seen)
                last_box.append(None)
                last_lm.append(None)
                last_seen.append(t)
            j = out[c]
            last_box[j], last_lm[j], last_seen[j] = d.box[c], d.landmarks[c], t
        ids.append(out)
    return ids


def _track_stats(dets: list[Detections], ids: list[np.ndarray], min_frames: int = 1,
                 min_score: float = 0.0) -> dict[int, dict[str, float]]:
    """Per track that counts as a face: kept frames, summed face size and centre x, median score.

    A track counts when it lasts ``min_frames`` kept frames (or the whole video, if shorter) and
    its median detection score reaches ``min_score``: a lone or barely accepted MTCNN detection is
    more often lettering or texture (a title card, a pattern) than a face, while a real face is
    found again frame after frame.
    """
    stats: dict[int, dict[str, float]] = {}
    scores: dict[int, list[float]] = {}
    for d, tid in zip(dets, ids, strict=True):
        for c, j in enumerate(tid):
            s = stats.setdefault(int(j), {"frames": 0, "size": 0.0, "x": 0.0})
            w, h = d.box[c, 2:] - d.box[c, :2]
            s["frames"] += 1
            s["size"] += float(np.sqrt(max(w * h, 0.0)))
            s["x"] += float(d.box[c, 0] + d.box[c, 2]) / 2
            scores.setdefault(int(j), []).append(float(d.score[c]))
    for j, s in stats.items():
        s["score"] = float(np.median(scores[j]))
    long = min(min_frames, len(dets))
    return {j: s for j, s in stats.items() if s["frames"] >= long and s["score"] >= min_score}


def choose_track(
    dets: list[Detections], ids: list[np.ndarray], subject: str = "main", min_share: float = 0.25,
    min_frames: int = 2, min_score: float = 0.9,
) -> int:
    """The subject's track id, or -1 if no face was found.

    Only tracks of at least ``min_frames`` kept frames (or all of a shorter video) with a median
    score of at least ``min_score`` are faces. ``main``: the face with the largest sum of sizes over
    frames (present longest and largest). ``left`` / ``right``: among faces present at least
    ``min_share`` as long as the longest, the one whose mean centre is furthest left / right in the
    image.
    """
    if subject not in SUBJECTS:
        raise ValueError(f"subject={subject!r}: choose one of {', '.join(SUBJECTS)}")
    stats = _track_stats(dets, ids, min_frames, min_score)
    if not stats:
        return -1
    if subject == "main":
        return max(stats, key=lambda j: stats[j]["size"])
    longest = max(s["frames"] for s in stats.values())
    cands = [j for j, s in stats.items() if s["frames"] >= min_share * longest]
    side = -1 if subject == "left" else 1
    return max(cands, key=lambda j: side * stats[j]["x"] / stats[j]["frames"])


def subject_tracks(dets: list[Detections], ids: list[np.ndarray], subject: str = "main", min_frames: int = 2,
                   min_score: float = 0.9) -> list[int]:
    """Every track of the subject: the one :func:`choose_track` picks, then, largest first, each
    face (``min_frames``, ``min_score`` as there) that never shares a frame with those already
    taken (the subject left the picture for longer than a track survives and came back). For
    ``left`` / ``right`` such a track must also be the leftmost / rightmost face in most of its
    frames. Tracks that are not faces are never the subject's."""
    first = choose_track(dets, ids, subject, min_frames=min_frames, min_score=min_score)
    if first < 0:
        return []
    stats = _track_stats(dets, ids, min_frames, min_score)
    faces = list(stats)
    frames = {j: np.array([j in tid for tid in ids]) for j in stats}
    taken, chosen = frames[first].copy(), [first]
    side = {"left": -1, "right": 1}.get(subject)
    for j in sorted(stats, key=lambda k: -stats[k]["size"]):
        if j == first or (frames[j] & taken).any():
            continue
        if side is not None:
            # only faces compete for the side: a stray further out must not push the face inward
            extreme = []
            for d, tid in zip(dets, ids, strict=True):
                if j in tid:
                    x = side * (d.box[:, 0] + d.box[:, 2])
                    extreme.append((x[tid == j] >= x[np.isin(tid, faces)].max()).any())
            if np.mean(extreme) <= 0.5:
                continue
        chosen.append(j)
        taken |= frames[j]
    return chosen


def follow(dets: list[Detections], ids: list[np.ndarray], track: int | list[int], max_gap: int = 5,
           usable: np.ndarray | None = None) -> Subject:
    """The subject's face per kept frame, from one track id or several that never share a frame,
    with gaps of at most ``max_gap`` kept frames bridged by linear interpolation of box and
    landmarks; ``usable`` (n,) bool marks frames that may be bridged (not decode failures)."""
    n = len(dets)
    tracks = [track] if isinstance(track, int | np.integer) else list(track)
    box = np.full((n, 4), np.nan, np.float32)
    lm = np.full((n, 5, 2), np.nan, np.float32)
    score = np.zeros(n, np.float32)
    found = np.zeros(n, bool)
    which = np.full(n, -1, np.int32)
    for t, (d, tid) in enumerate(zip(dets, ids, strict=True)):
        hit = np.flatnonzero(np.isin(tid, tracks))
        if len(hit):
            box[t], lm[t], score[t], found[t] = d.box[hit[0]], d.landmarks[hit[0]], d.score[hit[0]], True
            which[t] = tid[hit[0]]
    interp = np.zeros(n, bool)
    seen = np.flatnonzero(found)
    usable = np.ones(n, bool) if usable is None else usable
    for a, b in zip(seen[:-1], seen[1:], strict=True):
        gap = b - a - 1
        if 0 < gap <= max_gap:
            w = (np.arange(a + 1, b) - a) / (b - a)  # (gap,)
            box[a + 1 : b] = (1 - w)[:, None] * box[a] + w[:, None] * box[b]
            lm[a + 1 : b] = (1 - w)[:, None, None] * lm[a] + w[:, None, None] * lm[b]
            interp[a + 1 : b] = True
            which[a + 1 : b] = which[a]
    interp &= usable
    present = found | interp
    box[~present], lm[~present] = np.nan, np.nan
    return Subject(box, lm, score, np.where(present, which, -1).astype(np.int32), present, interp)
