"""Cross-task attention from AU node embeddings to the EXPR and VA branches, with an optional AU graph.

Each frame's shared feature is split into one embedding per AU (12 nodes); AU logits are read
from the nodes, and EXPR / VA attend over them, so facial-muscle evidence informs expression
and affect. An optional graph (a learned or given 12x12 relation matrix) mixes the nodes first.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import einsum, rearrange
from torch import nn

from models.abaw import TASK_SIZES
from models.encoders import encoder_from
from models.heads import DEFAULT_HEAD, HeadSpec

N_AU = TASK_SIZES["au"]


def au_cooccurrence(au: np.ndarray) -> np.ndarray:
    """P(AU j active | AU i active) from labels (n, 12) in {0, 1, -1 invalid} -> (12, 12) float32.

    A given relation matrix for ``au_graph``; pairs never observed together valid get 0.
    """
    au = np.asarray(au)
    valid = (au >= 0).astype(np.float64)
    pos = (au == 1).astype(np.float64)
    both = pos.T @ pos
    seen = pos.T @ valid  # frames where i is active and j is labelled
    return np.divide(both, seen, out=np.zeros_like(both), where=seen > 0).astype(np.float32)


class AUGraph(nn.Module):
    """Residual graph convolution over AU nodes: (b, t, 12, c) -> (b, t, 12, c).

    ``relation="learned"`` learns the adjacency (row softmax of free logits); a 12x12 non-negative
    matrix is fixed, made symmetric and normalised as in a GCN, D^-1/2 (A + I) D^-1/2.
    """

    def __init__(self, dim: int, relation: str | list | np.ndarray, layers: int = 1) -> None:
        super().__init__()
        if isinstance(relation, str):
            if relation != "learned":
                raise ValueError(f"au_graph={relation!r}: use 'learned' or a 12x12 relation matrix")
            self.logits = nn.Parameter(torch.zeros(N_AU, N_AU))
        else:
            a = torch.as_tensor(np.asarray(relation, dtype=np.float32))
            if a.shape != (N_AU, N_AU) or not torch.isfinite(a).all() or (a < 0).any():
                raise ValueError(
                    f"au_graph matrix must be {N_AU}x{N_AU}, finite and non-negative; got {tuple(a.shape)}"
                )
            a = (a + a.T) / 2 + torch.eye(N_AU)
            d = a.sum(1).rsqrt()
            self.register_buffer("fixed", d[:, None] * a * d[None, :])
            self.logits = None
        self.lins = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.act = nn.GELU()

    def adjacency(self) -> torch.Tensor:
        """(12, 12) row i = how much node i gathers from each node."""
        return self.logits.softmax(-1) if self.logits is not None else self.fixed

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        a = self.adjacency()
        for lin, norm in zip(self.lins, self.norms, strict=True):
            mixed = einsum(a, lin(nodes), "n m, b t m c -> b t n c")
            nodes = nodes + self.act(norm(mixed))
        return nodes


class NodeAttention(nn.Module):
    """A task's frame feature (b, t, d) queries the 12 AU nodes (b, t, 12, c) -> context (b, t, c)."""

    def __init__(self, d: int, c: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.query = nn.Linear(d, c)
        self.attn = nn.MultiheadAttention(c, heads, dropout=dropout, batch_first=True)

    def forward(self, h: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        b = h.shape[0]
        q = rearrange(self.query(h), "b t c -> (b t) 1 c")
        kv = rearrange(nodes, "b t n c -> (b t) n c")
        ctx, _ = self.attn(q, kv, kv, need_weights=False)
        return rearrange(ctx, "(b t) 1 c -> b t c", b=b)


class CrossTaskModel(nn.Module):
    """Shared encoder -> AU nodes (-> graph) -> AU logits; EXPR and VA heads see [feature, AU context].

    Needs the ``au`` task. The AU logits come from one vector per node, so ``head`` shapes the EXPR
    and VA heads only; its dropout is the node attention's too.
    """

    def __init__(
        self,
        d_in: int,
        encoder: dict,
        tasks: tuple[str, ...],
        head: HeadSpec = DEFAULT_HEAD,
        au_dim: int = 64,
        au_graph: str | list | None = None,
        graph_layers: int = 1,
        attn_heads: int = 4,
    ) -> None:
        super().__init__()
        if "au" not in tasks:
            raise ValueError(f"structure 'cross_attention' needs the au task; tasks={list(tasks)}")
        self.tasks = tasks
        self.bottom = encoder_from(encoder, d_in)
        d = self.bottom.out_dim
        self.to_nodes = nn.Linear(d, N_AU * au_dim)
        self.node_norm = nn.LayerNorm(au_dim)
        self.graph = AUGraph(au_dim, au_graph, graph_layers) if au_graph is not None else None
        self.au_weight = nn.Parameter(torch.randn(N_AU, au_dim) / au_dim**0.5)
        self.au_bias = nn.Parameter(torch.zeros(N_AU))
        others = [t for t in tasks if t != "au"]
        self.attend = nn.ModuleDict({t: NodeAttention(d, au_dim, attn_heads, head.dropout) for t in others})
        self.heads = nn.ModuleDict({t: head(t, d + au_dim) for t in others})

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.bottom(x, mask)
        nodes = self.node_norm(rearrange(self.to_nodes(h), "b t (n c) -> b t n c", n=N_AU))
        if self.graph is not None:
            nodes = self.graph(nodes)
        out = {"au": einsum(nodes, self.au_weight, "b t n c, n c -> b t n") + self.au_bias}
        for task, attend in self.attend.items():
            out[task] = self.heads[task](torch.cat([h, attend(h, nodes)], dim=-1))
        return {t: out[t] for t in self.tasks}
