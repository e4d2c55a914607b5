"""Face detection for video: facenet-pytorch's MTCNN on the whole frame at keyframes and, in between,
MTCNN's last network (O-net) alone on each face of the frame before.

The whole cascade's cost is its image pyramid over the frame and the many candidate boxes that the
first two networks pass on one by one. A face that stays in view needs neither: O-net, given a
square around where the face was, re-fits its box and five landmarks. That square follows the
previous frame's landmarks, with the size and offset the whole cascade gave it at the keyframe,
and not the previous re-fitted box: re-fitting a box from its own last fit creeps (on a real clip,
the chin grew by a fifth of the face within a few frames), while the landmarks' centroid holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from facenet_pytorch.models.utils.detect_face import bbreg, imresample, pad, rerec
from torchvision.transforms.v2.functional import resize

from pipeline.vision.track import Detections, iou
from pipeline.vision.video import shrunk


class Cascade:
    """MTCNN (P-, R-, O-net, weights from the facenet-pytorch wheel) on batches of equal-sized frames.

    ``detect`` is facenet-pytorch's own cascade, unchanged; ``refit`` is its last stage alone.
    """

    def __init__(self, thresholds=(0.6, 0.7, 0.7), device: str | torch.device = "cpu"):
        from facenet_pytorch import MTCNN

        self.device = torch.device(device)
        self.mtcnn = MTCNN(keep_all=True, thresholds=list(thresholds), device=self.device)
        self.threshold = float(thresholds[2])

    @torch.inference_mode()
    def detect(self, images: torch.Tensor, min_face: float) -> list[Detections]:
        """All faces of at least ``min_face`` pixels. images: (b, 3, h, w) uint8 RGB -> per image
        its faces, in that image's pixels."""
        self.mtcnn.min_face_size = min_face
        boxes, probs, points = self.mtcnn.detect(rearrange(images, "b c h w -> b h w c"), landmarks=True)
        # under numpy 2 the per-image results are object arrays, or None where nothing was found
        return [Detections.empty() if b is None or not len(b) else
                Detections(np.asarray(b, np.float32).reshape(-1, 4), np.asarray(p, np.float32).reshape(-1),
                           np.asarray(q, np.float32).reshape(-1, 5, 2))
                for b, p, q in zip(boxes, probs, points, strict=True)]

    @torch.inference_mode()
    def refit(self, image: torch.Tensor, squares: np.ndarray) -> tuple[Detections, np.ndarray]:
        """O-net alone on square boxes (n, 4) of one image (3, h, w) uint8.

        Returns the faces it accepts, box re-fitted and five landmarks, in the order of ``squares``,
        and the (n,) mask of the accepted squares. Cropping, scoring and the box and landmark
        arithmetic are facenet-pytorch's last stage.
        """
        h, w = image.shape[1:]
        boxes = torch.as_tensor(squares, dtype=torch.float32, device=image.device).reshape(-1, 4)
        y, ey, x, ex = pad(boxes.clone(), w, h)
        inside = (ey > y - 1) & (ex > x - 1)
        accepted = np.zeros(len(boxes), bool)
        if not inside.any():
            return Detections.empty(), accepted
        crops = [imresample(image[None, :, y[k] - 1 : ey[k], x[k] - 1 : ex[k]].float(), (48, 48))
                 for k in np.flatnonzero(inside)]
        reg, pts, prob = self.mtcnn.onet((torch.cat(crops) - 127.5) * 0.0078125)
        ok = (prob[:, 1] > self.threshold).cpu().numpy()
        accepted[np.flatnonzero(inside)[ok]] = True
        boxes = boxes[torch.from_numpy(accepted).to(image.device)]
        reg, pts, score = reg[ok], pts[ok], prob[ok, 1]
        # landmarks are relative to the square O-net saw (inclusive pixel size)
        size = boxes[:, 2:] - boxes[:, :2] + 1
        pts = rearrange(pts, "n (xy k) -> n k xy", xy=2) * size[:, None] + boxes[:, None, :2] - 1
        boxes = bbreg(torch.cat([boxes, score[:, None]], 1), reg)[:, :4]
        return Detections(boxes.cpu().numpy(), score.cpu().numpy(), pts.cpu().numpy()), accepted


@dataclass
class Anchor:
    """Where O-net's square sits relative to each face's landmarks, as the whole cascade placed it:
    the square's centre ``offset`` (n, 2) from the landmarks' centroid and its ``side`` (n,), pixels.

    Between keyframes the square moves with the landmarks and keeps its size: letting it also scale
    with the landmarks' spread fed O-net's own noise back into the next square and let it drift.
    """

    offset: np.ndarray
    side: np.ndarray

    @classmethod
    def of(cls, faces: Detections) -> Anchor:
        square = rerec(torch.from_numpy(faces.box.copy())).numpy()
        mid = (square[:, :2] + square[:, 2:]) / 2
        return cls(mid - faces.landmarks.mean(1), square[:, 2] - square[:, 0])

    def squares(self, landmarks: np.ndarray) -> np.ndarray:
        """The squares for faces whose landmarks are now ``landmarks`` (n, 5, 2) -> (n, 4)."""
        mid = landmarks.mean(1) + self.offset
        half = (self.side / 2)[:, None]
        return np.concatenate([mid - half, mid + half], 1).astype(np.float32)


