"""Quantizers against float64 references and known answers."""
import pytest
import torch

from ditq.quant_core import quantizers as qz


def ref_sym(x, bits):
    """float64 per-row symmetric RTN written out independently."""
    qmax = 2 ** (bits - 1) - 1
    scale = (x.double().abs().amax(dim=1, keepdim=True) / qmax).clamp_min(qz.SCALE_EPS)
    return torch.round(x.double() / scale).clamp(-qmax, qmax) * scale


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_per_channel_symmetric_matches_float64(bits):
    w = torch.randn(37, 53, dtype=torch.float64)
    q, s, z = qz.quantize_weight(w, bits)
    assert z is None and q.dtype == torch.int8 and s.shape == (37, 1)
    assert q.abs().max() <= 2 ** (bits - 1) - 1
    assert torch.allclose(qz.dequantize(q, s, dtype=torch.float64), ref_sym(w.float(), bits), atol=1e-6)


def test_error_bounded_by_half_step():
    w = torch.randn(16, 64)
    for group in (None, 16):
        q, s, _ = qz.quantize_weight(w, 4, group_size=group)
        err = (qz.dequantize(q, s) - w).abs().reshape(16, s.shape[1], -1)
        assert (err <= s.unsqueeze(-1) / 2 + 1e-6).all()


def test_asymmetric_range_contains_zero_and_is_exact_at_zero():
    w = torch.rand(8, 32) + 0.5  # all positive: range widened to include 0
    w[0, 0] = 0.0
    q, s, z = qz.quantize_weight(w, 4, symmetric=False)
    assert q.dtype == torch.uint8 and q.max() <= 15
    deq = qz.dequantize(q, s, z)
    assert deq[0, 0] == 0.0
    assert (deq - w).abs().max() <= s.max() / 2 + 1e-6


def test_zero_and_constant_rows_do_not_divide_by_zero():
    w = torch.zeros(3, 16)
    w[1] = 5.0
    for sym in (True, False):
        q, s, z = qz.quantize_weight(w, 8, symmetric=sym)
        deq = qz.dequantize(q, s, z)
        assert torch.isfinite(s).all() and (s > 0).all()
        assert torch.allclose(deq, w, atol=1e-6)
    q, s = qz.quantize_per_token(torch.zeros(4, 8))
    assert torch.equal(q, torch.zeros(4, 8, dtype=torch.int8)) and torch.isfinite(s).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises_clear_error(bad):
    w = torch.randn(4, 8)
    w[2, 3] = bad
    with pytest.raises(qz.NonFiniteError, match="blocks.0.attn.weight: 1 NaN/Inf"):
        qz.quantize_weight(w, 8, name="blocks.0.attn.weight")
    with pytest.raises(qz.NonFiniteError):
        qz.quantize_per_token(w)
    with pytest.raises(qz.NonFiniteError):
        qz.quantize_fp8(w)


def test_per_token_scales_are_per_row():
    x = torch.randn(6, 32)
    x[3] *= 1000  # one loud token must not change the others' scales
    q, s = qz.quantize_per_token(x)
    q2, s2 = qz.quantize_per_token(torch.cat([x[:3], x[4:]]))
    assert torch.equal(s[[0, 1, 2, 4, 5]], s2) and torch.equal(q[[0, 1, 2, 4, 5]], q2)


def test_group_scales_shape_and_values():
    x = torch.randn(5, 48)
    q, s = qz.quantize_per_token(x, 8, group_size=16)
    assert s.shape == (5, 3)
    assert torch.allclose(s[:, 1], x[:, 16:32].abs().amax(1) / 127)
    with pytest.raises(ValueError, match="must divide"):
        qz.quantize_per_token(x, 8, group_size=10)


def test_fp8_round_trip_relative_error():
    w = torch.randn(32, 64)
    q, s = qz.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn
    rel = ((q.float() * s - w).abs() / w.abs().clamp_min(1e-3)).median()
    assert rel < 2 ** -4  # 3 mantissa bits: relative error below 1/16


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("width", [1, 7, 8, 13, 64])
def test_pack_unpack_round_trip(bits, width):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(lo, hi + 1, (5, width), dtype=torch.int8)
    packed = qz.pack_bits(q, bits)
    assert packed.shape == (5, qz.packed_width(width, bits))
    assert torch.equal(qz.unpack_bits(packed, bits, width), q)


