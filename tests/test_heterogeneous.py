"""Data sets that each label only some tasks, trained together (1802.06664's setting): batches that
hold every data set's share, the best epoch chosen on one data set, and each data set's rows."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline import ensemble, sweep, train
from pipeline.config import Config, InputError, load_config
from pipeline.distributed import BalancedBatches, World, proportioned
from pipeline.loop import LoopState
from pipeline.validation import selected_scores
from tests.synthetic import learnable_set, two_data_sets
from tests.test_seed_training import FAST, scores_of


class Windows:
    """What BalancedBatches reads of a training set: its windows as (video, start)."""

    def __init__(self, per_video: list[int]) -> None:
        self.items = [(i, s) for i, n in enumerate(per_video) for s in range(n)]

    def __len__(self) -> int:
        return len(self.items)


def test_shares_of_a_batch_follow_the_proportions() -> None:
    assert proportioned(8, {"a": 1, "b": 1}) == {"a": 4, "b": 4}
    assert proportioned(8, {"a": 3, "b": 1}) == {"a": 6, "b": 2}
    assert proportioned(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert proportioned(4, {"a": 100, "b": 1}) == {"a": 3, "b": 1}  # every data set at least once
    with pytest.raises(ValueError, match="cannot hold a window of each of 3"):
        proportioned(2, {"a": 1, "b": 1, "c": 1})


def test_every_batch_holds_each_data_sets_share_and_the_smaller_set_repeats() -> None:
    data = Windows([30, 25, 6])  # videos 0 and 1 of data set a (55 windows), video 2 of b (6)
    data_of = ["a", "a", "b"]
    sampler = BalancedBatches(data, data_of, {"a": 3, "b": 1}, 8, "keep", torch.Generator().manual_seed(0),
                              World(0, 1))
    batches = [[i for i, _ in b] for b in sampler]
    assert len(batches) == len(sampler) == math.ceil(61 / 8)
    of = [data_of[v] for v, _ in data.items]
    for batch in batches:
        assert [of[i] for i in batch].count("a") == 6 and [of[i] for i in batch].count("b") == 2
        assert len(set(batch)) == len(batch)  # no window twice in one batch
    b_windows = {i for i, d in enumerate(of) if d == "b"}
    assert {i for batch in batches for i in batch if of[i] == "b"} == b_windows  # each seen, some twice
    again = [[i for i, _ in b] for b in BalancedBatches(data, data_of, {"a": 3, "b": 1}, 8, "keep",
                                                        torch.Generator().manual_seed(0), World(0, 1))]
    assert again == batches  # the seed decides the batches, so a resumed run repeats them
    # two ranks together take exactly the single process's batches
    ranks = [[[i for i, real in b if real] for b in BalancedBatches(data, data_of, {"a": 3, "b": 1}, 8, "keep",
                                                                    torch.Generator().manual_seed(0), World(r, 2))]
             for r in range(2)]
    assert [r0 + r1 for r0, r1 in zip(*ranks, strict=True)] == batches


def test_the_best_epoch_on_a_named_data_set() -> None:
    cfg = load_config("train", overrides=["selection_data=b"])
    model = torch.nn.Linear(1, 1)
    pooled = [1.0, 2.0, 1.5]  # the pooled score is best at epoch 1, b's own at epoch 2
    own_b = [0.2, 0.1, 0.9]
    chosen, pooled_state = LoopState.start(cfg), LoopState.start(load_config("train"))
    for epoch, (p, b) in enumerate(zip(pooled, own_b, strict=True)):
        labelled = {"n_va": 10, "n_expr": 10, "n_au": 10}
        scores = {"p_va": p, "f1_expr": p, "f1_au": p,
                  "data": {"a": {"p_va": p, "f1_expr": p, "f1_au": p, **labelled},
                           "b": {"p_va": b, "f1_expr": b, "f1_au": b, **labelled}}}
        improved, _, _ = chosen.judge(epoch, selected_scores(scores, cfg), ["va", "expr", "au"], model, cfg)
        pooled_state.judge(epoch, selected_scores(scores, load_config("train")), ["va", "expr", "au"], model, cfg)
    assert chosen.best == pytest.approx(3 * 0.9) and pooled_state.best == pytest.approx(3 * 2.0)
    # a task the named data set does not label is chosen on the pooled score
    scores = {"p_va": 0.5, "ccc_v": 0.4, "ccc_a": 0.6, "f1_expr": 0.3, "f1_au": 0.2,
              "data": {"b": {"p_va": math.nan, "f1_expr": math.nan, "f1_au": 0.7, "n_va": 0, "n_expr": 0, "n_au": 5}}}
    picked = selected_scores(scores, cfg)
    assert (picked["p_va"], picked["f1_expr"], picked["f1_au"]) == (0.5, 0.3, 0.7)


@pytest.fixture
def two_sets(tmp_path: Path) -> tuple[Path, list[str]]:
    """Data set a labels every task, b only action units; b is a third of a's size."""
    runs, (a, b) = two_data_sets(tmp_path, b_frames=32)
    return runs, [*FAST, f"runs_dir={runs}", f"data=[{a},{b}]"]


def test_two_data_sets_with_balanced_batches_train_and_report_each(two_sets, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    _, overrides = two_sets
    out = tmp_path / "run"
    cfg = load_config("train", overrides=[*overrides, f"out_dir={out}", "epochs=6", "batches=balanced",
                                          "data_proportions={syn_a: 3, syn_b: 1}", "selection_data=syn_b"])
    assert train.main(cfg) == 0
    printed = capsys.readouterr().out
    assert "| syn_a |" in printed and "| syn_b |" in printed  # each data set's own row
    scores = scores_of(out)
    assert scores["data"]["syn_b"]["n_au"] > 0 and scores["data"]["syn_b"]["n_va"] == 0
    # the ensemble's table and the sweep's have a row per data set too
    assert ensemble.main(Config({"runs": [str(out)], "device": "cpu"})) == 0
    printed = capsys.readouterr().out
    assert "| ensemble · syn_a |" in printed and "| ensemble · syn_b |" in printed
    rows = sweep.summary_rows([{"setting": "run", "seed": 0, "scores": scores}])
    assert [r["setting"] for r in rows] == ["run", "run · syn_a", "run · syn_b"]
    assert rows[2]["f1_au"]["mean"] == scores["data"]["syn_b"]["f1_au"]


def test_balanced_batches_and_data_selection_refused_where_they_cannot_apply(two_sets, tmp_path: Path) -> None:
    _, overrides = two_sets
    out = tmp_path / "run"
    with pytest.raises(InputError, match="'selection_data' = 'syn_c': not a data set this run pools"):
        train.main(load_config("train", overrides=[*overrides, f"out_dir={out}", "selection_data=syn_c"]))
    with pytest.raises(InputError, match="'data_proportions' names syn_c, not a data set of this run"):
        train.main(load_config("train", overrides=[*overrides, f"out_dir={out}1", "batches=balanced",
                                                   "data_proportions={syn_c: 1}"]))
    one = learnable_set(tmp_path / "one")
    with pytest.raises(InputError, match="batches: balanced needs several data sets"):
        train.main(load_config("train", overrides=[*FAST, f"runs_dir={one['runs']}", f"out_dir={out}2",
                                                   "data.name=syn", f"data.annotations={one['annotations']}",
                                                   "data.format=abaw_tasks", "batches=balanced"]))
