"""MultiTaskLoss against hand computations on small cases with ABAW sentinels and masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import MultiTaskLoss

torch.set_num_threads(1)


def case(seed: int = 0):
    """Predictions and targets for (2, 6) steps with every kind of invalid entry."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "va": torch.rand(2, 6, 2, generator=g) * 2 - 1,
        "expr": torch.randn(2, 6, 8, generator=g),
        "au": torch.randn(2, 6, 12, generator=g),
    }
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 5] = mask[1, 0] = False  # padding / missing face, labels there look valid
    va = torch.rand(2, 6, 2, generator=g) * 2 - 1
    va[0, 1, 0] = va[1, 3] = -5.0  # one or both values missing
    expr = torch.randint(0, 8, (2, 6), generator=g)
    expr[0, 2] = expr[1, 4] = -1
    au = torch.randint(0, 2, (2, 6, 12), generator=g)
    au[0, 0, :3] = -1
    au[1, 2] = -1
    return out, {"va": va, "expr": expr, "au": au}, mask


def numpy_ccc(p: np.ndarray, y: np.ndarray) -> float:
    mp, my = p.mean(), y.mean()
    cov = np.mean((p - mp) * (y - my))
    return 2 * cov / (np.mean((p - mp) ** 2) + np.mean((y - my) ** 2) + (mp - my) ** 2)


def hand_va_frames(out, targets, mask):
    """Valid VA frames, listed one by one."""
    pred, true = [], []
    for i in range(2):
        for j in range(6):
            y = targets["va"][i, j].tolist()
            if mask[i, j] and -5.0 not in y:
                pred.append(out["va"][i, j].tolist())
                true.append(y)
    return np.array(pred, dtype=np.float64), np.array(true, dtype=np.float64)


def test_va_ccc_pools_valid_frames():
    out, targets, mask = case()
    _, parts = MultiTaskLoss(va="ccc")(out, targets, mask)
    p, y = hand_va_frames(out, targets, mask)
    assert len(p) == 12 - 2 - 2  # two masked steps, two frames with a -5
    expected = 1 - (numpy_ccc(p[:, 0], y[:, 0]) + numpy_ccc(p[:, 1], y[:, 1])) / 2
    assert float(parts["va"]) == pytest.approx(expected, abs=1e-5)


def test_va_mse_and_ccc_extremes():
    out, targets, mask = case()
    _, parts = MultiTaskLoss(va="mse")(out, targets, mask)
    p, y = hand_va_frames(out, targets, mask)
    assert float(parts["va"]) == pytest.approx(np.mean((p - y) ** 2), abs=1e-6)
    loss = MultiTaskLoss(va="ccc")
    assert float(loss({"va": targets["va"]}, targets, mask)[0]) == pytest.approx(0.0, abs=1e-5)
    mirror = 2 * torch.tensor(y.mean(0), dtype=torch.float32) - targets["va"]  # same means, opposite trend
    flipped = {"va": torch.where(targets["va"] == -5, 0.0, mirror)}
    assert float(loss(flipped, targets, mask)[0]) == pytest.approx(2.0, abs=1e-5)


def test_expr_cross_entropy_by_hand():
    out, targets, mask = case()
    weights = [1.0, 2.0, 0.5, 3.0, 1.0, 1.5, 0.7, 1.2]
    _, parts = MultiTaskLoss(expr_class_weights=weights, label_smoothing=0.1)(out, targets, mask)
    idx = [(i, j) for i in range(2) for j in range(6) if mask[i, j] and targets["expr"][i, j] >= 0]
    assert len(idx) == 8
    logits = torch.stack([out["expr"][i, j] for i, j in idx])
    labels = torch.stack([targets["expr"][i, j] for i, j in idx])
    expected = F.cross_entropy(logits, labels, weight=torch.tensor(weights), label_smoothing=0.1)
    assert float(parts["expr"]) == pytest.approx(float(expected), abs=1e-6)


