"""The built-in labelled sample: short face videos in the Aff-Wild2 / ABAW layout, made offline.

Every frame is scikit-image's public-domain ``astronaut`` photo, warped: head motion, then facial
deformations whose intensities are the labels, so the labels hold by construction. Each action
unit (AU) owns a displacement field (sums of Gaussian bumps around hand-placed landmarks) and, for
AU4 and AU10, some shading; the mouth opens by a jaw drop plus a painted cavity. Expressions are
fixed AU combinations with a valence/arousal target. Frames where the face leaves the picture or is
covered are labelled invalid from the generator's own flags, which are saved in ``truth/``.

    python -m pipeline.sample [configs/sample.yaml] [key=value ...]

writes ``<out>/videos/<video>.mp4``, ``<out>/annotations/<task>/<split>/<video>.txt``,
``<out>/truth/<video>.npz``, ``<out>/sample.yaml`` (the resolved config), ``<out>/manifest.json``
and ``<out>/lists/``: the validation videos listed in each ABAW edition's test-list layout
(:func:`pipeline.submit.write_test_lists`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from einops import einsum

from models.abaw import AUS, EXPRESSIONS
from pipeline.atomic import atomic_output, write_json
from pipeline.cli import run_stage
from pipeline.config import Config, ConfigError

log = logging.getLogger("pipeline")

# AU5 (lids wide) and AU20 (lips stretched) shape Fear and Surprise but are not ABAW labels.
CHANNELS = AUS + ("AU5", "AU20")
SPLITS = ("Train_Set", "Validation_Set")
TASKS = {  # label key -> (ABAW folder, header line)
    "va": ("VA_Estimation_Challenge", "valence,arousal"),
    "expr": ("EXPR_Recognition_Challenge", ",".join(EXPRESSIONS)),
    "au": ("AU_Detection_Challenge", ",".join(AUS)),
}

# Expression -> AUs it is made of, and its valence/arousal at full intensity.
TEMPLATES = {
    1: ("AU4", "AU7", "AU23", "AU24"),
    2: ("AU10", "AU15"),
    3: ("AU1", "AU2", "AU4", "AU5", "AU20", "AU25"),
    4: ("AU6", "AU12", "AU25"),
    5: ("AU1", "AU4", "AU15"),
    6: ("AU1", "AU2", "AU5", "AU25", "AU26"),
    7: ("AU2", "AU12", "AU24"),
}
TARGET_VA = {1: (-0.6, 0.65), 2: (-0.65, 0.35), 3: (-0.55, 0.75), 4: (0.75, 0.4),
             5: (-0.65, -0.35), 6: (0.25, 0.8), 7: (0.2, -0.4)}
# An AU shown on its own on a neutral face nudges valence/arousal this much.
AU_VA = {"AU1": (0.0, 0.25), "AU2": (0.05, 0.25), "AU4": (-0.3, 0.15), "AU6": (0.3, 0.1),
         "AU7": (-0.15, 0.15), "AU10": (-0.3, 0.1), "AU12": (0.4, 0.15), "AU15": (-0.35, -0.1),
         "AU23": (-0.2, 0.2), "AU24": (-0.15, 0.0), "AU25": (0.0, 0.15), "AU26": (0.0, 0.3)}

VERSION = 3  # bump when a change to this file changes the output, so finished samples are redone
ACTIVE = 0.35  # intensity from which an AU, or an expression event, counts as present
MIN_VISIBLE = 0.75  # share of the face box inside the picture for a frame to be labelled
MAX_OCCLUDED = 0.3  # share of the face box an occluder may cover for a frame to be labelled

# The photo's face box (MTCNN, facenet-pytorch, on skimage.data.astronaut()) and the square of it shown
# at rest, in pixels of the 512x512 image: where the face is in every frame, and the labels' visibility.
FACE_BOX = (181.1, 62.2, 267.7, 172.1)
VIEW_CENTER, VIEW_SIDE = (224.0, 122.0), 200.0  # the photo square shown at rest


def pose_matrices(pose: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Head pose (n, 4: dx, dy px, angle deg, scale) -> photo px to output px map: A (n, 2, 2), t (n, 2)."""
    k = size / VIEW_SIDE
    ang = np.deg2rad(pose[:, 2])
    cos, sin = np.cos(ang), np.sin(ang)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    a = rot * (k * pose[:, 3])[:, None, None]
    centre = np.array([(size - 1) / 2, (size - 1) / 2]) + pose[:, :2]
    t = centre - einsum(a, np.array(VIEW_CENTER), "n i j, j -> n i")
    return a, t


