"""pipeline.train's pieces on their own: what a run builds from its config, the stage's optimiser,
one epoch of the training loop, and the loop's own time in each epoch's record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline import loop, splits, train, training
from pipeline.config import Config, load_config
from pipeline.distributed import World
from tests.synthetic import learnable_set

FAST = ["encoder.hidden=16", "encoder.layers=1", "window=24", "stride=8", "eval_stride=12", "batch_size=4",
        "patience=0", "extractors=[syn]", "va_smoothing=[1]"]


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return learnable_set(tmp_path_factory.mktemp("syn"))


def config(syn: dict[str, Path], *overrides: str) -> Config:
    cfg = load_config("train", overrides=[*FAST, f"runs_dir={syn['runs']}", *overrides])
    cfg.data.update(name="syn", annotations=str(syn["annotations"]), format="abaw_tasks")
    return cfg


class Board:
    """Collects what the loop logs, as TensorBoard's SummaryWriter would take it."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))


def test_build_training_is_seeded_and_an_epoch_steps_every_batch(syn: dict[str, Path]) -> None:
    cfg, cpu = config(syn), torch.device("cpu")
    built = training.build_training(cfg, World(), cpu, splits.open_features(cfg))
    again = training.build_training(cfg, World(), cpu, splits.open_features(cfg))
    for a, b in zip(built.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)  # the seed is set before the model is built
    assert built.stages == [["va", "expr", "au"]] and len(built.train_videos) == 4

    _, groups, optimizer, scheduler = training.enter_stage(cfg, built.model, built.loss_fn, built.stages, 0,
                                                        len(built.loader))
    before = [p.detach().clone() for p in built.model.parameters()]
    board = Board()
    losses = loop.train_epoch(cfg, built.model, built.loader, built.loss_fn, optimizer, scheduler, groups,
                               built.stages[0], cpu, World(), first_step=100, board=board)
    assert len(losses) == len(built.loader) > 1 and all(math.isfinite(v) for v in losses)
    assert scheduler.last_epoch == len(built.loader)  # stepped after every optimiser step
    assert [s for tag, _, s in board.scalars if tag == "train/loss"] == list(range(100, 100 + len(losses)))
    assert {tag for tag, _, _ in board.scalars} >= {"train/lr", "train/loss_va", "train/loss_expr", "train/loss_au"}
    assert all(not torch.equal(a, b) for a, b in zip(before, built.model.parameters(), strict=True))


def test_a_later_stage_freezes_what_the_earlier_trained(syn: dict[str, Path]) -> None:
    cfg = config(syn, "stages=[[au],[expr,va]]")
    built = training.build_training(cfg, World(), torch.device("cpu"), splits.open_features(cfg))
    frozen, _, optimizer, _ = training.enter_stage(cfg, built.model, built.loss_fn, built.stages, 1, len(built.loader))
    assert frozen and all(not p.requires_grad for m in frozen for p in m.parameters())
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not stepped & {id(p) for m in frozen for p in m.parameters()}
    frozen, _, _, _ = training.enter_stage(cfg, built.model, built.loss_fn, built.stages, 0, len(built.loader))
    assert frozen == [] and all(p.requires_grad for p in built.model.parameters())


def test_each_epoch_records_the_loop_time_apart(syn: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train.main(config(syn, "epochs=2", f"out_dir={out}")) == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for record in history:
        assert 0 <= record["train_seconds"] <= record["seconds"]  # the loop alone, no evaluation or saving
