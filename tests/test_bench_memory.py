"""The memory benchmark end to end on tiny generated videos, and how it reports what goes wrong."""

from __future__ import annotations

import json

import av
import pytest

from pipeline.bench import memory as bench_memory
from pipeline.config import ConfigError, load_config


def frames_in(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.mark.slow
def test_tiny_run_measures_both_stages_on_both_lengths(tmp_path, capsys):
    out, videos = tmp_path / "memory.json", tmp_path / "videos"
    # a limit of 1 MB no process can keep: every run must be measured, flagged, and fail the exit status
    cfg = load_config("bench_memory", None, ["minutes=[0.05, 0.1]", "stride=4", f"cache={videos}", f"out={out}",
                                            "limit_mb=1"])
    assert bench_memory.main(cfg) == 1

    result = json.loads(out.read_text())
    runs = {(r["stage"], r["minutes"]): r for r in result["runs"]}
    assert set(runs) == {(s, m) for s in ("faces", "features") for m in (0.05, 0.1)}
    for (_, minutes), r in runs.items():
        assert "error" not in r, r
        assert 0 < r["baseline_mb"] <= r["peak_rss_mb"], r
        assert r["within_limit"] is False
        video = videos / f"astronaut_{minutes:g}min_1280x720_30fps.mp4"
        assert r["frames"] == -(-frames_in(video) // 4), r  # every 4th frame, the first included
        assert r["faces"] == r["frames"], r  # the generated video shows a face in every frame
    assert set(result["ratios"]) == {"faces", "features"}
    assert all(q["peak"] > 0 for q in result["ratios"].values())
    assert result["machine"]["cores"] >= 1
    table = capsys.readouterr().out
    assert "| faces | 0.1 min |" in table and "| NO |" in table


@pytest.mark.slow
def test_unreadable_video_is_reported_and_skips_its_features(tmp_path, capsys):
    videos, out = tmp_path / "videos", tmp_path / "memory.json"
    videos.mkdir()
    # a cached video is reused as it is, so a broken one reaches the faces stage
    (videos / "astronaut_0.05min_1280x720_30fps.mp4").write_bytes(b"not a video at all")
    cfg = load_config("bench_memory", None, ["minutes=[0.05]", f"cache={videos}", f"out={out}"])
    assert bench_memory.main(cfg) == 1
    faces, features = json.loads(out.read_text())["runs"]
    assert "astronaut_0.05min" in faces["error"] and "stage exited with 1" in faces["error"]
    assert features["error"] == "skipped: the faces stage failed"
    assert "failed:" in capsys.readouterr().out


@pytest.mark.parametrize("override", ["minutes=[]", "minutes=[0, 1]", "stride=0", "faces=[detect_sise=480]",
                                      "features=[batch_size=big]"])
def test_bad_settings_are_refused_before_any_work(tmp_path, override):
    cfg = load_config("bench_memory", None, [override, f"cache={tmp_path}", f"out={tmp_path / 'm.json'}"])
    with pytest.raises(ConfigError):
        bench_memory.main(cfg)
    assert list(tmp_path.iterdir()) == []


def test_quick_uses_the_smoke_lengths():
    assert bench_memory.check(load_config("bench_memory", None, ["quick=true"])) == [0.25, 0.5]
