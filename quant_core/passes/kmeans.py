"""Seeded, vectorised, batched k-means: the codebook builder of the VQ methods.

VQ4DiT initialises one codebook per layer by k-means over the layer's weight sub-vectors; Qua²SeDiMo's
K-Means-C / K-Means-A formats run one k-means per output channel / per layer. Both are this function:
``x`` is ``[B, S, d]`` (B independent problems of S points in d dimensions) or ``[S, d]``.

Determinism: every random draw comes from one generator seeded with ``seed`` on ``x``'s device, and
the centroid update is a sorted segment sum (no atomic adds), so a run is repeatable on CPU and GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..progress import report

INITS = ("kmeans++", "random")


@dataclass
class KMeansResult:
    centroids: torch.Tensor    # [B, k, d] (or [k, d] for 2-D input)
    assignments: torch.Tensor  # [B, S] int64 (or [S])
    iterations: int


def _chunk_rows(batch: int, k: int, budget: int = 1 << 24) -> int:
    """Points per distance chunk so that one ``[B, chunk, k]`` block holds ~``budget`` floats."""
    return max(1, budget // max(1, batch * k))


def sq_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[B, S, k]`` between ``x [B, S, d]`` and ``c [B, k, d]`` (float32,
    clamped at 0 against cancellation in the expanded form ``|x|² - 2 x·c + |c|²``)."""
    x, c = x.float(), c.float()
    return _scores(x, c).add_((x * x).sum(-1, keepdim=True)).clamp_min_(0)


def _scores(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``|c|² - 2 x·c``: squared distances up to the per-point constant ``|x|²`` (enough to rank)."""
    return torch.baddbmm((c * c).sum(-1).unsqueeze(1), x, c.transpose(1, 2), alpha=-2)


def nearest(x: torch.Tensor, c: torch.Tensor, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` nearest centroids of every point, closest first: (squared distances, indices), each
    ``[B, S, n]``. Works through S in chunks so memory stays bounded for large layers."""
    batch, s, _ = x.shape
    if n > c.shape[1]:
        raise ValueError(f"asked for {n} nearest of only {c.shape[1]} centroids")
    step = _chunk_rows(batch, c.shape[1])
    dists, idx = [], []
    for start in range(0, s, step):
        d2 = sq_distances(x[:, start:start + step], c)
        v, i = d2.topk(n, dim=-1, largest=False, sorted=True)
        dists.append(v)
        idx.append(i)
    return torch.cat(dists, 1), torch.cat(idx, 1)


def assign(x: torch.Tensor, c: torch.Tensor, on_chunk: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Index ``[B, S]`` of the nearest centroid (the Lloyd step; cheaper than ``nearest``).
    ``on_chunk(i, n)`` before chunk ``i`` of ``n``: one pass over a large layer takes seconds on a CPU."""
    step = _chunk_rows(x.shape[0], c.shape[1])
    x, c = x.float(), c.float()
    starts = range(0, x.shape[1], step)
    parts = []
    for i, start in enumerate(starts):
        if on_chunk is not None:
            on_chunk(i, len(starts))
        parts.append(_scores(x[:, start:start + step], c).argmin(-1))
    return torch.cat(parts, 1)


def _init_random(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    batch, s, _ = x.shape
    pick = torch.rand(batch, s, generator=gen, device=x.device).argsort(dim=1)[:, :k]
    return x.gather(1, pick.unsqueeze(-1).expand(-1, -1, x.shape[-1])).clone()


def _init_kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ (Arthur & Vassilvitskii 2007): each next centre drawn with probability proportional
    to the squared distance to the nearest centre chosen so far; all B problems advance together."""
    batch, s, d = x.shape
    rows = torch.arange(batch, device=x.device)
    first = torch.randint(0, s, (batch,), generator=gen, device=x.device)
    centres = torch.empty(batch, k, d, dtype=x.dtype, device=x.device)
    centres[:, 0] = x[rows, first]
    dmin = (x - centres[:, :1]).pow(2).sum(-1)
    for i in range(1, k):
        report("k-means++ init", i, k)
        weights = torch.where(dmin.sum(-1, keepdim=True) > 0, dmin, torch.ones_like(dmin))
        pick = torch.multinomial(weights, 1, generator=gen).squeeze(-1)
        centres[:, i] = x[rows, pick]
        torch.minimum(dmin, (x - centres[:, i:i + 1]).pow(2).sum(-1), out=dmin)
    return centres


def _update(x: torch.Tensor, assign: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Mean of each cluster by a sorted segment sum (deterministic); empty clusters keep their centre."""
    batch, s, d = x.shape
    k = old.shape[1]
    flat = (assign + torch.arange(batch, device=x.device).unsqueeze(1) * k).reshape(-1)
    order = flat.argsort(stable=True)
    csum = torch.cat([x.new_zeros(1, d, dtype=torch.float64),
                      x.reshape(-1, d)[order].double().cumsum(0)])
    counts = torch.bincount(flat, minlength=batch * k)
    ends = counts.cumsum(0)
    sums = csum[ends] - csum[ends - counts]
    means = (sums / counts.clamp_min(1).unsqueeze(1).double()).to(old.dtype).reshape(batch, k, d)
    return torch.where((counts > 0).reshape(batch, k, 1), means, old)


def kmeans(x: torch.Tensor, k: int, *, iters: int = 100, seed: int = 0, init: str = "kmeans++") -> KMeansResult:
    """Lloyd's k-means of ``x`` (``[S, d]`` or batched ``[B, S, d]``) into ``k`` clusters, float32,
    on ``x``'s device; stops early once no assignment changes."""
    if init not in INITS:
        raise ValueError(f"k-means init {init!r} unknown; expected one of {INITS}")
    squeeze = x.dim() == 2
    xb = (x.unsqueeze(0) if squeeze else x).float()
    if xb.dim() != 3:
        raise ValueError(f"k-means input must be [S, d] or [B, S, d], got shape {tuple(x.shape)}")
    if not 1 <= k <= xb.shape[1]:
        raise ValueError(f"k-means with k={k} needs 1 <= k <= number of points ({xb.shape[1]})")
    if not torch.isfinite(xb).all():
        raise ValueError("k-means input has NaN/Inf values")
    gen = torch.Generator(device=xb.device).manual_seed(seed)
    centres = (_init_kmeanspp if init == "kmeans++" else _init_random)(xb, k, gen)
    labels = assign(xb, centres)
    done = 0
    for done in range(1, iters + 1):
        centres = _update(xb, labels, centres)
        new = assign(xb, centres, lambda i, n: report("k-means", (done - 1) * n + i, iters * n))
        if torch.equal(new, labels):
            break
        labels = new
    if squeeze:
        return KMeansResult(centres[0], labels[0], done)
    return KMeansResult(centres, labels, done)
