"""Triton kernels against their torch references, on the CPU through TRITON_INTERPRET=1.

Shapes are small and odd (M=37, N=80 against 32-wide tiles; K=100 against 32-deep K-steps) so the
masked edges run; outputs are poisoned before each kernel so an unwritten element cannot pass; every
test draws its own random inputs. A compile-only test builds the GEMMs for sm_90 without a GPU and
checks they use wgmma, pipeline with cp.async and fit in shared memory.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before importing them

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'ditq[triton]')")
if tuple(map(int, triton.__version__.split(".")[:2])) < (3, 9):
    import numpy

    if tuple(map(int, numpy.__version__.split(".")[:2])) >= (2, 4):
        pytest.skip(f"the interpreter of Triton {triton.__version__} breaks on loops with runtime bounds under "
                    f"NumPy {numpy.__version__} (use Triton >= 3.9 or NumPy < 2.4)", allow_module_level=True)

from ditq.kernels import reference as ref  # noqa: E402
from ditq.kernels import triton_act_quant as aq  # noqa: E402
from ditq.kernels import triton_gemm as gm  # noqa: E402
from ditq.quant_core import quantizers as qz  # noqa: E402
from ditq.quant_core.config import LayerScheme  # noqa: E402
from ditq.quant_core.layers import QuantLinear  # noqa: E402

M, K, N = 37, 96, 80

if not gm.INTERPRET:
    pytest.skip("TRITON_INTERPRET was set to 0 before this module loaded", allow_module_level=True)


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Fill every kernel output with garbage first: NaN for floats, 77 for integers."""
    def empty_output(shape, device, dtype):
        fill = 77 if not dtype.is_floating_point else (448.0 if dtype == qz.FP8_DTYPE else float("nan"))
        return torch.full(shape, fill, device=device, dtype=dtype)

    monkeypatch.setattr(gm, "empty_output", empty_output)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(dtype)


def signs(k, seed):
    return (torch.randint(0, 2, (k,), generator=gen(seed)) * 2 - 1).to(torch.int8)


def rel_err(y, y_ref):
    return ((y.double() - y_ref.double()).abs().max() / y_ref.double().abs().max()).item()


def quantized_weight(n, k, bits, group_size, symmetric, seed, per_tensor=False):
    """Packed weight as QuantLinear stores it (asymmetric values offset to signed)."""
    q, s, z = qz.quantize_weight(rand(n, k, seed=seed), bits, symmetric=symmetric, group_size=group_size,
                                 per_tensor=per_tensor)
    if not symmetric:
        q, z = q.to(torch.int16) - 2 ** (bits - 1), (z - 2 ** (bits - 1)).to(torch.int8)
    return qz.pack_bits(q.to(torch.int8), bits), s, z


# -- activation quantization -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, 32])
def test_act_quant_matches_reference_bit_for_bit(dtype, group_size):
    x = rand(M, K, seed=1, scale=3.0, dtype=dtype)
    x[0] = (torch.arange(K) - 40.5).to(dtype)  # row of exact .5 ties after scaling
    smooth = torch.rand(K, generator=gen(2)) + 0.5
    for kwargs in ({}, {"smooth": smooth}):
        q, s = aq.act_quant(x, 8, group_size, **kwargs)
        q_ref, s_ref = ref.act_quant(x, 8, group_size, **kwargs)
        assert torch.equal(s, s_ref)
        assert torch.equal(q, q_ref)
    q, s = aq.act_quant(x, 6, group_size)  # fewer bits: clamp at +-31
    assert torch.equal(q, ref.act_quant(x, 6, group_size)[0]) and q.abs().max() == 31


@pytest.mark.parametrize("block", [16, 32])
def test_act_quant_fused_rotation(block):
    x, smooth, sg = rand(M, K, seed=3, dtype=torch.float16), torch.rand(K, generator=gen(4)) + 0.5, signs(K, 5)
    q, s = aq.act_quant(x, 8, 32, smooth, sg, block)
    q_ref, s_ref = ref.act_quant(x, 8, 32, smooth, sg, block)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    # butterflies sum in another order than the reference matmul: a value on a tie may move by one
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


