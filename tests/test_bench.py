"""The encoder benchmark: timing logic on a fake clock, a tiny real run, the training loop against
the bare step, the P_MTL bookkeeping and the seed statistics that rank the encoders."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from pipeline import loop as epoch_loop
from pipeline.bench import encoders as bench
from pipeline.config import ConfigError, component_names, load_config
from pipeline.metrics import summarise
from tests.synthetic import learnable_set

# Every encoder in the registry at a size that times in milliseconds (``none`` has no options).
TINY_ENCODERS = {
    "frame": {"hidden": 16, "layers": 1},
    "tcn": {"hidden": 8, "layers": 2},
    "transformer": {"hidden": 16, "layers": 1, "heads": 2},
    "lstm": {"hidden": 8, "layers": 1},
    "gru": {"hidden": 8, "layers": 1},
}
TINY = [
    "d_in=16",
    "lengths=[8]",
    "batch_size=2",
    "warmup=1",
    "repeats=1",
    "threads=1",
    f"encoder_args={json.dumps(TINY_ENCODERS)}",
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
        for key in ("train_seq_s", "train_frames_s", "infer_seq_s", "infer_frames_s", "infer_window_ms"):
            assert _positive(cell[key]), (name, key, cell[key])
        assert cell["train_frames_s"] == pytest.approx(cell["train_seq_s"] * 8)
        assert cell["infer_frames_s"] == pytest.approx(cell["infer_seq_s"] * 8)
        assert len(cell["train_times_s"]) == len(cell["infer_times_s"]) == len(cell["infer_window_times_s"]) == 1
        assert cell["infer_window_ms"] == pytest.approx(cell["infer_window_times_s"][0] * 1000)
        assert all(math.isfinite(cell[k]) and cell[k] >= 0 for k in ("train_peak_mb", "infer_peak_mb"))
        assert "scores" not in enc and "loop" not in enc
    assert result["encoders"]["transformer"]["config"]["hidden"] == 16

    image = matplotlib.image.imread(out.with_suffix(".png"))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_every_registry_encoder_has_a_tiny_size_and_measures() -> None:
    assert set(TINY_ENCODERS) == set(component_names("encoder")) - {"none"}
    for name in component_names("encoder"):
        spec = bench.encoder_spec(name, TINY_ENCODERS.get(name))
        assert bench.sizes(name, spec, 16)["params"] < 20_000, name
        cell = bench.measure(spec, d_in=16, length=8, batch_size=2, warmup=0, repeats=1, threads=1)
        assert all(_positive(cell[k]) for k in ("train_frames_s", "infer_frames_s", "infer_window_ms")), name


def test_default_output_is_one_file_per_data_set() -> None:
    cfg = load_config("bench", overrides=["runs_dir=elsewhere"])
    assert cfg.encoders == ["frame", "tcn", "transformer", "lstm", "gru"] and cfg.baseline == "frame"
    assert bench.output_path(cfg) == Path("elsewhere/bench/encoders-sample.json")
    cfg = load_config("bench", overrides=["output=x/y.json"])
    assert bench.output_path(cfg) == Path("x/y.json")


def test_scores_use_one_budget_per_seed_and_leave_a_failed_seed_out(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    (runs / "sample" / "features").mkdir(parents=True)
    (runs / "sample" / "features" / "onet.h5").touch()  # only its presence is checked; training is faked
    seen = []

    folder = lambda cfg: runs / "sample" / "train" / f"{cfg.name}-seed{cfg.seed}"

    def fake_train(config, overrides, env=None):  # in place of the `python -m pipeline.train` process
        assert config is None
        cfg = load_config("train", overrides=overrides)
        seen.append(cfg)
        if cfg.seed == 5 and cfg.encoder.name == "gru":
            return 1  # as pipeline.train exits on "no train video has both labels and features"
        folder(cfg).mkdir(parents=True)
        p_mtl = 1.0 + cfg.seed / 10 - (0.5 if cfg.encoder.name == "frame" else 0.0)
        scores = {"p_mtl": p_mtl, "ccc_v": 0.1 * cfg.seed, "ccc_a": float("nan"), "f1_expr": 0.3, "f1_au": 0.4}
        (folder(cfg) / "scores.json").write_text(json.dumps(scores))
        return 0

    monkeypatch.setattr("pipeline.bench.encoders.train_process", fake_train)
    monkeypatch.setattr("pipeline.bench.encoders.run_folder", folder)
    out = tmp_path / "encoders-sample.json"
    cfg = load_config("bench", overrides=[*TINY, "encoders=[frame, gru]", "seeds=[3, 5, 7]", "train.epochs=2",
                                          "loop_repeats=0", "jobs=1",
                                          f"runs_dir={runs}", f"output={out}"])
    cfg.train["loss"] = {"va": "mse"}  # a nested budget key, as a user may add to configs/bench.yaml
    assert bench.main(cfg) == 1  # one seed failed

    assert [(c.encoder.name, c.seed) for c in seen] == [("frame", 3), ("frame", 5), ("frame", 7),
                                                        ("gru", 3), ("gru", 5), ("gru", 7)]
    for c in seen[3:]:
        assert c.encoder.name == "gru" and c.encoder.hidden == 8 and c.encoder.layers == 1
        assert c.epochs == 2 and c.patience == 0 and c.extractors == ["onet"] and c.runs_dir == str(runs)
        assert c.name == "bench_gru" and c.out_dir == ""  # an ordinary run, in the folder its settings name
        assert c.loss.va == "mse" and c.loss.weighting == "fixed"  # updated, not replaced
    result = json.loads(out.read_text())
    scores = result["encoders"]["gru"]["scores"]
    assert scores["per_seed"][1] is None
    assert scores["per_seed"][::2] == pytest.approx([1.3, 1.7])
    assert scores["p_mtl"]["mean"] == pytest.approx(statistics.fmean([1.3, 1.7]))
    assert scores["p_mtl"]["std"] == pytest.approx(statistics.stdev([1.3, 1.7]))
    assert scores["p_mtl"]["n"] == 2
    assert scores["tasks"]["ccc_v"]["per_seed"] == pytest.approx([0.3, None, 0.7])
    assert scores["tasks"]["ccc_a"] == {"per_seed": [None] * 3, "mean": None, "std": None, "min": None,
                                        "max": None, "n": 0}  # undefined in every run
    # the baseline is 0.5 lower on every seed both finished: two wins of two, outside the spread
    vs = scores["vs_baseline"]
    assert vs["per_seed"][0] == pytest.approx(0.5) and vs["per_seed"][1] is None
    assert (vs["wins"], vs["n"], vs["tie"]) == (2, 2, False) and vs["mean"] == pytest.approx(0.5)
    assert scores["rank"] == 1 and scores["percent_of_best"] == 100 and scores["vs_best"] is None
    frame = result["encoders"]["frame"]["scores"]
    assert frame["rank"] == 2 and frame["vs_baseline"] is None
    assert frame["percent_of_best"] == pytest.approx(100 * 1.0 / 1.5)
    assert result["comparison"] == {"best": "gru", "baseline": "frame", "rule": bench.TIE_RULE}
    assert all("loop" not in enc for enc in result["encoders"].values())  # loop_repeats=0
    printed = capsys.readouterr().out
    assert "1.500 ± 0.283" in printed and "2/2 wins" in printed and "baseline frame: 67%" in printed
    assert "| gru | 0.500 ± 0.283 | n/a ± n/a | 0.300 ± 0.000 | 0.400 ± 0.000 |" in printed
    assert out.with_suffix(".png").is_file()


def test_baseline_must_be_benchmarked(tmp_path):
    (tmp_path / "sample" / "features").mkdir(parents=True)
    (tmp_path / "sample" / "features" / "onet.h5").touch()
    cfg = load_config("bench", overrides=[*TINY, "encoders=[gru]", f"runs_dir={tmp_path}",
                                          f"output={tmp_path / 'x.json'}"])
    with pytest.raises(ConfigError, match="baseline=frame"):
        bench.main(cfg)


def test_training_loop_is_timed_against_the_bare_step_on_the_same_batches(tmp_path, monkeypatch):
    syn = learnable_set(tmp_path, name="sample")  # runs/sample/features/syn.h5
    cfg = load_config("bench", overrides=[*TINY, "extractors=[syn]", f"runs_dir={syn['runs']}", "loop_repeats=2",
                                          "train.window=24", "train.stride=8", "train.batch_size=4"])
    cfg.data.update(annotations=str(syn["annotations"]))
    calls = []
    real_epoch = epoch_loop.train_epoch
    monkeypatch.setattr(epoch_loop, "train_epoch", lambda *a, **kw: calls.append(kw) or real_epoch(*a, **kw))

    loop = bench.loop_speed(cfg, "gru")
    assert len(calls) == 1 + 2 and all(kw["board"] is not None for kw in calls)  # TensorBoard logged, as in a run
    assert loop["repeats"] == 2 and len(loop["loop_times_s"]) == len(loop["bare_times_s"]) == 2
    # 4 training videos of 96 frames, cut into whole 24-frame windows, 4 to a batch
    assert loop["batches"] >= 5 and loop["frames"] == loop["batches"] * 4 * 24
    loop_s, bare_s = statistics.median(loop["loop_times_s"]), statistics.median(loop["bare_times_s"])
    assert loop["loop_frames_s"] == pytest.approx(loop["frames"] / loop_s)
    assert loop["bare_frames_s"] == pytest.approx(loop["frames"] / bare_s)
    assert loop["ratio"] == pytest.approx(bare_s / loop_s) and _positive(loop["ratio"])
    assert loop["ratio_per_pass"] == pytest.approx([b / t for t, b in zip(loop["loop_times_s"], loop["bare_times_s"],
                                                                          strict=True)])
    assert not (syn["runs"] / "sample" / "train").exists()  # timing writes no run


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
    """In a process of its own, as the benchmarks measure theirs: a test worker's heap may already
    hold freed pages that a new allocation reuses without raising the resident size."""
    script = """
