"""Numerics pinned by float64 references and known answers, each chosen so that a one-line bug which
the rest of the suite let through fails here (see bench/mutation_test.py for the bugs planted)."""
import pytest
import torch

from ditq.quant_core import quantizers as qz
from ditq.quant_core.passes import kmeans, smoothing


@pytest.mark.parametrize("alpha", [0.12, 0.3, 0.88])
def test_smoothing_scale_is_the_papers_formula_in_float64(alpha):
    # s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha); alpha = 0.5 (the known answer in test_vidit_q)
    # cannot tell alpha from 1 - alpha, these can
    g = torch.Generator().manual_seed(0)
    act_max = torch.rand(64, generator=g, dtype=torch.float64) * 50 + 0.01
    weight = torch.randn(32, 64, generator=g, dtype=torch.float64)
    ref = act_max.pow(alpha) / weight.abs().amax(dim=0).pow(1 - alpha)
    s = smoothing.smoothing_scale(act_max.float(), weight.float(), alpha)
    torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=0)


def test_smoothing_scale_floors_a_dead_weight_column():
    weight = torch.ones(4, 3)
    weight[:, 1] = 0.0
    s = smoothing.smoothing_scale(torch.tensor([2.0, 2.0, 2.0]), weight, 0.5)
    assert torch.isfinite(s).all()
    assert s[1].item() == pytest.approx(2.0**0.5 / smoothing.WEIGHT_FLOOR**0.5, rel=1e-5)


@pytest.mark.parametrize("bits, symmetric, expected", [(8, True, (-127, 127)), (4, True, (-7, 7)),
                                                        (2, True, (-1, 1)), (8, False, (0, 255)),
                                                        (4, False, (0, 15))])
def test_integer_ranges_known_answers(bits, symmetric, expected):
    # symmetric ranges leave out -2^(b-1) so that -q is representable and the grid is symmetric
    assert qz.int_range(bits, symmetric) == expected


@pytest.mark.parametrize("bits, expected", [(4, (-8, 7)), (3, (-4, 3)), (8, (-128, 127))])
def test_full_integer_ranges_known_answers(bits, expected):
    assert qz.int_range(bits, True, full_range=True) == expected
    assert qz.int_range(bits, False, full_range=True) == (0, 2**bits - 1)  # asymmetric: always all 2^b


def test_full_range_scale_known_answer():
    # max 7, min -16: narrow scale 16/7, full scale max(7/7, 16/8) = 2, and -16 is exactly -8 steps
    x = torch.tensor([[7.0, -16.0, 1.0, 3.0]])
    scale, _ = qz.compute_scale(x, 4, full_range=True)
    assert scale.item() == 2.0
    assert qz.quantize(x, scale, None, 4, True, True).tolist() == [[4, -8, 0, 2]]  # 3.5 rounds half to even
    assert qz.compute_scale(x, 4)[0].item() == pytest.approx(16 / 7)


def test_quantize_clamps_to_the_symmetric_range():
    x = torch.tensor([[-1000.0, 1000.0, -127.4, 126.6]])
    q = qz.quantize(x, torch.ones(1, 1), None, 8)
    assert q.tolist() == [[-127, 127, -127, 127]]
    q4 = qz.quantize(x, torch.ones(1, 1), None, 4)
    assert q4.tolist() == [[-7, 7, -7, 7]]


def test_all_zero_rows_get_the_floor_scale_and_quantize_to_zero():
    x = torch.zeros(2, 16)
    x[1] = torch.linspace(-1, 1, 16)
    for sym in (True, False):
        for kw in ({}, {"groups": 2}, {"per_tensor": True}):
            scale, zero = qz.compute_scale(torch.zeros(2, 16), 8, symmetric=sym, **kw)
            assert torch.equal(scale, torch.full_like(scale, qz.SCALE_EPS)), (sym, kw)
        scale, zero = qz.mse_clip_scale(x, 4, symmetric=sym, steps=5)
        assert scale[0].item() == pytest.approx(qz.SCALE_EPS) and torch.isfinite(scale).all()
        deq = qz.dequantize(qz.quantize(x, scale, zero, 4, sym), scale, zero)
        assert torch.equal(deq[0], torch.zeros(16))
    q8, s8 = qz.quantize_fp8(x)
    assert s8[0].item() == pytest.approx(qz.SCALE_EPS) and torch.equal(q8[0].float(), torch.zeros(16))
    q, s = qz.quantize_per_token(torch.zeros(3, 8))
    assert torch.equal(s, torch.full((3, 1), qz.SCALE_EPS)) and not q.any()


def test_asymmetric_zero_point_known_answer():
    # 2 bits over [-1, 3]: scale 4/3, zero = -round(-1 / (4/3)) = 1, an integer on the grid
    scale, zero = qz.compute_scale(torch.tensor([[-1.0, 3.0]]), 2, symmetric=False)
    assert scale.item() == pytest.approx(4 / 3) and zero.item() == 1.0
    assert qz.dequantize(torch.tensor([[3]]), torch.tensor([[2.0]]), torch.tensor([[1.0]])).item() == 4.0


def test_kmeans_with_more_clusters_than_distinct_points():
    # 12 points on 3 distinct locations, 5 clusters: two clusters stay empty and must keep a centre
    # on the data (not jump to the origin, not become NaN), and every point keeps zero distortion
    base = torch.tensor([[1.0, 2.0], [5.0, -3.0], [-4.0, 7.0]])
    x = base.repeat(4, 1)
    for init in kmeans.INITS:
        res = kmeans.kmeans(x, 5, iters=20, seed=0, init=init)
        assert torch.isfinite(res.centroids).all()
        on_data = torch.cdist(res.centroids.double(), base.double()).min(dim=1).values
        assert on_data.max() == 0, (init, res.centroids)
        assert torch.equal(res.centroids[res.assignments], x), init
