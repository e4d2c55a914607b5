"""The prepared GPU check runs on this CPU as a smoke test: the same code, toy sizes."""

from __future__ import annotations

import json

import pytest

from pipeline.bench import gpu
from pipeline.config import load_config


@pytest.mark.slow
def test_bench_gpu_smoke_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    cfg = load_config("bench_gpu", overrides=["device=cpu", "smoke=true", f"work={tmp_path / 'work'}", f"out={out}"])
    assert gpu.main(cfg) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["failed"] == [] and result["smoke"] is True
    assert result["machine"]["device"] == "cpu"

    # faces: one process, then every shard on its own copy; each kept every frame of its video
    frames = round(gpu.SMOKE["faces"]["minutes"] * 60 * gpu.SMOKE["faces"]["fps"])
    runs = result["faces"]["runs"]
    assert [r["processes"] for r in runs.values()] == [1, gpu.SMOKE["faces"]["shards"]]
    assert [r["frames"] for r in runs.values()] == [frames, frames * gpu.SMOKE["faces"]["shards"]]
    assert all(r["frames_with_face"] == r["frames"] for r in runs.values())

    # every extractor at every batch, encoders at every (length, batch)
    want = {f"{x}/{b}" for x in gpu.SMOKE["features"]["extractors"] for b in gpu.SMOKE["features"]["batches"]}
    assert set(result["features"]) == want and all(r["fps"] > 0 for r in result["features"].values())
    e = gpu.SMOKE["encoders"]
    assert len(result["encoders"]) == len(e["names"]) * len(e["lengths"]) * len(e["batches"])

    # on the CPU training does not autocast, so amp on and off are one run, trained once
    t = result["training"]
    assert t["amp"]["precision"] == {"device": "cpu", "autocast": "none"} and t["amp"]["p_mtl"] > 0
    assert t["fp32"]["same_run_as"] == "amp" and t["fp32"]["p_mtl"] == t["amp"]["p_mtl"]
    assert result["dtype"]["gru"] == "float32"

    assert "| faces | 1 process |" in printed and "P_MTL" in printed and "GRU: float32" in printed
