"""AMTL: AU nodes on a per-frame top-k graph, and expression logits re-weighted by attention from the AU scores.

Nguyen et al. 2022, "Multi-task cross attention network in facial behavior analysis",
arXiv 2207.10293; code github.com/khanhnd185/MTL-ABAW4 (``model.py`` GNN, ANFL, AMTL; ``block.py``
Dense, AdditiveAttention; ``helpers.py`` normalize_digraph). Submodule and parameter names follow
theirs, so a state dict maps one to one (minus ``bottom.``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum
from torch import nn

from models.abaw import TASK_SIZES
from models.encoders import encoder_from
from models.heads import check_tasks

N_AU = TASK_SIZES["au"]
METRICS = ("dots", "cosine", "l1")  # how the AU graph measures node closeness


class Dense(nn.Module):
    """Dropout -> linear -> BatchNorm1d (if ``bn``) -> activation: (n, d_in) -> (n, d_out)."""

    ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh}

    def __init__(self, d_in: int, d_out: int, activation: str = "none", bn: bool = False, drop: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.ac = self.ACTIVATIONS[activation]()
        self.bn = nn.BatchNorm1d(d_out) if bn else nn.Identity()  # weight 1, bias 0, as theirs sets
        self.drop = nn.Dropout(drop)
        nn.init.normal_(self.fc.weight, 0.0, math.sqrt(1.0 / d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ac(self.bn(self.fc(self.drop(x))))


def normalize_digraph(adj: torch.Tensor) -> torch.Tensor:
    """D^-1/2 A D^-1/2 with D the (detached) out-degrees: (b, n, n) -> (b, n, n)."""
    d = adj.detach().sum(-1) ** -0.5  # (b, n)
    return d[:, :, None] * adj * d[:, None, :]


class GNN(nn.Module):
    """One residual graph layer over the AU nodes, ``relu(x + bn(A V(x) + U(x)))``: (n, 12, c) -> (n, 12, c).

    A links each node to its ``neighbours`` closest nodes in the same frame (more on ties), by the
    detached node features, so the graph changes per sample and is not trained through.
    """

    def __init__(self, c: int, nodes: int, neighbours: int = 4, metric: str = "dots") -> None:
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"au_metric={metric!r}: choose one of {', '.join(METRICS)}")
        if not 1 <= neighbours <= nodes:
            raise ValueError(f"au_neighbours={neighbours} must be between 1 and {nodes}")
        self.metric, self.neighbours = metric, neighbours
        self.relu = nn.ReLU()
        self.U = nn.Linear(c, c)
        self.V = nn.Linear(c, c)
        self.bnv = nn.BatchNorm1d(nodes)  # statistics per node, over frames and channels
        nn.init.normal_(self.U.weight, 0.0, math.sqrt(2.0 / c))
        nn.init.normal_(self.V.weight, 0.0, math.sqrt(2.0 / c))

    def adjacency(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 12, c) -> (n, 12, 12) in {0, 1}: row i marks node i's nearest nodes, itself possibly among them."""
        x = x.detach()
        if self.metric == "l1":
            dist = (x[:, None, :, :] - x[:, :, None, :]).abs().sum(-1)  # (n, 12, 12)
            kth = dist.topk(self.neighbours, dim=-1, largest=False).values[..., -1:]
            return (dist <= kth).float()
        if self.metric == "cosine":
            x = F.normalize(x, p=2, dim=-1)
        sim = einsum(x, x, "b i c, b j c -> b i j")
        kth = sim.topk(self.neighbours, dim=-1, largest=True).values[..., -1:]
        return (sim >= kth).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = normalize_digraph(self.adjacency(x))
        aggregate = einsum(a, self.V(x), "b i j, b j c -> b i c")
        return self.relu(x + self.bnv(aggregate + self.U(x)))


class ANFL(nn.Module):
    """AU node features, the graph, and cosine scores against learned prototypes: (n, c) -> (n, 12), (n, 12, c).

    One Dense(c, c, BN, dropout 0.5, ReLU) per AU gives the nodes; the score of AU i is the cosine
    between node i and prototype ``sc[i]`` (ReLU-ed). Both are non-negative, so scores lie in [0, 1].
    """

    def __init__(self, c: int, nodes: int, neighbours: int = 4, metric: str = "dots") -> None:
        super().__init__()
        self.class_linears = nn.ModuleList(Dense(c, c, activation="relu", bn=True, drop=0.5) for _ in range(nodes))
        self.gnn = GNN(c, nodes, neighbours, metric)
        self.sc = nn.Parameter(torch.empty(nodes, c))
        self.relu = nn.ReLU()
        nn.init.xavier_uniform_(self.sc)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nodes = self.gnn(torch.stack([layer(x) for layer in self.class_linears], dim=1))  # (n, 12, c)
        prototypes = F.normalize(self.relu(self.sc), p=2, dim=-1)
        scores = einsum(F.normalize(nodes, p=2, dim=-1), prototypes, "b n c, n c -> b n")
        return scores, nodes