import numpy as np
from pipeline import bench
peak, method = bench.cpu_peak_meter()
before = peak()
block = np.ones(64 * 2**20 // 8)  # 64 MB, every page written
block.sum()
del block
print(peak() - before, method)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    grown, method = done.stdout.split(" ", 1)
    assert 48 < float(grown) < 160, method  # the high-water mark keeps it after the free


def test_paired_differences_skip_failed_seeds():
    diff = bench.paired([0.5, None, 0.7, 0.6], [0.4, 0.6, 0.8, None])
    assert diff["per_seed"] == pytest.approx([0.1, None, -0.1, None])
    assert diff["mean"] == pytest.approx(0.0) and (diff["wins"], diff["n"]) == (1, 2)
    assert bench.paired([None, 0.5], [0.4, None]) == {"per_seed": [None, None], "mean": None, "wins": 0, "n": 0}


def test_a_difference_within_the_larger_seed_spread_is_a_tie():
    steady, noisy = [0.50, 0.51, 0.52], [0.45, 0.55, 0.56]  # std 0.01 and about 0.06
    c = bench.compare(noisy, steady)
    assert c["spread"] == pytest.approx(statistics.stdev(noisy))  # the larger of the two
    assert c["mean"] == pytest.approx(0.01) and c["wins"] == 2 and c["tie"]
    c = bench.compare([0.60, 0.62, 0.58], [0.40, 0.41, 0.39])
    assert c["mean"] == pytest.approx(0.2) and (c["wins"], c["n"]) == (3, 3) and not c["tie"]
    assert bench.compare([None, None], [0.4, 0.5])["tie"] is None  # nothing to compare: no verdict


def test_encoders_within_each_others_spread_share_a_rank():
    per_seed = {
        "a": [0.57, 0.60, 0.63],  # mean 0.60, every std 0.03
        "b": [0.55, 0.58, 0.61],  # 0.02 below a: tied with a
        "c": [0.53, 0.56, 0.59],  # 0.04 below a (ahead of it), 0.02 below b (tied)
        "d": [0.30, 0.31, None],  # below all by more than any spread
        "e": [None, None, None],  # every seed failed
    }
    assert bench.ranks(per_seed) == {"a": 1, "b": 1, "c": 2, "d": 4, "e": None}


def test_standings_against_the_baseline_and_the_best():
    per_seed = {"frame": [0.30, 0.33, 0.36], "gru": [0.50, 0.52, None], "tcn": [0.50, 0.54, 0.52],
                "bad": [None, None, None]}
    table = bench.standings(per_seed, "frame")
    assert (table["best"], table["baseline"], table["rule"]) == ("tcn", "frame", bench.TIE_RULE)
    enc = table["encoders"]
    assert enc["tcn"]["percent_of_best"] == pytest.approx(100) and enc["tcn"]["vs_best"] is None
    assert enc["frame"]["percent_of_best"] == pytest.approx(100 * 0.33 / 0.52)
    assert enc["frame"]["vs_baseline"] is None and enc["bad"]["percent_of_best"] is None
    assert enc["gru"]["vs_best"]["per_seed"] == pytest.approx([0.0, -0.02, None]) and enc["gru"]["vs_best"]["tie"]
    assert enc["gru"]["vs_baseline"]["wins"] == 2 and not enc["gru"]["vs_baseline"]["tie"]
    assert enc["bad"]["vs_baseline"]["n"] == 0 and enc["bad"]["vs_baseline"]["tie"] is None
    assert [enc[n]["rank"] for n in per_seed] == [3, 1, 1, None]
    assert all(e["vs_baseline"] is None for e in bench.standings(per_seed)["encoders"].values())


def _scored(data: str, values: dict[str, list]) -> dict:
    return {"data": data, "encoders": {n: {"scores": {"per_seed": v, "p_mtl": summarise(v)}}
                                       for n, v in values.items()}}


def test_plot_draws_every_scored_data_set_beside_the_output(tmp_path):
    (tmp_path / "encoders-sample_temporal.json").write_text(json.dumps(_scored("sample_temporal",
                                                                               {"gru": [0.8, 0.9, None]})))
    (tmp_path / "encoders-speed_only.json").write_text(json.dumps({"data": "x", "encoders": {"gru": {"speed": []}}}))
    (tmp_path / "encoders-broken.json").write_text("{")
    (tmp_path / "encoders-sample.json").write_text(json.dumps(_scored("sample", {"gru": [0.1, 0.1, 0.1]})))
    result = {**_scored("sample", {"frame": [0.3, 0.4, 0.5], "gru": [0.5, 0.6, 0.7]}),
              "lengths": [8, 16], "batch_size": 2, "d_in": 16,
              "machine": {"device": "cpu", "cpu": "test", "torch_threads": 1, "torch": "x"}}
    for enc in result["encoders"].values():
        enc.update(params=1000, speed=[{"length": t, "train_frames_s": 10.0 * t, "infer_frames_s": 20.0 * t,
                                        "infer_window_ms": 1.0, "train_peak_mb": 5.0, "infer_peak_mb": 1.0}
                                       for t in (8, 16)] + [{"length": 32, "error": "x"}])

    groups = bench.scored_results(tmp_path / "encoders-sample.json", result)
    assert list(groups) == ["sample", "sample_temporal"]  # this run's, not the older file of its data set
    assert groups["sample"] is result
    bench.plot(result, tmp_path / "encoders-sample.png", groups)
    image = matplotlib.image.imread(tmp_path / "encoders-sample.png")
    assert image.shape[0] > 600 and image.shape[1] > 1000


def test_loop_table_shows_each_encoders_ratio_and_its_spread_over_passes():
    result = {"encoders": {
        "gru": {"params": 10**6, "speed": [], "loop": {"loop_frames_s": 900.0, "bare_frames_s": 1000.0, "ratio": 0.9,
                                                       "ratio_per_pass": [0.85, 0.9, 0.97], "frames": 2560,
                                                       "repeats": 3}},
        "tcn": {"params": 10**6, "speed": [], "loop": {"error": "InputError: no features"}},
    }}
    text = bench.report_tables(result)
    assert "| gru | 900 | 1,000 | 90% | 85%-97% | 2560 | 3 |" in text
    assert "| tcn | InputError: no features |" in text


def test_parallel_training_runs_report_each_failure_and_go_on(tmp_path, caplog):
    """``jobs=2``: the runs go to spawned processes; a run that fails there (no feature cache) is
    left out with its error logged, and every (encoder, seed) gets its entry."""
    cfg = load_config("bench", overrides=[*TINY, "encoders=[frame, gru]", "seeds=[0, 1]", "jobs=2", "threads=1",
                                          f"runs_dir={tmp_path / 'runs'}"])
    done = bench.all_scores(cfg, ["frame", "gru"])
    assert done == {(name, seed): {} for name in ("frame", "gru") for seed in (0, 1)}
    assert sum("failed" in r.message and "onet.h5" in r.message for r in caplog.records) == 4
