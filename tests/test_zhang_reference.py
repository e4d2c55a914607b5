"""The zhang2022_* recipes built and trained as training builds them, against the authors' code
(AIM3-RUC/ABAW4) transcribed below and run on the same inputs: their transformer encoder with its
sinusoid table, the networks their model builds (for the parameter count), their masked losses as
their model assembles them for a chunk of 8 videos, their two learning-rate policies, and their
``init_weights``."""

# ruff: noqa: E501, UP008, UP031, B008, B905, E721 - the reference is the authors' code as written

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import init
from torch.optim import lr_scheduler

from models.transformer import zero_first_positions
from pipeline import training
from pipeline.config import load_config
from pipeline.labels import Labels
from tests.test_recipes import built

torch.set_num_threads(1)


# fmt: off
# ---- models/networks/transformer.py, lines 18-153 ----
def get_sinusoid_encoding_table(n_position, d_hid, padding_idx=None):
    ''' Sinusoid position encoding table '''

    def cal_angle(position, hid_idx):
        return position / np.power(10000, 2 * (hid_idx // 2) / d_hid)

    def get_posi_angle_vec(position):
        return [cal_angle(position, hid_j) for hid_j in range(d_hid)]

    sinusoid_table = np.array([get_posi_angle_vec(pos_i)
                               for pos_i in range(n_position)])

    sinusoid_table[:, 0::2] = np.sin(sinusoid_table[:, 0::2])  # dim 2i
    sinusoid_table[:, 1::2] = np.cos(sinusoid_table[:, 1::2])  # dim 2i+1

    if padding_idx is not None:
        # zero vector for padding dimension
        sinusoid_table[padding_idx] = 0.

    return torch.FloatTensor(sinusoid_table)

def _get_clones(module, N):
    return nn.ModuleList([copy.deepcopy(module) for i in range(N)])


class _TransformerEncoder(nn.Module):
    __constants__ = ['norm']

    def __init__(self, encoder_layer, num_layers, norm=None):
        super(_TransformerEncoder, self).__init__()
        self.layers = _get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src, mask=None, src_key_padding_mask=None):
        output = src
        hidden_states = []
        for mod in self.layers:
            output = mod(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask)
            hidden_states.append(output)

        if self.norm is not None:
            output = self.norm(output)

        return output, hidden_states

class TransformerEncoder(nn.Module):
    def __init__(self, input_dim, num_layers, nhead, dim_feedforward=None, \
                            affine=False, affine_dim=None, embd_method='maxpool', \
                            max_position_embeddings=512, use_pe=True, dropout=0.1):
        super().__init__()
        self.affine = affine
        self.max_position_embeddings = max_position_embeddings
        assert embd_method in ['maxpool', 'meanpool', 'last']
        self.embd_method = embd_method
        if self.affine:
            _inp = affine_dim
            self.affine = nn.Linear(input_dim, affine_dim)
        else:
            _inp = input_dim
        if dim_feedforward is None:
            dim_feedforward = _inp

        self.position_embeddings = nn.Embedding.from_pretrained(
                get_sinusoid_encoding_table(self.max_position_embeddings, affine_dim, padding_idx=0),
                freeze=True
            )
        encoder_layer = nn.TransformerEncoderLayer(d_model=_inp, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout)
        self.encoder = _TransformerEncoder(encoder_layer=encoder_layer, num_layers=num_layers)
        self.linear = nn.Linear(_inp, _inp)
        self.tanh = nn.Tanh()
        self.use_pe = use_pe

    def post_process(self, x):
        if self.embd_method == 'maxpool':
            x = x.transpose(1, 2)                               # out.shape => [batch_size, ft_dim, seq_len]
            embd = F.max_pool1d(x, x.size(2), x.size(2))        # out.shape => [batch_size, ft_dim, 1]
            embd = embd.squeeze()                               # out.shape => [batch_size, ft_dim]
        elif self.embd_method == 'meanpool':
            embd = torch.mean(x, dim=1)
        elif self.embd_method == 'last':
            embd = x[:, -1, :]
        return embd

    def forward(self, x, mask=None, src_key_padding_mask=None):
        # switch batch to dim-1, inp.shape => [seq_len, batch_size, ft_dim]
        batch_size, seq_len, _ = x.size()
        x = x.transpose(0, 1)
        if self.affine:
            x = self.affine(x)
        position_ids = torch.arange(seq_len, dtype=torch.long, device=x.device)
        position_ids = position_ids.unsqueeze(1).expand([seq_len, batch_size])
        if self.use_pe:
            position_embeddings = self.position_embeddings(position_ids)
            x = x + position_embeddings

        out, hidden_states = self.encoder(x, mask, src_key_padding_mask)
        # switch back to batch first, inp.shape => [batch_size, seq_len, ft_dim]
        out = out.transpose(0, 1)
        out = self.post_process(out)
        out = self.tanh(self.linear(out))
        return out, hidden_states


# ---- models/networks/regressor.py, lines 5-34 and classifier.py, lines 70-99 ----
class FcRegressor(nn.Module):
    def __init__(self, input_dim, layers, output_dim, activation=nn.ReLU(), dropout=0.3, use_bn=False, dropout_input=True):
        super().__init__()
        self.all_layers = [nn.Dropout(dropout)] if dropout_input else []
        for i in range(0, len(layers)):
            self.all_layers.append(nn.Linear(input_dim, layers[i]))
            self.all_layers.append(activation)
            if use_bn:
                self.all_layers.append(nn.BatchNorm1d(layers[i]))
            if dropout > 0:
                self.all_layers.append(nn.Dropout(dropout))
            input_dim = layers[i]

        self.module = nn.Sequential(*self.all_layers) #前面的所有隐藏层
        self.fc_out = nn.Linear(layers[-1], output_dim) #最后一层输出层

    def forward(self, x):
        feat = self.module(x)
        out = self.fc_out(feat)
        return out, feat

class FcClassifier(nn.Module):
    def __init__(self, input_dim, layers, output_dim, activation=nn.ReLU, dropout=0.3, use_bn=False, dropout_input=True):
        super().__init__()
        self.all_layers = [nn.Dropout(dropout)] if dropout_input else []
        for i in range(0, len(layers)):
            self.all_layers.append(nn.Linear(input_dim, layers[i]))
            self.all_layers.append(nn.ReLU())
            if use_bn:
                self.all_layers.append(nn.BatchNorm1d(layers[i]))
            if dropout > 0:
                self.all_layers.append(nn.Dropout(dropout))
            input_dim = layers[i]

        self.module = nn.Sequential(*self.all_layers)
        self.fc_out = nn.Linear(layers[-1], output_dim)

    def forward(self, x):
        feat = self.module(x)
        out = self.fc_out(feat)
        return out, feat


# ---- models/mtl_transformer_model.py, lines 45-47 and 70-144 (the networks; the feedback
# embeddings of strategy 'feedback' left out, the recipe's strategy is feature_feedback) ----
class MTLTransformerNetworks:
    @staticmethod
    def get_encoder(input_dim, num_layers, nhead, dim_feedforward, affine, affine_dim, use_pe, dropout):
        return TransformerEncoder(input_dim, num_layers, nhead, dim_feedforward=dim_feedforward,
                                  affine=affine, affine_dim=affine_dim, use_pe=use_pe, dropout=dropout)

    def __init__(self, opt):
        self.model_names = ['_seq', '_v_reg', '_a_reg', '_expr_cls', '_au_cls']
        self.structure = opt.structure
        if opt.structure == 'share_bottom':
            opt.num_layers = opt.num_layers - opt.share_layers
        self.net_seq = self.get_encoder(opt.input_dim, opt.num_layers, opt.nhead,
                                        dim_feedforward=opt.ffn_dim, affine=True,
                                        affine_dim=opt.hidden_size, use_pe=opt.use_pe, dropout=opt.dropout_rate)
        layers = list(map(lambda x: int(x), opt.regress_layers.split(',')))
        task_hidden_size = dict([(t, opt.hidden_size) for t in ['au', 'v', 'a', 'expr']])
        if opt.strategy in ['feedback', 'feature_feedback']:
            for task in opt.feed_target:
                for _ in opt.feed_source:
                    task_hidden_size[task] += opt.feed_dim if opt.strategy == 'feedback' else layers[-1]

        v_layers = [FcRegressor(task_hidden_size['v'], layers, output_dim=1, dropout=opt.dropout_rate)]
        a_layers = [FcRegressor(task_hidden_size['a'], layers, output_dim=1, dropout=opt.dropout_rate)]
        expr_layers = [FcClassifier(task_hidden_size['expr'], layers, output_dim=8, dropout=opt.dropout_rate)]
        au_layers = [FcClassifier(task_hidden_size['au'], layers, output_dim=12, dropout=opt.dropout_rate)]

        if self.structure == 'share_bottom':
            v_layers = [self.get_encoder(task_hidden_size['v'], opt.share_layers, task_hidden_size['v'] // 64,
                                          dim_feedforward=opt.ffn_dim, affine=False, affine_dim=task_hidden_size['v'],
                                          use_pe=opt.use_pe, dropout=opt.dropout_rate)] + v_layers
            a_layers = [self.get_encoder(task_hidden_size['a'], opt.share_layers, task_hidden_size['a'] // 64,
                                          dim_feedforward=opt.ffn_dim, affine=False, affine_dim=task_hidden_size['a'],
                                          use_pe=opt.use_pe, dropout=opt.dropout_rate)] + a_layers
            expr_layers = [self.get_encoder(task_hidden_size['expr'], opt.share_layers, task_hidden_size['expr'] // 64,
                                            dim_feedforward=opt.ffn_dim, affine=False, affine_dim=task_hidden_size['expr'],
                                            use_pe=opt.use_pe, dropout=opt.dropout_rate)] + expr_layers
            au_layers = [self.get_encoder(task_hidden_size['au'], opt.share_layers, task_hidden_size['au'] // 64,
                                          dim_feedforward=opt.ffn_dim, affine=False, affine_dim=task_hidden_size['au'],
                                          use_pe=opt.use_pe, dropout=opt.dropout_rate)] + au_layers

        self.net_v_reg = nn.ModuleList(v_layers)
        self.net_a_reg = nn.ModuleList(a_layers)
        self.net_expr_cls = nn.ModuleList(expr_layers)
        self.net_au_cls = nn.ModuleList(au_layers)


# ---- models/loss.py, lines 4-25 ----
class MSELoss(nn.Module):
    def __init__(self, reduction='mean'):
        super(MSELoss, self).__init__()
        self.mse = torch.nn.MSELoss(reduction=reduction)

    def forward(self, inputs, target, mask=None):
        if mask is not None:
            return self.mse(inputs * mask, target * mask)
        else:
            return self.mse(inputs, target)


class CELoss(nn.Module):
    def __init__(self, reduction='mean', ignore_index=-1):
        super(CELoss, self).__init__()
        self.ce = torch.nn.CrossEntropyLoss(reduction=reduction, ignore_index=ignore_index)

    def forward(self, inputs, target, mask=None):
        #logits: [B, C, L], target: [B, L], mask: [B, L]
        if mask is not None:
            target[mask == 0] = -1
        return self.ce(inputs, target)


# ---- models/mtl_transformer_model.py, lines 153-155 (criteria), 336-338 (get_weights, fixed),
# 366-381 (get_loss) and 383-421 (backward_step, without the backward and the clipping) ----
class MTLTransformerLoss:
    def __init__(self, loss_weights, loss_names):
        self.weight_type = 'fixed'
        self.loss_weights = [float(w) for w in loss_weights.split(',')]
        self.loss_names = loss_names
        self.loss_type = loss_names
        self.criterion_reg = MSELoss()
        self.criterion_cls = CELoss()
        self.criterio_bce = torch.nn.BCELoss()

    def get_weights(self, default=(15, 15, 1, 0.25), temperature=1.5):
        if self.weight_type in ['fixed', 'normalized_fixed']:
            return default

    def get_loss(self, v_loss=None, a_loss=None, au_loss=None, expr_loss=None, pred=None, target=None):
        weights = self.get_weights(self.loss_weights)
        losses = [v_loss, a_loss, au_loss, expr_loss]
        final_loss = 0
        for w, loss in zip(weights, losses):
            if loss is not None:
                if self.weight_type not in ['fixed', 'param_adjust'] and type(loss) != int and loss > 0: #除了fixed，其他默认都normalize到1
                    loss = loss/loss.item()
                final_loss = final_loss + w*loss
        return final_loss

    def backward_step(self, pred, target, mask):
        """Calculate the loss for back propagation"""
        ############ v and a loss
        self.loss_v, self.loss_a, self.loss_au, self.loss_expr = None, None, None, None
        if 'v' in self.loss_names:
            v_mask = mask.unsqueeze(-1)  # -> [B, L, 1]
            target_mask = target['v'] != -5
            target_mask = target_mask.int()
            v_mask = v_mask.mul(target_mask)
            self.loss_v = self.criterion_reg(pred['v'], target['v'], v_mask)

        if 'a' in self.loss_names:
            a_mask = mask.unsqueeze(-1)  # -> [B, L, 1]
            target_mask = target['a'] != -5
            target_mask = target_mask.int()
            a_mask = a_mask.mul(target_mask)
            self.loss_a = self.criterion_reg(pred['a'], target['a'], a_mask)

        ############ expr loss
        if 'expr' in self.loss_names:
            expr_mask = mask
            expr_pred = pred['expr'].permute(0, 2, 1)
            self.loss_expr = self.criterion_cls(expr_pred, target['expr'], expr_mask)

        ############ au loss
        if 'au' in self.loss_names:
            if len(pred['au'][target['au']!=-1]) == 0:
                self.loss_au = 0
                pred['au'].detach_()
            else:
                self.loss_au = self.criterio_bce(F.sigmoid(pred['au'][target['au']!=-1]), target['au'][target['au']!=-1].float())

        ############ 对所有loss求和
        if 'au' in self.loss_type and len(pred['au'][target['au'] != -1]) == 0:
            self.loss = self.get_loss(v_loss=self.loss_v, a_loss=self.loss_a, au_loss=None, expr_loss=self.loss_expr,
                                      pred=pred, target=target)
        else:
            self.loss = self.get_loss(v_loss=self.loss_v, a_loss=self.loss_a, au_loss=self.loss_au,
                                      expr_loss=self.loss_expr, pred=pred, target=target)
        return self.loss


# ---- models/networks/tools.py, lines 47-64 (get_scheduler, linear and linear_with_warmup) ----
def get_scheduler(optimizer, opt):
    if opt.lr_policy == 'linear':
        def lambda_rule(epoch):
            lr_l = 1.0 - max(0, epoch + opt.epoch_count - opt.niter) / float(opt.niter_decay + 1)
            return lr_l
        scheduler = lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda_rule)
    elif opt.lr_policy == 'linear_with_warmup':
        scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=opt.niter, num_training_steps=(opt.niter+opt.niter_decay))
    return scheduler


