"""`make reproduce`: a recipe over its authors' seeds, ensembled, beside its paper's figures."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from pipeline import reproduce
from pipeline.config import ConfigError
from tests.synthetic import learnable_set

SMALL = ["extractors=[syn]", "epochs=1", "batch_size=64"]


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return learnable_set(tmp_path_factory.mktemp("syn"), frames=48)


def test_the_recipe_over_its_seeds_its_ensemble_and_the_published_figures(
        syn: dict[str, Path], capfd: pytest.CaptureFixture) -> None:
    job = reproduce.PROGRAM.read(["recipe=nguyen2022_amtl", "seeds=[1,2]", *SMALL, f"runs_dir={syn['runs']}",
                                  "data.name=syn", f"data.annotations={syn['annotations']}", "data.format=abaw_tasks"])
    assert job.seeds == [1, 2] and [c.seed for c in job.configs] == [1, 2]
    assert all(c.name == "nguyen2022_amtl" and c.epochs == 1 for c in job.configs)  # the recipe, the overrides
    assert reproduce.main(job) == 0
    printed = capfd.readouterr().out
    written = next(Path(syn["runs"], "syn", "reproduce").glob("nguyen2022_amtl-*.json"))
    result = json.loads(written.read_text())
    table = written.with_suffix(".md").read_text()
    assert table.strip() in printed
    lines = table.splitlines()
    p_mtl = [r["scores"]["p_mtl"] for r in result["runs"]]
    assert lines[2].startswith("| seed 1 |") and lines[3].startswith("| seed 2 |")
    assert lines[4].startswith("| mean ± std of 2 |")
    assert f"{statistics.fmean(p_mtl):.4f} ± {statistics.stdev(p_mtl):.4f} |" in lines[4]
    # the ensemble is the one make ensemble writes for these runs
    assert lines[5].startswith("| ensemble of 2 |") and f"{result['ensemble']['p_mtl']:.4f} |" in lines[5]
    assert sorted(result["ensemble"]["members"]) == sorted(r["folder"] for r in result["runs"])
    assert lines[6] == "| published (the paper's, not ours) |  |  |  |  | 1.2880 |"
    assert lines[7] == "| published baseline (the paper's) |  |  |  |  | 0.3000 |"


def test_its_authors_seeds_by_default_and_unknown_recipes_refused() -> None:
    job = reproduce.PROGRAM.read(["recipe=zhang2022_transformer", "extractors=[onet]"])
    assert job.seeds == [100, 101, 102]
    with pytest.raises(ConfigError, match="recipe='mtl_gru': reproduce knows zhang2022_transformer"):
        reproduce.PROGRAM.read(["recipe=mtl_gru"])
