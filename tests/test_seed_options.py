"""Options that express the ABAW4 winner (AIM3-RUC/ABAW4, Zhang et al. 2022): its structure at full
size, post-norm blocks against torch's own layer, head feedback, per-frame models, and the losses
and output conversions that go with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models import ENCODERS, STRUCTURES, MultiTaskLoss, MultiTaskModel, encoder_from
from models.transformer import Block, TransformerEncoder, attention_mask
from pipeline.config import load_component
from pipeline.inference import predict_features
from tests.test_losses import case as loss_case
from tests.test_losses import numpy_ccc

torch.set_num_threads(1)

# Their share-bottom transformer with feature feedback from valence and AU to arousal.
WINNER_ENCODER = dict(
    name="transformer",
    hidden=1024,
    layers=1,
    heads=16,
    ffn_dim=2048,
    dropout=0.3,
    norm="post",
    activation="relu",
    input_dropout=False,
    positions="sinusoidal",
)
WINNER = dict(
    structure="feedback",
    dropout=0.3,
    head_layers=[512, 256],
    head_activation="relu",
    va_output="linear",
    task_layers=3,
    task_head_dim=64,
    task_projection=False,
    split_va=True,
    feedback_sources=["valence", "au"],
    feedback_targets=["arousal"],
    feedback_from="head",
)
# The same at a size that trains in milliseconds: bottom 128 wide with 2 heads, heads 64 -> 32.
SMALL_ENCODER = {**WINNER_ENCODER, "hidden": 128, "heads": 2, "ffn_dim": 256}
SMALL = {**WINNER, "head_layers": [64, 32]}
D_IN = 48
NEW_OPTIONS = (
    "head_layers",
    "head_activation",
    "va_output",
    "expr_classes",
    "task_head_dim",
    "task_projection",
    "split_va",
    "feedback_sources",
    "feedback_targets",
    "feedback_from",
    "au_neighbours",
    "au_metric",
    "attention_dim",
)


def batch(seed: int = 0, d: int = D_IN) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 12, d) features and a mask with trailing padding and a hole."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 12, d, generator=g)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, 9:] = False
    mask[1, 2:4] = False
    return x, mask


def head_layout(head: nn.Module) -> list[tuple]:
    """A head's layers as (kind, in, out) / (kind, p) / (kind,)."""
    out = []
    for layer in head.net:
        if isinstance(layer, nn.Linear):
            out.append(("Linear", layer.in_features, layer.out_features))
        elif isinstance(layer, nn.Dropout):
            out.append(("Dropout", layer.p))
        else:
            out.append((type(layer).__name__,))
    return out


def test_winner_structure_at_full_size():
    with torch.device("meta"):  # shapes only: no memory, no time
        net = MultiTaskModel(768, WINNER_ENCODER, **WINNER).net
    bottom = net.bottom
    assert isinstance(bottom, TransformerEncoder) and len(bottom.blocks) == 1 and bottom.out_dim == 1024
    assert [type(m) for m in bottom.inp] == [nn.Linear] and bottom.inp[0].in_features == 768
    assert isinstance(bottom.norm, nn.Identity) and bottom.positions == "sinusoidal"
    block = bottom.blocks[0]
    assert not block.pre and block.heads == 16 and block.dropout == 0.3
    assert [type(m) for m in block.mlp] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert block.mlp[0].out_features == 2048

    assert list(net.branches) == ["valence", "expr", "au", "arousal"]  # sources before the target
    widths = {"valence": 1024, "expr": 1024, "au": 1024, "arousal": 1024 + 2 * 256}
    for name, branch in net.branches.items():
        assert isinstance(branch, TransformerEncoder) and len(branch.blocks) == 3
        assert len(branch.inp) == 0 and branch.positions == "sinusoidal"  # no projection, positions again
        assert branch.out_dim == widths[name] and isinstance(branch.norm, nn.Identity)
        for b in branch.blocks:
            assert not b.pre and b.heads == widths[name] // 64 and b.mlp[0].out_features == 2048
            assert b.dropout == 0.3
    assert net.branches["arousal"].blocks[0].heads == 24

    outputs = {"valence": 1, "arousal": 1, "expr": 8, "au": 12}
    for name, head in net.heads.items():
        assert head_layout(head) == [
            ("Dropout", 0.3),
            ("Linear", widths[name], 512),
            ("ReLU",),
            ("Dropout", 0.3),
            ("Linear", 512, 256),
            ("ReLU",),
            ("Dropout", 0.3),
            ("Linear", 256, outputs[name]),
        ]  # VA linear: no Tanh


