"""The encoder benchmark: timing logic on a fake clock, a tiny real run, and the P_MTL bookkeeping."""

from __future__ import annotations

import json
import math
import statistics

import matplotlib.image
import numpy as np
import pytest

from pipeline.bench import encoders as bench
from pipeline.config import ConfigError, InputError, load_config

TINY = [
    "d_in=16",
    "lengths=[8]",
    "batch_size=2",
    "warmup=1",
    "repeats=1",
    "threads=1",
    "encoder_args={transformer: {hidden: 16, layers: 1, heads: 2}, lstm: {hidden: 8, layers: 1}, "
    "gru: {hidden: 8, layers: 1}}",
]


class FakeClock:
    """A clock that only moves when the timed function runs, by the next scripted duration."""

    def __init__(self, durations: list[float]) -> None:
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def __call__(self) -> float:
        return self.now

    def work(self) -> None:
        self.now += self.durations[self.calls]
        self.calls += 1


def test_time_call_drops_warmup_and_syncs_before_each_reading():
    clock = FakeClock([50.0, 40.0, 3.0, 1.0, 2.0])
    synced = []
    times = bench.time_call(clock.work, warmup=2, repeats=3, sync=lambda: synced.append(clock.calls), clock=clock)
    assert clock.calls == 5
    assert times == [3.0, 1.0, 2.0]  # the slow warm-up calls are not among them
    assert statistics.median(times) == 2.0
    assert synced == [2, 3, 4, 5]  # after warm-up, then after each timed call before the clock is read