def test_au_bce_by_hand():
    out, targets, mask = case()
    pos_weight = np.linspace(0.5, 3.0, 12)
    _, parts = MultiTaskLoss(au_pos_weight=pos_weight)(out, targets, mask)
    x, y = out["au"].double().numpy(), targets["au"].numpy()
    terms = []
    for i in range(2):
        for j in range(6):
            for k in range(12):
                if mask[i, j] and y[i, j, k] >= 0:
                    s = 1 / (1 + np.exp(-x[i, j, k]))
                    terms.append(-(pos_weight[k] * y[i, j, k] * np.log(s) + (1 - y[i, j, k]) * np.log(1 - s)))
    assert len(terms) == 10 * 12 - 3 - 12
    assert float(parts["au"]) == pytest.approx(np.mean(terms), abs=1e-5)


def test_total_is_weighted_sum_and_ignores_invalid_entries():
    out, targets, mask = case()
    loss = MultiTaskLoss(task_weights={"va": 2.0, "expr": 0.5})
    total, parts = loss(out, targets, mask)
    assert float(total) == pytest.approx(
        2 * float(parts["va"]) + 0.5 * float(parts["expr"]) + float(parts["au"]), abs=1e-5
    )
    # Whatever is predicted where labels are invalid or steps masked, the loss stays the same.
    invalid = {
        "va": ~mask[..., None] | (targets["va"] == -5).any(-1, keepdim=True),
        "expr": (~mask | (targets["expr"] < 0))[..., None],
        "au": ~mask[..., None] | (targets["au"] < 0),
    }
    garbage = {k: torch.where(invalid[k], torch.randn_like(v) * 50, v) for k, v in out.items()}
    assert float(loss(garbage, targets, mask)[0]) == pytest.approx(float(total), abs=1e-5)
    assert not torch.equal(garbage["au"], out["au"])


@pytest.mark.parametrize("weighting", ["fixed", "uncertainty"])
def test_task_without_labels_adds_zero_with_finite_grads(weighting):
    out, targets, mask = case()
    out = {k: v.clone().requires_grad_() for k, v in out.items()}
    loss = MultiTaskLoss(weighting=weighting)
    targets["va"] = torch.full_like(targets["va"], -5.0)
    targets["expr"] = torch.where(mask, -1, targets["expr"])  # labels only on masked steps
    total, parts = loss(out, targets, mask)
    assert float(parts["va"]) == 0 and float(parts["expr"]) == 0
    total.backward()
    assert all(torch.isfinite(v.grad).all() for v in out.values())
    assert out["va"].grad.abs().sum() == 0 and out["expr"].grad.abs().sum() == 0
    assert out["au"].grad.abs().sum() > 0
    if weighting == "uncertainty":
        grads = {t: p.grad for t, p in loss.log_vars.items()}
        assert grads["au"] is not None and grads["va"] is None and grads["expr"] is None

    nothing = {k: torch.full_like(v, -1) for k, v in targets.items()}
    nothing["va"] = torch.full_like(targets["va"], -5.0)
    total, parts = loss(out, nothing, mask)
    assert float(total.detach()) == 0 and torch.isfinite(total) and total.requires_grad
    assert set(parts) == {"va", "expr", "au"}


def test_uncertainty_weighting_by_hand():
    out, targets, mask = case()
    loss = MultiTaskLoss(weighting="uncertainty")
    with torch.no_grad():
        for t, s in zip(("va", "expr", "au"), (0.3, -0.5, 1.2), strict=True):
            loss.log_vars[t].fill_(s)
    total, parts = loss(out, targets, mask)
    expected = sum(np.exp(-s) * float(parts[t]) + s for t, s in (("va", 0.3), ("expr", -0.5), ("au", 1.2)))
    assert float(total.detach()) == pytest.approx(expected, abs=1e-5)
    assert {n for n, _ in loss.named_parameters()} == {"log_vars.va", "log_vars.expr", "log_vars.au"}


def test_missing_tasks_and_bad_options():
    out, targets, mask = case()
    total, parts = MultiTaskLoss()({"expr": out["expr"]}, targets, mask)
    assert list(parts) == ["expr"] and float(total) == pytest.approx(float(parts["expr"]))
    _, parts = MultiTaskLoss()(out, {"au": targets["au"]}, mask)
    assert list(parts) == ["au"]
    with pytest.raises(ValueError, match="choose one of ccc, mse"):
        MultiTaskLoss(va="mae")
    with pytest.raises(ValueError, match="needs 8"):
        MultiTaskLoss(expr_class_weights=[1.0] * 7)
    with pytest.raises(ValueError, match="unknown tasks"):
        MultiTaskLoss(task_weights={"pain": 1.0})
