"""Promises of the README that hold across stages: features are never written non-finite and are
recomputed when the extractor's weights change, a changed training setting trains afresh beside the
run it would otherwise resume, early stopping keeps its count, ``best.pt`` is the best epoch, the
VA smoothing is the window that scores best, and torchrun's ranks split the videos."""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from features.base import read_state_dict, sha256_file
from pipeline import checkpoint, features, metrics, splits, train, validation
from pipeline import loop as epoch_loop
from pipeline.bench.features import make_face_files
from pipeline.config import Config, load_config
from pipeline.data import Normaliser
from pipeline.feature_cache import FeatureCache
from pipeline.identity import run_folder, run_identity
from pipeline.inference import predict_features
from pipeline.labels import Labels, load_annotations
from pipeline.runs import stage_lock
from tests.synthetic import learnable_set

TRAIN_FAST = ["encoder.hidden=16", "encoder.layers=1", "window=8", "stride=4", "eval_stride=4", "batch_size=8",
              "lr=0.005", "extractors=[syn]", "deterministic=true", "tune_au_thresholds=false",
              "va_smoothing=[1]"]


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return learnable_set(tmp_path_factory.mktemp("syn"), frames=48)


def train_config(syn: dict[str, Path], *overrides: str) -> Config:
    return load_config("train", overrides=[*TRAIN_FAST, f"runs_dir={syn['runs']}", "data.name=syn",
                                           f"data.annotations={syn['annotations']}", *overrides])


def epochs_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def parts(out: Path, extractor: str = "onet") -> set[str]:
    return {p.stem for p in (out / extractor).glob("*.h5")}


def features_config(faces: Path, out: Path, *overrides: str) -> Config:
    return load_config("features", None, ["extractor=onet", "batch_size=4", f"faces_dir={faces}",
                                          f"out_dir={out}", *overrides])


# ---- features ------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_non_finite_features_fail_their_video_alone_and_are_never_written(tmp_path, monkeypatch, caplog, capsys):
    """A video whose features overflow float16 fails alone, named, with the hint to store float32;
    the other videos are written and no part holds a non-finite value."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "bright_gain.py").write_text(textwrap.dedent('''
        from features import Extractor

        class BrightGain(Extractor):
            """Each channel's mean pixel times 500: above 131 it no longer fits float16."""
            name, input_size, dim, weights_sha256 = "bright_gain", 16, 3, "none"

            def forward(self, x):
                return x.mean(dim=(2, 3)) * 500

        def build():
            return BrightGain()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    faces = tmp_path / "faces"
    for path, level in zip(make_face_files(faces, videos=3, frames=4, absent=0.0, sizes=[16]), (60, 250, 90),
                           strict=True):
        with h5py.File(path, "r+") as f:
            f["crops_16"][...] = level
    out, name = tmp_path / "features", "bright_gain:build"

    with caplog.at_level(logging.ERROR):
        status = features.main(features_config(faces, out, f"extractor={name}"))
    assert status == 1
    (failure,) = map(json.loads, (out / f"{name}.failures.jsonl").read_text().splitlines())
    assert failure["item"] == "synthetic_01"
    assert "non-finite features" in failure["error"] and "try dtype=float32" in failure["error"]
    assert "synthetic_01 failed" in caplog.text
    assert "  failed: synthetic_01: " in capsys.readouterr().out
    assert parts(out, name) == {"synthetic_00", "synthetic_02"}
    for part in (out / name).glob("*.h5"):
        with h5py.File(part) as f:
            assert np.isfinite(f["features"][:]).all()
    assert not list(out.rglob("*.partial"))
    assert FeatureCache([out / f"{name}.h5"]).videos == ["synthetic_00", "synthetic_02"]

    assert features.main(features_config(faces, out, f"extractor={name}", "dtype=float32")) == 0
    assert FeatureCache([out / f"{name}.h5"]).read("synthetic_01")[0][0, 0] == pytest.approx(250 * 500)