def test_int4_nibble_order_known_answer():
    # values 2j -> low nibble, 2j+1 -> high nibble, offset binary (+8)
    q = torch.tensor([[-8, 7, 0, 1, -1, 2, 3, -3]], dtype=torch.int8)
    packed = qz.pack_bits(q, 4)
    assert packed.tolist() == [[0x0 | (0xF << 4), 0x8 | (0x9 << 4), 0x7 | (0xA << 4), 0xB | (0x5 << 4)]]


def test_int4_packing_halves_bytes():
    assert qz.packed_width(4608, 4) == 2304 and qz.packed_width(1152, 3) == 432


def test_fake_quantize_is_quantize_then_dequantize():
    x = torch.randn(4, 3, 32)
    fq = qz.fake_quantize(x, 4)
    q, s, _ = qz.quantize_weight(x.reshape(-1, 32), 4)
    assert torch.equal(fq, qz.dequantize(q, s).reshape(x.shape))


# -- full range [-2^(b-1), 2^(b-1) - 1] (format 3) -------------------------------------------------
def ref_full(x, bits, groups=1):
    """float64 full-range symmetric RTN written out independently: each side against its own end."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    g = x.double().reshape(x.shape[0], groups, -1)
    scale = torch.maximum(g.clamp(min=0).amax(-1) / qmax, g.clamp(max=0).amin(-1) / qmin).clamp_min(qz.SCALE_EPS)
    return (torch.round(g / scale.unsqueeze(-1)).clamp(qmin, qmax) * scale.unsqueeze(-1)).reshape(x.shape)


@pytest.mark.parametrize("bits, group", [(4, None), (4, 16), (3, None)])
def test_full_range_matches_float64_and_reaches_minus_2_to_b_minus_1(bits, group):
    w = torch.randn(41, 64, generator=torch.Generator().manual_seed(bits))
    w[0] = -w[0].abs()  # all negative: the scale is -min / 8
    w[1] = w[1].abs()   # all positive: -8 unused, the scale is max / 7 as in the narrow range
    q, s, z = qz.quantize_weight(w, bits, group_size=group, full_range=True)
    assert z is None and q.min() == -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
    groups = 1 if group is None else 64 // group
    deq = qz.dequantize(q, s).double()
    torch.testing.assert_close(deq, ref_full(w, bits, groups), rtol=0, atol=1e-6)
    assert (q[0] == -(2 ** (bits - 1))).any() and not (q[1] < 0).any()
    # never coarser than the narrow range's scale, never clipping: error within half a step
    _, s_narrow, _ = qz.quantize_weight(w, bits, group_size=group)
    assert (s <= s_narrow).all() and (s < s_narrow).any()
    err = (deq - w.double()).abs().reshape(41, groups, -1)
    assert (err <= s.double().unsqueeze(-1) / 2 + 1e-7).all()


def test_full_range_mse_clip_search_runs_on_the_full_grid():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(9))
    x[:, 3] = -8 * x[:, 3].abs()  # a negative outlier per row: the -8 end pays
    s, z = qz.mse_clip_scale(x, 4, groups=2, full_range=True)
    q = qz.quantize(x, s, z, 4, True, True)
    assert q.min() == -8
    err = lambda sz, full: (qz.dequantize(qz.quantize(x, *sz, 4, True, full), *sz) - x).abs().pow(2.4).sum(-1)
    minmax = qz.compute_scale(x, 4, groups=2, full_range=True)
    assert (err((s, z), True) <= err(minmax, True) + 1e-6).all()  # the search starts at min-max


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("width", [6, 7, 16, 23])
def test_holds_full_range_min_reads_packed_bytes_and_skips_padding(bits, width):
    lo = -(2 ** (bits - 1))
    q = torch.randint(lo + 1, -lo, (3, width), generator=torch.Generator().manual_seed(width), dtype=torch.int32)
    packed = qz.pack_bits(q.to(torch.int8), bits)  # 4 bits: padding nibbles are 0, which reads as -8
    assert not qz.holds_full_range_min(packed, bits, width)
    for col in (0, width - 1, width // 2):
        hit = q.clone()
        hit[2, col] = lo
        assert qz.holds_full_range_min(qz.pack_bits(hit.to(torch.int8), bits), bits, width), col
