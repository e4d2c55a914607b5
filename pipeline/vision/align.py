"""Five-point face alignment: templates, a batched least-squares similarity (Umeyama), a batched warp."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from pipeline.vision.templates import TEMPLATES, template  # noqa: F401 - aligning to them is this module's work


def umeyama(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transforms mapping ``src`` onto ``dst`` (Umeyama 1991).

    src: (b, k, 2) points; dst: (k, 2) or (b, k, 2). Returns (b, 2, 3) matrices ``[s R | t]`` with
    ``dst ~ s R src + t``; float64 inside for stability.
    """
    src = src.double()
    dst = dst.double().expand_as(src)
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    xs, xd = src - mu_s, dst - mu_d
    cov = torch.einsum("bki,bkj->bij", xd, xs) / src.shape[1]  # (b, 2, 2)
    u, sig, vh = torch.linalg.svd(cov)
    d = torch.ones_like(sig)
    d[:, 1] = torch.sign(torch.det(u) * torch.det(vh))  # no reflections
    rot = u @ torch.diag_embed(d) @ vh
    var_s = xs.pow(2).sum((1, 2)) / src.shape[1]
    scale = (sig * d).sum(1) / var_s.clamp_min(1e-12)
    a = scale[:, None, None] * rot
    t = mu_d.transpose(1, 2) - a @ mu_s.transpose(1, 2)  # (b, 2, 1)
    return torch.cat([a, t], dim=2).float()


def apply_affine(mat: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Apply (b, 2, 3) affine matrices to (b, k, 2) points -> (b, k, 2)."""
    return pts @ mat[:, :, :2].transpose(1, 2) + mat[:, None, :, 2]


def _pixel_to_norm(size_hw: tuple[int, int]) -> torch.Tensor:
    # grid_sample with align_corners=False: x_norm = (2 x + 1) / W - 1 for pixel centre x
    h, w = size_hw
    return torch.tensor([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]],
                        dtype=torch.float64)


def _warp(frames: torch.Tensor, mat: torch.Tensor, size: int) -> torch.Tensor:
    b, h, w, _ = frames.shape
    full = torch.eye(3, dtype=torch.float64).repeat(b, 1, 1)
    full[:, :2] = mat.double()
    # the grid maps crop pixels back to frame pixels, both expressed in normalised coordinates
    theta = _pixel_to_norm((h, w)) @ torch.linalg.inv(full) @ torch.linalg.inv(_pixel_to_norm((size, size)))
    grid = F.affine_grid(theta[:, :2].float(), [b, 3, size, size], align_corners=False)
    x = rearrange(frames, "b h w c -> b c h w").float()
    out = F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="zeros", align_corners=False)
    return rearrange(out.round().clamp(0, 255).to(torch.uint8), "b c h w -> b h w c")


def footprint(mat: torch.Tensor, size: int, hw: tuple[int, int]) -> np.ndarray:
    """The frame pixels that ``size`` x ``size`` crops made with affines ``mat`` (b, 2, 3) read:
    (b, 4) int x0, y0, x1, y1 (exclusive), clipped to the frame of ``hw`` = (h, w)."""
    full = torch.eye(3, dtype=torch.float64).repeat(len(mat), 1, 1)
    full[:, :2] = mat.double()
    corners = torch.tensor([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], dtype=torch.float64)
    back = apply_affine(torch.linalg.inv(full)[:, :2], corners.expand(len(mat), 4, 2)).numpy()
    # bilinear sampling reads the pixel below and the one above each sample point
    lo = np.floor(back.min(1)).astype(np.int64) - 1
    hi = np.floor(back.max(1)).astype(np.int64) + 2
    h, w = hw
    return np.stack([lo[:, 0].clip(0, w), lo[:, 1].clip(0, h), hi[:, 0].clip(0, w), hi[:, 1].clip(0, h)], 1)


def warp(frames: torch.Tensor, mat: torch.Tensor, size: int) -> torch.Tensor:
    """Warp frames into ``size`` x ``size`` crops with the source->crop affines ``mat``.

    frames: (b, h, w, 3) uint8; mat: (b, 2, 3) pixel affine mapping frame points to crop points.
    Returns (b, size, size, 3) uint8; outside the frame is black. Each crop reads only the part of
    its frame that it covers, so the cost and the float copies do not grow with the frame's size.
    """
    b, h, w, _ = frames.shape
    out = torch.zeros((b, size, size, 3), dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(footprint(mat, size, (h, w))):
        if x1 <= x0 or y1 <= y0:
            continue  # the crop lies wholly outside the frame
        shift = mat[i : i + 1].clone()
        # frame point p = q + (x0, y0) for a point q of the region
        shift[0, :, 2] += shift[0, :, :2] @ torch.tensor([x0, y0], dtype=shift.dtype)
        out[i] = _warp(frames[i : i + 1, y0:y1, x0:x1], shift, size)[0]
    return out


def align_faces(
    frames: np.ndarray | torch.Tensor, landmarks: np.ndarray, size: int = 112, name: str = "arcface"
) -> np.ndarray:
    """Aligned crops of one face per frame.

    frames: (b, h, w, 3) uint8 RGB; landmarks: (b, 5, 2) pixels. Returns (b, size, size, 3) uint8.
    """
    mats = umeyama(torch.as_tensor(np.asarray(landmarks, np.float32)), torch.from_numpy(template(name, size)))
    return warp(torch.as_tensor(frames), mats, size).numpy()