def test_new_extractor_weights_recompute_every_part_and_the_same_ones_nothing(tmp_path, caplog):
    """New contents in the same weights file make every part stale and recomputed with the new
    checksum; the unchanged file rewrites nothing."""
    import facenet_pytorch

    faces = tmp_path / "faces"
    make_face_files(faces, videos=2, frames=3, absent=0.0, sizes=[48])
    state = read_state_dict(Path(facenet_pytorch.__file__).parent / "data" / "onet.pt")
    weights = tmp_path / "onet_tuned.pt"
    torch.save(state, weights)
    out = tmp_path / "features"
    cfg = features_config(faces, out, f"extractor.weights={weights}")
    assert features.main(cfg) == 0
    videos = {"synthetic_00", "synthetic_01"}
    assert parts(out) == videos

    def snapshot() -> dict[str, tuple]:
        found = {}
        for video in videos:
            part = out / "onet" / f"{video}.h5"
            with h5py.File(part) as f:
                found[video] = (part.stat().st_ino, part.stat().st_mtime_ns, f.attrs["weights_sha256"],
                                f["features"][:])
        return found

    first = snapshot()
    assert {sha for _, _, sha, _ in first.values()} == {sha256_file(weights)}

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert features.main(cfg) == 0
    again = snapshot()
    assert {v: s[:3] for v, s in again.items()} == {v: s[:3] for v, s in first.items()}
    assert "stale" not in caplog.text

    state["dense5.weight"] = state["dense5.weight"] * 1.5
    torch.save(state, weights)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert features.main(cfg) == 0
    recomputed = snapshot()
    for video in videos:
        assert recomputed[video][0] != first[video][0], f"{video} was not rewritten"
        assert recomputed[video][2] == sha256_file(weights)
        assert not np.array_equal(recomputed[video][3], first[video][3])
        assert f"{video}: stale: made with config" in caplog.text


def test_torchrun_ranks_split_the_videos_each_under_its_own_lock(tmp_path, monkeypatch):
    """RANK / WORLD_SIZE split the videos into disjoint shards that cover them all; each rank locks
    ``.lock.<i>of<n>``, so ranks work side by side and a second copy of one is refused; ``shard=``
    wins over the environment."""
    faces = tmp_path / "faces"
    make_face_files(faces, videos=5, frames=2, absent=0.0, sizes=[48])
    monkeypatch.setenv("WORLD_SIZE", "2")
    shards = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        out = tmp_path / f"rank{rank}"
        with stage_lock(out, f"{1 - rank}/2"):  # the other rank at work on the same folder
            assert features.main(features_config(faces, out)) == 0
        shards[rank] = parts(out)
        assert (out / f".lock.{rank}of2").is_file() and not (out / ".lock").exists()
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert shards[0] | shards[1] == {f"synthetic_{v:02d}" for v in range(5)}

    monkeypatch.setenv("RANK", "0")
    with stage_lock(tmp_path / "rank0", "0/2"):
        assert features.main(features_config(faces, tmp_path / "rank0")) == 2
    assert features.main(features_config(faces, tmp_path / "given", "shard=1/2")) == 0
    assert parts(tmp_path / "given") == shards[1]


# ---- training ------------------------------------------------------------------------------------

def test_a_changed_setting_trains_afresh_beside_an_interrupted_run_which_then_resumes(syn, caplog):
    """With another ``lr`` the run gets its own ``<name>-<hash>`` folder and trains from epoch 0,
    leaving the interrupted run's files as they were; the first settings again resume that run."""
    first_cfg = train_config(syn, "name=fresh", "epochs=3", "patience=0")
    assert train.main(first_cfg) == 0
    first = run_folder(first_cfg)
    identity = json.loads((first / "scores.json").read_text())["identity"]
    (first / "scores.json").unlink()  # as if killed while scoring its last epoch
    (first / "run.json").write_text(json.dumps({"identity": identity, "finished": False}))
    kept = {name: sha256_file(first / name) for name in ("best.pt", "last.pt", "metrics.jsonl", "config.yaml")}

    other_cfg = train_config(syn, "name=fresh", "epochs=3", "patience=0", "lr=0.002")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert train.main(other_cfg) == 0
    other = run_folder(other_cfg)
    other_identity = run_identity(other_cfg, splits.open_features(other_cfg))
    assert other != first and other.name == f"fresh-{other_identity[:8]}"
    assert "resuming from" not in caplog.text
    assert [h["epoch"] for h in epochs_of(other)] == [0, 1, 2]
    assert checkpoint.read(other / "best.pt").recipe.identity == other_identity
    assert {name: sha256_file(first / name) for name in kept} == kept and not (first / "scores.json").exists()

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert train.main(first_cfg) == 0
    assert f"resuming from {first / 'last.pt'} at epoch 3" in caplog.text
    assert json.loads((first / "scores.json").read_text())["identity"] == identity


