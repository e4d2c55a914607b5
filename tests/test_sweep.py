"""Sweeps: a grid of training overrides times seeds, one run folder each, one mean +- std table."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from pipeline import sweep
from pipeline.config import ConfigError
from tests.synthetic import learnable_set

FAST = ["encoder.hidden=16", "encoder.layers=1", "window=24", "stride=8", "eval_stride=12", "batch_size=4",
        "lr=0.005", "patience=0", "extractors=[syn]", "epochs=2"]


def test_commas_outside_brackets_make_axes() -> None:
    assert sweep.split_values("gru,lstm") == ["gru", "lstm"]
    assert sweep.split_values("[onet,iresnet18],[onet]") == ["[onet,iresnet18]", "[onet]"]
    assert sweep.split_values("{va: 1, au: 2}") == ["{va: 1, au: 2}"]
    runs = sweep.expand(["encoder=gru,lstm", "epochs=2", "seed=0,1,2"])
    assert len(runs) == 6 and runs[0] == ["encoder=gru", "epochs=2", "seed=0"] and runs[-1][0] == "encoder=lstm"
    with pytest.raises(ConfigError, match="empty value"):
        sweep.expand(["seed=0,,1"])


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return learnable_set(tmp_path_factory.mktemp("syn"), frames=48)


def args(syn: dict[str, Path], *more: str) -> list[str]:
    return [*FAST, f"runs_dir={syn['runs']}", "data.name=syn", f"data.annotations={syn['annotations']}", *more]


def test_a_sweep_trains_each_run_once_and_tables_mean_and_std_over_seeds(syn: dict[str, Path],
                                                                        capfd: pytest.CaptureFixture) -> None:
    """Each run is a `python -m pipeline.train` process: capfd sees what they print."""
    grid = sweep.PROGRAM.read(args(syn, "encoder=gru,lstm", "seed=0,1"))
    assert len(grid.runs) == 4 and grid.axes == ["encoder", "seed"]
    assert sweep.main(grid) == 0
    printed = capfd.readouterr().out
    table = next(Path(syn["runs"], "syn", "sweeps").glob("*.md")).read_text()
    assert table.strip() in printed
    assert "| encoder=gru | 2 |" in table and "| encoder=lstm | 2 |" in table
    result = json.loads(next(Path(syn["runs"], "syn", "sweeps").glob("*.json")).read_text())
    folders = {r["folder"] for r in result["runs"]}
    assert len(folders) == 4 and all((Path(f) / "scores.json").is_file() for f in folders)
    assert all(list((Path(f) / "tensorboard").glob("events.out.tfevents.*")) for f in folders)
    for row in result["summary"]:
        runs = [r for r in result["runs"] if r["setting"] == row["setting"]]
        values = [r["scores"]["p_mtl"] for r in runs]
        assert row["p_mtl"]["per_seed"] == values
        assert row["p_mtl"]["mean"] == pytest.approx(statistics.fmean(values))
        assert row["p_mtl"]["std"] == pytest.approx(statistics.stdev(values))
        assert f"{row['p_mtl']['mean']:.4f} ± {row['p_mtl']['std']:.4f}" in table

    # the same sweep again trains nothing and gives the same table
    assert sweep.main(sweep.PROGRAM.read(args(syn, "encoder=gru,lstm", "seed=0,1"))) == 0
    again = capfd.readouterr().out
    assert again.count("not trained again") == 4 and table.strip() in again


def test_every_run_is_checked_before_the_first_starts(syn: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="schedule=cosin: config key 'schedule' = 'cosin'"):
        sweep.PROGRAM.read(args(syn, "schedule=linear,cosin"))
    with pytest.raises(ConfigError, match="unknown config key 'encoder.hiden'"):
        sweep.PROGRAM.read(args(syn, "encoder=gru,lstm", "encoder.hiden=3,4"))


def test_a_failing_run_fails_alone(syn: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid = sweep.PROGRAM.read([*FAST, f"runs_dir={syn['runs']}", "data.name=syn", "seed=5",
                                 f"data.annotations={tmp_path / 'nothing'},{syn['annotations']}"])
    assert sweep.main(grid) == 1
    result = json.loads(sorted(Path(syn["runs"], "syn", "sweeps").glob("*.json"),
                               key=lambda p: p.stat().st_mtime)[-1].read_text())
    assert [r["status"] for r in result["runs"]] == [1, 0]
    assert "(1 failed)" in capsys.readouterr().out
