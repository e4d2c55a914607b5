"""The nguyen2022_amtl recipe's losses, class weights and schedule, built as training builds them,
against the authors' code run as their train.py runs it: one task per run, on the frames their
dataset keeps for that task."""

# ruff: noqa: UP008, E501 - the reference below is the authors' code as written

from __future__ import annotations

import math
from math import cos, pi
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import Dataset

from pipeline import training
from pipeline.config import load_config
from pipeline.data import SequenceDataset
from pipeline.feature_cache import FeatureCache
from pipeline.labels import Labels
from tests.synthetic import write_cache

torch.set_num_threads(1)
D_IN = 16  # feature width of the model the loss is built for; the loss does not read it


# The reference: khanhnd185/MTL-ABAW4 helpers.py (EPS, adjust_learning_rate and the losses) and
# dataset.py (get_dataset and UniSAW2, which computes the class weights), verbatim.
# fmt: off


EPS = 1e-8


def adjust_learning_rate(optimizer, epoch, epochs, init_lr, iteration, num_iter):

    current_iter = iteration + epoch * num_iter
    max_iter = epochs * num_iter
    lr = init_lr * (1 + cos(pi * current_iter / max_iter)) / 2
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr


class WeightedAsymmetricLoss(nn.Module):
    def __init__(self, eps=1e-8, disable_torch_grad=True, weight=None):
        super(WeightedAsymmetricLoss, self).__init__()
        self.disable_torch_grad = disable_torch_grad
        self.eps = eps
        self.weight = weight

    def forward(self, x, y, mask):
        xs_pos = x
        xs_neg = 1 - x
        los_pos = y * torch.log(xs_pos.clamp(min=self.eps))
        los_neg = (1 - y) * torch.log(xs_neg.clamp(min=self.eps))

        if self.disable_torch_grad:
            torch.set_grad_enabled(False)
        neg_weight = 1 - xs_neg
        if self.disable_torch_grad:
            torch.set_grad_enabled(True)
        loss = los_pos + neg_weight * los_neg

        if self.weight is not None:
            loss = loss * self.weight.view(1,-1)

        loss = loss.mean(dim=-1)
        loss = loss * mask
        return -loss.sum() / (mask.sum() + EPS)


class RegressionLoss(nn.Module):
    def __init__(self):
        super(RegressionLoss, self).__init__()
        self.loss = MaskNegativeCCCLoss()

    def forward(self, x, y, mask):
        loss1 = self.loss(x[:, 0], y[:, 0], mask) + self.loss(x[:, 1], y[:, 1], mask)
        return loss1


class MaskedCELoss(nn.Module):
    def __init__(self, weight=None, ignore_index=-1):
        super(MaskedCELoss, self).__init__()
        self.ce = nn.CrossEntropyLoss(reduction='none', weight=weight, ignore_index=ignore_index)

    def forward(self, x, y, mask):
        loss = self.ce(x, y)
        loss = loss.mean(dim=-1)
        loss = loss * mask
        return loss.sum() / (mask.sum() + EPS)


class MaskNegativeCCCLoss(nn.Module):
    def __init__(self):
        super(MaskNegativeCCCLoss, self).__init__()
    def forward(self, x, y, m):
        y = y.view(-1)
        x = x.view(-1)
        x = x * m
        y = y * m
        N = torch.sum(m)
        x_m = torch.sum(x) / N
        y_m = torch.sum(x) / N
        vx = (x - x_m) * m
        vy = (y - y_m) * m
        ccc = 2*torch.dot(vx, vy) / (torch.dot(vx, vx) + torch.dot(vy, vy) + N * torch.pow(x_m - y_m, 2) + EPS)
        return 1-ccc


def get_dataset(filename, feature_dict, onlyfilename=False):
    with open(filename) as f:
        lines = f.read().splitlines()
    num_missed = 0
    X, y_va, y_ex, y_au = [], [], [], []
    masks_va, masks_ex, masks_au = [], [], []

    for line in lines[1:]:
        splitted_line = line.split(',')
        imagename = splitted_line[0]
        valence = float(splitted_line[1])
        arousal = float(splitted_line[2])
        expression = int(splitted_line[3])
        aus = list(map(int, splitted_line[4:]))

        mask_va = (valence > -5 and arousal > -5)
        if not mask_va:
            valence = arousal = 0
        mask_ex = (expression > -1)
        if not mask_ex:
            expression = 0
        mask_au = min(aus) >= 0
        if not mask_au:
            aus = [0]*len(aus)

        if mask_va or mask_ex or mask_au:
            if imagename in feature_dict or onlyfilename:
                if onlyfilename:
                    X.append(imagename)
                else:
                    X.append(np.concatenate((feature_dict[imagename][0], feature_dict[imagename][1])))
                y_va.append((valence, arousal))
                masks_va.append(mask_va)

                y_ex.append(expression)
                masks_ex.append(mask_ex)

                y_au.append(aus)
                masks_au.append(mask_au)
            else:
                num_missed += 1

    X = np.array(X)
    y_va = np.array(y_va)
    y_ex = np.array(y_ex)
    y_au = np.array(y_au)
    masks_va = np.array(masks_va).astype(np.float32)
    masks_ex = np.array(masks_ex).astype(np.float32)
    masks_au = np.array(masks_au).astype(np.float32)

    return X, y_va, y_ex, y_au, masks_va, masks_ex, masks_au