def test_time_call_without_warmup_times_every_call():
    clock = FakeClock([5.0, 7.0])
    assert bench.time_call(clock.work, warmup=0, repeats=2, clock=clock) == [5.0, 7.0]


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_tiny_speed_run_writes_json_and_png(tmp_path):
    out = tmp_path / "bench" / "encoders.json"
    cfg = load_config("bench", overrides=[*TINY, "encoders=[transformer, gru]", "skip_scores=true",
                                          f"runs_dir={tmp_path / 'runs'}", f"output={out}"])
    assert bench.main(cfg) == 0

    result = json.loads(out.read_text())
    assert {"cpu", "cores", "torch", "device", "torch_threads", "load_average"} <= set(result["machine"])
    assert result["machine"]["device"] == "cpu"
    assert result["d_in"] == 16 and result["lengths"] == [8]
    assert set(result["encoders"]) == {"transformer", "gru"}
    for name, enc in result["encoders"].items():
        assert enc["config"]["name"] == name
        assert 0 < enc["encoder_params"] < enc["params"]
        [cell] = enc["speed"]
        assert cell["length"] == 8
        for key in ("train_seq_s", "train_frames_s", "infer_seq_s", "infer_frames_s"):
            assert _positive(cell[key]), (name, key, cell[key])
        assert cell["train_frames_s"] == pytest.approx(cell["train_seq_s"] * 8)
        assert cell["infer_frames_s"] == pytest.approx(cell["infer_seq_s"] * 8)
        assert len(cell["train_times_s"]) == len(cell["infer_times_s"]) == 1
        assert all(math.isfinite(cell[k]) and cell[k] >= 0 for k in ("train_peak_mb", "infer_peak_mb"))
        assert "scores" not in enc
    assert result["encoders"]["transformer"]["config"]["hidden"] == 16

    image = matplotlib.image.imread(out.with_suffix(".png"))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_scores_use_one_budget_per_seed_and_leave_a_failed_seed_out(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    (runs / "sample" / "features").mkdir(parents=True)
    (runs / "sample" / "features" / "onet.h5").touch()  # only its presence is checked; training is faked
    seen = []

    folder = lambda cfg: runs / "sample" / "train" / f"{cfg.name}-seed{cfg.seed}"

    def fake_train(cfg):
        seen.append(cfg)
        if cfg.seed == 5:
            raise InputError("no train video has both labels and features")  # as pipeline.train does
        folder(cfg).mkdir(parents=True)
        (folder(cfg) / "scores.json").write_text(json.dumps({"p_mtl": 1.0 + cfg.seed / 10}))
        return 0

    monkeypatch.setattr("pipeline.train.main", fake_train)
    monkeypatch.setattr("pipeline.train.run_folder", folder)
    out = tmp_path / "encoders.json"
    cfg = load_config("bench", overrides=[*TINY, "encoders=[gru]", "seeds=[3, 5, 7]", "train.epochs=2",
                                          f"runs_dir={runs}", f"output={out}"])
    cfg.train["loss"] = {"va": "mse"}  # a nested budget key, as a user may add to configs/bench.yaml
    assert bench.main(cfg) == 1  # one seed failed

    assert [c.seed for c in seen] == [3, 5, 7]
    for c in seen:
        assert c.encoder.name == "gru" and c.encoder.hidden == 8 and c.encoder.layers == 1
        assert c.epochs == 2 and c.patience == 0 and c.extractors == ["onet"] and c.runs_dir == str(runs)
        assert c.name == "bench_gru" and c.out_dir == ""  # an ordinary run, in the folder its settings name
        assert c.loss.va == "mse" and c.loss.weighting == "fixed"  # updated, not replaced
    scores = json.loads(out.read_text())["encoders"]["gru"]["scores"]
    assert scores["per_seed"][1] is None
    assert scores["per_seed"][::2] == pytest.approx([1.3, 1.7])
    assert scores["p_mtl"]["mean"] == pytest.approx(statistics.fmean([1.3, 1.7]))
    assert scores["p_mtl"]["std"] == pytest.approx(statistics.stdev([1.3, 1.7]))
    assert scores["p_mtl"]["n"] == 2


def test_missing_feature_cache_says_to_build_it(tmp_path):
    cfg = load_config("bench", overrides=[*TINY, f"runs_dir={tmp_path}", f"output={tmp_path / 'x.json'}"])
    with pytest.raises(ConfigError, match="make features"):
        bench.main(cfg)
    assert not (tmp_path / "x.json").exists()


def test_unknown_encoder_option_is_refused_before_any_work(tmp_path):
    cfg = load_config("bench", overrides=["skip_scores=true", "d_in=16", "encoder_args={gru: {hiden: 8}}",
                                          f"output={tmp_path / 'x.json'}"])
    with pytest.raises(ConfigError, match="hiden"):
        bench.main(cfg)


def test_failing_cell_is_recorded_and_the_run_reports_it(tmp_path):
    out = tmp_path / "encoders.json"
    # learned positions stop at max_len, so the 16-step cell fails inside its own process
    cfg = load_config("bench", overrides=[*TINY, "encoders=[transformer]", "lengths=[16]", "skip_scores=true",
                                          "encoder_args={transformer: {hidden: 16, layers: 1, heads: 2, "
                                          "positions: learned, max_len: 8}}", f"output={out}"])
    assert bench.main(cfg) == 1
    [cell] = json.loads(out.read_text())["encoders"]["transformer"]["speed"]
    assert cell["length"] == 16 and "max_len=8" in cell["error"]
    assert out.with_suffix(".png").is_file()


def test_encoder_that_cannot_be_built_is_refused_before_any_timing(tmp_path):
    cfg = load_config("bench", overrides=["skip_scores=true", "d_in=16", "encoder_args={transformer: {heads: 3}}",
                                          f"output={tmp_path / 'x.json'}"])
    with pytest.raises(ConfigError, match="transformer.*divisible"):
        bench.main(cfg)


def test_cpu_peak_meter_sees_a_freed_allocation():
    peak, method = bench.cpu_peak_meter()
    before = peak()
    block = np.ones(64 * 2**20 // 8)  # 64 MB, every page written
    block.sum()
    del block
    assert 48 < peak() - before < 160, method  # the high-water mark keeps it after the free