class FaceDetector:
    """Faces in the frames of one video, in full-resolution pixels.

    Frames are shrunk to ``detect_size`` on their longest side. Every ``keyframe``-th frame runs the
    whole cascade. The frames in between re-fit, with O-net alone, the faces of the frame before;
    the whole cascade runs again when a re-fit face scores under ``follow_score`` or is lost, and on
    every frame while no face is known. So a face that enters while another is in view is found at
    the next keyframe at the latest; ``keyframe=1`` runs the whole cascade on every frame.
    Call ``reset()`` before each new video.
    """

    def __init__(self, thresholds=(0.6, 0.7, 0.7), min_face: int = 32, detect_size: int = 640,
                 device: str = "cpu", batch_size: int = 16, keyframe: int = 1, follow_score: float = 0.9):
        self.cascade = Cascade(thresholds, device=device)
        self.min_face, self.detect_size, self.batch_size = min_face, detect_size, batch_size
        self.keyframe, self.follow_score = max(1, int(keyframe)), float(follow_score)
        self.device = torch.device(device)
        self.reset()

    @classmethod
    def from_config(cls, cfg) -> FaceDetector:
        """The detector the faces stage's config (``configs/faces.yaml``) describes."""
        return cls(cfg.thresholds, cfg.min_face, cfg.detect_size, cfg.device, cfg.batch_size, cfg.keyframe,
                   cfg.follow_score)

    def reset(self) -> None:
        """Forget the previous video: the next frame is a keyframe. ``full`` counts the frames that
        ran the whole cascade since."""
        self._prior, self._anchor = Detections.empty(), Anchor.of(Detections.empty())
        self._seen = self.full = 0

    def __call__(self, frames: np.ndarray, full: tuple[int, int] | None = None) -> list[Detections]:
        """frames (t, h, w, 3) uint8 RGB, consecutive kept frames of one video -> per frame its faces.

        ``full`` is the (h, w) of the video's own frames when ``frames`` were already shrunk from it
        (for instance while decoding); results are in its pixels.
        """
        t, h, w, _ = frames.shape
        full_h, full_w = full or (h, w)
        size = shrunk((h, w), self.detect_size)
        sy, sx = size[0] / full_h, size[1] / full_w
        # the pyramid starts at 12 px faces: a smaller minimum would only upsample
        min_face = max(12.0, self.min_face * min(sx, sy))
        out: list[Detections] = []
        for s in range(0, t, self.batch_size):
            x = rearrange(torch.from_numpy(frames[s : s + self.batch_size]), "b h w c -> b c h w").to(self.device)
            if size != (h, w):
                x = resize(x, list(size), antialias=True)
            out += self._batch(x, min_face)
        return [self._to_frame(d, sx, sy) for d in out]

    def _batch(self, x: torch.Tensor, min_face: float) -> list[Detections]:
        n, first = len(x), self._seen
        self._seen += n
        key = [k for k in range(n) if (first + k) % self.keyframe == 0]
        whole = dict(zip(key, self.cascade.detect(x[key], min_face), strict=True)) if key else {}
        self.full += len(key)
        out = []
        for k in range(n):
            if k in whole:
                self._prior, self._anchor = whole[k], Anchor.of(whole[k])
            elif not len(self._prior) or not self._follow(x[k]):
                # nobody to follow, so a face may enter at any time; or a followed face was lost
                self.full += 1
                self._prior = self.cascade.detect(x[k : k + 1], min_face)[0]
                self._anchor = Anchor.of(self._prior)
            out.append(self._prior)
        return out

    def _follow(self, x: torch.Tensor) -> bool:
        """Re-fit the previous frame's faces in ``x``; False if any was lost or two became one."""
        got, ok = self.cascade.refit(x, self._anchor.squares(self._prior.landmarks))
        if not ok.all() or got.score.min() < self.follow_score:
            return False
        if len(got) > 1 and iou(got.box, got.box)[np.triu_indices(len(got), 1)].max() >= 0.5:
            return False
        self._prior = got  # every face kept its place, so the anchors stand
        return True

    def _to_frame(self, d: Detections, sx: float, sy: float) -> Detections:
        if not len(d):
            return d
        # pixel centres at integers: x_full = (x_small + 0.5) / s - 0.5
        box = (d.box + 0.5) / np.array([sx, sy, sx, sy], np.float32) - 0.5
        pts = (d.landmarks + 0.5) / np.array([sx, sy], np.float32) - 0.5
        keep = np.minimum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]) >= self.min_face
        return Detections(box[keep], d.score[keep], pts[keep])
