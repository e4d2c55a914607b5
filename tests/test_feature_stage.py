"""The features stage on tiny synthetic face files, and the cache reader on its output."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from features import build_extractor
from pipeline.config import CONFIG_DIR, InputError, load_config
from pipeline.feature_cache import FeatureCache
from pipeline.features import FaceFile, main

PRESENT = {"clip_a": [1, 1, 0, 1, 0, 0, 1], "clip_b": [0, 1, 1, 1, 1]}


def write_face_file(path: Path, present: list[int], sizes=(112,), seed: int = 0,
                    chash: str = "faces-v1") -> None:
    """A face-stage file as the conventions describe it (only what the features stage reads, plus a bit)."""
    rng = np.random.default_rng(seed)
    n, mask = len(present), np.array(present, bool)
    with h5py.File(path, "w") as f:
        f["frame"] = np.arange(n, dtype=np.int64) * 2  # stride 2: frame numbers are not row numbers
        f["timestamp"] = f["frame"][:] / 30.0
        f["present"] = mask
        f["box"] = np.where(mask[:, None], 10.0, np.nan).astype(np.float32) * np.ones((n, 4), np.float32)
        for s in sizes:
            crops = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8) * mask[:, None, None, None]
            f.create_dataset(f"crops_{s}", data=crops, chunks=(1, s, s, 3), compression="gzip")
        f.attrs.update({"video": str(path.with_suffix(".mp4")), "fps": 30.0, "n_frames": 2 * n, "stride": 2,
                        "config_hash": chash})
        f.attrs["complete"] = True


@pytest.fixture
def faces(tmp_path: Path) -> Path:
    folder = tmp_path / "faces"
    folder.mkdir()
    for i, (video, present) in enumerate(PRESENT.items()):
        write_face_file(folder / f"{video}.h5", present, sizes=(112, 224) if i else (112,), seed=i)
    return folder


@pytest.fixture
def run(tmp_path: Path, faces: Path):
    """``run(key=value, ...)`` -> (exit status, cache path) using configs/features.yaml."""
    cfg = yaml.safe_load((CONFIG_DIR / "features.yaml").read_text())
    cfg["data"] = {"name": "synth"}  # inline, so the test does not depend on a data set YAML
    path = tmp_path / "features.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"

    def go(*overrides: str) -> tuple[int, Path]:
        base = [f"faces_dir={faces}", f"out_dir={out}", "batch_size=2"]
        c = load_config("features", path, [*base, *overrides])
        return main(c), out / f"{c.extractor.name}.h5"

    return go


def test_stage_writes_a_cache_the_reader_reads_back(run, faces):
    status, cache_path = run()
    assert status == 0
    with h5py.File(cache_path) as f:
        assert isinstance(f.get("clip_a", getlink=True), h5py.ExternalLink)  # parts linked, not copied
    assert (cache_path.parent / "onet.yaml").is_file()

    cache = FeatureCache([cache_path])
    assert cache.videos == ["clip_a", "clip_b"] and cache.dim == 256
    attrs = cache.attrs[0]
    assert attrs["extractor"] == "onet" and attrs["preprocessing"]["input_size"] == 48
    assert len(attrs["weights_sha256"]) == 64

    onet = build_extractor("onet")
    for video, present in PRESENT.items():
        feats, mask, frame = cache.read(video)
        assert feats.dtype == np.float32 and feats.shape == (len(present), 256)
        np.testing.assert_array_equal(mask, np.array(present, bool))
        np.testing.assert_array_equal(frame, np.arange(len(present)) * 2)
        assert not feats[~mask].any()  # no face: zero features
        with h5py.File(faces / f"{video}.h5") as f:
            crops = torch.from_numpy(f["crops_112"][:][mask])  # 48-pixel input: the smallest crops above it
        with torch.inference_mode():
            expected = onet(onet.preprocess(crops)).numpy()
        np.testing.assert_allclose(feats[mask], expected, rtol=2e-3, atol=2e-3)  # stored as float16

    whole = cache.read("clip_a")
    window = cache.read("clip_a", 2, 5)
    for a, b in zip(window, whole, strict=True):
        np.testing.assert_array_equal(a, b[2:5])
    assert cache.length("clip_b") == 5


def test_picks_matching_crops_else_the_largest(faces):
    assert FaceFile(faces / "clip_b.h5", 224, 4).key == "crops_224"
    assert FaceFile(faces / "clip_b.h5", 112, 4).key == "crops_112"
    assert FaceFile(faces / "clip_b.h5", 48, 4).key == "crops_112"  # the smallest not resized up
    assert FaceFile(faces / "clip_b.h5", 160, 4).key == "crops_224"


def test_crops_smaller_than_the_extractor_needs_are_named_once_with_the_sizes_to_write(faces, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        for _ in range(2):
            assert FaceFile(faces / "clip_a.h5", 256, 4).key == "crops_112"
            assert FaceFile(faces / "clip_b.h5", 256, 4).key == "crops_224"
            assert FaceFile(faces / "clip_a.h5", 112, 4).key == "crops_112"
    said = [r.getMessage() for r in caplog.records if "resized up" in r.getMessage()]
    assert len(said) == 1 and "no 256-pixel crops, the largest are 112" in said[0] and "extractors=[" in said[0]


def test_features_from_crops_resized_up_are_redone_once_the_faces_stage_writes_the_size(run, faces):
    """The faces stage gives a finished file a crop size without changing its settings hash; a part
    computed from the smaller crops resized up must still be redone from the new ones."""
    assert run("extractor=vit_tiny", "extractor.random_init=true")[0] == 0
    part = faces.parent / "out" / "vit_tiny" / "clip_a.h5"
    first = part.stat().st_mtime_ns
    with h5py.File(faces / "clip_a.h5", "a") as f:  # as faces.add_sizes leaves it: same hash, one more size
        crops = np.random.default_rng(5).integers(0, 256, (len(f["present"]), 224, 224, 3), dtype=np.uint8)
        f.create_dataset("crops_224", data=crops, chunks=(1, 224, 224, 3))
    status, cache_path = run("extractor=vit_tiny", "extractor.random_init=true")
    assert status == 0 and part.stat().st_mtime_ns != first
    with h5py.File(cache_path) as f:
        assert f["clip_a"].attrs["source_config_hash"] == "faces-v1 crops_224"
    onet_part = faces.parent / "out" / "onet" / "clip_a.h5"
    assert run()[0] == 0
    kept = onet_part.stat().st_mtime_ns
    with h5py.File(faces / "clip_a.h5", "a") as f:  # a size it does not read leaves its parts alone
        f.create_dataset("crops_160", data=np.zeros((len(f["present"]), 160, 160, 3), np.uint8))
    assert run()[0] == 0 and onet_part.stat().st_mtime_ns == kept  # onet still reads the 112-pixel crops


def test_rerun_resumes_and_config_change_is_stale(run, faces, caplog):
    run()
    part = faces.parent / "out" / "onet" / "clip_a.h5"
    first = part.stat().st_mtime_ns
    assert run()[0] == 0
    assert part.stat().st_mtime_ns == first  # finished videos are skipped

    part.write_bytes(part.read_bytes()[:100])  # as if killed mid-write without the atomic rename
    status, cache_path = run()
    assert status == 0 and FeatureCache([cache_path]).read("clip_a")[0].shape == (7, 256)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        status, cache_path = run("dtype=float32")
    assert status == 0
    assert sum("stale" in r.getMessage() for r in caplog.records) == 2
    with h5py.File(cache_path) as f:
        assert f["clip_a/features"].dtype == np.float32 and f.attrs["dtype"] == "float32"

    write_face_file(faces / "clip_b.h5", PRESENT["clip_b"], seed=7, chash="faces-v2")  # face stage re-ran
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run("dtype=float32")
    assert [r.getMessage() for r in caplog.records if "stale" in r.getMessage()] == \
        ["clip_b: stale: its face file was re-made; recomputing"]


def test_a_bad_face_file_fails_alone(run, faces):
    (faces / "broken.h5").write_bytes(b"not hdf5")
    status, cache_path = run()
    assert status == 1
    lines = (cache_path.parent / "onet.failures.jsonl").read_text().splitlines()
    failures = [json.loads(line) for line in lines]
    assert [f["item"] for f in failures] == ["broken"] and "broken.h5" in failures[0]["error"]
    assert FeatureCache([cache_path]).videos == ["clip_a", "clip_b"]


def test_shards_split_the_videos_and_the_last_links_all(run):
    status, cache_path = run("shard=0/2")
    assert status == 0 and FeatureCache([cache_path]).videos == ["clip_a"]
    run("shard=1/2")
    assert FeatureCache([cache_path]).videos == ["clip_a", "clip_b"]


def test_random_init_is_refused_unless_asked_and_then_loud(run, caplog):
    with pytest.raises(InputError, match="random_init=true"):  # one error line on the command line
        run("extractor=iresnet18")
    with caplog.at_level(logging.WARNING):
        status, cache_path = run("extractor=iresnet18", "extractor.random_init=true", "dtype=float32")
    assert status == 0
    assert any("RANDOM weights" in r.getMessage() for r in caplog.records)
    assert FeatureCache([cache_path]).attrs[0]["weights_sha256"].startswith("random-init")


def test_plugin_extractor_runs_end_to_end_and_fuses(run, tmp_path, monkeypatch):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "colour_stats.py").write_text(textwrap.dedent('''
        import torch
        from features import Extractor

        class ColourStats(Extractor):
            """Mean and standard deviation of each channel: a 6-d weight-free feature."""
            name, input_size, dim, weights_sha256 = "colour_stats", 32, 6, "none"

            def forward(self, x):
                return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

        def build():
            return ColourStats()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    status, plug_cache = run("extractor=colour_stats:build")
    assert status == 0
    status, onet_cache = run()

    fused = FeatureCache([onet_cache, plug_cache])
    assert fused.dim == 256 + 6 and fused.videos == ["clip_a", "clip_b"]
    feats, present, _ = fused.read("clip_b")
    alone = FeatureCache([plug_cache]).read("clip_b")[0]
    np.testing.assert_array_equal(feats[:, 256:], alone)
    np.testing.assert_array_equal(present, np.array(PRESENT["clip_b"], bool))
    assert np.abs(alone[present, :3] - 127).max() < 5  # uniform random pixels average about 127.5


def test_abaw_cropped_aligned_folders(run, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "cropped_aligned"
    for video, numbers in {"10-60-1280x720": [1, 2, 4], "video7": [3]}.items():
        (root / video).mkdir(parents=True)
        for k in numbers:
            pixels = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / video / f"{k:05d}.jpg")
    status, cache_path = run(f"faces_dir={root}", "num_workers=1")
    assert status == 0
    cache = FeatureCache([cache_path])
    feats, present, frame = cache.read("10-60-1280x720")
    np.testing.assert_array_equal(present, [True, True, False, True])  # 00003.jpg missing: no face
    np.testing.assert_array_equal(frame, [0, 1, 2, 3])
    assert not feats[2].any() and feats[present].any(axis=1).all()
    assert cache.read("video7")[1].tolist() == [False, False, True]


def test_reader_survives_pickling_for_workers(run):
    import pickle

    _, cache_path = run()
    cache = FeatureCache([cache_path])
    cache.read("clip_a")
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone.read("clip_a", 1, 3)[0], cache.read("clip_a", 1, 3)[0])


def test_runs_dir_roots_the_default_folders():
    """What ``make features RUNS=...`` passes: the inputs and outputs follow ``runs_dir``."""
    from pipeline.features import resolve

    cfg = resolve(load_config("features", None, ["data=sample", "runs_dir=/scratch/runs"]))
    assert (cfg.faces_dir, cfg.out_dir) == ("/scratch/runs/sample/faces", "/scratch/runs/sample/features")
