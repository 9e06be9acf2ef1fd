"""GPTQ against an independent float64 reference, MSE clipping, the evolutionary search, FID math."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ditq.quant_core import quantizers as qz
from ditq.quant_core.passes.fitness import frechet_distance
from ditq.quant_core.passes.gptq import gptq, hessian
from ditq.quant_core.passes.evolution import EvolutionSettings, evolutionary_search


def obs_reference(w, h, bits, symmetric, group_size, damp, full_range=False):
    """Textbook optimal-brain-quantizer order: quantize column i, spread its error with the explicit
    inverse Hessian, then remove row/column i from the inverse (no Cholesky, no blocking)."""
    w = w.double().clone()
    k = w.shape[1]
    h = h.double() + damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    out = torch.empty_like(w)
    for i in range(k):
        if i % group_size == 0:
            scale, zero = qz.compute_scale(w[:, i:i + group_size].float(), bits, symmetric=symmetric,
                                           full_range=full_range)
        qi = qz.quantize(w[:, i:i + 1].float(), scale, zero, bits, symmetric, full_range)
        out[:, i] = qz.dequantize(qi, scale, zero).double()[:, 0]
        err = (w[:, i] - out[:, i]) / hinv[i, i]
        w[:, i + 1:] -= err[:, None] * hinv[i, i + 1:][None, :]
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return out


def correlated_inputs(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    mix = 3 * torch.randn(k, k, generator=g) / math.sqrt(k) + torch.eye(k)
    return (torch.randn(n, k, generator=g) @ mix) * torch.linspace(0.2, 3.0, k)


@pytest.mark.parametrize("symmetric,group_size,block", [(True, 16, 8), (False, 16, 64), (True, 64, 1)])
def test_gptq_matches_obs_reference(symmetric, group_size, block):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 64, generator=g)
    h = hessian(correlated_inputs(256, 64, 2))
    q, scale, zero = gptq(w, h, bits=4, symmetric=symmetric, group_size=group_size, damp=0.01, block_size=block)
    assert scale.shape == (12, 64 // group_size)
    ref = obs_reference(w, h, 4, symmetric, group_size, 0.01)
    got = qz.dequantize(q, scale, zero).double()
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("group_size", [16, 64])
def test_gptq_full_range_matches_obs_reference_and_is_rtn_without_correlation(group_size):
    g = torch.Generator().manual_seed(6)
    w = torch.randn(12, 64, generator=g)
    h = hessian(correlated_inputs(256, 64, 7))
    q, scale, zero = gptq(w, h, bits=4, group_size=group_size, full_range=True)
    assert zero is None and q.min() == -8 and q.max() <= 7
    ref = obs_reference(w, h, 4, True, group_size, 0.01, full_range=True)
    assert torch.allclose(qz.dequantize(q, scale).double(), ref, atol=1e-5)
    q2, s2, _ = gptq(w, torch.eye(64) * 2, bits=4, group_size=group_size, full_range=True, damp=0.0)
    qr, sr, _ = qz.quantize_weight(w, 4, group_size=group_size, full_range=True)
    assert torch.equal(q2, qr) and torch.equal(s2, sr)


def test_gptq_beats_rtn_and_equals_rtn_without_correlation():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 128, generator=g)
    x = correlated_inputs(512, 128, 4)
    q, s, z = gptq(w, hessian(x), bits=4, symmetric=False, group_size=32)
    qr, sr, zr = qz.quantize_weight(w, 4, symmetric=False, group_size=32)
    err = lambda a: (x @ (w - a).t()).pow(2).mean().item()
    assert err(qz.dequantize(q, s, z)) < 0.8 * err(qz.dequantize(qr, sr, zr))
    # a diagonal Hessian gives no column any reason to compensate another: GPTQ is RTN
    q2, s2, z2 = gptq(w, torch.diag(torch.rand(128, generator=g) + 0.5), bits=4, symmetric=False, group_size=32,
                      damp=0.0)
    assert torch.equal(q2, qr) and torch.equal(s2, sr) and torch.equal(z2, zr)


def test_gptq_dead_channels_and_errors():
    w = torch.randn(4, 32)
    x = torch.randn(64, 32)
    x[:, 5] = 0
    q, s, _ = gptq(w, hessian(x), bits=4, group_size=16)
    assert q[:, 5].abs().sum() == 0
    with pytest.raises(ValueError, match="does not match"):
        gptq(w, torch.eye(16), bits=4)
    with pytest.raises(ValueError, match="divide"):
        gptq(w, torch.eye(32), bits=4, group_size=24)


def test_mse_clip_scale_never_worse_than_minmax():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 64, generator=g)
    x[:, 3] *= 8  # an outlier per row: clipping pays
    for symmetric in (True, False):
        err = lambda sz: (qz.dequantize(qz.quantize(x, *sz, 4, symmetric), *sz) - x).abs().pow(2.4).sum(-1)
        mm, ms = qz.compute_scale(x, 4, symmetric=symmetric, groups=2), qz.mse_clip_scale(x, 4, symmetric=symmetric, groups=2)
        assert (err(ms) <= err(mm) + 1e-6).all() and err(ms).sum() < err(mm).sum()


# -- evolutionary search ------------------------------------------------------------------------
CHOICES = [[32, 64, 128, 256]] * 12
TARGET = (256, 32, 128, 64, 256, 32, 128, 256, 64, 128, 256, 32)


def distance(g):
    return sum(abs(math.log2(a) - math.log2(b)) for a, b in zip(g, TARGET))


def budget(g):
    return sum(g) / len(g) >= 128


def test_search_finds_optimum_under_constraint():
    assert budget(TARGET)
    settings = EvolutionSettings(population=30, top_k=6, mutations=12, crossovers=12, generations=30, seed=1)
    r = evolutionary_search(CHOICES, distance, constraint=budget, seeds=[[128] * 12], settings=settings,
                            progress=False)
    assert r.best == TARGET and r.best_loss == 0
    assert all(budget(g) for g, _ in r.top_k)
    assert r.history == sorted(r.history, reverse=True)  # a working top-k never forgets its best
    assert [loss for _, loss in r.top_k] == sorted(loss for _, loss in r.top_k)


def test_search_deterministic_and_resumable(tmp_path):
    settings = EvolutionSettings(population=10, top_k=3, mutations=4, crossovers=4, generations=4, seed=7)
    calls = []

    def fit(g):
        calls.append(g)
        return distance(g)

    full = evolutionary_search(CHOICES, distance, constraint=budget, settings=settings, progress=False)
    state = tmp_path / "search.json"
    part = evolutionary_search(CHOICES, fit, constraint=budget, progress=False, state_path=state,
                               settings=EvolutionSettings(**{**settings.__dict__, "generations": 2}))
    assert part.generations == 2 and json.loads(state.read_text())["generation"] == 2
    n_first = len(calls)
    resumed = evolutionary_search(CHOICES, fit, constraint=budget, settings=settings, state_path=state,
                                  progress=False)
    assert (resumed.best, resumed.history, resumed.top_k) == (full.best, full.history, full.top_k)
    assert len(set(calls)) == len(calls) and len(calls) > n_first  # nothing evaluated twice across the resume
    with pytest.raises(ValueError, match="other choices, settings"):
        evolutionary_search(CHOICES[:-1], fit, settings=settings, state_path=state, progress=False)
    # scores made for another model or other conditions are never resumed
    ctx = tmp_path / "ctx.json"
    evolutionary_search(CHOICES, fit, constraint=budget, progress=False, state_path=ctx, context={"weights": "a"},
                        settings=EvolutionSettings(**{**settings.__dict__, "generations": 1}))
    with pytest.raises(ValueError, match="ctx.json: saved for other choices, settings, weights or conditions"):
        evolutionary_search(CHOICES, fit, constraint=budget, settings=settings, state_path=ctx, progress=False,
                            context={"weights": "b"})


def test_search_time_budget_and_bad_seed(tmp_path):
    settings = EvolutionSettings(population=8, top_k=2, mutations=3, crossovers=3, generations=50, time_budget_s=0.0)
    with pytest.raises(TimeoutError):
        evolutionary_search(CHOICES, distance, settings=settings, progress=False, state_path=tmp_path / "s.json")
    with pytest.raises(ValueError, match="seed genome"):
        evolutionary_search(CHOICES, distance, constraint=budget, seeds=[[32] * 12], progress=False)


def test_frechet_distance_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    c1 = a @ a.t() + torch.eye(5, dtype=torch.float64)
    mu1, mu2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    assert frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0, abs=1e-9)
    # commuting covariances: tr((sqrt C1 - sqrt C2)^2) with C2 = 4 C1 -> tr(C1)
    assert frechet_distance(mu1, c1, mu2, 4 * c1) == pytest.approx((mu1 - mu2).pow(2).sum().item() + c1.trace().item())
    d1, d2 = torch.diag(torch.tensor([1.0, 4.0])), torch.diag(torch.tensor([9.0, 1.0]))
    assert frechet_distance(torch.zeros(2), d1, torch.zeros(2), d2) == pytest.approx((1 - 3) ** 2 + (2 - 1) ** 2)


@pytest.mark.parametrize("k, block", [(1, 4), (37, 8), (300, 128)])
def test_inverse_hessian_factor_is_upper_cholesky_of_the_damped_inverse(k, block):
    from ditq.quant_core.passes.gptq import _inverse_hessian_factor

    g = torch.Generator().manual_seed(k)
    x = torch.randn(2 * k + 3, k, generator=g, dtype=torch.float64)
    h = x.t() @ x / x.shape[0]
    u = _inverse_hessian_factor(h, 0.01, "layer", block=block)
    damped_inverse = torch.linalg.inv(h + 0.01 * h.diagonal().mean() * torch.eye(k, dtype=torch.float64))
    assert torch.equal(u, u.triu()) and (u.diagonal() > 0).all()
    torch.testing.assert_close(u, torch.linalg.cholesky(damped_inverse, upper=True), rtol=1e-10, atol=1e-12)
