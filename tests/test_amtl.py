"""AMTL: equal to the authors' code on valid frames, masking, the top-k AU graph, freezing, the attention."""

# ruff: noqa: UP008, B007 - the reference below is the authors' code as written

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import amtl
from models.amtl import AMTLModel
from models.encoders import ENCODERS

torch.set_num_threads(1)
C = 48  # feature size of the per-frame equivalence checks
TASKS = ("va", "expr", "au")
TINY_TRANSFORMER = {"name": "transformer", "hidden": 32, "layers": 1, "heads": 2, "dropout": 0.0}


# The reference: khanhnd185/MTL-ABAW4 block.py, helpers.py and model.py, verbatim but for the
# device lines of normalize_digraph and AMTL's extractor.
# fmt: off


class Dense(nn.Module):
    def __init__(self, in_features, out_features, activation='none', bn=False, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        self.fc = nn.Linear(in_features, out_features)
        if activation == 'tanh':
            self.ac = nn.Tanh()
        elif activation == 'softmax':
            self.ac = nn.Softmax()
        elif activation == 'sigmoid':
            self.ac = nn.Sigmoid()
        elif activation == 'relu':
            self.ac = nn.ReLU()
        else:
            self.ac = nn.Identity()

        if bn:
            self.bn = nn.BatchNorm1d(out_features)
            self.bn.weight.data.fill_(1)
            self.bn.bias.data.zero_()
        else:
            self.bn = nn.Identity()

        self.drop = nn.Dropout(drop)
        self.fc.weight.data.normal_(0, math.sqrt(1. / out_features))

    def forward(self, x):
        x = self.drop(x)
        x = self.fc(x)
        x = self.bn(x)
        x = self.ac(x)
        return x


class AdditiveAttention(nn.Module):
    def __init__(self, key_size, query_size, num_hiddens):
        super(AdditiveAttention, self).__init__()
        self.W_k = nn.Linear(key_size, num_hiddens, bias=False)
        self.W_q = nn.Linear(query_size, num_hiddens, bias=False)
        self.w_v = nn.Linear(num_hiddens, 1, bias=False)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, queries, keys, values):
        queries, keys = self.W_q(queries), self.W_k(keys)
        features = queries.unsqueeze(2) + keys.unsqueeze(1)
        features = torch.tanh(features)
        scores = self.w_v(features).squeeze(-1)
        attention_weights = self.softmax(scores)
        return attention_weights.squeeze(1) * values.squeeze(-1)


def normalize_digraph(A):
    b, n, _ = A.shape
    node_degrees = A.detach().sum(dim = -1)
    degs_inv_sqrt = node_degrees ** -0.5
    norm_degs_matrix = torch.eye(n)
    norm_degs_matrix = norm_degs_matrix.view(1, n, n) * degs_inv_sqrt.view(b, n, 1)
    norm_A = torch.bmm(torch.bmm(norm_degs_matrix,A),norm_degs_matrix)
    return norm_A