def test_feedback_from_heads_is_detached_and_masked():
    torch.manual_seed(0)
    model = MultiTaskModel(D_IN, SMALL_ENCODER, **SMALL)
    net = model.net
    assert net.branches["arousal"].out_dim == 128 + 2 * 32 and net.branches["arousal"].blocks[0].heads == 3
    x, mask = batch()
    out = model(x, mask)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"va": (3, 12, 2), "expr": (3, 12, 8), "au": (3, 12, 12)}
    out["va"][..., 1][mask].sum().backward()  # an arousal loss

    def grad(module: nn.Module) -> float:
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    for name in ("valence", "au", "expr"):
        assert grad(net.heads[name]) == 0 and grad(net.branches[name]) == 0
    assert grad(net.heads["arousal"]) > 0 and grad(net.branches["arousal"]) > 0 and grad(net.bottom) > 0

    model.eval()
    noisy = x.clone()
    noisy[~mask] = float("nan")
    with torch.no_grad():
        ref, again = model(x, mask), model(noisy, mask)
    for task in ref:
        torch.testing.assert_close(again[task][mask], ref[task][mask])


def copy_into(block: Block, layer: nn.TransformerEncoderLayer) -> None:
    """Our block's weights into torch's layer (same layout: q, k, v rows, heads contiguous)."""
    with torch.no_grad():
        layer.self_attn.in_proj_weight.copy_(block.qkv.weight)
        layer.self_attn.in_proj_bias.copy_(block.qkv.bias)
        layer.self_attn.out_proj.weight.copy_(block.proj.weight)
        layer.self_attn.out_proj.bias.copy_(block.proj.bias)
        for ours, theirs in ((block.mlp[0], layer.linear1), (block.mlp[3], layer.linear2)):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
        for ours, theirs in ((block.norm1, layer.norm1), (block.norm2, layer.norm2)):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)


def test_post_norm_equals_torch_encoder_layer():
    torch.manual_seed(0)
    enc = TransformerEncoder(32, layers=2, heads=4, ffn_dim=48, dropout=0.3, norm="post", activation="relu",
                             input_projection=False, input_dropout=False, positions="none").eval()
    layers = [
        nn.TransformerEncoderLayer(32, 4, 48, dropout=0.3, activation="relu", batch_first=True, norm_first=False)
        for _ in enc.blocks
    ]
    for block, layer in zip(enc.blocks, layers, strict=True):
        for p in layer.parameters():  # start torch's layer elsewhere, so equality comes from the copy
            nn.init.normal_(p)
        copy_into(block, layer)
        layer.eval()
    x, full = torch.randn(2, 10, 32), torch.ones(2, 10, dtype=torch.bool)
    with torch.no_grad():
        h = x
        for layer in layers:
            h = layer(h)
        torch.testing.assert_close(enc(x, full), h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc.blocks[0](x, attention_mask(full)), layers[0](x), atol=1e-5, rtol=1e-5)
        # Key padding as torch's: valid steps agree.
        mask = full.clone()
        mask[0, 7:] = False
        h = x
        for layer in layers:
            h = layer(h, src_key_padding_mask=~mask)
        torch.testing.assert_close(enc(x, mask)[mask], h[mask], atol=1e-5, rtol=1e-5)


def test_identity_encoder_is_a_per_frame_model():
    assert "none" in ENCODERS
    spec = load_component("encoder", "none")
    assert spec == {"name": "none"}
    enc = encoder_from(spec, D_IN)
    x, mask = batch()
    noisy = x.clone()
    noisy[~mask] = float("nan")
    out = enc(noisy, mask)
    assert enc.out_dim == D_IN and torch.equal(out[mask], x[mask]) and (out[~mask] == 0).all()

    torch.manual_seed(0)
    for structure in ("shared", "task_specific"):
        model = MultiTaskModel(D_IN, spec, structure=structure, head_layers=[16]).eval()
        y = x.clone()
        y[:, 5] += 3.0  # change one frame
        with torch.no_grad():
            a, b = model(x, mask), model(y, mask)
        moved = (a["au"] - b["au"]).abs().amax(-1) > 0
        assert moved[mask].tolist() == (torch.arange(12) == 5).expand(3, 12)[mask].tolist()


