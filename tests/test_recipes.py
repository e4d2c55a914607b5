"""The seed systems' recipes (configs/experiments/zhang2022_*.yaml, nguyen2022_amtl.yaml) built the
way training builds them, checked against what their authors' code does.

The references, read from the authors' public code:
- Zhang et al. 2022, AIM3-RUC/ABAW4: scripts/train_mtl_transformer.sh (hidden_size 1024, num_layers 4
  with share_layers 3 under structure share_bottom: models/mtl_transformer_model.py turns that into
  num_layers - share_layers = 1 shared layer and a share_layers = 3 layer TransformerEncoder per task
  with nhead = width // 64; ffn_dim 2048, dropout 0.3, regress_layers 512,256; strategy
  feature_feedback, feed_source v au -> feed_target a, fed the 256-d last hidden layers, detached;
  loss_weights 12,12,1,0.35 paired with (v, a, au, expr) in get_loss; Adam betas (beta1 0.5, 0.999),
  lr 5e-5; lr_policy linear_with_warmup over niter 10 + niter_decay 40 epochs, stepped per epoch;
  clip_grad_norm_ 5 per network; max_seq_len 64, batch_size 8 videos; nn.TransformerEncoderLayer
  defaults: post-norm, ReLU), scripts/train_lstm.sh and train_gru.sh (one-direction LSTM of one layer,
  GRU of two layers with dropout 0.3, both straight on the features with the state carried from
  chunk to chunk, regress_layers 256,256 and 512,256, lr_policy linear: niter 30 at the full rate,
  then niter_decay 20).
- Nguyen et al. 2022, khanhnd185/MTL-ABAW4: model.py AMTL (ANFL with 12 per-AU layers, top-4
  graph, prototypes; VA Dense with tanh; additive attention of dimension 64), train.py (AdamW betas
  (0.9, 0.999), lr 1e-3, weight decay 1 / batch, batch 256 frames, cosine per iteration, one task
  per run with AU first and then frozen; class-balanced CE, WeightedAsymmetricLoss with
  1 / positives weights summing to 12, the sum of 1 - CCC over valence and arousal).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from models.amtl import AMTLModel
from models.transformer import TransformerEncoder
from pipeline import training
from pipeline.config import load_config
from pipeline.labels import Labels
from tests.test_seed_options import head_layout

D_IN = 48  # the recipes' features are MAE + IResNet; any width builds the same structure around it


def recipe(name: str, *overrides: str):
    return load_config("train", overrides=[f"experiment={name}", *overrides])


def labels(n: int = 200, seed: int = 0) -> dict[str, Labels]:
    rng = np.random.default_rng(seed)
    expr = rng.integers(0, 8, n)
    au = rng.integers(0, 2, (n, 12))
    return {"v0": Labels(rng.uniform(-1, 1, (n, 2)).astype(np.float32), expr, au)}


def built(name: str, *overrides: str, meta: bool = False):
    cfg = recipe(name, *overrides)
    lab = labels()
    if meta:  # the full-size transformer (134 M parameters) without allocating it
        with torch.device("meta"):
            model = training.build_model(cfg, D_IN, lab, ["v0"])
    else:
        model = training.build_model(cfg, D_IN, lab, ["v0"])
    return cfg, model, training.build_loss(cfg, model, lab, ["v0"])


def fc(d_in: int, widths: list[int], d_out: int, p: float) -> list[tuple]:
    """What the authors' FcRegressor / FcClassifier builds (dropout on the input, Linear-ReLU-Dropout
    per width, then a linear output with no activation)."""
    layers = [("Dropout", p)]
    for w in widths:
        layers += [("Linear", d_in, w), ("ReLU",), ("Dropout", p)]
        d_in = w
    return [*layers, ("Linear", d_in, d_out)]


# ---- Zhang et al. 2022: the transformer ---------------------------------------------------------


def test_zhang2022_transformer_shares_one_layer_then_three_per_task() -> None:
    cfg, model, _ = built("zhang2022_transformer", meta=True)
    net = model.net
    bottom = net.bottom
    assert isinstance(bottom, TransformerEncoder) and len(bottom.blocks) == 1
    assert isinstance(bottom.inp[0], nn.Linear) and (bottom.inp[0].in_features, bottom.inp[0].out_features) == (
        D_IN, 1024)
    assert len(bottom.inp) == 1  # the affine projection has no dropout after it
    assert bottom.positions == "sinusoidal_zero_first" and isinstance(bottom.norm, nn.Identity)  # post-norm
    block = bottom.blocks[0]
    assert block.heads == 16 and not block.pre
    assert block.mlp[0].out_features == 2048 and isinstance(block.mlp[1], nn.ReLU) and block.dropout == 0.3
    assert sorted(net.branches) == ["arousal", "au", "expr", "valence"]
    widths = {"valence": 1024, "expr": 1024, "au": 1024, "arousal": 1024 + 2 * 256}
    for name, branch in net.branches.items():
        assert isinstance(branch, TransformerEncoder) and len(branch.blocks) == 3, name
        assert len(branch.inp) == 0, name  # affine=False: no projection, no dropout
        assert branch.out_dim == widths[name] and branch.positions == "sinusoidal_zero_first", name
        for b in branch.blocks:
            assert b.heads == widths[name] // 64 and not b.pre and b.mlp[0].out_features == 2048, name
    # arousal's branch: 1536 wide with 24 heads
    assert net.branches["arousal"].blocks[0].heads == 24


def test_zhang2022_transformer_heads_are_fc_512_256_with_a_linear_va() -> None:
    cfg, model, _ = built("zhang2022_transformer", meta=True)
    outs = {"valence": 1, "arousal": 1, "expr": 8, "au": 12}
    widths = {"valence": 1024, "expr": 1024, "au": 1024, "arousal": 1536}
    for name, head in model.net.heads.items():
        assert head_layout(head) == fc(widths[name], [512, 256], outs[name], 0.3), name
    assert model.args["va_output"] == "linear"


def test_zhang2022_transformer_arousal_reads_the_detached_valence_and_au_heads() -> None:
    cfg, model, _ = built("zhang2022_transformer", "encoder.hidden=128", "encoder.ffn_dim=64")
    assert model.net.sources == ["valence", "au"] and model.net.targets == ["arousal"] and model.net.feed_heads
    x, mask = torch.randn(2, 16, D_IN), torch.ones(2, 16, dtype=torch.bool)
    model.train()
    model(x, mask)["va"][..., 1].sum().backward()  # the arousal output alone
    grads = {n: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
             for n, m in (("valence_head", model.net.heads["valence"]), ("au_head", model.net.heads["au"]),
                          ("bottom", model.net.bottom), ("arousal", model.net.branches["arousal"]))}
    assert grads == {"valence_head": False, "au_head": False, "bottom": True, "arousal": True}


def test_zhang2022_transformer_loss_optimiser_and_batches() -> None:
    """The schedule, the losses as computed and the initialisation are compared with the authors'
    code itself in tests/test_zhang_reference.py."""
    cfg, model, loss = built("zhang2022_transformer", "encoder.hidden=128", "encoder.ffn_dim=64")
    # get_loss pairs 12, 12, 1, 0.35 with (v, a, au, expr)
    assert loss.task_weights["valence"] == 12 and loss.task_weights["arousal"] == 12
    assert loss.task_weights["au"] == 1 and loss.task_weights["expr"] == 0.35
    assert loss.va == "mse" and loss.expr_class_weights is None and loss.au_pos_weight is None
    opt = training.build_optimizer(cfg, list(model.parameters()))
    assert type(opt) is torch.optim.Adam
    assert opt.defaults["betas"] == (0.5, 0.999) and opt.defaults["lr"] == 5e-5 and opt.defaults["weight_decay"] == 0
    # one gradient norm of 5 per network: the shared layer and each task's branch with its head
    groups = training.clip_groups(model, cfg.clip_groups)
    assert cfg.clip == 5 and len(groups) == 5
    assert sum(len(g) for g in groups) == len(list(model.parameters()))
    assert (cfg.window, cfg.batch_size, cfg.batches, cfg.train_windows, cfg.eval_windows) == (
        64, 8, "videos", "consecutive", "consecutive")
    assert cfg.selection == "per_task" and cfg.va_smoothing_per_dimension
    assert cfg.init == "normal" and cfg.patience == 0 and cfg.tune_au_thresholds is False


# ---- Zhang et al. 2022: the recurrent encoders --------------------------------------------------


@pytest.mark.parametrize(("name", "cell", "layers", "widths"), [
    ("zhang2022_lstm", nn.LSTM, 1, [256, 256]),
    ("zhang2022_gru", nn.GRU, 2, [512, 256]),
])
def test_zhang2022_recurrent_recipes(name: str, cell: type, layers: int, widths: list[int]) -> None:
    cfg, model, loss = built(name)
    enc = model.net.encoder
    assert type(enc.rnn) is cell and enc.rnn.num_layers == layers and not enc.rnn.bidirectional
    assert enc.rnn.input_size == D_IN and isinstance(enc.inp, nn.Identity)  # straight on the features
    assert enc.carry_state and cfg.batches == "videos" and cfg.eval_windows == "consecutive"
    assert enc.rnn.dropout == (0.3 if layers > 1 else 0.0) and enc.drop.p == (0.3 if cell is nn.GRU else 0.0)
    outs = {"valence": 1, "arousal": 1, "expr": 8, "au": 12}
    assert sorted(model.net.heads) == sorted(outs)
    for head_name, head in model.net.heads.items():
        assert head_layout(head) == fc(256, widths, outs[head_name], 0.3), head_name
    assert loss.task_weights["valence"] == 12 and loss.task_weights["expr"] == 0.35 and loss.va == "mse"
    opt = training.build_optimizer(cfg, list(model.parameters()))
    assert type(opt) is torch.optim.Adam and opt.defaults["betas"] == (0.5, 0.999) and opt.defaults["lr"] == 5e-5
    assert len(training.clip_groups(model, cfg.clip_groups)) == 5 and cfg.clip == 5


def test_carried_state_equals_the_whole_video_at_once() -> None:
    _, model, _ = built("zhang2022_gru")
    model.eval()
    x = torch.randn(2, 150, D_IN)
    mask = torch.ones(2, 150, dtype=torch.bool)
    whole = model.net.encoder.rnn(x)[0]
    from models.recurrent import reset_carried_state

    assert reset_carried_state(model)
    chunks = [model.net.encoder(x[:, s : s + 64], mask[:, s : s + 64]) for s in range(0, 150, 64)]
    torch.testing.assert_close(torch.cat(chunks, 1), whole, atol=1e-5, rtol=1e-5)


# ---- Nguyen et al. 2022: AMTL ---------------------------------------------------------------------


def test_nguyen2022_amtl_recipe() -> None:
    cfg, model, loss = built("nguyen2022_amtl")
    net = model.net
    assert isinstance(net, AMTLModel) and cfg.encoder.name == "none" and net.bottom.out_dim == D_IN
    assert len(net.au.class_linears) == 12 and net.au.gnn.neighbours == 4 and net.au.gnn.metric == "dots"
    assert net.attention.W_q.in_features == 12 and net.attention.W_q.out_features == 64
    assert isinstance(net.va.ac, nn.Tanh) and net.va.fc.out_features == 2 and net.ex.fc.out_features == 8
    assert model.au_output == "cosine"
    assert [list(s) for s in cfg.stages] == [["au"], ["expr", "va"]] and cfg.selection == "per_task"
    # losses: the sum of 1 - CCC over valence and arousal, class-balanced CE, the weighted asymmetric AU loss
    assert loss.va == "ccc" and loss.task_weights["valence"] == loss.task_weights["arousal"] == 1
    assert loss.au == "asymmetric" and loss.au_pos_weight is None
    lab = labels()
    au = lab["v0"].au
    expected = 1 / au.sum(0)
    torch.testing.assert_close(loss.au_weight, torch.tensor(expected / expected.sum() * 12, dtype=torch.float32))
    counts = np.bincount(lab["v0"].expr, minlength=8)
    torch.testing.assert_close(loss.expr_class_weights, torch.tensor(len(lab["v0"].expr) / (8 * counts),
                                                                     dtype=torch.float32))
    opt = training.build_optimizer(cfg, list(model.parameters()))
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.9, 0.999)
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 1 / 256
    # their adjust_learning_rate: lr (1 + cos(pi i / n)) / 2 at iteration i of n, no warm-up
    steps = 7
    factor = training.lr_lambda(cfg, steps)
    n = cfg.epochs * steps
    for i in (0, 1, n // 2, n - 1):
        assert factor(i) == pytest.approx((1 + math.cos(math.pi * i / n)) / 2, abs=1e-9), i
    assert (cfg.window, cfg.batch_size, cfg.clip, cfg.tune_au_thresholds) == (1, 256, 0.0, False)
    assert cfg.amp is False  # train.py trains in fp32: no autocast anywhere in it


def test_amtl_stage_two_freezes_the_au_modules() -> None:
    _, model, _ = built("nguyen2022_amtl")
    frozen = training.task_modules(model, ["au"])
    assert frozen == [model.net.au]
    assert {id(p) for m in frozen for p in m.parameters()} == {id(p) for p in model.net.au.parameters()}