class GNN(nn.Module):
    def __init__(self, in_channels, num_classes, neighbor_num=4, metric='dots'):
        super(GNN, self).__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.relu = nn.ReLU()
        self.metric = metric
        self.neighbor_num = neighbor_num

        self.U = nn.Linear(self.in_channels,self.in_channels)
        self.V = nn.Linear(self.in_channels,self.in_channels)
        self.bnv = nn.BatchNorm1d(num_classes)

        self.U.weight.data.normal_(0, math.sqrt(2. / self.in_channels))
        self.V.weight.data.normal_(0, math.sqrt(2. / self.in_channels))
        self.bnv.weight.data.fill_(1)
        self.bnv.bias.data.zero_()

    def forward(self, x):
        b, n, c = x.shape

        if self.metric == 'dots':
            si = x.detach()
            si = torch.einsum('b i j , b j k -> b i k', si, si.transpose(1, 2))
            threshold = si.topk(k=self.neighbor_num, dim=-1, largest=True)[0][:, :, -1].view(b, n, 1)
            adj = (si >= threshold).float()

        elif self.metric == 'cosine':
            si = x.detach()
            si = F.normalize(si, p=2, dim=-1)
            si = torch.einsum('b i j , b j k -> b i k', si, si.transpose(1, 2))
            threshold = si.topk(k=self.neighbor_num, dim=-1, largest=True)[0][:, :, -1].view(b, n, 1)
            adj = (si >= threshold).float()

        elif self.metric == 'l1':
            si = x.detach().repeat(1, n, 1).view(b, n, n, c)
            si = torch.abs(si.transpose(1, 2) - si)
            si = si.sum(dim=-1)
            threshold = si.topk(k=self.neighbor_num, dim=-1, largest=False)[0][:, :, -1].view(b, n, 1)
            adj = (si <= threshold).float()

        else:
            raise Exception("Error: wrong metric: ", self.metric)

        A = normalize_digraph(adj)
        aggregate = torch.einsum('b i j, b j k->b i k', A, self.V(x))
        x = self.relu(x + self.bnv(aggregate + self.U(x)))
        return x


class ANFL(nn.Module):
    def __init__(self, in_channels, num_classes, neighbor_num=4, metric='dots'):
        super(ANFL, self).__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        class_linear_layers = []
        for i in range(self.num_classes):
            layer = Dense(self.in_channels, self.in_channels, bn=True, drop=0.5, activation='relu')
            class_linear_layers += [layer]
        self.class_linears = nn.ModuleList(class_linear_layers)
        self.gnn = GNN(self.in_channels, self.num_classes,neighbor_num=neighbor_num,metric=metric)
        self.sc = nn.Parameter(torch.FloatTensor(torch.zeros(self.num_classes, self.in_channels)))
        self.relu = nn.ReLU()

        nn.init.xavier_uniform_(self.sc)

    def forward(self, x):
        # AFG
        f_u = []
        for i, layer in enumerate(self.class_linears):
            f_u.append(layer(x).unsqueeze(1))
        f_u = torch.cat(f_u, dim=1)
        # f_v = f_u.mean(dim=-2)
        f_v = f_u
        # FGG
        f_v = self.gnn(f_v)
        b, n, c = f_v.shape
        sc = self.sc
        sc = self.relu(sc)
        sc = F.normalize(sc, p=2, dim=-1)
        cl = F.normalize(f_v, p=2, dim=-1)
        cl = (cl * sc.view(1, n, c)).sum(dim=-1)
        return cl, f_v


class AMTL(nn.Module):
    def __init__(self, in_channels=1288, neighbor_num=4, metric='dots', freeze_au=True):
        super(AMTL, self).__init__()
        self.AU_metric_dim = 12
        self.EX_metric_dim = 8
        self.VA_metric_dim = 2
        self.attention_dim = 64

        self.in_channels = in_channels
        self.out_channels = self.in_channels
        self.au = ANFL(self.out_channels, self.AU_metric_dim, neighbor_num, metric)

        self.va = Dense(in_channels, self.VA_metric_dim, activation='tanh', bn=True)
        self.ex = Dense(in_channels, self.EX_metric_dim, activation='none')

        self.attention = AdditiveAttention(1, self.AU_metric_dim, self.attention_dim)

        if freeze_au:
            for p in self.au.parameters():
                p.requires_grad = False

    def forward(self, x):
        au, f_v = self.au(x)
        va = self.va(x)
        ex = self.ex(x)

        q = au.unsqueeze(1)
        v = ex.unsqueeze(-1)
        ex = self.attention(q, v, v)

        return va, ex, au


# fmt: on
# End of the reference.


class Identity(nn.Module):
    """The per-frame setting: the bottom passes features through."""

    def __init__(self, d_in: int) -> None:
        super().__init__()
        self.out_dim = d_in

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x