class UniSAW2(Dataset):
    def __init__(self, filename, feature_dict, task='All'):
        super(UniSAW2, self).__init__()
        y = {}
        mask = {}
        self.y = {}
        self.task = task
        X , y['VA'], y['EX'], y['AU'], mask['VA'], mask['EX'], mask['AU'] = get_dataset(filename, feature_dict)

        if task == 'All':
            self.X = X
            self.y = y
            self.mask = mask
        else:
            self.X = X[mask[task] == 1]
            self.y[task] = y[task][mask[task] == 1]

        print(len(self.X))

    def __getitem__(self, i):
        if self.task == 'All':
            return self.X[i] , self.y['VA'][i], self.y['EX'][i], self.y['AU'][i], self.mask['VA'][i], self.mask['EX'][i], self.mask['AU'][i]
        else:
            return self.X[i] , self.y[self.task][i]

    def __len__(self):
        return len(self.X)

    def ex_weight(self):
        if self.task == 'EX':
            return compute_class_weight(class_weight='balanced', classes=np.unique(self.y['EX'].astype(int)), y=self.y['EX'].astype(int))
        else:
            return np.zeros(8)

    def au_weight(self):
        if self.task == 'AU':
            weight = 1.0 / np.sum(self.y['AU'], axis=0)
            weight = weight / weight.sum() * self.y['AU'].shape[1]
            return weight
        else:
            return np.zeros(12)


# fmt: on
# End of the reference.


def split(seed: int = 0, videos: int = 3, frames: int = 120) -> tuple[dict[str, Labels], dict[str, np.ndarray]]:
    """A training split as the project reads it: labels per video with the ABAW sentinels (frames
    without an expression, without VA, without AUs, without any label) and which frames have a face."""
    rng = np.random.default_rng(seed)
    labels, present = {}, {}
    for v in range(videos):
        va = rng.uniform(-1, 1, (frames, 2)).astype(np.float32)
        va[rng.random(frames) < 0.2] = -5.0
        expr = rng.choice(8, frames, p=[0.3, 0.05, 0.05, 0.1, 0.2, 0.15, 0.1, 0.05])
        expr[rng.random(frames) < 0.25] = -1
        au = (rng.random((frames, 12)) < np.linspace(0.05, 0.6, 12)).astype(int)
        au[rng.random(frames) < 0.3] = -1
        none = rng.random(frames) < 0.05
        va[none], expr[none], au[none] = -5.0, -1, -1
        labels[f"v{v}"] = Labels(va, expr, au)
        present[f"v{v}"] = rng.random(frames) > 0.05
    return labels, present


def their_files(tmp_path: Path, labels: dict[str, Labels], present: dict[str, np.ndarray]) -> tuple[Path, dict, dict]:
    """The split as their annotation file (one line per image: name, valence, arousal, expression, 12
    AUs) and two feature pickles: one of every image, one of the images with a face. Each image's
    "feature" is its row in the concatenated split, so their dataset says which frames it keeps."""
    lines, features, row = ["image,valence,arousal,expression,aus"], {}, 0
    for video, lab in labels.items():
        for i in range(len(lab)):
            name = f"{video}/{i + 1:05d}.jpg"
            lines.append(",".join([name, repr(float(lab.va[i, 0])), repr(float(lab.va[i, 1])), str(lab.expr[i]),
                                   *map(str, lab.au[i])]))
            features[name] = (np.array([row], dtype=np.float64), np.zeros(0))
            row += 1
    path = tmp_path / "training_set_annotations.txt"
    path.write_text("\n".join(lines) + "\n")
    faces = np.concatenate(list(present.values()))
    return path, features, {k: f for k, f in features.items() if faces[int(f[0][0])]}