def test_act_quant_static_and_fp8():
    x, sg = rand(M, K, seed=6, scale=2.0, dtype=torch.float16), signs(K, 7)
    scale = torch.tensor([0.02])
    q, s = aq.act_quant_static(x, scale, 8)
    q_ref, s_ref = ref.act_quant_static(x, scale, 8)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref) and q.abs().max() == 127  # saturates
    for kwargs in ({}, {"rotation_signs": sg, "rotation_block": 32}):
        q, s = aq.act_quant_fp8(x, **kwargs)
        q_ref, s_ref = ref.act_quant_fp8(x, **kwargs)
        torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
        assert (q.float() != q_ref.float()).float().mean() < (0.01 if kwargs else 1e-9)


def test_act_quant_unfusable_rotation_falls_back():
    x, sg = rand(M, 128, seed=8), signs(128, 9)
    q, s = aq.act_quant(x, 8, 32, None, sg, 64)  # a 64-block straddles 32-wide groups: reference
    assert torch.equal(q, ref.act_quant(x, 8, 32, None, sg, 64)[0])


# -- integer GEMMs --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_gemm(bits, group_size, symmetric):
    seed = bits * 10 + (group_size or 0) + symmetric
    w, sw, zw = quantized_weight(N, K, bits, group_size, symmetric, seed)
    xq, sx = ref.act_quant(rand(M, K, seed=seed + 1), 8, group_size)
    bias = rand(N, seed=seed + 2)
    args = (xq, sx, w, sw, zw, bias)
    y = gm.int_gemm(*args, bits=bits, in_features=K, out_dtype=torch.float32)
    y_ref = ref.int_gemm(*args, bits=bits, in_features=K, out_dtype=torch.float32)
    assert rel_err(y, y_ref) < 1e-6
    y16 = gm.int_gemm(*args, bits=bits, in_features=K, out_dtype=torch.float16)
    torch.testing.assert_close(y16, y_ref.half(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_gemm_ragged_k_static_and_per_tensor(bits, symmetric):
    k = 100  # not a multiple of the K-step (nor of 8 for the packed int4 rows)
    w, sw, zw = quantized_weight(N, k, bits, None, symmetric, seed=20 + bits, per_tensor=True)  # [1, 1] scales
    xq, sx = ref.act_quant_static(rand(M, k, seed=21), torch.tensor([0.01]), 8)  # [M, 1] stride-0 view
    y = gm.int_gemm(xq, sx, w, sw, zw, None, bits=bits, in_features=k, out_dtype=torch.float32)
    y_ref = ref.int_gemm(xq, sx, w, sw, zw, None, bits=bits, in_features=k, out_dtype=torch.float32)
    assert rel_err(y, y_ref) < 1e-6


def test_int_gemm_exact_int32_accumulation():
    """All +-127: unit scales make the output the integer sum itself, which fp32 holds exactly."""
    xq = (torch.randint(0, 2, (M, K), generator=gen(30)) * 254 - 127).to(torch.int8)
    wq = (torch.randint(0, 2, (N, K), generator=gen(31)) * 254 - 127).to(torch.int8)
    ones_m, ones_n = torch.ones(M, 1), torch.ones(N, 1)
    y = gm.int_gemm(xq, ones_m, wq, ones_n, None, None, bits=8, in_features=K, out_dtype=torch.float32)
    assert torch.equal(y, (xq.double() @ wq.double().t()).float())


@pytest.mark.parametrize("bits", [8, 4])
def test_int_gemm_groups_spanning_several_k_steps(bits):
    """Group size 64 over 32-deep K-steps: each group's scales and its zero-point term apply once."""
    m, k, n = 21, 192, 48
    w, sw, zw = quantized_weight(n, k, bits, 64, False, seed=33 + bits)
    xq, sx = ref.act_quant(rand(m, k, seed=34), 8, 64)
    args = (xq, sx, w, sw, zw, None)
    y = gm.int_gemm(*args, bits=bits, in_features=k, out_dtype=torch.float32)
    assert rel_err(y, ref.int_gemm(*args, bits=bits, in_features=k, out_dtype=torch.float32)) < 1e-6


def full_range_int4(n, k, groups, seed):
    """Packed int4 in the full range [-8, 7] (format 3): row 0 all -8, row 1 alternating -8 / 7, the
    rest uniform over the 16 values; positive scales ``[n, groups]``."""
    q = torch.randint(-8, 8, (n, k), generator=gen(seed), dtype=torch.int32)
    q[0] = -8
    q[1, 0::2], q[1, 1::2] = -8, 7
    return q.to(torch.int8), torch.rand(n, groups, generator=gen(seed + 1)) + 0.01


@pytest.mark.parametrize("group_size", [None, 32])
def test_int4_full_range_gemms_decode_minus_8(group_size):
    """W4A8 (per channel, ragged K = 100; group-wise g32) and W4A16 (fused and decode-then-dense) on
    weights that hit -8, against the torch reference; unit scales give the exact integer sums."""
    k = 100 if group_size is None else 96
    groups = 1 if group_size is None else k // group_size
    q, sw = full_range_int4(N, k, groups, seed=40 + groups)
    w = qz.pack_bits(q, 4)
    xq, sx = ref.act_quant(rand(M, k, seed=42), 8, group_size)
    y = gm.int_gemm(xq, sx, w, sw, None, None, bits=4, in_features=k, out_dtype=torch.float32)
    assert rel_err(y, ref.int_gemm(xq, sx, w, sw, None, None, bits=4, in_features=k, out_dtype=torch.float32)) < 1e-6
    unit = (xq, torch.ones(M, groups), w, torch.ones(N, groups), None, None)
    for impl in (gm, ref):
        ones = impl.int_gemm(*unit, bits=4, in_features=k, out_dtype=torch.float32)
        assert torch.equal(ones, (xq.double() @ q.double().t()).float()), impl
        assert torch.equal(ones[:, 0], (-8 * xq.double().sum(1)).float()), impl
    kw = dict(bits=4, weight_format="int", in_features=k)
    for m in (M, gm.FUSED_DECODE_MAX_M + 3):
        x = rand(m, k, seed=43, dtype=torch.float16)
        assert rel_err(gm.weight_only_linear(x, w, sw, None, None, **kw),
                       ref.weight_only_linear(x, w, sw, None, None, **kw)) < 3e-3


def test_fp8_gemm():
    for k in (96, 100):
        xq, sx = ref.act_quant_fp8(rand(M, k, seed=40, scale=5.0))
        wq, sw = qz.quantize_fp8(rand(N, k, seed=41), per_row=True)
        bias = rand(N, seed=42)
        y = gm.fp8_gemm(xq, sx, wq, sw, bias, out_dtype=torch.float32)
        assert rel_err(y, ref.fp8_gemm(xq, sx, wq, sw, bias, out_dtype=torch.float32)) < 1e-6


# -- real layer shapes (#18): the FFNs of Wan 2.1 14B and Flux at a few rows ---------------------
REAL_SHAPES = {"wan-ffn-up": (5120, 13824), "wan-ffn-down": (13824, 5120),  # (K, N)
               "flux-ffn-up": (3072, 12288), "flux-ffn-down": (12288, 3072)}
REAL_FORMS = ("w8a8", "w4a8", "fp8", "w4a16-g128")
CI_N = 80  # CI runs W4A8 at the longest K (13,824) and 80 output channels (a ragged N tile); a full-size case
#            takes the interpreter minutes: DITQ_REAL_SHAPES=1 runs all 16, best with a GPU-sized tile
#            (DITQ_INTERPRET_TILE=16,128,128; command and times in docs/kernels.md)


def real_cases():
    if os.environ.get("DITQ_REAL_SHAPES") == "1":
        return [(shape, form, None) for shape in REAL_SHAPES for form in REAL_FORMS]
    return [("wan-ffn-down", "w4a8", CI_N)]


@pytest.mark.parametrize("shape, form, n_cut", real_cases())
def test_real_layer_shapes_at_three_rows(shape, form, n_cut):
    """M = 3 rows through the full K (and N, unless cut to ``n_cut``) of a real DiT's FFN: every K-step
    and N tile of the grid runs (the last K-step, int4 rows of 1,536-6,912 bytes), against the torch
    reference."""
    k, n = REAL_SHAPES[shape]
    w, x = rand(n_cut or n, k, seed=80, scale=0.02), rand(3, k, seed=81)
    if form == "fp8":
        (xq, sx), (wq, sw) = ref.act_quant_fp8(x), qz.quantize_fp8(w, per_row=True)
        args = (xq, sx, wq, sw, None)
        assert rel_err(gm.fp8_gemm(*args, out_dtype=torch.float32), ref.fp8_gemm(*args, out_dtype=torch.float32)) < 1e-5
    elif form == "w4a16-g128":
        q, sw, _ = qz.quantize_weight(w, 4, group_size=128, full_range=True)
        args = (x.half(), qz.pack_bits(q, 4), sw, None, None)
        kw = dict(bits=4, weight_format="int", in_features=k)
        assert rel_err(gm.weight_only_linear(*args, **kw), ref.weight_only_linear(*args, **kw)) < 3e-3
    else:
        bits = 8 if form == "w8a8" else 4
        q, sw, _ = qz.quantize_weight(w, bits, full_range=bits == 4)
        xq, sx = ref.act_quant(x, 8)
        args = (xq, sx, qz.pack_bits(q, bits), sw, None, None)
        kw = dict(bits=bits, in_features=k, out_dtype=torch.float32)
        assert rel_err(gm.int_gemm(*args, **kw), ref.int_gemm(*args, **kw)) < 1e-6


def _truncate(v: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """Round toward zero to ``mantissa_bits`` bits after the leading one."""
    m, e = torch.frexp(v)
    scale = 2.0 ** (mantissa_bits + 1)
    return torch.ldexp(torch.trunc(m * scale) / scale, e)


def hopper_fp8_accumulate(products: torch.Tensor, promote_every: int) -> torch.Tensor:
    """A model of sm_90's FP8 wgmma accumulation (float64 in, last dim K): each k32 instruction's
    32 products are added to a partial sum kept with FP8_ACC_MANTISSA bits (truncated), which is
    added into an exact sum every ``promote_every`` products (Triton's ``max_num_imprecise_acc``)."""
    chunks = products.reshape(*products.shape[:-1], -1, 32).sum(-1)
    partial = torch.zeros(products.shape[:-1], dtype=torch.float64)
    total = torch.zeros_like(partial)
    for j in range(chunks.shape[-1]):
        partial = _truncate(partial + chunks[..., j], gm.FP8_ACC_MANTISSA)
        if (j + 1) * 32 % promote_every == 0:
            total, partial = total + partial, torch.zeros_like(partial)
    return total + partial


def test_fp8_gemm_error_bound_at_k4608():
    """The documented bound (gm.fp8_error_bound) holds against float64 at K = 4608 for the kernel (the
    interpreter accumulates in fp32, so this checks scales and the promoted loop, not the tensor
    core) and for a model of the sm_90 accumulator with the kernel's promotion interval."""
    m, k, n = 5, 4608, 40
    xq, sx = ref.act_quant_fp8(rand(m, k, seed=43, scale=3.0) + 0.5)  # a mean: sums grow with K
    wq, sw = qz.quantize_fp8(rand(n, k, seed=44) + 0.3, per_row=True)
    products = xq.double()[:, None, :] * wq.double()[None, :, :]
    exact = products.sum(-1) * sx.double() * sw.double().t()
    bound = gm.fp8_error_bound(products.abs().sum(-1), k) * sx.double() * sw.double().t()
    y = gm.fp8_gemm_triton(xq, sx, wq, sw, None, out_dtype=torch.float32)
    assert ((y.double() - exact).abs() <= bound).all()
    promoted = hopper_fp8_accumulate(products, int(gm.FP8_PROMOTE_K)) * sx.double() * sw.double().t()
    unpromoted = hopper_fp8_accumulate(products, k) * sx.double() * sw.double().t()
    assert ((promoted - exact).abs() <= bound).all()
    # what the promotion buys in this model: the whole-K partial sum (Triton's sm_90 default) errs
    # an order of magnitude more (a worst-case bound 36x looser)
    assert (unpromoted - exact).abs().mean() > 10 * (promoted - exact).abs().mean()


# -- weight-only and codebook ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "int4-g32-asym", "int4-g32-asym-fp32-zero", "fp8"])
def test_weight_only_linear(dtype, fmt):
    if fmt == "fp8":
        (w, sw), zw, bits = qz.quantize_fp8(rand(N, K, seed=50), per_row=True), None, 8
    else:
        bits = 8 if fmt == "int8" else 4
        w, sw, zw = quantized_weight(N, K, bits, 32 if bits == 4 else None, bits == 8, seed=51)
        if fmt.endswith("fp32-zero"):  # as older files store them
            zw = zw.float()
    x, bias = rand(M, K, seed=52, dtype=dtype), rand(N, seed=53, dtype=dtype)
    kw = dict(bits=bits, weight_format="fp8" if fmt == "fp8" else "int", in_features=K)
    y = gm.weight_only_linear(x, w, sw, zw, bias, **kw)
    y_ref = ref.weight_only_linear(x, w, sw, zw, bias, **kw)
    assert y.dtype == dtype
    # the weight is decoded to the activation dtype before the MMA; the reference decodes to fp32
    assert rel_err(y, y_ref) < (2e-2 if dtype == torch.bfloat16 else 3e-3)
    big = rand(gm.FUSED_DECODE_MAX_M + 3, K, seed=54, dtype=dtype)  # decode once, then the dense matmul
    assert rel_err(gm.weight_only_linear(big, w, sw, zw, bias, **kw),
                   ref.weight_only_linear(big, w, sw, zw, bias, **kw)) < (2e-2 if dtype == torch.bfloat16 else 3e-3)


def codebook_weight(n, k_in, bits, dim, rows, seed):
    """Packed indices and an fp16 codebook ``[rows, 2^bits, dim]`` as CodebookLinear stores them."""
    u = torch.randint(0, 2**bits, (n, k_in // dim), generator=gen(seed))
    codebook = rand(rows, 2**bits, dim, seed=seed + 1, dtype=torch.float16)
    return qz.pack_bits((u - 2 ** (bits - 1)).to(torch.int8), bits), codebook


@pytest.mark.parametrize("dim", [1, 2, 4])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_codebook_linear(bits, dim):
    k = 100  # not a multiple of the K-step; K / dim = 100, 50, 25 indices: rows padded to 8 indices
    for rows in (1, N):
        idx, codebook = codebook_weight(N, k, bits, dim, rows, seed=60 + bits * dim + rows)
        for dtype, bias in ((torch.float32, rand(N, seed=61)), (torch.bfloat16, None)):
            x = rand(M, k, seed=62 + rows, dtype=dtype)
            y = gm.codebook_linear(x, idx, codebook, bias, bits=bits, in_features=k)
            assert y.dtype == dtype
            y_ref = ref.codebook_linear(x, idx, codebook, bias, bits=bits, in_features=k)
            # fp32: an IEEE dot of the exact fp16 entries; bf16: the entries are rounded to bf16 first
            assert rel_err(y, y_ref) < (1e-5 if dtype == torch.float32 else 2e-2), (rows, dtype)
    big = rand(gm.FUSED_DECODE_MAX_M + 3, k, seed=64)  # decode-then-matmul path
    y = gm.codebook_linear(big, idx, codebook, bias, bits=bits, in_features=k)
    assert rel_err(y, ref.codebook_linear(big, idx, codebook, bias, bits=bits, in_features=k)) < 1e-5


# -- through QuantLinear -------------------------------------------------------------------------
SCHEMES = {
    "w8a8": (LayerScheme(), {}),
    "w8a8-static": (LayerScheme(act_mode="static_tensor"), {"input_scale": 0.03}),
    "w4a8-g32-asym": (LayerScheme(weight_bits=4, weight_granularity="group", group_size=32, weight_symmetric=False,
                                  act_mode="dynamic_token_group"), {}),
    "w8a8-smooth-hadamard": (LayerScheme(), {"rot": True}),
    "fp8": (LayerScheme(weight_format="fp8", act_mode="dynamic_token_fp8"), {}),
    "w4a16": (LayerScheme(weight_bits=4, act_mode=None, act_bits=None), {}),
    "w4a8-full": (LayerScheme(weight_bits=4, weight_full_range=True), {}),
    "w4a16-g32-full": (LayerScheme(weight_bits=4, weight_granularity="group", group_size=32, weight_full_range=True,
                                   act_mode=None, act_bits=None), {}),
}


def quant_linear(name, seed):
    scheme, extra = SCHEMES[name]
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(rand(N, K, seed=seed, scale=0.1))
        lin.bias.copy_(rand(N, seed=seed + 1))
    kw = {"input_scale": extra["input_scale"]} if "input_scale" in extra else {}
    if extra.get("rot"):
        kw.update(smooth_scale=torch.rand(K, generator=gen(seed)) + 0.5, rotation_signs=signs(K, seed),
                  rotation_block=32)
    return QuantLinear.from_linear(lin, scheme, name=name, **kw).half()


@pytest.mark.parametrize("name", list(SCHEMES))
def test_quant_linear_triton_equals_torch(name, monkeypatch):
    layer = quant_linear(name, seed=70)
    x = rand(2, 19, K, seed=71, dtype=torch.float16)  # M = 38 tokens
    monkeypatch.setenv("DITQ_KERNELS", "torch")
    y_torch = layer(x)
    monkeypatch.setenv("DITQ_KERNELS", "triton")
    y_triton = layer(x)
    assert y_triton.shape == (2, 19, N) and y_triton.dtype == torch.float16
    tol = 2e-2 if name == "w8a8-smooth-hadamard" else 3e-3  # rotation: a few activations move by 1 LSB
    assert rel_err(y_triton, y_torch) < tol


def test_quant_linear_triton_under_torch_compile(monkeypatch):
    monkeypatch.setenv("DITQ_KERNELS", "triton")
    layer = quant_linear("w4a8-g32-asym", seed=80)
    x = rand(M, K, seed=81, dtype=torch.float16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("act_bits", [None, 8])
def test_codebook_layer_triton_equals_torch(act_bits, monkeypatch):
    """CodebookLinear (VQ4DiT's weight-only layer; Qua²SeDiMo's with per-token int8 activations)
    dispatches to the Triton kernel, eagerly and as one opaque op under torch.compile."""
    from ditq.quant_core.layers import CodebookLinear

    idx = torch.randint(0, 64, (N, K // 2), generator=gen(90))
    layer = CodebookLinear.from_codes(idx, rand(1, 64, 2, seed=91), rand(N, seed=92), name="cb",
                                      act_bits=act_bits).half()
    x = rand(2, 19, K, seed=93, dtype=torch.float16)
    monkeypatch.setenv("DITQ_KERNELS", "torch")
    y_torch = layer(x)
    monkeypatch.setenv("DITQ_KERNELS", "triton")
    y_triton = layer(x)
    assert y_triton.shape == (2, 19, N) and y_triton.dtype == torch.float16
    assert rel_err(y_triton, y_torch) < 3e-3
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), y_triton, rtol=0, atol=0)


# -- compile-only for Hopper -------------------------------------------------------------------
# A representative subset (the full sweep over every autotune candidate: sm90_compile.py --sweep,
# committed as SWEEP and checked below): each kernel form's largest tile, the tightest fits
# (255 / 254 registers in the sweep), a grouped tile per weight width and the act_quant kernel.
SM90_CASES = ["w8a8 128x256x128 w8 s4", "w8a8 asym 256x128x128 w8 s3", "w4a8 128x256x128 w8 s4",
              "w4a8 g128 asym (Q-DiT) 64x128x128 w4 s4", "w8a8 g128 asym (Q-DiT) 64x128x128 w4 s4",
              "fp8 128x128x128 w8 s4", "w4a16 g128 asym 128x256x64 w8 s3", "codebook b6 d2 64x128x32 w4 s4",
              "codebook b8 d4 128x128x64 w8 s4", "act_quant rot128 k1152"]
SWEEP = Path(__file__).parents[1] / "bench" / "results" / "sm90_spills.md"
WGMMA = {"w8a8": "s32.s8.s8", "w4a8": "s32.s8.s8", "fp8": "f32.e4m3.e4m3", "w4a16": "f32.bf16.bf16",
         "codebook": "f32.bf16.bf16"}


def _sm90(*args) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("sm90_compile.py")), *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_kernels_compile_for_sm90():
    results = {r["case"]: r for r in map(json.loads, _sm90(*SM90_CASES).splitlines())}
    assert set(results) == set(SM90_CASES)
    for name, r in results.items():
        assert "error" not in r, f"{name}: {r.get('error')}"
        assert r["shared"] <= 232448, f"{name}: {r['shared']} B of shared memory exceeds sm_90's 227 KB"
        assert r["spill_stores"] == r["spill_loads"] == 0, f"{name}: ptxas spills ({r})"
        if name.startswith("act_quant"):
            continue
        suffix = next(v for k, v in WGMMA.items() if name.startswith(k))
        assert r["wgmma"] and all(i.endswith(suffix) for i in r["wgmma"]), f"{name}: {r['wgmma']}"
        assert r["cp_async"] and not r["mma_sync"], f"{name}: not a pipelined wgmma main loop"
        # one K loop, not nested in a per-group loop, waiting on the oldest loads with newer ones in flight
        assert r["mma_loops"] and all(not lp["nested"] and lp["async_copies"] and lp["waits_in_flight"]
                                      for lp in r["mma_loops"]), f"{name}: {r['mma_loops']}"
        decoded = name.startswith(("w4", "codebook"))  # decoded in registers: the left wgmma operand
        assert r["wgmma_a"] == (["RS"] if decoded else ["SS"]), f"{name}: {r['wgmma_a']}"
    assert results["fp8 128x128x128 w8 s4"]["max_imprecise_acc"] == [int(gm.FP8_PROMOTE_K)]


def test_sweep_covers_every_autotune_candidate_without_spills():
    """The committed sweep lists every case sm90_compile.py builds now (so a new tile or kernel form
    means re-running it) and shows no spill and a pipelined MMA loop in any of them."""
    rows = [r.split("|")[1:-1] for r in SWEEP.read_text().splitlines() if r.startswith("| ") and "---" not in r]
    table = {f"{r[0].strip()} {r[1].strip()}": r for r in rows[1:]}
    assert set(_sm90("--list").split("\n")) - {""} <= set(table)
    for name, r in table.items():
        assert r[3].strip() == r[4].strip() == "0", f"{name}: spills {r[3]} / {r[4]} B"
        assert name.startswith("act_quant") or r[7].strip() == "yes", f"{name}: MMA loop not pipelined"


def test_hopper_tiles_fit_shared_memory():
    """Pipelined operand buffers of every autotune candidate fit sm_90's 227 KB per block."""
    for bm, bn, bk, _, stages in gm.HOPPER_INT8:
        assert (bm + bn) * bk * stages <= 232448 and bk >= 32
    for bm, bn, bk, _, stages in gm.HOPPER_FLOAT:
        assert (bm + bn) * bk * 2 * stages <= 232448