def test_branches_take_only_the_options_their_encoder_has():
    x, mask = batch()
    for name in ("lstm", "gru", "none"):
        spec = {"name": name} if name == "none" else {"name": name, "hidden": 16, "layers": 1}
        model = MultiTaskModel(D_IN, spec, structure="task_specific", task_head_dim=8, split_va=True)
        out = model(x, mask)
        assert out["va"].shape == (3, 12, 2) and list(model.net.tops) == ["valence", "arousal", "expr", "au"]


def test_expr_classes_reach_every_head_and_loss():
    x, mask = batch()
    enc = {"name": "gru", "hidden": 8, "layers": 1}
    for structure in STRUCTURES:  # the expression head of every structure, the authors' AMTL's included
        out = MultiTaskModel(D_IN, enc, structure=structure, expr_classes=7)(x, mask)
        assert out["expr"].shape == (3, 12, 7), structure
    MultiTaskLoss(expr_classes=7, expr_class_weights=[1.0] * 7)
    with pytest.raises(ValueError, match="needs 7"):
        MultiTaskLoss(expr_classes=7, expr_class_weights=[1.0] * 8)


def test_old_model_args_rebuild_the_same_model():
    torch.manual_seed(0)
    model = MultiTaskModel(D_IN, {"name": "lstm", "hidden": 8, "layers": 1}, structure="feedback", head_hidden=4)
    own = set(NEW_OPTIONS) - {"au_neighbours", "au_metric", "attention_dim"}  # the others are amtl's
    assert own <= set(model.args) and not set(NEW_OPTIONS) - own & set(model.args)
    old = {k: v for k, v in model.args.items() if k not in NEW_OPTIONS}
    clone = MultiTaskModel.from_args(old)
    clone.load_state_dict(model.state_dict())
    assert clone.args == model.args


def test_choices_are_checked_by_name():
    enc = {"name": "gru", "hidden": 8, "layers": 1}
    for kwargs, message in [
        (dict(head_activation="tanh"), "head_activation.*gelu, relu"),
        (dict(va_output="sigmoid"), "va_output.*tanh, linear"),
        (dict(head_layers=[8], head_hidden=8), "head_layers.*head_hidden"),
        (dict(structure="feedback", feedback_from="logits"), "feedback_from.*branch, head"),
        (dict(structure="feedback", feedback_targets=["pain"]), "feedback_targets.*valence, arousal, expr, au"),
        (dict(structure="feedback", feedback_sources=["au"], feedback_targets=["au"]), "apart"),
    ]:
        with pytest.raises(ValueError, match=message):
            MultiTaskModel(D_IN, enc, **kwargs)
    for kwargs, message in [(dict(norm="mid"), "norm.*pre, post"), (dict(activation="tanh"), "activation.*gelu")]:
        with pytest.raises(ValueError, match=message):
            TransformerEncoder(D_IN, hidden=16, heads=2, **kwargs)
    for kwargs, message in [
        (dict(au="focal"), "focal.*bce, asymmetric"),
        (dict(au_output="prob"), "au_output.*logits, cosine"),
        (dict(au_output="cosine"), "bce.*logits"),
        (dict(task_weights={"va": 1.0, "valence": 12.0}), "va and valence"),
    ]:
        with pytest.raises(ValueError, match=message):
            MultiTaskLoss(**kwargs)


@pytest.mark.parametrize("va", ["mse", "ccc"])
def test_valence_and_arousal_weighted_apart(va):
    out, targets, mask = loss_case()
    weights = {"va": None, "valence": 12.0, "arousal": 12.0, "au": 1.0, "expr": 0.35}
    total, parts = MultiTaskLoss(va=va, task_weights=weights)(out, targets, mask)
    assert list(parts) == ["valence", "arousal", "expr", "au"]
    expected = {}
    for k, name in enumerate(("valence", "arousal")):
        rows = [(i, j) for i in range(2) for j in range(6) if mask[i, j] and targets["va"][i, j, k] != -5]
        assert len(rows) == 10 - (2 if k == 0 else 1)
        p = np.array([float(out["va"][i, j, k]) for i, j in rows])
        y = np.array([float(targets["va"][i, j, k]) for i, j in rows])
        expected[name] = np.mean((p - y) ** 2) if va == "mse" else 1 - numpy_ccc(p, y)
        assert float(parts[name]) == pytest.approx(expected[name], abs=1e-5)
    hand = 12 * expected["valence"] + 12 * expected["arousal"] + 0.35 * float(parts["expr"]) + float(parts["au"])
    assert float(total) == pytest.approx(hand, abs=1e-4)