SCRIPTS = {
    # best at epoch 2; epoch 4 only equals it; three epochs without a better score stop the run
    "plateau": ([0.1, 0.5, 0.9, 0.8, 0.9, 0.7, 2.0, 2.1, 2.2, 2.3], 6, 2),
    # never three epochs in a row without a better score: every epoch runs
    "sawtooth": ([0.1, 0.5, 0.4, 0.4, 0.6, 0.5, 0.5, 0.7, 0.6, 0.8], 10, 9),
}


@pytest.mark.parametrize(("script", "ran", "best"), SCRIPTS.values(), ids=SCRIPTS)
def test_early_stopping_ends_patience_epochs_after_the_best(syn, tmp_path, monkeypatch, caplog, script, ran, best):
    """With ``patience=k`` training stops once k epochs in a row brought no better validation score
    than the best: ``metrics.jsonl`` then ends k epochs after the best epoch, which ``best.pt`` holds."""
    scores = iter(script)
    monkeypatch.setattr(epoch_loop, "selection_score", lambda *_: next(scores))
    with caplog.at_level(logging.INFO):
        assert train.main(train_config(syn, "epochs=10", "patience=3", f"out_dir={tmp_path}")) == 0
    assert [h["epoch"] for h in epochs_of(tmp_path)] == list(range(ran))
    stopped = "no better validation score for 3 epochs: stopping early" in caplog.text
    assert stopped == (ran < 10)
    assert checkpoint.read(tmp_path / "best.pt").resume.epoch == best
    assert json.loads((tmp_path / "scores.json").read_text())["epoch"] == best


def rescore(path: Path, syn: dict[str, Path]) -> float:
    """Validation P_MTL of a checkpoint's own weights, computed apart from the training loop."""
    model, ckpt = checkpoint.load(path)
    cache, norm = FeatureCache([syn["cache"]]), Normaliser.from_state(ckpt.inference.normaliser)
    labels = load_annotations(syn["annotations"], "val")
    preds = {}
    for video in labels:
        feats, present, frames = cache.read(video)
        preds[video] = {"frame": frames,
                        **predict_features(model, feats, present, norm, ckpt.inference.window,
                                           ckpt.inference.eval_stride)}
    prior = metrics.prior_from_labels(load_annotations(syn["annotations"], "train"))
    return metrics.score_videos(preds, labels, prior=prior)["p_mtl"]


def test_best_checkpoint_holds_the_epoch_with_the_best_validation_score(syn, tmp_path):
    """``best.pt`` is the epoch of ``metrics.jsonl`` with the highest validation P_MTL (the first of
    equals), with that epoch's weights: re-scored alone, it gives that line's score."""
    assert train.main(train_config(syn, "epochs=30", "patience=2", "lr=0.02", f"out_dir={tmp_path}")) == 0
    history = epochs_of(tmp_path)
    p_mtl = [h["val"]["p_mtl"] for h in history]
    best = int(np.argmax(p_mtl))
    assert len(history) == best + 3 < 30, "the run did not stop early: its best epoch would be its last"
    assert checkpoint.read(tmp_path / "best.pt").resume.epoch == best
    assert rescore(tmp_path / "best.pt", syn) == pytest.approx(p_mtl[best], abs=1e-6)
    assert rescore(tmp_path / "last.pt", syn) == pytest.approx(p_mtl[-1], abs=1e-6)
    assert p_mtl[-1] != pytest.approx(p_mtl[best], abs=1e-6)
    assert json.loads((tmp_path / "scores.json").read_text())["p_mtl"] == pytest.approx(p_mtl[best], abs=1e-6)