# ---- transformers (4.x) optimization.py: get_linear_schedule_with_warmup, which tools.py imports ----
def get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, last_epoch=-1):
    def lr_lambda(current_step: int):
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        return max(
            0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps))
        )

    return lr_scheduler.LambdaLR(optimizer, lr_lambda, last_epoch)


# ---- models/networks/tools.py, lines 69-101 (init_weights), as base_model.py:79-84 applies it to
# each network of model_names ----
def init_weights(net, init_type='normal', init_gain=0.02):
    def init_func(m):  # define the initialization function
        classname = m.__class__.__name__
        if hasattr(m, 'weight') and (classname.find('Conv') != -1 or classname.find('Linear') != -1):
            if init_type == 'normal':
                init.normal_(m.weight.data, 0.0, init_gain)
            elif init_type == 'xavier':
                init.xavier_normal_(m.weight.data, gain=init_gain)
            elif init_type == 'kaiming':
                init.kaiming_normal_(m.weight)
            elif init_type == 'orthogonal':
                init.orthogonal_(m.weight.data, gain=init_gain)
            else:
                raise NotImplementedError('initialization method [%s] is not implemented' % init_type)
            if hasattr(m, 'bias') and m.bias is not None:
                init.constant_(m.bias.data, 0.0)
        elif classname.find('BatchNorm2d') != -1:  # BatchNorm Layer's weight is not a matrix; only normal distribution applies.
            init.normal_(m.weight.data, 1.0, init_gain)
            init.constant_(m.bias.data, 0.0)

    net.apply(init_func)  # apply the initialization function <init_func>
