"""Training over several processes or machines with torchrun: who this process is, how a global
batch is split over ranks, and how the ranks' outputs are put back together for the loss."""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch.utils.data import Dataset, Sampler

from models.abaw import INVALID, TASKS
from pipeline.data import SequenceDataset
from pipeline.runs import local_device


@dataclass(frozen=True)
class World:
    """This process's place among torchrun's processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    group: object = None  # a process group of its own for the loss's collectives

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world(device: str) -> tuple[World, torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1: NCCL with one GPU per local rank for
    a CUDA ``device``, else gloo."""
    device = local_device(device)  # a device this torch cannot use is refused, never replaced
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size == 1:
        return World(), torch.device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # the other ranks wait while rank 0 evaluates, which can outlast the default timeout
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    # The loss's all-gathers run inside backward next to DDP's gradient all-reduces; a group of
    # their own keeps each group's collectives in the same order on every rank.
    group = dist.new_group()
    return World(rank, size, local_rank, group), torch.device(f"cuda:{local_rank}" if cuda else device)


class TaskOutputs(torch.nn.Module):
    """``model`` with its outputs cut to the tasks trained now (``tasks``, set per stage).

    DDP takes a parameter as used when the outputs its forward returns reach it; an output that
    no loss reads (a task of a later stage) would leave its head waiting for a gradient forever.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.tasks: tuple[str, ...] = tuple(model.tasks)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model(x, mask).items() if k in self.tasks}


def may_leave_unused(model: torch.nn.Module, stages: list[list[str]], frozen: bool) -> bool:
    """Whether a step may leave some parameter of ``model`` without a gradient on some rank:
    training in stages (a stage's loss reads some tasks; earlier ones are frozen), modules kept
    frozen, or a structure that says so (``may_leave_unused``: AMTL computes every task's modules
    for ``tasks=[va]`` and uses no head on a rank without two valid frames)."""
    net = getattr(model, "net", model)
    return len(stages) > 1 or frozen or bool(getattr(net, "may_leave_unused", False))


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> bool:
    """Replace ``model``'s BatchNorm layers by SyncBatchNorm ones, in place (parameters, buffers and
    state-dict keys stay), where ``device`` is CUDA: the only kind SyncBatchNorm computes on.
    Whether any was replaced."""
    found = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if device.type != "cuda" or not found:
        return False
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the root is no BatchNorm: changed below it
    return True


def parallel(model: torch.nn.Module, device: torch.device, world: World, unused: bool
             ) -> tuple[torch.nn.Module, TaskOutputs | None]:
    """``model`` for training on this rank: itself alone; over several ranks, its BatchNorm layers
    synchronised across them on CUDA (their statistics then come from the global batch, as in one
    process; gloo has no SyncBatchNorm, so on the CPU each rank's statistics are its own share's),
    cut to the trained tasks and wrapped in DDP, told that parameters may go unused where
    ``unused``. Returns the module to call and the :class:`TaskOutputs` whose ``tasks`` to set."""
    if world.size == 1:
        return model, None
    from torch.nn.parallel import DistributedDataParallel

    sync_batchnorm(model, device)
    cut = TaskOutputs(model)
    net = DistributedDataParallel(cut, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=unused)
    return net, cut


LAST_BATCHES = ("drop", "keep")  # a short last batch of an epoch: left out (unless the only one), or trained on


class GlobalBatches(Sampler[list[tuple[int, bool]]]):
    """Batches of a seeded permutation of the windows, each split into contiguous equal shares,
    one per rank; so the ranks together take exactly the batches of a single process.

    Yields this rank's share as ``(index, real)`` pairs: a share of a short last batch is padded
    with copies of its first window marked ``real=False``, which carry no labels.
    """

    def __init__(self, data: Dataset, batch_size: int, last_batch: str, generator: torch.Generator,
                 world: World) -> None:
        if last_batch not in LAST_BATCHES:
            raise ValueError(f"last_batch {last_batch!r}: choose one of {', '.join(LAST_BATCHES)}")
        self.data, self.batch_size, self.last_batch = data, batch_size, last_batch
        self.generator, self.world = generator, world

    @property
    def drop_last(self) -> bool:
        """Whether a short last batch is left out: with ``drop``, unless it is the only one (the
        windows may change from stage to stage)."""
        return self.last_batch == "drop" and len(self.data) > self.batch_size

    def batches(self) -> Iterator[list[int]]:
        """The global batches of an epoch, as window indices."""
        # randperm with the shared generator, as RandomSampler draws it, so one process is unchanged
        order = torch.randperm(len(self.data), generator=self.generator).tolist()
        for i in range(0, len(order), self.batch_size):
            batch = order[i : i + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield batch

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for batch in self.batches():
            share = -(-len(batch) // self.world.size)
            mine = [(j, True) for j in batch[self.world.rank * share : (self.world.rank + 1) * share]]
            yield mine + [(batch[0], False)] * (share - len(mine))

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def proportioned(size: int, weights: dict[str, float]) -> dict[str, int]:
    """``size`` rows split over the data sets in proportion to ``weights``, each at least one, by
    largest remainder (ties to the earlier data set)."""
    if size < len(weights):
        raise ValueError(f"a batch of {size} cannot hold a window of each of {len(weights)} data sets")
    total = sum(weights.values())
    exact = {k: size * w / total for k, w in weights.items()}
    counts = {k: max(1, int(v)) for k, v in exact.items()}
    order = sorted(weights, key=lambda k: -(exact[k] - int(exact[k])))
    i = 0
    while sum(counts.values()) < size:
        counts[order[i % len(order)]] += 1
        i += 1
    while sum(counts.values()) > size:  # the minimum of one overshot: take from the largest
        counts[max(counts, key=lambda k: counts[k])] -= 1
    return counts


class BalancedBatches(GlobalBatches):
    """Batches that each draw from every data set in a set proportion (1802.06664's setting of
    data sets that each label some tasks): window i of ``data`` (a :class:`SequenceDataset`) is of
    data set ``data_of[video of window i]``, and ``weights`` give each data set's share of a batch.
    Each data set's windows are served in a seeded permutation, drawn again when used up, so the
    smaller sets repeat within an epoch; an epoch is as many batches as the single shuffle over all
    windows gives. Split into shares per rank as :class:`GlobalBatches` does."""

    def __init__(self, data: SequenceDataset, data_of: list[str], weights: dict[str, float], batch_size: int,
                 last_batch: str, generator: torch.Generator, world: World) -> None:
        super().__init__(data, batch_size, last_batch, generator, world)
        self.data_of, self.counts = data_of, proportioned(batch_size, weights)

    def groups(self) -> dict[str, list[int]]:
        """Each data set's window indices this epoch (the windows change from epoch to epoch)."""
        groups: dict[str, list[int]] = {k: [] for k in self.counts}
        for index, (i, _) in enumerate(self.data.items):
            groups[self.data_of[i]].append(index)
        empty = [k for k, v in groups.items() if not v]
        if empty:
            raise ValueError(f"balanced batches: no training window of data set {', '.join(empty)}")
        return groups

    def batches(self) -> Iterator[list[int]]:
        groups = self.groups()
        order: dict[str, list[int]] = {k: [] for k in groups}
        for _ in range(len(self)):
            batch = []
            for k, n in self.counts.items():
                while len(order[k]) < n:
                    drawn = torch.randperm(len(groups[k]), generator=self.generator).tolist()
                    order[k] += [groups[k][j] for j in drawn]
                batch += order[k][:n]
                order[k] = order[k][n:]
            # rows mixed, so that each rank's share holds every data set too
            yield [batch[j] for j in torch.randperm(len(batch), generator=self.generator).tolist()]