class AdditiveAttention(nn.Module):
    """Additive attention whose output is the attention weights times the values, not their sum.

    queries (n, 1, query_size), keys (n, k, key_size), values (n, k, 1) -> (n, k).
    """

    def __init__(self, key_size: int, query_size: int, hidden: int) -> None:
        super().__init__()
        self.W_k = nn.Linear(key_size, hidden, bias=False)
        self.W_q = nn.Linear(query_size, hidden, bias=False)
        self.w_v = nn.Linear(hidden, 1, bias=False)
        self.softmax = nn.Softmax(dim=-1)

    def scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(n, q, query_size), (n, k, key_size) -> (n, q, k) unnormalised scores."""
        features = torch.tanh(self.W_q(queries)[:, :, None] + self.W_k(keys)[:, None])  # (n, q, k, hidden)
        return self.w_v(features).squeeze(-1)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.scores(queries, keys)).squeeze(1) * values.squeeze(-1)


class AMTLModel(nn.Module):
    """Encoder -> their AMTL on each valid frame -> ``{"va": (b, t, 2), "expr": (b, t, E), "au": (b, t, 12)}``.

    AMTL: ANFL (twelve per-AU Dense layers, a top-``au_neighbours`` graph by ``au_metric``, cosine
    scores against per-AU prototypes) gives the AU scores; VA = Dense(c, 2, BN, tanh); the
    expression logits Dense(c, E) are multiplied by softmax attention weights over the E classes,
    queried by the 12 AU scores (``attention_dim`` hidden units). With the ``none`` encoder this is
    their per-frame model.

    Their layers are per frame with BatchNorm1d over a batch of frames, so AMTL runs on the valid
    frames only, ``h[mask]`` (n, c): padding and missing faces never enter BatchNorm statistics or
    the graph, and invalid steps come out as zeros. With no valid frame (or only one in training,
    where BatchNorm cannot take statistics) every output is zeros that still carry a gradient;
    under DDP such a rank leaves the heads unused (``may_leave_unused``), unless BatchNorm is
    synchronised across ranks, when it runs them on what frames it has.

    AU outputs are cosine scores in [0, 1] used directly as probabilities (their metric thresholds
    them at 0.5), not logits: ``au_output = "cosine"`` tells losses and inference so. AU scores
    are always computed since the expression attention reads them; only ``tasks`` are returned.

    Its heads are theirs, so it takes no head options: the Dense dropouts are 0.5 before each per-AU
    layer and 0 elsewhere. ``task_modules`` names each task's own modules,
    for their schedule (AU first, then EXPR and VA with AU frozen). Their freezing only turns
    off gradients; keep the frozen modules in eval mode too, or their BatchNorm running statistics
    keep moving. A trainable encoder is shared, so freezing AU modules alone does not fix AU outputs.
    """

    au_output = "cosine"
    # for DDP: a rank with fewer than two valid frames uses no head, and with tasks=[va] the AU and
    # expression modules feed no loss (the AU scores are computed for the expression attention)
    may_leave_unused = True

    def __init__(
        self,
        d_in: int,
        encoder: dict,
        tasks: tuple[str, ...],
        expr_classes: int = TASK_SIZES["expr"],
        au_neighbours: int = 4,
        au_metric: str = "dots",
        attention_dim: int = 64,
    ) -> None:
        super().__init__()
        self.tasks = check_tasks(tasks)
        self.bottom = encoder_from(encoder, d_in)
        c = self.bottom.out_dim
        self.au = ANFL(c, N_AU, au_neighbours, au_metric)
        self.va = Dense(c, TASK_SIZES["va"], activation="tanh", bn=True)
        self.ex = Dense(c, expr_classes)
        self.attention = AdditiveAttention(1, N_AU, attention_dim)
        self.sizes = {"va": TASK_SIZES["va"], "expr": expr_classes, "au": N_AU}

    def task_modules(self) -> dict[str, list[nn.Module]]:
        """The modules used by one task alone (the encoder is shared and named by none)."""
        return {"au": [self.au], "expr": [self.ex, self.attention], "va": [self.va]}

    def frames(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Their AMTL forward on frames (n, c) -> {"va": (n, 2), "expr": (n, E), "au": (n, 12)}."""
        au, _ = self.au(h)
        va = self.va(h)
        ex = self.ex(h)[..., None]  # (n, E, 1): each class logit is a key and a value
        return {"va": va, "expr": self.attention(au[:, None], ex, ex), "au": au}

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (b, t, d_in), mask (b, t) bool True = valid -> {task: (b, t, outputs)}."""
        mask = mask.bool()
        h = self.bottom(x, mask)
        b, t, _ = h.shape
        valid = h[mask]  # (n, c)
        # with BatchNorm synchronised over ranks, statistics come from every rank's frames: each rank
        # runs the layers, with few or no frames of its own, so that their collectives match up
        synced = self.training and any(isinstance(m, nn.SyncBatchNorm) for m in self.modules())
        if valid.shape[0] < (2 if self.training else 1) and not synced:
            zero = valid.sum() * 0  # keeps the graph, so backward still runs
            return {task: h.new_zeros(b, t, self.sizes[task]) + zero for task in self.tasks}
        out = self.frames(valid)
        return {task: h.new_zeros(b, t, self.sizes[task]).index_put((mask,), out[task]) for task in self.tasks}