# fmt: on
# End of the reference.


def recipe(name: str, *overrides: str):
    return load_config("train", overrides=[f"experiment={name}", *overrides])


def copy_layer(theirs: nn.TransformerEncoderLayer, ours) -> None:
    """Their layer's weights into our block (q, k and v stacked the same way)."""
    pairs = [(theirs.self_attn.in_proj_weight, ours.qkv.weight), (theirs.self_attn.in_proj_bias, ours.qkv.bias),
             (theirs.self_attn.out_proj.weight, ours.proj.weight), (theirs.self_attn.out_proj.bias, ours.proj.bias),
             (theirs.linear1.weight, ours.mlp[0].weight), (theirs.linear1.bias, ours.mlp[0].bias),
             (theirs.linear2.weight, ours.mlp[3].weight), (theirs.linear2.bias, ours.mlp[3].bias),
             (theirs.norm1.weight, ours.norm1.weight), (theirs.norm1.bias, ours.norm1.bias),
             (theirs.norm2.weight, ours.norm2.weight), (theirs.norm2.bias, ours.norm2.bias)]
    with torch.no_grad():
        for a, b in pairs:
            assert a.shape == b.shape
            b.copy_(a)


SMALL = ("encoder.hidden=128", "encoder.heads=4", "encoder.ffn_dim=96")
D_IN = 48  # the width tests/test_recipes.py builds its models on