def face_boxes(pose: np.ndarray, size: int) -> np.ndarray:
    """(n, 4) axis-aligned face box in output px for head poses (n, 4)."""
    a, t = pose_matrices(pose, size)
    x1, y1, x2, y2 = FACE_BOX
    corners = np.array([[x1, y1], [x2, y1], [x1, y2], [x2, y2]])
    pts = einsum(a, corners, "n i j, c j -> n c i") + t[:, None]
    return np.concatenate([pts.min(1), pts.max(1)], -1)


@dataclass
class Slot:
    kind: str  # "expr", "au", "occlude" or "leave"
    expr: int = 0  # expression shown (the one underneath for occlude / leave)
    aus: tuple[str, ...] = ()  # for "au": the AUs shown on a neutral face


@dataclass
class Timeline:
    intensity: np.ndarray  # (n, k) float32 per channel
    expr: np.ndarray  # (n,) int64
    va: np.ndarray  # (n, 2) float32
    pose: np.ndarray  # (n, 4) dx, dy, angle, scale
    occluder: np.ndarray  # (n, 4) x1, y1, x2, y2 output px, NaN when absent
    occluder_rgb: np.ndarray  # (3,)
    light: np.ndarray  # (n, 3) per-channel gain
    bias: np.ndarray  # (n,)
    au: np.ndarray | None = None  # (n, 12) AU labels when they differ from intensity >= ACTIVE


def split_names(cfg: Config) -> dict[str, list[str]]:
    """Video names per split: the last ``val_videos`` validate, unless ``val_list`` names them."""
    names = [f"sample_{i:02d}" for i in range(cfg.n_videos)]
    if cfg.val_list:
        unknown = sorted(set(cfg.val_list) - set(names))
        if unknown:
            raise ConfigError(f"val_list names unknown videos {unknown}; videos are {names[0]}..{names[-1]}")
        val = [n for n in names if n in cfg.val_list]
    else:
        val = names[len(names) - cfg.val_videos:] if cfg.val_videos > 0 else []
    train = [n for n in names if n not in val]
    if not train or not val:
        raise ConfigError(f"both splits need a video: n_videos={cfg.n_videos}, val_videos={cfg.val_videos}, "
                          f"val_list={cfg.val_list}")
    return {"Train_Set": train, "Validation_Set": val}


