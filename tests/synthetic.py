"""Small learnable data written in the project's on-disk layouts, for stage tests."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pipeline.labels import AUS, EXPRESSIONS, Labels

TASK_FILES = {
    "va": ("VA_Estimation_Challenge", "valence,arousal"),
    "expr": ("EXPR_Recognition_Challenge", ",".join(EXPRESSIONS)),
    "au": ("AU_Detection_Challenge", ",".join(AUS)),
}


def write_cache(path: Path, videos: dict[str, tuple[np.ndarray, np.ndarray]], frame_step: int = 1) -> Path:
    """A feature cache in the features stage's layout: one group per video."""
    dim = next(iter(videos.values()))[0].shape[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update(extractor=path.stem, dim=dim, config_hash="synthetic", complete=True)
        for name, (feats, present) in videos.items():
            g = f.create_group(name)
            g["features"] = feats.astype(np.float16)
            g["present"] = present
            g["frame"] = np.arange(len(feats), dtype=np.int64) * frame_step
    return path


def write_annotations(root: Path, split: str, labels: dict[str, Labels]) -> None:
    """Per-task ABAW annotation files (``Train_Set`` / ``Validation_Set``)."""
    folder = {"train": "Train_Set", "val": "Validation_Set"}[split]
    for video, lab in labels.items():
        rows = {
            "va": [f"{v:.4f},{a:.4f}" for v, a in lab.va],
            "expr": [str(e) for e in lab.expr],
            "au": [",".join(map(str, r)) for r in lab.au],
        }
        for task, (task_dir, header) in TASK_FILES.items():
            path = root / task_dir / folder / f"{video}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join([header, *rows[task]]) + "\n")


def learnable_set(root: Path, name: str = "syn", videos: int = 6, frames: int = 96, dim: int = 24,
                  seed: int = 0) -> dict[str, Path]:
    """Features whose slow latent factors decide every label, split 4:2 into train and val.

    Returns the paths: ``runs`` (runs folder), ``annotations`` and ``cache``.
    """
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(8, dim))
    feats, labels = {}, {}
    for v in range(videos):
        # Piecewise-constant latent states, one of each expression per video.
        order = rng.permutation(8)
        z = np.repeat(np.eye(8)[order], int(np.ceil(frames / 8)), axis=0)[:frames]
        present = np.ones(frames, bool)
        present[rng.integers(0, frames, 3)] = False
        feats[f"v{v}"] = (z @ mix + 0.3 * rng.normal(size=(frames, dim)), present)
        expr = z.argmax(1)
        va = np.stack([np.linspace(-0.9, 0.9, 8)[expr], np.linspace(0.8, -0.8, 8)[expr]], 1)
        au = (np.arange(12)[None, :] % 8 == expr[:, None]) | (np.arange(12)[None, :] == (expr[:, None] + 4))
        lab = Labels(va, expr, au.astype(int))
        lab.expr[: frames // 10] = -1  # some frames unlabelled
        labels[f"v{v}"] = lab
    runs = root / "runs"
    cache = write_cache(runs / name / "features" / "syn.h5", feats)
    names = sorted(labels)
    write_annotations(root / "annotations", "train", {k: labels[k] for k in names[:4]})
    write_annotations(root / "annotations", "val", {k: labels[k] for k in names[4:]})
    return {"runs": runs, "annotations": root / "annotations", "cache": cache}


def two_data_sets(root: Path, b_frames: int = 96) -> tuple[Path, list[Path]]:
    """Two learnable data sets under one runs folder: ``syn_a`` labels every task, ``syn_b`` (videos
    of ``b_frames`` frames) action units only. Returns the runs folder and the two data configs."""
    import shutil

    a = learnable_set(root / "a", name="syn_a")
    b = learnable_set(root / "b", name="syn_b", seed=1, frames=b_frames)
    shutil.rmtree(b["annotations"] / "VA_Estimation_Challenge")
    shutil.rmtree(b["annotations"] / "EXPR_Recognition_Challenge")
    shutil.copytree(b["runs"] / "syn_b", a["runs"] / "syn_b")
    configs = []
    for name, paths in (("syn_a", a), ("syn_b", b)):
        configs.append(root / f"{name}.yaml")
        configs[-1].write_text(f"name: {name}\nvideos: none\nannotations: {paths['annotations']}\n"
                               "format: abaw_tasks\ntrain_split: train\nval_split: val\nexpressions: abaw8\n")
    return a["runs"], configs
