"""Training over several processes (torchrun, gloo) follows the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import checkpoint, distributed, train
from tests.synthetic import learnable_set
from tests.test_train import FAST, syn_config

ROOT = Path(__file__).resolve().parents[1]
# Dropout draws differ between one process and two, so it is off for the comparison; an odd
# global batch also makes one rank's share of every batch padded.
SAME = ["encoder.dropout=0.0", "model.dropout=0.0", "batch_size=3", "epochs=3", "deterministic=true"]


class Keys(Dataset):
    """n items, each its own key."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        return key


def shares(n: int, batch: int, world: int, drop_last: bool, seed: int) -> list[list[list[tuple[int, bool]]]]:
    """Per rank, the batches a loader over GlobalBatches serves for ``n`` windows, as in training."""
    out = []
    for rank in range(world):
        g = torch.Generator().manual_seed(seed)
        sampler = distributed.GlobalBatches(Keys(n), batch, "drop" if drop_last else "keep", g,
                                            distributed.World(rank, world))
        loader = DataLoader(Keys(n), batch_sampler=sampler, generator=g, collate_fn=list)
        out.append([[(int(i), bool(real)) for i, real in b] for b in loader])
        assert len(loader) == len(out[-1])
    return out


@pytest.mark.parametrize(("n", "batch", "drop_last"), [(23, 8, True), (23, 8, False), (5, 8, False), (10, 3, True)])
def test_one_rank_draws_the_batches_of_a_shuffled_loader(n: int, batch: int, drop_last: bool) -> None:
    reference = DataLoader(Keys(n), batch_size=batch, shuffle=True, drop_last=drop_last,
                           generator=torch.Generator().manual_seed(7))
    expected = [b.tolist() for b in reference]
    (ours,) = shares(n, batch, 1, drop_last, seed=7)
    assert [[i for i, real in b] for b in ours] == expected
    assert all(real for b in ours for _, real in b)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(("n", "batch", "drop_last"), [(23, 8, True), (23, 8, False), (5, 8, False), (10, 3, True)])
def test_ranks_together_take_the_single_process_batches(n: int, batch: int, drop_last: bool, world: int) -> None:
    (single,) = shares(n, batch, 1, drop_last, seed=3)
    ranks = shares(n, batch, world, drop_last, seed=3)
    assert all(len(r) == len(single) for r in ranks)
    for step, whole in enumerate(single):
        local = [r[step] for r in ranks]
        assert len({len(b) for b in local}) == 1, "every rank's share must have one size for the all-gather"
        assert [i for b in local for i, real in b if real] == [i for i, _ in whole]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    syn = learnable_set(tmp_path / "syn")
    one = tmp_path / "one"
    assert train.main(syn_config(syn, one, *SAME)) == 0

    two = tmp_path / "two"
    args = [f"runs_dir={syn['runs']}", "data.name=syn", f"data.annotations={syn['annotations']}", f"out_dir={two}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pipeline.train", *FAST, *SAME, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = checkpoint.read(one / "last.pt"), checkpoint.read(two / "last.pt")
    assert a.resume.epoch == b.resume.epoch == 2
    for key, value in a.model.state_dict.items():
        torch.testing.assert_close(b.model.state_dict[key], value, rtol=1e-4, atol=1e-5)
    for h1, h2 in zip(a.resume.history, b.resume.history, strict=True):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)
    s1, s2 = (json.loads((p / "scores.json").read_text()) for p in (one, two))
    assert s2["p_mtl"] == pytest.approx(s1["p_mtl"], abs=1e-4)
    # only rank 0 wrote: one set of outputs, no stray partial files
    assert sorted(p.name for p in two.iterdir() if p.name.startswith(".")) == [".lock"]  # rank 0's lock only
