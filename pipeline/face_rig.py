"""The built-in sample's face: scikit-image's ``astronaut`` photo, the displacement field and
shading of each action unit around hand-placed landmarks, and the renderer that warps the photo by
a timeline's intensities and head pose (torch, on the CPU)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from pipeline.config import Config
from pipeline.sample import CHANNELS, pose_matrices

if TYPE_CHECKING:
    from pipeline.sample import Timeline

# --- the photo's geometry, in pixels of the 512x512 image ---------------------------------------
# MTCNN (facenet-pytorch) on skimage.data.astronaut(): box and 5 points (eyes, nose, mouth corners).
KEYPOINTS = np.array([[205.0, 101.7], [246.8, 103.7], [224.7, 129.0], [201.7, 139.2], [245.3, 141.9]])
# Read off the photo by eye: brows, lids, lips. The neutral face smiles with the upper teeth showing.
L_BROW_IN, L_BROW_MID, L_BROW_OUT = (213.0, 91.0), (203.0, 90.0), (193.0, 91.0)
R_BROW_IN, R_BROW_MID, R_BROW_OUT = (238.0, 93.0), (248.0, 93.0), (258.0, 95.0)
L_LID_UP, L_LID_LOW = (205.0, 97.5), (205.0, 105.5)
R_LID_UP, R_LID_LOW = (246.8, 99.5), (246.8, 107.5)
L_CHEEK, R_CHEEK = (204.0, 121.0), (246.0, 123.0)
L_MOUTH, R_MOUTH = tuple(KEYPOINTS[3]), tuple(KEYPOINTS[4])
UPPER_LIP, LOWER_LIP = (223.5, 140.0), (223.5, 152.0)
MOUTH_X, MOUTH_HALF = 223.5, 21.5
EYE_TO_MOUTH = float(np.linalg.norm(KEYPOINTS[:2].mean(0) - KEYPOINTS[3:].mean(0)))  # ~37 px
WINDOW = (150.0, 55.0, 300.0, 205.0)  # x0, y0, x1, y1: where deformation fields are non-zero
WINDOW_STEP = 1.0
BACKGROUND = (0.5, 0.5, 0.5)
CAVITY = (0.16, 0.06, 0.07)


def _teeth_bottom(x: torch.Tensor) -> torch.Tensor:
    """Lower edge of the upper teeth, which follows the smile: y at each x (photo px)."""
    u = ((x - MOUTH_X) / MOUTH_HALF).clamp(-1, 1)
    return 149.5 - 8.5 * u**2


def _teeth_top(x: torch.Tensor) -> torch.Tensor:
    u = ((x - MOUTH_X) / MOUTH_HALF).clamp(-1, 1)
    return 142.5 - 2.5 * u**2


def _lens(x: torch.Tensor) -> torch.Tensor:
    """How far the mouth can open at each x: 1 in the middle, 0 at the corners."""
    return (1 - ((x - MOUTH_X) / MOUTH_HALF) ** 2).clamp(min=0).sqrt()


def _step(z: torch.Tensor) -> torch.Tensor:
    z = z.clamp(0, 1)
    return z * z * (3 - 2 * z)


def _pair(left, right, sx, sy, inward, down):
    """Two mirrored bumps; displacements in eye-to-mouth units, inward = towards the midline."""
    return [(*left, sx, sy, inward, down), (*right, sx, sy, -inward, down)]


# Channel -> bumps (cx, cy, sigma_x, sigma_y, dx, dy): forward displacement of the photo.
# Amplitudes stay below ~1.3 sigma so the warp does not fold and its inverse converges.
BUMPS = {
    "AU1": _pair(L_BROW_IN, R_BROW_IN, 8, 10, 0.04, -0.21),
    "AU2": _pair(L_BROW_OUT, R_BROW_OUT, 8, 10, -0.03, -0.21),
    "AU4": _pair(L_BROW_MID, R_BROW_MID, 10, 6.5, 0.1, 0.22) + _pair(L_BROW_IN, R_BROW_IN, 5, 5, 0.1, 0.06),
    "AU5": _pair(L_LID_UP, R_LID_UP, 8, 3.5, 0, -0.05),
    "AU6": _pair(L_CHEEK, R_CHEEK, 11, 7, 0, -0.16) + _pair(L_LID_LOW, R_LID_LOW, 8, 2.5, 0, -0.03),
    "AU7": _pair(L_LID_UP, R_LID_UP, 8, 2.5, 0, 0.06) + _pair(L_LID_LOW, R_LID_LOW, 8, 2.5, 0, -0.07),
    "AU10": [(*UPPER_LIP, 12, 5, 0, -0.16)] + _pair((213.0, 130.0), (236.0, 131.0), 4, 4, 0, -0.06),
    "AU12": _pair(L_MOUTH, R_MOUTH, 6.5, 6.5, -0.08, -0.18),
    "AU15": _pair(L_MOUTH, R_MOUTH, 7.5, 7.5, 0.03, 0.24),
    "AU20": _pair(L_MOUTH, R_MOUTH, 7, 6, -0.15, 0.03),
    "AU23": _pair(L_MOUTH, R_MOUTH, 6.5, 5, 0.16, 0.0)
    + [(*UPPER_LIP, 12, 2.5, 0, 0.04), (*LOWER_LIP, 12, 2.5, 0, -0.04)],
    "AU24": [(*UPPER_LIP, 14, 3, 0, 0.08), (*LOWER_LIP, 14, 3, 0, -0.08)],
}
JAW = {"AU25": 0.13, "AU26": 0.26}  # mouth opening in eye-to-mouth units
# Dark creases (segment from, segment to, width px, darkening): frown furrows, nasolabial folds and
# nose wrinkles; geometry alone leaves AU4 and AU10 too subtle to learn.
CREASES = {
    "AU4": [((219.5, 86.0), (220.5, 100.0), 1.2, 0.3), ((228.5, 87.0), (227.5, 101.0), 1.2, 0.3)],
    "AU10": [((213.0, 129.0), (202.0, 143.0), 1.5, 0.22), ((236.0, 131.0), (247.0, 145.0), 1.5, 0.22),
             ((219.0, 113.0), (231.0, 113.5), 1.0, 0.15), ((219.5, 116.5), (230.5, 117.0), 1.0, 0.15)],
}


@dataclass
class FaceRig:
    """The photo and every per-channel field, sampled on a grid over ``WINDOW``."""

    photo: torch.Tensor  # (1, 4, 512, 512): RGB in [0, 1] and an all-ones coverage channel
    bumps: torch.Tensor  # (k, 2, y, x) forward displacement per channel at intensity 1, photo px
    static: torch.Tensor  # (5, y, x): jaw drop for AU25, AU26; creases for AU4, AU10; lip band
    lip: torch.Tensor  # (3,) colour painted over the teeth when the lips press together
    strength: float


def build_rig(strength: float) -> FaceRig:
    """Load the photo and precompute the deformation fields, scaled by ``strength``."""
    from skimage.data import astronaut

    rgb = torch.from_numpy(astronaut()).float().div(255)
    photo = rearrange(torch.cat([rgb, torch.ones_like(rgb[..., :1])], -1), "h w c -> 1 c h w")
    x0, y0, x1, y1 = WINDOW
    ys = torch.arange(y0, y1 + 1e-6, WINDOW_STEP)
    xs = torch.arange(x0, x1 + 1e-6, WINDOW_STEP)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    unit = EYE_TO_MOUTH * strength

    bumps = torch.zeros(len(CHANNELS), 2, *x.shape)
    for k, name in enumerate(CHANNELS):
        for cx, cy, sx, sy, dx, dy in BUMPS.get(name, []):
            g = torch.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))
            bumps[k, 0] += unit * dx * g
            bumps[k, 1] += unit * dy * g

    # Jaw drop as a backward map: below the teeth line content comes from higher up. Inside the
    # mouth the step is sharp (the cavity hides it); beside it the cheeks stretch softly.
    rise = y - _teeth_bottom(x)
    sharp, soft, lens = _step(rise / 1.5), _step(rise / 15), _lens(x)
    below_lip = torch.exp(-0.5 * ((y - 156).clamp(min=0) / 6) ** 2)
    below_chin = torch.exp(-0.5 * ((y - 176).clamp(min=0) / 14) ** 2)
    jaw_width = 0.5 + 0.5 * torch.cos(math.pi * (((x - MOUTH_X).abs() - 30) / 18).clamp(0, 1))
    lips_part = unit * JAW["AU25"] * lens * sharp * below_lip
    jaw_drop = unit * JAW["AU26"] * (lens * sharp + (1 - lens) * soft) * jaw_width * below_chin

    creases = []
    for name in ("AU4", "AU10"):
        dark = torch.zeros_like(x)
        for a, b, width, depth in CREASES[name]:
            a, b = torch.tensor(a), torch.tensor(b)
            p = torch.stack([x, y], -1)
            t = ((p - a) @ (b - a) / (b - a).dot(b - a)).clamp(0, 1)
            dist = (p - a - t[..., None] * (b - a)).norm(dim=-1)
            dark = torch.maximum(dark, depth * torch.exp(-0.5 * (dist / width) ** 2))
        creases.append((dark * strength).clamp(max=0.9))

    band = torch.sigmoid((y - _teeth_top(x)) / 0.4) * torch.sigmoid((_teeth_bottom(x) - y) / 0.4)
    band = band * (lens > 0) * strength
    static = torch.stack([lips_part, jaw_drop, *creases, band])
    lip = photo[0, :3, 151:154, 218:230].mean((1, 2))  # lower lip colour
    return FaceRig(photo, bumps, static, lip, strength)


def _to_window(q: torch.Tensor) -> torch.Tensor:
    """Photo px (..., 2) -> grid_sample coordinates over ``WINDOW`` (align_corners=True)."""
    x0, y0, x1, y1 = WINDOW
    lo, hi = q.new_tensor([x0, y0]), q.new_tensor([x1, y1])
    return (q - lo) / (hi - lo) * 2 - 1


def _photo_grid(q: torch.Tensor, side: int = 512) -> torch.Tensor:
    return q / (side - 1) * 2 - 1


def _sample_static(field: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """One (c, y, x) field at every point of q (b, h, w, 2) -> (b, c, h, w); frames share the field."""
    b = q.shape[0]
    grid = rearrange(_to_window(q), "b h w two -> 1 (b h) w two")
    out = F.grid_sample(field[None], grid, align_corners=True, padding_mode="zeros")
    return rearrange(out, "1 c (b h) w -> b c h w", b=b)


def render(rig: FaceRig, intensity: np.ndarray, pose: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames before occluder, lighting and noise.

    intensity (b, k) per channel, pose (b, 4) -> rgb (b, 3, h, w) in [0, 1], and the forward
    displacement of the five keypoints (b, 5, 2) in photo px.
    """
    b = len(pose)
    a, t = (torch.from_numpy(m).float() for m in pose_matrices(pose, size))
    pix = torch.arange(size, dtype=torch.float32)
    out = torch.stack(torch.meshgrid(pix, pix, indexing="xy"), -1)  # (h, w, 2) as x, y
    # Output px -> photo px through the inverse head pose.
    p = einsum(torch.linalg.inv(a), out[None] - t[:, None, None], "b i j, b h w j -> b h w i")

    inten = torch.from_numpy(intensity).float()
    field = einsum(inten, rig.bumps, "b k, k c y x -> b c y x")
    q = p  # invert the forward warp x -> x + d(x) by fixed-point steps q = p - d(q)
    for _ in range(6):
        d = F.grid_sample(field, _to_window(q), align_corners=True, padding_mode="zeros")
        q = p - rearrange(d, "b two h w -> b h w two")
    kp = torch.from_numpy(KEYPOINTS).float()[None].expand(b, -1, -1)
    kp_move = F.grid_sample(field, _to_window(kp)[:, None], align_corners=True)  # (b, 2, 1, 5)

    st = _sample_static(rig.static, q)  # (b, 5, h, w)
    a25, a26, a4, a10, a24 = (inten[:, CHANNELS.index(c), None, None]
                              for c in ("AU25", "AU26", "AU4", "AU10", "AU24"))
    drop = a25 * st[:, 0] + a26 * st[:, 1]
    src = torch.stack([q[..., 0], q[..., 1] - drop], -1)
    grid = rearrange(_photo_grid(src), "b h w two -> 1 (b h) w two")
    img = F.grid_sample(rig.photo, grid, align_corners=True, padding_mode="zeros")
    img = rearrange(img, "1 c (b h) w -> b c h w", b=b)
    cover = img[:, 3:]
    bg = torch.tensor(BACKGROUND)[None, :, None, None]
    rgb = img[:, :3] + (1 - cover) * bg  # zero padding: outside the photo is flat background

    rgb = rgb * (1 - (a4 * st[:, 2] + a10 * st[:, 3]).clamp(max=0.9))[:, None]
    press = (a24 * st[:, 4]).clamp(0, 1)[:, None]
    mid = 0.5 * (_teeth_top(q[..., 0]) + _teeth_bottom(q[..., 0]))
    seam = torch.exp(-0.5 * ((q[..., 1] - mid) / 0.6) ** 2)
    lip = rig.lip[None, :, None, None] * (1 - 0.5 * seam[:, None])
    rgb = rgb * (1 - press) + lip * press

    # The cavity spans from the teeth line down to where the lower lip has dropped to.
    depth = _lens(q[..., 0]) * (a25 * EYE_TO_MOUTH * JAW["AU25"] + a26 * EYE_TO_MOUTH * JAW["AU26"])
    depth = depth * rig.strength
    y_b = _teeth_bottom(q[..., 0])
    hole = torch.sigmoid((q[..., 1] - y_b) / 0.4) * torch.sigmoid((y_b + depth - q[..., 1]) / 0.4)
    hole = (hole * depth.clamp(0, 1))[:, None]
    rgb = rgb * (1 - hole) + torch.tensor(CAVITY)[None, :, None, None] * hole
    return rgb, rearrange(kp_move, "b two 1 k -> b k two")