def plan_split(videos: list[str], cfg: Config, rng: np.random.Generator) -> dict[str, list[Slot]]:
    """Deal events to a split's videos so that every expression (hence every AU) occurs in it."""
    per_video = max(cfg.events_per_video, math.ceil(len(TEMPLATES) / len(videos)))
    if cfg.n_frames // per_video < 10:
        raise ConfigError(f"n_frames={cfg.n_frames} is too short for {per_video} events per video "
                          f"({len(videos)} videos in a split); use at least {10 * per_video} frames")
    slots = [Slot("expr", e) for e in TEMPLATES]
    spare = len(videos) * per_video - len(slots)
    n_occ = min(spare, math.ceil(cfg.occlusion * spare))
    n_leave = min(spare - n_occ, math.ceil(cfg.leave_frame * spare))
    slots += [Slot("occlude", int(rng.integers(1, 8))) for _ in range(n_occ)]
    slots += [Slot("leave", int(rng.integers(1, 8))) for _ in range(n_leave)]
    au_cycle = list(rng.permutation(AUS))
    for i in range(spare - n_occ - n_leave):
        if i % 2:
            slots.append(Slot("expr", int(rng.integers(1, 8))))
        else:
            au = str(au_cycle[(i // 2) % len(AUS)])
            slots.append(Slot("au", aus=("AU25", "AU26") if au == "AU26" else (au,)))
    order = rng.permutation(len(slots))
    slots = [slots[i] for i in order]
    return {v: slots[i * per_video:(i + 1) * per_video] for i, v in enumerate(videos)}


def envelope(n: int, start: int, length: int, ramp: int) -> np.ndarray:
    """(n,) raised-cosine onset, plateau, offset over [start, start + length)."""
    t = np.arange(n) - start
    up = np.clip((t + 1) / (ramp + 1), 0, 1)
    down = np.clip((length - t) / (ramp + 1), 0, 1)
    return (0.5 - 0.5 * np.cos(np.pi * np.minimum(up, down))) * ((t >= 0) & (t < length))


def _wander(n: int, fps: float, amp: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) slow random motion: two sinusoids of random frequency and phase, peak ~amp."""
    t = np.arange(n) / fps
    f = rng.uniform(0.1, 0.6, 2)
    ph = rng.uniform(0, 2 * np.pi, 2)
    return amp * 0.5 * (np.sin(2 * np.pi * f[0] * t + ph[0]) + np.sin(2 * np.pi * f[1] * t + ph[1]))




def _overlap(box: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Share of each box (n, 4) covered by other (n, 4); NaN in other counts as no overlap."""
    w = np.clip(np.minimum(box[:, 2], other[:, 2]) - np.maximum(box[:, 0], other[:, 0]), 0, None)
    h = np.clip(np.minimum(box[:, 3], other[:, 3]) - np.maximum(box[:, 1], other[:, 1]), 0, None)
    area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
    return np.nan_to_num(w * h / area)


def make_timeline(slots: list[Slot], cfg: Config, rng: np.random.Generator) -> Timeline:
    """Per-frame channel intensities, labels, head pose, occluder and lighting for one video."""
    n, size = cfg.n_frames, cfg.size
    inten = np.zeros((n, len(CHANNELS)))
    expr = np.zeros(n, np.int64)
    va = np.zeros((n, 2))
    px = size / 256
    pose = np.stack([_wander(n, cfg.fps, rng.uniform(2, 6) * px, rng),
                     _wander(n, cfg.fps, rng.uniform(2, 6) * px, rng),
                     _wander(n, cfg.fps, rng.uniform(1, 4), rng),
                     1 + _wander(n, cfg.fps, rng.uniform(0.01, 0.04), rng)], -1)
    occluder = np.full((n, 4), np.nan)
    # Slots of random widths (each at least half the mean), so that when events happen differs from
    # video to video and a model cannot score from a frame's position alone.
    widths = 0.5 / len(slots) + 0.5 * rng.dirichlet(np.full(len(slots), 2.0))
    edges = np.concatenate([[0], np.cumsum(widths)]) * n
    edges = edges.round().astype(int)
    for slot, a, b in zip(slots, edges[:-1], edges[1:], strict=True):
        span = b - a
        length = max(4, round(span * rng.uniform(0.6, 0.8)))
        start = a + int(rng.integers(1, max(2, span - length)))
        env = envelope(n, start, length, max(1, length // 5)) * rng.uniform(0.75, 1.0)
        if slot.kind == "au":
            for au in slot.aus:
                inten[:, CHANNELS.index(au)] = np.maximum(inten[:, CHANNELS.index(au)], env)
                va += env[:, None] * np.array(AU_VA[au]) / len(slot.aus)
        else:
            for au in TEMPLATES[slot.expr]:
                k = CHANNELS.index(au)
                inten[:, k] = np.maximum(inten[:, k], env * rng.uniform(0.8, 1.0))
            expr[env >= ACTIVE] = slot.expr
            va += env[:, None] * np.array(TARGET_VA[slot.expr]) * rng.uniform(0.85, 1.15, 2)
        whole = envelope(n, a + 1, span - 2, max(1, (span - 2) // 3))
        if slot.kind == "leave":  # slide sideways until the face is out of the picture and back
            pose[:, 0] += rng.choice([-1, 1]) * 0.9 * size * whole
        elif slot.kind == "occlude":  # a card slides in from one side over the upper or lower face
            side = rng.choice([-1, 1])
            box = face_boxes(pose[a:b], size)
            cx = (box[:, 0] + box[:, 2]) / 2
            cy = (box[:, 1] + box[:, 3]) / 2 + rng.choice([-0.2, 0.2]) * (box[:, 3] - box[:, 1])
            w, h = 0.5 * size, 0.45 * size
            off = size + w / 2 if side > 0 else -w / 2
            x = off + (cx - off) * whole[a:b]
            card = np.stack([x - w / 2, cy - h / 2, x + w / 2, cy + h / 2], -1)
            card[whole[a:b] <= 0] = np.nan
            occluder[a:b] = card
    light = 1 + np.stack([_wander(n, cfg.fps, 0.08, rng)] * 3, -1) + rng.uniform(-0.04, 0.04, 3)
    bias = _wander(n, cfg.fps, 0.03, rng)
    return Timeline(inten.astype(np.float32), expr, np.clip(va, -1, 1).astype(np.float32), pose,
                    occluder, rng.uniform(0.15, 0.75, 3), light, bias)


# --- the temporal variant: labels that need the past ---------------------------------------------
TEMPORAL_KEYS = ("hold", "cue_every", "au_lead", "cover_seconds")
REST = ("AU25", "AU6")  # the faint resting face after any expression: lips apart, cheeks a little raised
RESIDUE = 0.12  # its intensity
LINGER = (20, 51)  # frames the resting face stays once the label has ended
# What a cue shows per unit of the hidden state (valence, arousal). Signed channels that are no ABAW
# label carry most of it: AU20 pulls the mouth corners out (+) or in (-), AU5 opens the lids wide (+)
# or lets them droop (-), both under the amplitude at which the warp would fold. The ABAW AUs add a
# trace that stays below ACTIVE, so a cue alone sets no AU label.
CUES = {  # channel: (gain on valence, gain on arousal, sign the state must have; 0 = either)
    "AU20": (1.2, 0.0, 0), "AU12": (0.3, 0.0, 1), "AU15": (0.3, 0.0, -1),
    "AU5": (0.0, 2.0, 0), "AU1": (0.0, 0.3, 1), "AU2": (0.0, 0.3, 1), "AU7": (0.0, 0.3, -1),
}
UNFOLDED = {"AU20": 1.4, "AU5": 2.4}  # largest intensity at which each field's warp stays invertible
COVER = 0.6  # side of the card that covers the face, in frame sizes


def check_kind(cfg: Config) -> None:
    """``kind`` is events or temporal; the temporal ranges are (low, high) pairs of positive numbers."""
    if cfg.kind not in ("events", "temporal"):
        raise ConfigError(f"kind={cfg.kind!r}: choose events or temporal")
    if cfg.kind == "temporal":
        for key in TEMPORAL_KEYS:
            pair = cfg[key]
            if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
                raise ConfigError(f"{key}={pair}: give [low, high] with 0 < low <= high")


def _hidden_state(n: int, fps: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) a slow process in [-1, 1]: a per-video level and two sinusoids of 6-16 s periods."""
    t = np.arange(n) / fps
    level = rng.uniform(-0.45, 0.45)
    periods, phases = rng.uniform(6, 16, 2), rng.uniform(0, 2 * np.pi, 2)
    wave = 0.6 * np.sin(2 * np.pi * t / periods[0] + phases[0]) + 0.4 * np.sin(2 * np.pi * t / periods[1] + phases[1])
    return np.clip(level + rng.uniform(0.3, 0.55) * wave, -1, 1)


def _distractors(inten: np.ndarray, busy: np.ndarray, rng: np.random.Generator) -> None:
    """The faint resting face (``REST``), labelled Neutral, time after time wherever the face is
    otherwise still (``busy`` false), so that a faint face is as likely neutral as held."""
    edges = np.flatnonzero(np.diff(np.concatenate([[1], busy.astype(int), [1]])))
    for first, last in zip(edges[::2], edges[1::2], strict=True):
        t = first + int(rng.integers(2, 10))
        while last - t >= 22:
            length = int(rng.integers(20, min(90, last - t - 2) + 1))
            env = envelope(len(inten), t, length, 6) * RESIDUE * rng.uniform(0.8, 1.2)
            for au in REST:
                k = CHANNELS.index(au)
                inten[:, k] = np.maximum(inten[:, k], env)
            t += length + int(rng.integers(2, 8))


def _ramp(length: int) -> np.ndarray:
    """(length,) raised cosine from 0 up to 1, both ends excluded."""
    return 0.5 - 0.5 * np.cos(np.pi * np.arange(1, length + 1) / (length + 1))


def _held_event(span: int, hold: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """An expression that rises, peaks and falls back to neutral, and the resting face that follows
    it: intensities (span,) of the expression's AUs and of ``REST``. The resting face stays for
    ``hold`` labelled frames and ``LINGER`` more labelled Neutral; it is the same face as after any
    other expression, or none. Also the frame where the label ends."""
    up, peak, down, fade = int(rng.integers(6, 11)), int(rng.integers(12, 25)), int(rng.integers(6, 11)), 6
    room = span - up - peak - down - fade
    linger = min(int(rng.integers(*LINGER)), room // 3)
    hold = max(8, min(hold, room - linger))
    shown = np.concatenate([_ramp(up), np.ones(peak), 1 - _ramp(down), np.zeros(hold + linger + fade)])
    rest = RESIDUE * np.concatenate([np.zeros(up + peak), _ramp(down), np.ones(hold + linger), _ramp(fade)[::-1]])
    return shown[:span], rest[:span], min(span, up + peak + down + hold)


def make_temporal_timeline(slots: list[Slot], cfg: Config, rng: np.random.Generator) -> Timeline:
    """A timeline whose labels depend on what came before, by construction:

    - an expression stays labelled for ``hold`` frames after the face has gone back to a faint
      resting face (``REST``) that shows nothing of which expression it was, and that face lingers
      on, labelled Neutral, for ``LINGER`` frames more;
    - the same resting face also comes and goes on its own, labelled Neutral, so a frame alone does
      not tell a held expression from a neutral face, nor which expression is held;
    - valence and arousal follow slow hidden processes; the face shows them only in brief cues every
      ``cue_every`` frames (``CUES``: valence in the mouth corners, arousal in the lids and brows), and
      between cues not at all;
    - an AU's label starts ``au_lead`` frames before the AU becomes visible;
    - for an "occlude" slot a card covers the whole face for ``cover_seconds`` from the peak of an
      expression, and the labels go on.
    """
    n, size, fps = cfg.n_frames, cfg.size, cfg.fps
    inten = np.zeros((n, len(CHANNELS)))
    au_label = np.zeros((n, len(AUS)), bool)
    expr = np.zeros(n, np.int64)
    px = size / 256
    pose = np.stack([_wander(n, fps, rng.uniform(2, 6) * px, rng), _wander(n, fps, rng.uniform(2, 6) * px, rng),
                     _wander(n, fps, rng.uniform(1, 4), rng), 1 + _wander(n, fps, rng.uniform(0.01, 0.04), rng)], -1)
    occluder = np.full((n, 4), np.nan)
    widths = 0.5 / len(slots) + 0.5 * rng.dirichlet(np.full(len(slots), 2.0))
    edges = (np.concatenate([[0], np.cumsum(widths)]) * n).round().astype(int)
    for slot, a, b in zip(slots, edges[:-1], edges[1:], strict=True):
        span = b - a - 2
        if slot.kind == "au":
            length = max(12, round(span * rng.uniform(0.4, 0.6)))
            start = a + 1 + int(rng.integers(0, max(1, span - length)))
            env = envelope(n, start, length, 6) * rng.uniform(0.75, 1.0)
            for au in slot.aus:
                k = CHANNELS.index(au)
                inten[:, k] = np.maximum(inten[:, k], env)
            continue
        hold = int(rng.integers(cfg.hold[0], cfg.hold[1] + 1))
        env, rest, label_end = _held_event(span, hold, rng)
        start = a + 1
        env = env * rng.uniform(0.75, 1.0)
        frames = slice(start, start + len(env))
        for au in TEMPLATES[slot.expr]:
            k = CHANNELS.index(au)
            inten[frames, k] = np.maximum(inten[frames, k], env * rng.uniform(0.8, 1.0))
        for au in REST:
            k = CHANNELS.index(au)
            inten[frames, k] = np.maximum(inten[frames, k], rest * rng.uniform(0.8, 1.2))
        onset = start + int(np.argmax(env >= ACTIVE))
        expr[onset:start + label_end] = slot.expr
        if slot.kind in ("occlude", "leave"):  # a card covers the face from the peak on
            first = onset + int(rng.integers(4, 12))
            length = round(fps * rng.uniform(*cfg.cover_seconds))
            box = face_boxes(pose[first:first + length], size)
            cx, cy = (box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2
            side = COVER * size / 2
            slide = np.clip(np.arange(len(box)) / 4, 0, 1)[:, None]  # in over four frames
            off = np.array([size + side, 0.0]) * rng.choice([-1, 1])
            centre = np.stack([cx, cy], -1) * slide + (np.stack([cx, cy], -1) + off) * (1 - slide)
            occluder[first:first + length] = np.concatenate([centre - side, centre + side], -1)
    _distractors(inten, (inten[:, : len(AUS)].max(1) > 0.01) | (expr > 0), rng)
    for k, au in enumerate(AUS):  # an AU is labelled from `lead` frames before it shows
        lead = int(rng.integers(cfg.au_lead[0], cfg.au_lead[1] + 1))
        shown = inten[:, CHANNELS.index(au)] >= ACTIVE
        au_label[:, k] = shown | np.array([shown[t + 1:t + 1 + lead].any() for t in range(n)])

    valence, arousal = _hidden_state(n, fps, rng), _hidden_state(n, fps, rng)
    t = 0
    while True:
        t += int(rng.integers(cfg.cue_every[0], cfg.cue_every[1] + 1))
        length = int(rng.integers(12, 21))
        if t + length >= n:
            break
        env = np.zeros(n)
        env[t:t + length] = np.sin(np.pi * np.arange(1, length + 1) / (length + 1))
        for au, (gain_v, gain_a, sign) in CUES.items():
            shown = gain_v * valence[t] + gain_a * arousal[t]
            if sign == 0:
                inten[:, CHANNELS.index(au)] += env * shown
            elif sign * shown > 0:
                k = CHANNELS.index(au)
                inten[:, k] = np.maximum(inten[:, k], env * abs(shown))
    for au, limit in UNFOLDED.items():  # a cue on top of Fear's AU5 and AU20 stays unfolded
        k = CHANNELS.index(au)
        inten[:, k] = np.clip(inten[:, k], -limit, limit)
    light = 1 + np.stack([_wander(n, fps, 0.08, rng)] * 3, -1) + rng.uniform(-0.04, 0.04, 3)
    bias = _wander(n, fps, 0.03, rng)
    va = np.stack([valence, arousal], -1).astype(np.float32)
    return Timeline(inten.astype(np.float32), expr, va, pose, occluder, rng.uniform(0.15, 0.75, 3), light, bias,
                    au=au_label.astype(np.int64))




def write_video(path: Path, frames: np.ndarray, fps: int, crf: int) -> None:
    """Encode RGB frames (n, h, w, 3) uint8 as H.264 mp4."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _spans(n: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) bool: a few short spans covering about ``share`` of the frames."""
    length = max(2, round(n / 30))
    mask = np.zeros(n, bool)
    for s in rng.integers(0, n - length + 1, round(share * n / length)):
        mask[s:s + length] = True
    return mask


def labels_of(tl: Timeline, face_ok: np.ndarray, unlabelled: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ABAW label arrays with the sentinels where the face is unusable or the task is unlabelled."""
    va = tl.va.round(4)
    expr = tl.expr.copy()
    au = au_truth(tl)
    va[~face_ok | unlabelled["va"]] = -5
    expr[~face_ok | unlabelled["expr"]] = -1
    au[~face_ok | unlabelled["au"]] = -1
    return {"va": va, "expr": expr, "au": au}


def au_truth(tl: Timeline) -> np.ndarray:
    """(n, 12) AU labels: the timeline's own, else an AU is on where its intensity reaches ACTIVE."""
    if tl.au is not None:
        return tl.au.astype(np.int64)
    return (tl.intensity[:, : len(AUS)] >= ACTIVE).astype(np.int64)


def write_annotations(root: Path, split: str, video: str, labels: dict[str, np.ndarray]) -> None:
    """One ABAW txt per task: the header, then row i = frame i."""
    rows = {
        "va": [",".join("-5" if v == -5 else f"{v:.4f}" for v in r) for r in labels["va"]],
        "expr": [str(int(e)) for e in labels["expr"]],
        "au": [",".join(str(int(a)) for a in r) for r in labels["au"]],
    }
    for task, (folder, header) in TASKS.items():
        path = root / "annotations" / folder / split / f"{video}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([header, *rows[task]]) + "\n")


def _coverage_gaps(labels: list[dict[str, np.ndarray]]) -> list[str]:
    expr = np.concatenate([lab["expr"] for lab in labels])
    au = np.concatenate([lab["au"] for lab in labels])
    missing = [EXPRESSIONS[e] for e in range(len(EXPRESSIONS)) if not (expr == e).any()]
    return missing + [name for k, name in enumerate(AUS) if not (au[:, k] == 1).any()]


def output_hash(cfg: Config) -> str:
    """Hash of every key that changes the written files (not ``out`` or ``batch``), and the version.
    The temporal keys count only for ``kind: temporal``, so an events sample keeps its hash."""
    skip = {"out", "batch"} | (set() if cfg.kind == "temporal" else {"kind", *TEMPORAL_KEYS})
    return f"{cfg.hash([k for k in cfg if k not in skip])}-v{VERSION}"


def generate(cfg: Config, root: Path) -> dict:
    """Write the whole sample under ``root``; returns the manifest."""
    from pipeline.face_rig import build_rig, render_video  # torch: only when there is work to do

    temporal = cfg.kind == "temporal"
    rig = build_rig(cfg.strength)
    splits = split_names(cfg)
    manifest = {"config_hash": output_hash(cfg), "kind": cfg.kind, "fps": cfg.fps, "n_frames": cfg.n_frames,
                "size": cfg.size, "splits": splits, "expressions": list(EXPRESSIONS), "aus": list(AUS)}
    for split, videos in splits.items():
        plan = plan_split(videos, cfg, np.random.default_rng([cfg.seed, SPLITS.index(split)]))
        written = []
        for video in videos:
            index = int(video.rsplit("_", 1)[1])
            rng = np.random.default_rng([cfg.seed, 100 + index])
            tl = (make_temporal_timeline if temporal else make_timeline)(plan[video], cfg, rng)
            frames, kps = render_video(rig, tl, cfg, seed=cfg.seed * 1000 + index)
            box = face_boxes(tl.pose, cfg.size)
            visible = _overlap(box, np.array([[0, 0, cfg.size, cfg.size]] * len(box)))
            occluded = _overlap(box, tl.occluder)
            # in the temporal set a covered face stays labelled: what it shows is known from before
            face_ok = (visible >= MIN_VISIBLE) & ((occluded <= MAX_OCCLUDED) | temporal)
            unlabelled = {task: _spans(cfg.n_frames, cfg.unlabelled, rng) for task in TASKS}
            labels = labels_of(tl, face_ok, unlabelled)
            write_video(root / "videos" / f"{video}.mp4", frames, cfg.fps, cfg.crf)
            write_annotations(root, split, video, labels)
            (root / "truth").mkdir(exist_ok=True)
            np.savez_compressed(
                root / "truth" / f"{video}.npz", split=split, fps=cfg.fps,
                face_ok=face_ok, face_visible=visible.astype(np.float32),
                occluded=occluded.astype(np.float32),
                **{f"unlabelled_{task}": m for task, m in unlabelled.items()},
                intensity=tl.intensity, channels=np.array(CHANNELS), expr=tl.expr, va=tl.va,
                au=au_truth(tl),
                pose=tl.pose.astype(np.float32), box=box.astype(np.float32), landmarks=kps,
                occluder=tl.occluder.astype(np.float32),
            )
            written.append(labels)
            log.info("%s/%s: %d frames, %d usable", split, video, cfg.n_frames, face_ok.sum())
        gaps = _coverage_gaps(written)
        if gaps:  # the plan guarantees coverage; failing here means the plan is broken
            raise RuntimeError(f"{split} has no labelled frame of {', '.join(gaps)}")
    from pipeline.submit import write_test_lists

    # the validation videos as the organisers list a test set, to try make submit on
    write_test_lists(root / "lists", dict.fromkeys(splits["Validation_Set"], cfg.n_frames))
    return manifest


def main(cfg: Config) -> int:
    """Generate the sample at ``cfg.out`` unless an output made with the same settings is there."""
    check_kind(cfg)
    out = Path(cfg.out)
    digest = output_hash(cfg)
    done = out / "manifest.json"
    if done.is_file():
        if json.loads(done.read_text()).get("config_hash") == digest:
            log.info("%s: already generated with this config (%s), skipping", out, digest)
            return 0
    elif out.exists() and any(out.iterdir()):
        log.error("%s exists but holds no sample manifest; refusing to overwrite it", out)
        return 1

    with atomic_output(out) as tmp:  # the whole folder appears at once, replacing an older sample
        tmp.mkdir()
        manifest = generate(cfg, tmp)
        cfg.save(tmp / "sample.yaml")
        write_json(tmp / "manifest.json", manifest)
    log.info("sample written to %s (%d videos)", out, cfg.n_videos)
    return 0


def cli() -> None:
    """The ``affect-sample`` command, the same as ``python -m pipeline.sample``."""
    run_stage("sample", main)


if __name__ == "__main__":
    cli()