@pytest.fixture
def per_frame(monkeypatch):
    """Builds AMTLModel on an identity bottom of width C."""
    monkeypatch.setitem(ENCODERS, "identity_test", Identity)

    def build(**kw) -> AMTLModel:
        return AMTLModel(C, {"name": "identity_test"}, kw.pop("tasks", TASKS), **kw)

    return build


def holey(b: int = 4, t: int = 9, d: int = C, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, 2:4] = False
    mask[2, :3] = False
    mask[3] = False
    return x, mask


def scrambled(x: torch.Tensor, mask: torch.Tensor, fill: float | None = None) -> torch.Tensor:
    y = x.clone()
    y[~mask] = 100 * torch.randn_like(x)[~mask] if fill is None else fill
    return y


def reference_of(model: AMTLModel, metric: str = "dots", neighbours: int = 4) -> AMTL:
    ref = AMTL(C, neighbours, metric, freeze_au=False)
    state = {k.removeprefix("bottom."): v for k, v in model.state_dict().items()}
    ref.load_state_dict(state, strict=True)  # the same names, none missing or extra
    return ref


def warm_up(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> None:
    """A few train-mode passes, so BatchNorm running statistics are no longer the defaults."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x, mask)


@pytest.mark.parametrize("metric", ["dots", "cosine", "l1"])
def test_equals_reference_in_eval_mode(per_frame, metric):
    torch.manual_seed(0)
    model = per_frame(au_metric=metric)
    x, mask = holey()
    warm_up(model, x, mask)
    ref = reference_of(model, metric).eval()
    model.eval()
    with torch.no_grad():
        out = model(x, mask)
        va, ex, au = ref(x[mask])
    for name, want in (("va", va), ("expr", ex), ("au", au)):
        torch.testing.assert_close(out[name][mask], want, atol=1e-5, rtol=1e-5, msg=name)
        assert (out[name][~mask] == 0).all()


def test_equals_reference_in_train_mode_with_valid_frame_statistics(per_frame):
    torch.manual_seed(0)
    model = per_frame()
    ref = reference_of(model).train()
    model.train()
    x, mask = holey()
    noisy = scrambled(x, mask)
    with torch.no_grad():
        torch.manual_seed(1)  # the same dropout masks: both draw them in the same order and shapes
        out = model(noisy, mask)
        torch.manual_seed(1)
        va, ex, au = ref(x[mask])
    for name, want in (("va", va), ("expr", ex), ("au", au)):
        torch.testing.assert_close(out[name][mask], want, atol=1e-5, rtol=1e-5, msg=name)
    ours, theirs = model.state_dict(), ref.state_dict()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5, msg=k)  # running statistics too


def test_initialisation_follows_reference(per_frame):
    torch.manual_seed(0)
    model = per_frame()
    dense = model.au.class_linears[0]
    assert abs(dense.fc.weight.std().item() - math.sqrt(1 / C)) < 0.01
    assert abs(model.va.fc.weight.std().item() - math.sqrt(1 / 2)) < 0.3
    assert (dense.bn.weight == 1).all() and (dense.bn.bias == 0).all()
    assert abs(model.au.gnn.U.weight.std().item() - math.sqrt(2 / C)) < 0.02
    bound = math.sqrt(6 / (12 + C))
    assert model.au.sc.abs().max() <= bound and model.au.sc.std() > bound / 3


@pytest.mark.parametrize("train", [False, True])
def test_valid_steps_ignore_invalid_content(train):
    torch.manual_seed(0)
    model = AMTLModel(16, TINY_TRANSFORMER, TASKS).train(train)
    x, mask = holey(d=16)
    noisy, nan = scrambled(x, mask), scrambled(x, mask, fill=float("nan"))
    with torch.no_grad():
        torch.manual_seed(1)  # the same dropout masks in each pass
        a = model(x, mask)
        torch.manual_seed(1)
        b = model(noisy, mask)
        torch.manual_seed(1)
        c = model(nan, mask)
    for task in TASKS:
        assert a[task].shape == (4, 9, model.sizes[task])
        torch.testing.assert_close(a[task], b[task])
        torch.testing.assert_close(a[task], c[task])
        assert (a[task][~mask] == 0).all()
    assert ((a["au"][mask] >= 0) & (a["au"][mask] <= 1 + 1e-6)).all()


@pytest.mark.parametrize("train", [False, True])
def test_no_usable_frame_gives_zeros_with_a_gradient(train):
    model = AMTLModel(16, TINY_TRANSFORMER, ("expr", "au")).train(train)
    x, mask = holey(d=16)
    mask[:] = False
    if train:
        mask[1, 4] = True  # one frame: BatchNorm has no batch statistics
    out = model(x, mask)
    assert set(out) == {"expr", "au"} and out["expr"].shape == (4, 9, 8)
    assert all((v == 0).all() for v in out.values())
    sum(v.sum() for v in out.values()).backward()


@pytest.mark.parametrize("metric", ["dots", "cosine", "l1"])
def test_graph_links_each_node_to_its_k_nearest_per_sample(metric):
    torch.manual_seed(0)
    gnn = amtl.GNN(C, 12, neighbours=4, metric=metric)
    nodes = torch.randn(5, 12, C)
    adj = gnn.adjacency(nodes)
    assert set(adj.unique().tolist()) <= {0.0, 1.0}
    assert (adj.sum(-1) == 4).all()
    torch.testing.assert_close(adj, torch.cat([gnn.adjacency(n[None]) for n in nodes]))
    assert not (adj == adj[:1]).all()  # samples get their own graphs
    tied = nodes.clone()
    tied[:, 1:4] = tied[:, :1]  # four identical nodes (dots: also three other nodes tie among themselves)
    tied[:, 5:8] = tied[:, 4:5]
    assert (gnn.adjacency(tied).sum(-1) >= 4).all()


def test_bad_graph_options_are_rejected(per_frame):
    with pytest.raises(ValueError, match="dots, cosine, l1"):
        per_frame(au_metric="l2")
    with pytest.raises(ValueError, match="au_neighbours"):
        per_frame(au_neighbours=13)


def test_freezing_au_modules_keeps_au_outputs(per_frame):
    torch.manual_seed(0)
    model = per_frame()
    x, mask = holey()
    warm_up(model, x, mask)
    model.eval()
    with torch.no_grad():
        before = model(x, mask)
    for module in model.task_modules()["au"]:
        module.requires_grad_(False)
    model.train()
    for module in model.task_modules()["au"]:
        module.eval()  # BatchNorm running statistics stay put too
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    labels = torch.randint(0, 8, (int(mask.sum()),))
    F.cross_entropy(model(x, mask)["expr"][mask], labels).backward()
    optim.step()
    model.eval()
    with torch.no_grad():
        after = model(x, mask)
    torch.testing.assert_close(after["au"], before["au"], rtol=0, atol=0)
    assert not torch.allclose(after["expr"], before["expr"])
    owned = [p for ms in model.task_modules().values() for m in ms for p in m.parameters()]
    assert len(owned) == len(list(model.parameters()))  # every parameter belongs to one task


def test_expr_is_attention_weights_times_raw_logits(per_frame):
    torch.manual_seed(0)
    model = per_frame(expr_classes=6, attention_dim=16).eval()
    seen = {}
    model.ex.register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o))
    model.au.register_forward_hook(lambda m, i, o: seen.__setitem__("au", o[0]))
    x, mask = holey()
    with torch.no_grad():
        out = model(x, mask)
        att = model.attention
        q = seen["au"] @ att.W_q.weight.T  # (n, h)
        k = seen["logits"][..., None] @ att.W_k.weight.T  # (n, 6, h)
        scores = (torch.tanh(q[:, None] + k) @ att.w_v.weight.T).squeeze(-1)  # (n, 6)
    torch.testing.assert_close(out["expr"][mask], scores.softmax(-1) * seen["logits"])
    torch.testing.assert_close(out["au"][mask], seen["au"])
    assert AMTLModel.au_output == "cosine"
