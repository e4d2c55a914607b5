"""The whole-pipeline benchmark: a tiny real run on a real clip, stage benchmarks folded in, bad input."""

from __future__ import annotations

import json
import math

import decord
import pytest

from pipeline.bench import pipeline as bench_pipeline
from pipeline.config import ConfigError, load_config


def tiny(tmp_path, videos, **extra) -> list[str]:
    """One short clip, few frames, one small extractor, one encoder, one timed call each."""
    settings = {"videos": videos, "frames": 6, "extractors": "[onet]", "encoders": "[gru]", "window": 8,
                "train_batch": 2, "warmup": 0, "repeats": 1, "threads": 1, "projection.extractor": "onet",
                "projection.encoder": "gru", "projection.epochs": 3, "projection.stride": 4,
                "output": tmp_path / "out" / "pipeline.json",
                "stage_benchmarks.faces": "", "stage_benchmarks.features": "", "stage_benchmarks.encoders": ""}
    return [f"{k}={v}" for k, v in {**settings, **extra}.items()]


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.real_video
def test_tiny_run_writes_finite_rates_and_names_the_bounding_stage(tmp_path, pyfeat_clips, capsys):
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "single_face.mp4").symlink_to(pyfeat_clips / "single_face.mp4")
    (clips / "broken.mp4").write_bytes(b"not a video at all" * 100)
    # the stage benchmarks' layouts (bench_features, bench_faces); a file of another layout is left out
    (tmp_path / "features.json").write_text(json.dumps({"results": [{"extractor": "onet", "stage_fps": 321.0}]}))
    (tmp_path / "faces.json").write_text(json.dumps({"config": {"fps": 30}, "speed": {"stage_fps": 7.25}}))
    (tmp_path / "encoders.json").write_text(json.dumps({"encoders": {"gru": {"speed": [{"length": 64}]}}}))
    cfg = load_config("bench_pipeline", overrides=tiny(
        tmp_path, clips, **{"stage_benchmarks.features": tmp_path / "features.json",
                            "stage_benchmarks.faces": tmp_path / "faces.json",
                            "stage_benchmarks.encoders": tmp_path / "encoders.json"}))
    assert bench_pipeline.main(cfg) == 0

    result = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    # the broken file is reported by name and costs nothing else
    [bad] = result["unreadable_clips"]
    assert bad["video"].endswith("broken.mp4") and "broken.mp4" in bad["error"]
    [clip] = result["clips"]
    assert clip["frames_used"] == min(6, len(decord.VideoReader(str(pyfeat_clips / "single_face.mp4"))))

    faces = result["faces"]
    assert faces["decode"]["frames"] == faces["detect"]["frames"] == clip["frames_used"]
    assert 0 < faces["align"]["frames"] == faces["detect"]["frames_with_face"] <= clip["frames_used"]
    rates = [faces[s]["fps"] for s in ("decode", "detect", "align")]
    rates += [result["extractors"]["onet"]["fps"], result["encoders"]["gru"]["fps"]]
    assert all(_positive(r) for r in rates), rates
    assert result["extractors"]["onet"]["dim"] == 256 == result["encoders"]["gru"]["d_in"]
    assert result["encoders"]["gru"]["frames"] == 8 * 2

    proj = result["projection"]
    assert proj["frames"] == 2_800_000 and proj["epochs"] == 3
    assert set(proj["seconds"]) == set(bench_pipeline.STAGES)
    assert all(_positive(s) for s in proj["seconds"].values())
    assert proj["total_s"] == pytest.approx(sum(proj["seconds"].values()))
    assert proj["bounding_stage"] == max(proj["seconds"], key=proj["seconds"].get)
    assert proj["seconds"]["features"] == pytest.approx(2_800_000 / result["extractors"]["onet"]["fps"])
    # windows of 8 every 4 frames: each frame is trained on twice an epoch
    assert proj["passes_per_epoch"] == 2
    assert proj["seconds"]["train"] == pytest.approx(3 * 2 * 2_800_000 / result["encoders"]["gru"]["fps"])

    assert result["stage_benchmarks"]["features"]["rates"] == {"onet": 321.0}
    assert result["stage_benchmarks"]["faces"]["rates"] == {"stage": 7.25}
    assert "encoders" not in result["stage_benchmarks"]  # no cell at this window
    out = capsys.readouterr().out
    assert f"Bounded by **{proj['bounding_stage']}**" in out
    assert "| 321 |" in out and "| 7.25 |" in out  # the stages' own rates beside this run's


@pytest.mark.real_video
def test_clips_without_faces_fail_with_a_clear_error(tmp_path, pyfeat_clips):
    cfg = load_config("bench_pipeline", overrides=tiny(tmp_path, pyfeat_clips / "no_face.mp4", frames=2))
    with pytest.raises(ValueError, match="no face found"):
        bench_pipeline.main(cfg)


def test_projection_must_name_a_benchmarked_extractor(tmp_path):
    cfg = load_config("bench_pipeline", overrides=tiny(tmp_path, "unused", **{"projection.extractor": "iresnet50"}))
    with pytest.raises(ConfigError, match="projection.extractor=iresnet50"):
        bench_pipeline.main(cfg)
    assert not (tmp_path / "out").exists()


def test_every_benchmark_reads_the_others_through_one_reader(tmp_path):
    """``make bench`` times lengths 32, 128 and 512; bench-pipeline's window is 64: the nearest
    measured length stands in, and says which it was."""
    from pipeline.bench import read_rates

    cells = [{"length": t, "train_frames_s": 1000.0 / t} for t in (32, 128, 512)]
    (tmp_path / "encoders-sample.json").write_text(json.dumps(
        {"encoders": {"gru": {"speed": cells}, "tcn": {"speed": [{"length": 64, "error": "out of memory"}]}}}))
    read = read_rates("encoders", tmp_path / "encoders-sample.json", window=64)
    assert read["rates"] == {"gru": 1000.0 / 32} and read["lengths"] == {"gru": 32}
    assert read_rates("encoders", tmp_path / "encoders-sample.json", window=512)["lengths"] == {"gru": 512}
    assert read_rates("encoders", tmp_path / "missing.json") == {}
    (tmp_path / "bad.json").write_text("{not json")
    assert read_rates("faces", tmp_path / "bad.json") == {}