def chunk_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk of 4 videos, 24 steps: two whole, one ending at step 9, one ended (all padding),
    zeros past each video's end as their pad_sequence leaves them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 24, D_IN, generator=g)
    mask = torch.ones(4, 24, dtype=torch.bool)
    mask[2, 9:] = False
    mask[3] = False
    return x * mask[..., None], mask


def test_the_shared_encoder_computes_as_theirs_on_a_chunk_with_ended_videos() -> None:
    cfg, model, _ = built("zhang2022_transformer", *SMALL)
    ours = model.net.bottom.eval()
    torch.manual_seed(0)
    theirs = TransformerEncoder(D_IN, 1, 4, dim_feedforward=96, affine=True, affine_dim=128, use_pe=True,
                                dropout=0.3).eval()
    with torch.no_grad():
        ours.inp[0].weight.copy_(theirs.affine.weight)
        ours.inp[0].bias.copy_(theirs.affine.bias)
    copy_layer(theirs.encoder.layers[0], ours.blocks[0])
    x, mask = chunk_batch()
    with torch.no_grad():
        expected = theirs(x)[1][-1].transpose(0, 1)  # forward_step: self.net_seq(input), no mask
        got = ours(x, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_task_branch_computes_as_their_share_bottom_layers() -> None:
    """Their task network's TransformerEncoder(affine=False, nhead=width // 64), positions added again."""
    cfg, model, _ = built("zhang2022_transformer", *SMALL)
    ours = model.net.branches["valence"].eval()
    torch.manual_seed(1)
    theirs = TransformerEncoder(128, 3, 128 // 64, dim_feedforward=96, affine=False, affine_dim=128, use_pe=True,
                                dropout=0.3).eval()
    assert len(ours.blocks) == 3 and ours.blocks[0].heads == 2
    for a, b in zip(theirs.encoder.layers, ours.blocks, strict=True):
        copy_layer(a, b)
    h, mask = torch.randn(4, 24, 128), chunk_batch()[1]
    h = h * mask[..., None]
    with torch.no_grad():
        expected = theirs(h)[1][-1].transpose(0, 1)
        got = ours(h, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_full_size_transformer_trains_their_parameters() -> None:
    """On MAE + IResNet features (1,280-d): their model holds 144,879,126 parameters, of which the
    frozen sinusoid tables and the pooled ``linear`` of each encoder (whose output their model
    never reads) take no gradient; what trains is what the recipe trains."""
    opt = SimpleNamespace(input_dim=1280, num_layers=4, share_layers=3, structure="share_bottom", nhead=16,
                          ffn_dim=2048, hidden_size=1024, use_pe=True, dropout_rate=0.3, regress_layers="512,256",
                          strategy="feature_feedback", feed_source=["v", "au"], feed_target=["a"], feed_dim=0)
    with torch.device("meta"):
        theirs = MTLTransformerNetworks(opt)
        nets = [getattr(theirs, "net" + name) for name in theirs.model_names]
        cfg = recipe("zhang2022_transformer")
        model = training.build_model(cfg, 1280, {"v0": Labels(np.zeros((1, 2)), [0], np.zeros((1, 12)))}, ["v0"])
    named = [(n, p) for net in nets for n, p in net.named_parameters()]
    assert sum(p.numel() for _, p in named) == 144_879_126
    trained = sum(p.numel() for n, p in named if p.requires_grad and not n.split(".")[-2] == "linear")
    assert trained == 135_436_310
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trained


def test_the_losses_of_a_chunk_batch_are_theirs() -> None:
    """Eight videos' chunk: the recipe's loss against their backward_step with loss_weights 12,12,1,0.35
    (paired with v, a, au, expr by get_loss), masks from each video's length."""
    cfg = recipe("zhang2022_transformer", *SMALL)
    lab = {"v0": Labels(np.zeros((1, 2)), [0], np.zeros((1, 12)))}
    model = training.build_model(cfg, D_IN, lab, ["v0"])
    loss_fn = training.build_loss(cfg, model, lab, ["v0"])
    g = torch.Generator().manual_seed(5)
    b, t = 8, 64
    steps = torch.tensor([64, 64, 40, 64, 0, 64, 17, 64])  # two videos end in this chunk, one has ended
    L = int(steps.max())  # their chunk: self.va_target[:, step*64:(step+1)*64] of the padded batch
    inside = torch.arange(t)[None] < steps[:, None]
    va = torch.rand(b, t, 2, generator=g) * 2 - 1
    va[torch.rand(b, t, generator=g) < 0.5] = -5.0  # half the frames without VA
    va[:, :, 1][torch.rand(b, t, generator=g) < 0.1] = -5.0  # some with valence but no arousal
    expr = torch.randint(0, 8, (b, t), generator=g)
    expr[torch.rand(b, t, generator=g) < 0.4] = -1
    au = torch.randint(0, 2, (b, t, 12), generator=g)
    au[torch.rand(b, t, generator=g) < 0.3] = -1
    va[~inside], expr[~inside], au[~inside] = -5.0, -1, -1  # padding, as SequenceDataset and pad_sequence give it
    out = {"va": torch.randn(b, t, 2, generator=g, requires_grad=True),
           "expr": torch.randn(b, t, 8, generator=g, requires_grad=True),
           "au": torch.randn(b, t, 12, generator=g, requires_grad=True)}
    total, parts = loss_fn(out, {"va": va, "expr": expr, "au": au, "steps": steps}, inside)
    # theirs, on the chunk as their run() slices it: L steps, the mask from the lengths
    pred = {"v": out["va"][:, :L, 0:1], "a": out["va"][:, :L, 1:2], "expr": out["expr"][:, :L],
            "au": out["au"][:, :L]}
    target = {"v": va[:, :L, 0:1].clone(), "a": va[:, :L, 1:2].clone(), "expr": expr[:, :L].clone(),
              "au": au[:, :L].clone()}
    reference = MTLTransformerLoss("12,12,1,0.35", ["v", "a", "expr", "au"])
    expected = reference.backward_step(pred, target, inside[:, :L].float())
    for ours_name, theirs_loss in (("valence", reference.loss_v), ("arousal", reference.loss_a),
                                   ("expr", reference.loss_expr), ("au", reference.loss_au)):
        assert float(parts[ours_name]) == pytest.approx(float(theirs_loss.detach()), rel=1e-6, abs=1e-7), ours_name
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    ours_grad = torch.autograd.grad(total, [out["va"], out["expr"], out["au"]])
    theirs_grad = torch.autograd.grad(expected, [out["va"], out["expr"], out["au"]])
    for a, e in zip(ours_grad, theirs_grad, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(("name", "policy", "niter", "niter_decay"), [
    ("zhang2022_transformer", "linear_with_warmup", 10, 40),  # scripts/train_mtl_transformer.sh:51
    ("zhang2022_lstm", "linear", 30, 20),  # scripts/train_lstm.sh, as train_gru.sh
    ("zhang2022_gru", "linear", 30, 20),  # scripts/train_gru.sh:27
])
def test_the_learning_rate_of_every_epoch_is_theirs(name: str, policy: str, niter: int, niter_decay: int) -> None:
    """Their scheduler, stepped once per epoch after training it (train_seed.py:272), against the
    recipe's as training builds and steps it."""
    cfg = recipe(name, *SMALL) if name == "zhang2022_transformer" else recipe(name)
    lab = {"v0": Labels(np.zeros((1, 2)), [0], np.zeros((1, 12)))}
    model = training.build_model(cfg, D_IN, lab, ["v0"])
    loss_fn = training.build_loss(cfg, model, lab, ["v0"])
    _, _, optimizer, scheduler = training.enter_stage(cfg, model, loss_fn, [list(cfg.model.tasks)], 0, 13)
    their_opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=cfg.lr, betas=(0.5, 0.999))
    theirs = get_scheduler(their_opt, SimpleNamespace(lr_policy=policy, niter=niter, niter_decay=niter_decay,
                                                      epoch_count=1))
    assert cfg.epochs == niter + niter_decay and cfg.schedule_unit == "epoch"
    for epoch in range(cfg.epochs):
        assert scheduler.get_last_lr()[0] == their_opt.param_groups[0]["lr"], epoch
        for _ in range(13):  # steps within the epoch leave an epoch-stepped rate alone
            optimizer.step()
            if cfg.schedule_unit == "step":
                scheduler.step()
        scheduler.step()
        their_opt.step()
        theirs.step()


def test_normal_init_draws_what_their_init_weights_draws() -> None:
    """init_weights: every module whose class name holds 'Linear' from N(0, 0.02) with bias 0 (the
    attention's out_proj, a NonDynamicallyQuantizableLinear, included); the attention's
    in_proj_weight is no module's weight, so it keeps nn.MultiheadAttention's Xavier draw and zero
    bias; layer norms keep ones and zeros."""
    cfg, model, _ = built("zhang2022_transformer", "encoder.hidden=256", "encoder.heads=4", "encoder.ffn_dim=512")
    torch.manual_seed(0)
    theirs = TransformerEncoder(D_IN, 1, 4, dim_feedforward=512, affine=True, affine_dim=256, dropout=0.3)
    init_weights(theirs)
    ours = model.net.bottom
    layer, block = theirs.encoder.layers[0], ours.blocks[0]
    pairs = {"affine": (theirs.affine, ours.inp[0]), "out_proj": (layer.self_attn.out_proj, block.proj),
             "linear1": (layer.linear1, block.mlp[0]), "linear2": (layer.linear2, block.mlp[3])}
    for name, (a, b) in pairs.items():
        assert b.weight.std().item() == pytest.approx(a.weight.std().item(), rel=0.06), name
        assert a.weight.std().item() == pytest.approx(0.02, rel=0.06), name
        assert (a.bias == 0).all() and (b.bias == 0).all(), name
    # the attention's input projection: Xavier-uniform over the (3d, d) matrix, zero bias, as theirs
    bound = math.sqrt(6 / (256 + 3 * 256))
    for w in (layer.self_attn.in_proj_weight, block.qkv.weight):
        assert w.abs().max().item() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert (layer.self_attn.in_proj_bias == 0).all() and (block.qkv.bias == 0).all()
    for a, b in ((layer.norm1, block.norm1), (layer.norm2, block.norm2)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    # their layers are deep copies of one (_get_clones): one input-projection draw for all of them
    theirs = TransformerEncoder(256, 3, 4, dim_feedforward=512, affine=False, affine_dim=256, dropout=0.3)
    init_weights(theirs)
    branch = model.net.branches["valence"]
    for first, rest in ((theirs.encoder.layers[0].self_attn.in_proj_weight,
                          [m.self_attn.in_proj_weight for m in theirs.encoder.layers[1:]]),
                         (branch.blocks[0].qkv.weight, [b.qkv.weight for b in branch.blocks[1:]])):
        assert len(rest) == 2 and all(torch.equal(first, w) for w in rest)
    assert not torch.equal(branch.blocks[0].mlp[0].weight, branch.blocks[1].mlp[0].weight)  # the Linears drawn apart


def test_the_position_codes_are_their_table_to_the_bit() -> None:
    """Their table (padding_idx=0) indexed by arange(seq_len) in every chunk, as the encoder adds it."""
    cfg, model, _ = built("zhang2022_transformer", *SMALL)
    assert model.net.bottom.positions == "sinusoidal_zero_first"
    expected = get_sinusoid_encoding_table(512, 128, padding_idx=0)[:300]
    assert torch.equal(zero_first_positions(300, 128), expected)