def numpy_asymmetric(p: np.ndarray, y: np.ndarray, valid: np.ndarray, w: np.ndarray) -> float:
    """Per (frame, AU) -(y log p + (1 - y) p log(1 - p)) * w, mean over labelled AUs, then frames."""
    eps = 1e-8
    each = -(y * np.log(np.maximum(p, eps)) + (1 - y) * p * np.log(np.maximum(1 - p, eps))) * w
    frames = [each[f][valid[f]].mean() for f in range(len(p)) if valid[f].any()]
    return float(np.mean(frames))


@pytest.mark.parametrize("au_output", ["logits", "cosine"])
def test_asymmetric_au_loss_by_hand(au_output):
    out, targets, mask = loss_case()
    if au_output == "cosine":
        out["au"] = torch.rand(2, 6, 12, generator=torch.Generator().manual_seed(3)) * 1.2 - 0.1
    w = np.linspace(0.2, 2.0, 12)
    loss = MultiTaskLoss(au="asymmetric", au_output=au_output, au_weight=w)
    _, parts = loss({"au": out["au"]}, targets, mask)
    s = out["au"].double().numpy().reshape(12, 12)
    p = 1 / (1 + np.exp(-s)) if au_output == "logits" else s
    y = targets["au"].numpy().reshape(12, 12)
    valid = (mask.numpy().reshape(12, 1)) & (y >= 0)
    assert float(parts["au"]) == pytest.approx(numpy_asymmetric(p, np.clip(y, 0, 1), valid, w), abs=1e-5)


def test_asymmetric_negative_weight_has_no_gradient():
    score = torch.full((1, 1, 12), 0.3, requires_grad=True)
    target = torch.zeros(1, 1, 12, dtype=torch.long)
    loss = MultiTaskLoss(au="asymmetric", au_output="cosine")
    loss({"au": score}, {"au": target}, torch.ones(1, 1, dtype=torch.bool))[0].backward()
    # d/dp of -(p' log(1 - p)) with p' fixed is p / (1 - p); averaged over 12 AUs.
    assert score.grad[0, 0, 0].item() == pytest.approx(0.3 / 0.7 / 12, rel=1e-5)


def test_probabilities_clip_linear_va_and_read_cosine_scores(monkeypatch):
    model = MultiTaskModel(D_IN, {"name": "none"}, va_output="linear").eval()
    assert model.au_output == "logits"
    raw = {"va": torch.tensor([[[-3.0, 0.5]]]), "expr": torch.randn(1, 1, 8), "au": torch.tensor([[[-0.5] * 12]])}
    scores = model.probabilities(raw)
    assert scores["va"].tolist() == [[[-1.0, 0.5]]]
    torch.testing.assert_close(scores["expr"].sum(-1), torch.ones(1, 1))
    torch.testing.assert_close(scores["au"], torch.sigmoid(raw["au"]))

    class Cosine(STRUCTURES["shared"]):
        au_output = "cosine"

    monkeypatch.setitem(STRUCTURES, "cosine", Cosine)
    cosine = MultiTaskModel(D_IN, {"name": "none"}, structure="cosine")
    assert cosine.au_output == "cosine"
    au = cosine.probabilities({"au": torch.tensor([[[-0.5, 0.25, 1.5]]])})["au"]
    assert au.tolist() == [[[0.0, 0.25, 1.0]]]

    feats = np.random.default_rng(0).normal(size=(20, D_IN)).astype(np.float32) * 100
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.05)
    preds = predict_features(model, feats, np.ones(20, bool), None, length=8, stride=4)
    assert np.abs(preds["va"]).max() == 1.0 and 0 <= preds["au"].min() and preds["au"].max() <= 1