class Shares(Dataset):
    """The training windows addressed by ``(index, real)``; padding windows lose their labels."""

    def __init__(self, windows: SequenceDataset) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, key: tuple[int, bool]) -> dict:
        index, real = key
        item = self.windows[index]
        if not real:
            item = {**item, **{task: torch.full_like(item[task], INVALID[task]) for task in TASKS}}
        return item


def gather_batch(outputs: dict[str, torch.Tensor], batch: dict, world: World) -> tuple[dict, dict]:
    """All ranks' outputs {task: (b, t, k)} and targets (with ``mask``) stacked along ``b``, in
    rank order, which is the single-process batch order. Outputs keep their graph: the backward
    of the all-gather sums every rank's gradient for this rank's outputs, W times the gradient
    of the global loss, which DDP's average over W then makes exact."""
    if world.size == 1:
        return outputs, batch
    with warnings.catch_warnings():  # its suggested successor is private API
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather", FutureWarning)
        outs = {k: torch.cat(dist_nn.all_gather(v, group=world.group)) for k, v in outputs.items()}
    targets = {}
    for key in ("va", "expr", "au", "mask"):
        local = batch[key].to(torch.uint8) if key == "mask" else batch[key]  # gloo has no bool
        parts = [torch.empty_like(local) for _ in range(world.size)]
        dist.all_gather(parts, local.contiguous(), group=world.group)
        targets[key] = torch.cat(parts).bool() if key == "mask" else torch.cat(parts)
    return outs, targets
