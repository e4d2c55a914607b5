"""Training over several processes (torchrun, gloo) follows the single-process run."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from models import STRUCTURES, MultiTaskModel
from pipeline import checkpoint, distributed, train
from pipeline.training import task_modules
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


# ---- every structure under DDP ------------------------------------------------------------------------
# One optimiser step of each structure of the registry over two gloo processes, built by the same
# function training builds its DDP model with: whole, uni-task, in two stages (the first stage's
# modules frozen in the second), and with rank 1 holding no valid frame. DDP's contract is checked
# from outside: every parameter's gradient is, on both ranks, the mean of the gradients that each
# rank's share gives in one plain process (None where no rank's share reaches it).

ENCODER = {"name": "gru", "hidden": 8, "layers": 1}
VARIANTS = {"whole": (("va", "expr", "au"), [["va", "expr", "au"]], None),
            "va only": (("va",), [["va"]], None),  # with the AU task for cross-attention, which needs it
            "two stages": (("va", "expr", "au"), [["au"], ["va", "expr"]], None),
            "rank 1 without a valid frame": (("va", "expr", "au"), [["va", "expr", "au"]], 1)}
CASES = [(s, v) for s in STRUCTURES for v in VARIANTS]


def share(case: int, rank: int, stage: int, empty: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * case + 10 * rank + stage)
    x = torch.randn(2, 6, 8, generator=g)
    mask = torch.rand(2, 6, generator=g) > 0.2
    if rank == empty:
        mask[:] = False
    return x, mask


def one_step(model, net, case: int, rank: int, stage: int, tasks: list[str], empty: int | None) -> dict:
    """Gradients of a loss on every output of ``tasks`` for ``rank``'s share, then an SGD step."""
    x, mask = share(case, rank, stage, empty)
    torch.manual_seed(7 * case + stage)  # the same dropout draws in the ranks and in the reference
    out = net(x, mask)
    loss = sum((out[t].float() * mask[..., None]).square().sum() for t in tasks)
    for p in model.parameters():
        p.grad = None
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.01 * p.grad
    return grads


def freeze_for(model, stages: list[list[str]], k: int) -> None:
    earlier = {t for s in stages[:k] for t in s} - set(stages[k])
    frozen = {id(p) for m in task_modules(model, sorted(earlier)) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)


def structure(case: int) -> tuple[MultiTaskModel, list[list[str]], int | None]:
    name, variant = CASES[case]
    tasks, stages, empty = VARIANTS[variant]
    if name == "cross_attention" and "au" not in tasks:
        tasks, stages = (*tasks, "au"), [[*stages[0], "au"]]
    torch.manual_seed(case)
    return MultiTaskModel(8, ENCODER, tasks=tasks, structure=name).train(), stages, empty


def ddp_rank(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    world = distributed.World(rank, 2, rank, dist.new_group())
    results = {}
    for case in range(len(CASES)):
        model, stages, empty = structure(case)
        net, cut = distributed.parallel(model, torch.device("cpu"), world,
                                        distributed.may_leave_unused(model, stages, frozen=False))
        for k, tasks in enumerate(stages):
            freeze_for(model, stages, k)
            cut.tasks = tuple(tasks)
            results[case, k] = one_step(model, net, case, rank, k, tasks, empty)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_every_structure_trains_under_ddp_as_ranks_averaged(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(ddp_rank, args=(f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for case, (name, variant) in enumerate(CASES):
        ref, stages, empty = structure(case)
        for k, tasks in enumerate(stages):
            freeze_for(ref, stages, k)
            singles = [one_step(m, m, case, rank, k, tasks, empty)  # each rank's share alone, in one process
                       for rank, m in enumerate(copy.deepcopy(ref) for _ in range(2))]
            means = {}
            for n in singles[0]:
                got, parts = [r[case, k][n] for r in ranks], [s[n] for s in singles]
                where = f"{name}, {variant}, stage {k}: {n}"
                if all(p is None for p in parts):
                    assert got == [None, None], where
                    continue
                known = next(p for p in parts if p is not None)
                means[n] = sum(torch.zeros_like(known) if p is None else p for p in parts) / 2
                for g in got:
                    assert g is not None, where
                    torch.testing.assert_close(g, means[n], rtol=1e-4, atol=1e-5,
                                               msg=lambda m, where=where: f"{where}: {m}")
            with torch.no_grad():  # the step the ranks took together
                for n, p in ref.named_parameters():
                    if n in means:
                        p -= 0.01 * means[n]


def test_batchnorm_is_synchronised_across_gpus_and_keeps_its_state() -> None:
    model = MultiTaskModel(8, ENCODER, structure="amtl")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not distributed.sync_batchnorm(model, torch.device("cpu"))  # gloo: no SyncBatchNorm on the CPU
    assert distributed.sync_batchnorm(model, torch.device("cuda", 0))
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm1d not in kinds
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not distributed.sync_batchnorm(MultiTaskModel(8, ENCODER), torch.device("cuda", 0))  # none to sync