def recipe(*overrides: str):
    return load_config("train", overrides=["experiment=nguyen2022_amtl", *overrides])


def project_loss(cfg, labels: dict[str, Labels], present: dict[str, np.ndarray], where: Path):
    """The loss as build_training makes it: its class weights from the labels its training set reads,
    over a feature cache with the split's faces."""
    videos = sorted(labels)
    cache = FeatureCache([write_cache(where / "features.h5", {
        v: (np.zeros((len(labels[v]), D_IN), np.float32), present[v]) for v in videos})])
    train_set = SequenceDataset(cache, labels, videos, cfg.window, cfg.stride, train=True, frames=cfg.frames)
    model = training.build_model(cfg, D_IN, labels, videos)
    return training.build_loss(cfg, model, train_set.labels_read(), videos)


def outputs(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """What AMTL gives n frames: tanh VA, expression logits, AU cosine scores in [0, 1], as (n, 1, k)
    leaves whose gradients both losses are compared on."""
    g = torch.Generator().manual_seed(seed)
    return {"va": (torch.randn(n, 1, 2, generator=g) * 0.6 + 0.2).tanh().requires_grad_(),
            "expr": (torch.randn(n, 1, 8, generator=g) * 2).requires_grad_(),
            "au": torch.rand(n, 1, 12, generator=g).requires_grad_()}


def project_batch(labels: dict[str, Labels], present: dict[str, np.ndarray]):
    """Every frame of the split as one batch of one-frame windows, as SequenceDataset gives them:
    (n, 1, ...) targets with the sentinels, mask False where there is no face."""
    cat = {t: np.concatenate([getattr(labels[v], t) for v in sorted(labels)]) for t in ("va", "expr", "au")}
    targets = {"va": torch.from_numpy(cat["va"])[:, None], "expr": torch.from_numpy(cat["expr"])[:, None],
               "au": torch.from_numpy(cat["au"])[:, None]}
    mask = torch.from_numpy(np.concatenate([present[v] for v in sorted(labels)]))[:, None]
    return targets, mask


def their_criteria(train_file: Path, features: dict) -> dict:
    """train.py:140-182: the training set of each task, its weights as float tensors, the criteria."""
    sets = {task: UniSAW2(train_file, features, task) for task in ("EX", "AU")}
    train_criteria = {}
    train_criteria['VA'] = RegressionLoss()
    train_criteria['AU'] = WeightedAsymmetricLoss(weight=torch.from_numpy(sets['AU'].au_weight()).float())
    train_criteria['EX'] = MaskedCELoss(weight=torch.from_numpy(sets['EX'].ex_weight()).float(), ignore_index=-1)
    return train_criteria


def their_loss(task: str, sets: dict, criteria: dict, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """train.py:24-36 on a batch of their dataset for ``task``: its frames among the batch's, y cast
    as there, a mask of ones."""
    rows = torch.from_numpy(sets[task].X[:, 0].astype(np.int64))
    yhat = {"VA": out["va"][rows, 0], "EX": out["expr"][rows, 0], "AU": out["au"][rows, 0]}
    y = torch.from_numpy(sets[task].y[task])
    y = y.long() if task == 'EX' else y.float()
    mask = torch.ones(len(rows)).float()
    return criteria[task](yhat[task], y, mask)


@pytest.fixture
def both(tmp_path: Path):
    """The split in the project's form and theirs: per task their training set and criteria from the
    images with a face (those they have a feature of), the frames of the project's batch that its
    mask keeps."""
    labels, present = split()
    train_file, _, faces = their_files(tmp_path, labels, present)
    criteria = their_criteria(train_file, faces)
    sets = {task: UniSAW2(train_file, faces, task) for task in ("VA", "EX", "AU")}
    return labels, present, sets, criteria, tmp_path


def test_class_weights_are_theirs(tmp_path: Path) -> None:
    """train.py:156-163: their weights count the frames their dataset keeps for the task, labelled
    images that have a feature (dataset.py:39); the split has labelled frames without a face."""
    labels, present = split()
    assert not all(p.all() for p in present.values())
    train_file, _, faces = their_files(tmp_path, labels, present)
    loss = project_loss(recipe(), labels, present, tmp_path)
    expr = UniSAW2(train_file, faces, "EX")
    assert len(np.unique(expr.y["EX"])) == 8  # every class present: compute_class_weight gives 8 weights
    torch.testing.assert_close(loss.expr_class_weights, torch.from_numpy(expr.ex_weight()).float(),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.au_weight, torch.from_numpy(UniSAW2(train_file, faces, "AU").au_weight()).float(),
                               rtol=1e-6, atol=1e-6)


def test_each_loss_is_theirs(both) -> None:
    labels, present, sets, criteria, where = both
    loss_fn = project_loss(recipe(), labels, present, where)
    targets, mask = project_batch(labels, present)
    out = outputs(len(mask))
    _, parts = loss_fn(out, targets, mask)
    ours = {"VA": parts["valence"] + parts["arousal"], "EX": parts["expr"], "AU": parts["au"]}
    for task, value in ours.items():
        theirs = their_loss(task, sets, criteria, out).detach()
        assert float(value) == pytest.approx(float(theirs), rel=1e-6, abs=1e-6), task
    # valence and arousal apart, as RegressionLoss adds them
    rows = torch.from_numpy(sets["VA"].X[:, 0].astype(np.int64))
    y = torch.from_numpy(sets["VA"].y["VA"]).float()
    for k, part in enumerate(("valence", "arousal")):
        theirs = MaskNegativeCCCLoss()(out["va"][rows, 0, k], y[:, k], torch.ones(len(rows))).detach()
        assert float(parts[part]) == pytest.approx(float(theirs), rel=1e-6, abs=1e-6), part


@pytest.mark.parametrize("stage", [["au"], ["expr", "va"]])
def test_each_stage_total_and_its_gradient_are_theirs(both, stage: list[str]) -> None:
    """A stage's total as train_epoch gives it (the stage's outputs only) against their runs' losses
    for those tasks: --task AU, then --task EX and --task VA, whose heads share no parameter, so the
    two runs' gradients are those of the sum."""
    labels, present, sets, criteria, where = both
    loss_fn = project_loss(recipe(), labels, present, where)
    targets, mask = project_batch(labels, present)
    out = outputs(len(mask), seed=2)
    total, _ = loss_fn({k: v for k, v in out.items() if k in stage}, targets, mask)
    theirs = sum(their_loss({"va": "VA", "expr": "EX", "au": "AU"}[t], sets, criteria, out) for t in stage)
    assert float(total.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6, abs=1e-6)
    leaves = [out[t] for t in stage]
    for t, g_ours, g_theirs in zip(stage, torch.autograd.grad(total, leaves), torch.autograd.grad(theirs, leaves),
                                   strict=True):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-7, msg=lambda m, t=t: f"{t}: {m}")


@pytest.mark.parametrize(("seed", "shift"), [(0, 0.0), (1, 0.5), (2, -1.3)])
def test_their_ccc_loss_is_one_minus_the_ccc(seed: int, shift: float) -> None:
    """MaskNegativeCCCLoss centres the labels on the predictions' mean (y_m = sum(x) / N), yet the
    expression is 1 - CCC exactly: vy's sum of squares gains N (x_m - y_mean)^2, which stands in
    for the N (x_m - y_m)^2 term that the substitution zeroes, and dot(vx, vy) loses nothing since
    vx sums to zero. Shown on predictions and labels whose means differ."""
    rng = np.random.default_rng(seed)
    x = np.tanh(rng.normal(size=500))
    y = np.clip(0.6 * x + 0.4 * rng.normal(size=500) + shift, -1, 1)
    mx, my = x.mean(), y.mean()
    ccc = 2 * np.mean((x - mx) * (y - my)) / (np.var(x) + np.var(y) + (mx - my) ** 2)
    theirs = MaskNegativeCCCLoss()(torch.from_numpy(x), torch.from_numpy(y), torch.ones(500, dtype=torch.float64))
    assert float(theirs) == pytest.approx(1 - ccc, abs=1e-6)


def test_the_schedule_is_their_adjust_learning_rate_at_every_iteration() -> None:
    """train.py:27 sets the rate before each step of each epoch; the recipe's LambdaLR, stepped
    after each optimiser step, gives each step the same rate (for the same steps per epoch)."""
    cfg = recipe()
    num_iter = 7
    p = nn.Parameter(torch.zeros(1))
    ours = torch.optim.AdamW([p], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(ours, training.lr_lambda(cfg, num_iter))
    theirs = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)  # train.py:114, the --lr default
    for epoch in range(cfg.epochs):
        for batch_idx in range(num_iter):
            adjust_learning_rate(theirs, epoch, cfg.epochs, 1e-3, batch_idx, num_iter)
            assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-9, abs=1e-15), (
                epoch, batch_idx)
            ours.step()
            scheduler.step()
    assert cfg.epochs == 100 and math.isclose(cfg.lr, 1e-3)  # train.py:113-114, --epoch and --lr defaults