# ---- VA smoothing --------------------------------------------------------------------------------

def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    half = window // 2
    return np.convolve(np.pad(x, half, mode="edge"), np.ones(2 * half + 1) / (2 * half + 1), mode="valid")


def concordance(p: np.ndarray, t: np.ndarray) -> float:
    return 2 * np.cov(p, t, bias=True)[0, 1] / (p.var() + t.var() + (p.mean() - t.mean()) ** 2)


def smooth_truth(seed: int, n: int = 240) -> np.ndarray:
    """(n, 2) valence and arousal: slow waves inside [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    return 0.7 * np.sin(2 * np.pi * t / rng.uniform(60, 120, 2) + rng.uniform(0, 6, 2))


def smoothing_case(noise: tuple[float, float]) -> tuple[dict, dict]:
    """Two validation videos' labels and predictions: the truth plus noise of (valence, arousal) std."""
    labels, preds = {}, {}
    for k in range(2):
        va = smooth_truth(k)
        n = len(va)
        labels[f"v{k}"] = Labels(va, np.full(n, -1), np.full((n, 12), -1))
        noisy = va + np.random.default_rng(10 + k).normal(size=va.shape) * np.asarray(noise)
        preds[f"v{k}"] = {"frame": np.arange(n), "va": np.clip(noisy, -1, 1)}
    return labels, preds


def best_windows(labels: dict, preds: dict, windows: list[int]) -> tuple[int, int, int]:
    """The window of highest pooled P_VA, of highest CCC-V and of highest CCC-A (the smallest of equals)."""
    truth = np.concatenate([lab.va for lab in labels.values()])

    def scores(w: int) -> tuple[float, float]:
        smoothed = np.concatenate([np.stack([moving_average(p["va"][:, j], w) for j in (0, 1)], 1)
                                   for p in preds.values()])
        return tuple(round(concordance(smoothed[:, j], truth[:, j]), 6) for j in (0, 1))

    tried = {w: scores(w) for w in sorted(windows)}

    def pick(value: Callable[[tuple[float, float]], float]) -> int:
        return max(tried, key=lambda w: (value(tried[w]), -w))

    return pick(lambda s: round((s[0] + s[1]) / 2, 6)), pick(lambda s: s[0]), pick(lambda s: s[1])


WINDOWS = [1, 3, 5, 9, 15, 25, 61]


NOISE = {"noisy": (0.3, 0.3), "clean": (0.0, 0.0), "noisy valence": (0.4, 0.0), "noisy arousal": (0.0, 0.4)}


@pytest.mark.parametrize("noise", NOISE.values(), ids=NOISE)
def test_va_smoothing_is_the_window_with_the_best_validation_ccc(noise):
    """The stored window is the configured one whose moving average scores the highest P_VA, both
    dimensions together: more than one frame for a noisy prediction of a smooth signal, one frame
    for an exact one."""
    labels, preds = smoothing_case(noise)
    chosen, p_va = validation.choose_va_smoothing(preds, labels, WINDOWS)
    expected, _, _ = best_windows(labels, preds, WINDOWS)
    assert chosen == expected
    assert (chosen > 1) == (max(noise) > 0)
    smoothed = {v: {**p, "va": np.stack([moving_average(p["va"][:, j], chosen) for j in (0, 1)], 1)}
                for v, p in preds.items()}
    assert p_va == pytest.approx(metrics.score_videos(smoothed, labels)["p_va"], abs=1e-9)


def test_va_smoothing_per_dimension_picks_each_dimensions_own_window():
    """With ``va_smoothing_per_dimension`` a noisy valence gets a wide window and a clean arousal one frame."""
    labels, preds = smoothing_case((0.3, 0.0))
    chosen, _ = validation.choose_va_smoothing(preds, labels, WINDOWS, per_dimension=True)
    _, valence, arousal = best_windows(labels, preds, WINDOWS)
    assert chosen == [valence, arousal] and valence > 1 and arousal == 1