# --- what happens when --------------------------------------------------------------------------


def render_video(rig: FaceRig, tl: Timeline, cfg: Config, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames (n, h, w, 3) uint8 and keypoints (n, 5, 2) output px, rendered in batches."""
    gen = torch.Generator().manual_seed(seed)
    size = cfg.size
    pix = torch.arange(size, dtype=torch.float32)
    frames, kps = [], []
    for s in range(0, cfg.n_frames, cfg.batch):
        sl = slice(s, s + cfg.batch)
        rgb, kp_move = render(rig, tl.intensity[sl], tl.pose[sl], size)
        occ = torch.from_numpy(np.nan_to_num(tl.occluder[sl], nan=-1e4)).float()
        inside_x = torch.sigmoid(pix - occ[:, 0, None]) * torch.sigmoid(occ[:, 2, None] - pix)  # (b, w)
        inside_y = torch.sigmoid(pix - occ[:, 1, None]) * torch.sigmoid(occ[:, 3, None] - pix)  # (b, h)
        card = einsum(inside_y, inside_x, "b h, b w -> b h w")[:, None]
        shade = 1 - 0.25 * (pix / size)[None, None, :, None]  # lit from above
        colour = torch.from_numpy(tl.occluder_rgb).float()[None, :, None, None] * shade
        rgb = rgb * (1 - card) + colour * card
        gain = torch.from_numpy(tl.light[sl]).float()[:, :, None, None]
        bias = torch.from_numpy(tl.bias[sl]).float()[:, None, None, None]
        rgb = rgb * gain + bias + cfg.noise * torch.randn(rgb.shape, generator=gen)
        frames.append(rearrange((rgb.clamp(0, 1) * 255).round().byte(), "b c h w -> b h w c").numpy())
        a, t = pose_matrices(tl.pose[sl], size)
        moved = KEYPOINTS[None] + kp_move.double().numpy()
        kps.append(einsum(a, moved, "b i j, b k j -> b k i") + t[:, None])
    return np.concatenate(frames), np.concatenate(kps).astype(np.float32)
