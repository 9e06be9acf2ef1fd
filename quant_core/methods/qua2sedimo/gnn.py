"""A small GATv2 graph regressor with a ranking objective, for predicting a configuration's quality
from the layer graph (Qua²SeDiMo §5.3 step 4, after AutoBuild). Torch only; dense adjacency.

Graphs in one batch share their structure (the same denoiser, or the same subgraph), so a batch is
``x [B, n, F]`` node features with one ``adj [n, n]`` (``adj[i, j]``: node i receives from node j).
The model returns the prediction and the graph embedding of every hop level (mean over nodes after
each message-passing layer); the ranking term asks the L1 norm of each hop embedding to rank the
configurations like the target does, which is what makes those norms usable as subgraph scores.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...progress import report


class GATv2Layer(nn.Module):
    """Brody et al. 2022: ``e_ij = a . LeakyReLU(W_dst h_i + W_src h_j)``, softmax over i's in-edges,
    ``h_i' = sum_j alpha_ij W_src h_j``. Single head."""

    def __init__(self, dim_in: int, dim_out: int, slope: float = 0.2):
        super().__init__()
        self.src = nn.Linear(dim_in, dim_out)
        self.dst = nn.Linear(dim_in, dim_out, bias=False)
        self.att = nn.Parameter(torch.randn(dim_out) / math.sqrt(dim_out))
        self.slope = slope

    def forward(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        msg = self.src(h)                                                    # [B, n, d]
        dst, src = adj.nonzero(as_tuple=True)                                # edges only: graphs are sparse
        pair = F.leaky_relu(self.dst(h)[:, dst] + msg[:, src], self.slope)    # [B, E, d]
        logits = h.new_full((h.shape[0],) + tuple(adj.shape), float("-inf"))
        logits[:, dst, src] = pair @ self.att                                # [B, n, n]
        return torch.softmax(logits, dim=-1) @ msg


class GraphRegressor(nn.Module):
    """Node encoder, ``layers`` residual GATv2 layers, mean readout per hop, MLP head on all hops."""

    def __init__(self, num_features: int, hidden: int = 64, layers: int = 4):
        super().__init__()
        self.encode = nn.Linear(num_features, hidden)
        self.convs = nn.ModuleList(GATv2Layer(hidden, hidden) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.head = nn.Sequential(nn.Linear(hidden * layers, hidden), nn.ELU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.encode(x)
        hops = []
        for conv, norm in zip(self.convs, self.norms):
            h = h + F.elu(conv(norm(h), adj))
            hops.append(h.mean(dim=1))
        return self.head(torch.cat(hops, dim=-1)).squeeze(-1), hops


def with_self_loops(adj: torch.Tensor) -> torch.Tensor:
    return adj.bool() | torch.eye(adj.shape[0], dtype=torch.bool)


# -- ranking ---------------------------------------------------------------------------------------
def soft_rank(s: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Differentiable ranks: ``r_i = sum_j sigmoid((s_i - s_j) / (tau * std(s)))`` (pairwise, O(B^2))."""
    scale = temperature * s.detach().std().clamp_min(1e-8)
    return torch.sigmoid((s.unsqueeze(1) - s.unsqueeze(0)) / scale).sum(dim=1)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12)


def ranks(y: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), float64."""
    y = y.double()
    less = (y.unsqueeze(0) < y.unsqueeze(1)).sum(dim=1)
    equal = (y.unsqueeze(0) == y.unsqueeze(1)).sum(dim=1)
    return less + (equal + 1) / 2


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (with ties), float64."""
    if a.numel() < 2:
        return float("nan")
    return _pearson(ranks(a.detach()), ranks(b.detach())).item()


def ranking_loss(scores: torch.Tensor, target: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``1 - soft Spearman(scores, target)``: zero when ``scores`` order the batch like ``target``."""
    return 1 - _pearson(soft_rank(scores, temperature), ranks(target).to(scores.dtype))


def objective(model: GraphRegressor, x, adj, y, rank_weight: float) -> torch.Tensor:
    """MSE on the (standardised) target plus the ranking term over the prediction and every hop's
    L1 norm. Unlike the released LTRLoss, the ranking term is part of the objective."""
    pred, hops = model(x, adj)
    loss = F.mse_loss(pred, y)
    if rank_weight:
        terms = [ranking_loss(pred, y)] + [ranking_loss(h.abs().sum(-1), y) for h in hops]
        loss = loss + rank_weight * torch.stack(terms).mean()
    return loss


def train(x: torch.Tensor, adj: torch.Tensor, y: torch.Tensor, *, epochs: int = 400, hidden: int = 64,
          layers: int = 4, lr: float = 1e-3, weight_decay: float = 1e-6, batch_size: int = 128,
          rank_weight: float = 1.0, seed: int = 0) -> GraphRegressor:
    """AdamW with a cosine schedule on standardised targets ``y`` (caller standardises)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GraphRegressor(x.shape[-1], hidden, layers)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    adj = with_self_loops(adj)
    model.train()
    for epoch in range(epochs):
        report("qua2sedimo predictor epochs", epoch, epochs)
        perm = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], batch_size):
            idx = perm[start:start + batch_size]
            if idx.numel() < 2:
                continue
            opt.zero_grad()
            objective(model, x[idx], adj, y[idx], rank_weight).backward()
            opt.step()
        sched.step()
    return model.eval()


def hop_correlations(model: GraphRegressor, x, adj, y) -> list[float]:
    """Spearman of each hop embedding's L1 norm with the target (the per-hop weight of a score)."""
    with torch.no_grad():
        _, hops = model(x, with_self_loops(adj))
    return [spearman(h.abs().sum(-1), y) for h in hops]
