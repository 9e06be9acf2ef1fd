"""Triton GEMMs for quantized linears: W8A8 / W4A8 int8, FP8 W8A8, weight-only and codebook decode.

Weights are stored ``[N, K]`` K-contiguous (kernels.md §2.4: 8-bit wgmma wants K-major operands).

``_scaled_gemm_kernel`` (int8 and fp8 tensor cores): for each group ``g`` of K it accumulates
``sum_k x[m,k] * w[n,k]`` exactly (int32, or fp32 for fp8) and adds
``sx[m,g] * sw[n,g] * (acc - rowsum_g(x)[m] * zw[n,g])`` in fp32; per-channel scales are one group,
so the rescale runs once in the epilogue (Q-DiT's group-wise path rescales each K-step's product).
The weight zero-point term is applied after the K loop from per-group row sums the wrapper takes
once per GEMM. One flat K loop either way, so loads pipeline across group boundaries; tile limits
that keep every form free of register spills on sm_90 are in ``_prune`` (docs/kernels.md). int4
weights are unpacked to int8 in registers and made the left operand of ``tl.dot`` (computing
Yᵀ = W·Xᵀ), which Hopper runs as register-sourced wgmma instead of writing the unpacked tile back to
shared memory (§4.3).

``_dequant_gemm_kernel`` (16-bit tensor cores): decodes int8 / int4 / fp8 weights with their scales,
or packed b-bit codebook indices through the codebook (k-means, VQ), to the activation dtype in
registers, again as the left operand; above FUSED_DECODE_MAX_M rows the weight is decoded once
and the dense matmul runs instead.

Tile configs are autotuned per (bucketed M, N, K, group size, format); under ``TRITON_INTERPRET=1``
a single small config is used (the autotuner needs a GPU to time more than one).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Hopper: GemLite's and lmdeploy's H100 int8
# winners (kernels.md §2.2, §2.4), all within 227 KB of shared memory, BLOCK_K >= 32. The last tile of
# each list has BLOCK_K = 32 (= MIN_GROUP): the one every group size can use (a K-step never spans two
# groups). Which tiles a kernel form may take: _prune; ptxas reports for all of them:
# bench/results/sm90_spills.md (tests/sm90_compile.py --sweep).
HOPPER_INT8 = [(128, 256, 128, 8, 4), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4),
               (64, 128, 128, 4, 4), (64, 64, 256, 4, 3), (128, 128, 64, 8, 4), (64, 128, 32, 4, 4)]
AMPERE_INT8 = [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 128, 4, 3),
               (64, 128, 32, 4, 4)]
HOPPER_FLOAT = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (32, 128, 64, 4, 4),
                (16, 128, 128, 4, 4), (64, 128, 32, 4, 4)]
AMPERE_FLOAT = [(128, 128, 32, 4, 4), (64, 128, 32, 4, 4), (32, 128, 64, 4, 3), (16, 128, 64, 4, 3),
                (16, 128, 32, 4, 3)]
# The interpreter's tile: small, so CI's small shapes cover ragged edges and several K-steps. Runs at
# real layer sizes take a GPU-sized tile instead (DITQ_INTERPRET_TILE="BLOCK_M,BLOCK_N,BLOCK_K"): the
# interpreter's cost is per K-step, so 32x32x32 over a 5120x13824 weight takes a CPU-hour.
def _interpret_tile() -> tuple[int, ...]:
    text = os.environ.get("DITQ_INTERPRET_TILE", "32,32,32")
    try:
        bm, bn, bk = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"DITQ_INTERPRET_TILE={text!r}: give BLOCK_M,BLOCK_N,BLOCK_K, e.g. 16,128,128") from None
    return bm, bn, bk, 4, 1


INTERPRET_TILE = _interpret_tile()
MIN_GROUP = 32  # int8 wgmma needs BLOCK_K >= 32, and a K-step may not cross a group boundary
# Above this many rows a weight-only or codebook GEMM decodes the weight once and runs the dense
# matmul: fused, every weight tile would be decoded again for each of the M / BLOCK_M row tiles.
FUSED_DECODE_MAX_M = 256
# Kernels that keep two accumulator tiles live (the grouped rescale's fp32 sum beside the MMA
# result; FP8's promoted sum beside the tensor core's partial one) take only tiles with at most this
# many accumulator registers per thread: at 128 (e.g. 128x256 on 8 warps) ptxas spills.
TWO_ACC_MAX_REGS = 64
# ... and the grouped kernel, which also holds a column of scales per K-step, spills on 8 warps
# even then (48-96 B at 128x128, sm90_spills.md): it runs on one warpgroup.
GROUPED_MAX_WARPS = 4
# The codebook decode gathers each weight element through a 64-bit pointer of its own: tiles with more
# than this many weight elements per thread and K-step spill (bench/results/sm90_spills.md).
CODEBOOK_MAX_ELEMS = 32
# FP8 products accumulate in the tensor core's reduced-precision accumulator (on sm_90 about 13
# mantissa bits) for at most this many K before the sum is promoted into an fp32 one: the bound
# and its cost are in docs/kernels.md ("FP8 accumulation").
FP8_PROMOTE_K = tl.constexpr(128)
FP8_ACC_MANTISSA = 13  # sm_90's FP8 accumulator is 1-8-13 ("FP22", measured by SageAttention2)


def empty_output(shape, device, dtype) -> torch.Tensor:
    """Every kernel output is allocated here (tests replace it to poison outputs and catch unwritten
    elements)."""
    return torch.empty(shape, device=device, dtype=dtype)


def fp8_error_bound(abs_products: Tensor, k: int) -> Tensor:
    """Worst-case error of the FP8 GEMM's sum of products (before the scales), given the sums of the
    products' magnitudes ``sum_k |xq[m,k] * wq[n,k]|``, on sm_90 with FP8_PROMOTE_K: each k32 wgmma
    adds into the partial sum with a truncation below ``2^-FP8_ACC_MANTISSA`` of a value no larger
    than the interval's magnitude sum (FP8_PROMOTE_K / 32 times per interval), and each of the
    ``ceil(K / FP8_PROMOTE_K)`` fp32 promotions and the two fp32 scale products rounds below ``2^-24``
    of the total. Without promotion the first term is ``K / 32`` additions instead of 4: 36x looser
    at K = 4608 (docs/kernels.md)."""
    adds = int(FP8_PROMOTE_K) // 32
    return abs_products * (adds * 2.0**-FP8_ACC_MANTISSA + (math.ceil(k / int(FP8_PROMOTE_K)) + 2) * 2.0**-24)


def _hopper() -> bool:
    return not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (9, 0)


def _configs(tiles) -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ([INTERPRET_TILE] if INTERPRET else tiles)]


def _acc_regs(config) -> int:
    """32-bit accumulator registers per thread for one BLOCK_M x BLOCK_N tile."""
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] // (32 * config.num_warps)


def _weight_elems(config) -> int:
    """Weight elements per thread in one K-step's ``BLOCK_N x BLOCK_K`` tile."""
    return config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_K"] // (32 * config.num_warps)


def _prune(configs, named_args, **kwargs):
    """Drop tiles whose K-step would cross a group, tiles too big for two live accumulators where
    the kernel keeps two (grouped scales, FP8 promotion), codebook tiles that gather too many weights
    per thread, and M tiles far taller than the problem."""
    m, gs, k = named_args["M"], named_args["GS"], named_args["K"]
    ok = [c for c in configs if gs == k or gs % c.kwargs["BLOCK_K"] == 0]
    if kwargs.get("GROUPED") or kwargs.get("FP8"):
        ok = [c for c in ok if _acc_regs(c) <= TWO_ACC_MAX_REGS] or ok[-1:]
    if kwargs.get("GROUPED"):
        ok = [c for c in ok if c.num_warps <= GROUPED_MAX_WARPS] or ok[-1:]
    if kwargs.get("CB_DIM"):
        ok = [c for c in ok if _weight_elems(c) <= CODEBOOK_MAX_ELEMS] or ok[-1:]
    fit = [c for c in ok if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))]
    return fit or ok[-1:]


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 8192)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-tiles share each weight column-tile while it sits in L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _load_weight(w_ptr, rn, k0, K, KP, stride_wn, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
                 EVEN_K: tl.constexpr):
    """``[BLOCK_N, BLOCK_K]`` weight values at columns ``k0 ...``: stored 8-bit values as they are,
    int4 unpacked from offset-binary nibbles (byte j: value 2j low, 2j+1 high) to signed int8."""
    if BITS == 4:
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + kb[None, :]
        p = tl.load(ptrs) if EVEN_K else tl.load(ptrs, mask=kb[None, :] < KP, other=0)
        w = tl.interleave((p & 0xF).to(tl.int8) - 8, (p >> 4).to(tl.int8) - 8)
    else:
        rk = k0 + tl.arange(0, BLOCK_K)
        ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
        w = tl.load(ptrs) if EVEN_K else tl.load(ptrs, mask=rk[None, :] < K, other=0.0)
    return w


@triton.jit
def _load_codes(w_ptr, rn, k0, K, stride_wn, BLOCK_K: tl.constexpr, BITS: tl.constexpr, CB_DIM: tl.constexpr):
    """Codebook index ``u`` of each weight in columns ``k0 ...`` (int32 ``[BLOCK_N, BLOCK_K]``; a
    sub-vector's index is read once per column). quantizers.pack_bits makes each row one little-endian
    bit stream, index j at bits ``j*b ... j*b + b - 1``: for b <= 8 that spans at most two bytes."""
    rk = k0 + tl.arange(0, BLOCK_K)
    bit = (rk // CB_DIM) * BITS
    shift = (bit % 8)[None, :]
    in_k = (rk < K)[None, :]
    ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + (bit // 8)[None, :]
    word = tl.load(ptrs, mask=in_k, other=0).to(tl.int32) & 0xFF
    if 8 % BITS != 0:  # widths that do not divide 8 straddle byte boundaries
        word |= (tl.load(ptrs + 1, mask=in_k & (shift + BITS > 8), other=0).to(tl.int32) & 0xFF) << 8
    u = (word >> shift) & ((1 << BITS) - 1)
    if BITS == 8:  # stored as int8 u - 128 (pack_bits keeps 8-bit values signed)
        u = u ^ 128
    return u


@triton.jit
def _load_x(x_ptr, rm, k0, K, stride_xm, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    rk = k0 + tl.arange(0, BLOCK_K)
    ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    return tl.load(ptrs) if EVEN_K else tl.load(ptrs, mask=rk[None, :] < K, other=0.0)


@triton.jit
def _store_tile(y_ptr, out, b_ptr, pid_m, pid_n, M, N, stride_ym, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add the bias in fp32, round once to the output dtype, store the in-bounds part."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _acc_tile(dtype: tl.constexpr, WEIGHT_LHS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Zeros shaped like the product: ``[BLOCK_N, BLOCK_M]`` when the weight is the left operand."""
    # one return: Triton checks every return statement's type, statically dead ones included
    if WEIGHT_LHS:
        zeros = tl.zeros((BLOCK_N, BLOCK_M), dtype)
    else:
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype)
    return zeros


@triton.jit
def _mma(x, w, acc, WEIGHT_LHS: tl.constexpr, FP8: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc + x·wᵀ`` (or its transpose with the weight as left operand). FP8 products are promoted
    from the tensor core's reduced-precision accumulator into the fp32 ``acc`` every
    FP8_PROMOTE_K of them (or every BLOCK_K, if smaller)."""
    a, b = (w, tl.trans(x)) if WEIGHT_LHS else (x, tl.trans(w))
    if FP8:
        interval: tl.constexpr = BLOCK_K if BLOCK_K < FP8_PROMOTE_K else FP8_PROMOTE_K
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=interval)
    else:
        acc += tl.dot(a, b)
    return acc


@triton.jit
def _outer(row, col, WEIGHT_LHS: tl.constexpr):
    """``row[m] * col[n]`` laid out like the product tile (``[n, m]`` when the weight is the left operand)."""
    if WEIGHT_LHS:
        product = col[:, None] * row[None, :]
    else:
        product = row[:, None] * col[None, :]
    return product


@triton.jit
def _rescale(acc, g, rm, rn, sx_ptr, sw_ptr, stride_sxm, stride_sxg, stride_swn, stride_swg,
             WEIGHT_LHS: tl.constexpr):
    """Group ``g``'s exact sum to fp32, times ``sx[m,g] * sw[n,g]``."""
    sx = tl.load(sx_ptr + rm * stride_sxm + g * stride_sxg)
    sw = tl.load(sw_ptr + rn * stride_swn + g * stride_swg)
    return acc.to(tl.float32) * _outer(sx, sw, WEIGHT_LHS)


@triton.jit
def _subtract_zero_point(acc, rm, rn, zr_ptr, zc_ptr, G, WEIGHT_LHS: tl.constexpr):
    """``acc - sum_g zr[m,g] * zc[n,g]``: the weight zero point's term, ``sx * rowsum_g(x)`` times
    ``sw * zw`` per group (both ``[rows, G]`` contiguous, made once per GEMM by the wrapper). Run
    after the K loop, when the MMA's registers are free: in the loop, the extra column vector per
    group would cost as many registers per thread as the scale vector does."""
    for g in range(0, G):
        acc -= _outer(tl.load(zr_ptr + rm * G + g), tl.load(zc_ptr + rn * G + g), WEIGHT_LHS)
    return acc


@triton.jit(do_not_specialize=["M"])
def _scaled_gemm_kernel(
    x_ptr, w_ptr, sx_ptr, sw_ptr, zr_ptr, zc_ptr, b_ptr, y_ptr,
    M, N, K, KP, GS, M_BUCKET,
    stride_xm, stride_wn, stride_sxm, stride_sxg, stride_swn, stride_swg, stride_ym,
    BITS: tl.constexpr, FP8: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    WEIGHT_LHS: tl.constexpr, GROUPED: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One flat loop over K in both forms, so the software pipeliner keeps the next K-steps' loads
    in flight across group boundaries. Per-channel (one group): a single int32 (fp32 for FP8)
    accumulator, rescaled once in the epilogue. GROUPED: each K-step's exact product (a K-step never
    spans two groups) is rescaled and added to the fp32 sum straight away, so no per-group int32
    accumulator outlives its step; the MMA result and the fp32 sum are then both live, which is why
    grouped tiles are limited to TWO_ACC_MAX_REGS accumulator registers per thread (see _prune)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # wrap out-of-range rows/columns onto valid ones: loads need no mask, the store drops them. int32:
    # the scale and zero-point vectors index with them (64-bit offsets cost registers per element);
    # the operand loads widen them first, as M * K may pass 2^31
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    acc_dtype: tl.constexpr = tl.float32 if FP8 else tl.int32
    acc = _acc_tile(tl.float32 if GROUPED else acc_dtype, WEIGHT_LHS, BLOCK_M, BLOCK_N)
    for k0 in range(0, K, BLOCK_K):
        x = _load_x(x_ptr, rm, k0, K, stride_xm, BLOCK_K, EVEN_K)
        w = _load_weight(w_ptr, rn, k0, K, KP, stride_wn, BLOCK_K, BITS, EVEN_K)
        if GROUPED:
            step = _mma(x, w, _acc_tile(acc_dtype, WEIGHT_LHS, BLOCK_M, BLOCK_N), WEIGHT_LHS, FP8, BLOCK_K)
            acc += _rescale(step, k0 // GS, rm, rn, sx_ptr, sw_ptr, stride_sxm, stride_sxg, stride_swn, stride_swg,
                            WEIGHT_LHS)
        else:
            acc = _mma(x, w, acc, WEIGHT_LHS, FP8, BLOCK_K)
    if not GROUPED:
        acc = _rescale(acc, 0, rm, rn, sx_ptr, sw_ptr, stride_sxm, stride_sxg, stride_swn, stride_swg, WEIGHT_LHS)
    if HAS_ZERO:
        acc = _subtract_zero_point(acc, rm, rn, zr_ptr, zc_ptr, tl.cdiv(K, GS), WEIGHT_LHS)
    if WEIGHT_LHS:
        acc = tl.trans(acc)
    _store_tile(y_ptr, acc, b_ptr, pid_m, pid_n, M, N, stride_ym, HAS_BIAS, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["M"])
def _dequant_gemm_kernel(
    x_ptr, w_ptr, sw_ptr, zw_ptr, cb_ptr, b_ptr, y_ptr,
    M, N, K, KP, GS, M_BUCKET,
    stride_xm, stride_wn, stride_swn, stride_swg, stride_zn, stride_zg, stride_cbn, stride_ym,
    BITS: tl.constexpr, CB_DIM: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    CHANNEL_SCALE: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y = X · decode(W)ᵀ with 16-bit MMAs. CB_DIM > 0: ``w_ptr`` holds BITS-bit packed codebook indices
    ``[N, packed_width(K / CB_DIM, BITS)]`` into ``cb_ptr [R, 2^BITS, CB_DIM]`` (row stride
    ``stride_cbn``: 0 for one codebook per layer); else integer / fp8 values with scales ``[N, G]``,
    applied to the decoded tile per group, or once in the epilogue when CHANNEL_SCALE (G == 1).
    UPCAST (interpreter only) runs the dot in fp32: interpreted bf16 dots are wrong."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    dot_dtype: tl.constexpr = tl.float32 if UPCAST else x_ptr.dtype.element_ty
    precision: tl.constexpr = "ieee" if dot_dtype == tl.float32 else "tf32"
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _load_x(x_ptr, rm, k0, K, stride_xm, BLOCK_K, EVEN_K)
        if CB_DIM > 0:
            u = _load_codes(w_ptr, rn, k0, K, stride_wn, BLOCK_K, BITS, CB_DIM)
            sub = (k0 + tl.arange(0, BLOCK_K)) % CB_DIM
            w = tl.load(cb_ptr + rn[:, None] * stride_cbn + u * CB_DIM + sub[None, :]).to(tl.float32)
        else:
            w = _load_weight(w_ptr, rn, k0, K, KP, stride_wn, BLOCK_K, BITS, EVEN_K).to(tl.float32)
            if HAS_ZERO:
                w -= tl.load(zw_ptr + rn * stride_zn + (k0 // GS) * stride_zg)[:, None]
            if not CHANNEL_SCALE:
                w *= tl.load(sw_ptr + rn * stride_swn + (k0 // GS) * stride_swg)[:, None]
        acc += tl.dot(w.to(dot_dtype), tl.trans(x.to(dot_dtype)), input_precision=precision)
    if CHANNEL_SCALE:
        acc *= tl.load(sw_ptr + rn * stride_swn)[:, None]
    _store_tile(y_ptr, tl.trans(acc), b_ptr, pid_m, pid_n, M, N, stride_ym, HAS_BIAS, BLOCK_M, BLOCK_N)


def _even_k(args) -> bool:
    return args["K"] % args["BLOCK_K"] == 0


_KEY = ["M_BUCKET", "N", "K", "GS"]
_scaled_gemm = triton.autotune(
    configs=_configs(HOPPER_INT8 if _hopper() else AMPERE_INT8), key=_KEY + ["BITS", "FP8", "HAS_ZERO", "GROUPED"],
    prune_configs_by={"early_config_prune": _prune},
)(triton.heuristics({"EVEN_K": _even_k})(_scaled_gemm_kernel))
_dequant_gemm = triton.autotune(
    configs=_configs(HOPPER_FLOAT if _hopper() else AMPERE_FLOAT), key=_KEY + ["BITS", "CB_DIM", "CHANNEL_SCALE"],
    prune_configs_by={"early_config_prune": _prune},
)(triton.heuristics({"EVEN_K": _even_k})(_dequant_gemm_kernel))


def _grid(m, n):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def _group_strides(t: torch.Tensor | None) -> tuple[int, int]:
    """(row, group) strides of a ``[rows or 1, G or 1]`` scale; 0 where it broadcasts."""
    if t is None:
        return 0, 0
    return (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else 0)


def _zero_point_factors(xq: Tensor, x_scale: Tensor, n: int, w_scale: Tensor, w_zero: Tensor, groups: int):
    """``(sx * rowsum_g(xq)) [M, G]`` and ``(sw * zw) [N, G]``, contiguous: the weight zero point's term
    is their product summed over groups. The row sums are taken once per GEMM here (the kernel would
    otherwise redo them for every column tile and K-step). Each side rounds once in fp32, where the
    old in-loop integer difference was exact: a 2^-24 relative change, far below the output's."""
    m = xq.shape[0]
    row_sums = xq.reshape(m, groups, -1).sum(dim=-1, dtype=torch.int32)
    rows = (x_scale.expand(m, groups) * row_sums).contiguous()
    cols = (w_scale.expand(n, groups) * w_zero.float().expand(n, groups)).contiguous()
    return rows, cols


def _launch_scaled(xq, x_scale, weight, w_scale, w_zero, bias, *, bits, fp8, in_features, out_dtype):
    m, k = xq.shape
    n = weight.shape[0]
    groups = max(x_scale.shape[1], w_scale.shape[1])
    xq, weight = xq.contiguous(), weight.contiguous()
    y = empty_output((m, n), xq.device, out_dtype)
    if m == 0:
        return y
    zr, zc = (_zero_point_factors(xq, x_scale, n, w_scale, w_zero, groups) if w_zero is not None
              else (x_scale, w_scale))
    _scaled_gemm[_grid(m, n)](
        xq, weight, x_scale, w_scale, zr, zc, bias if bias is not None else w_scale, y,
        m, n, k, weight.shape[1], k // groups, _m_bucket(m),
        xq.stride(0), weight.stride(0), *_group_strides(x_scale), *_group_strides(w_scale), y.stride(0),
        BITS=bits, FP8=fp8, HAS_ZERO=w_zero is not None, HAS_BIAS=bias is not None, WEIGHT_LHS=bits == 4,
        GROUPED=groups > 1,
    )
    return y


def int_gemm(xq: Tensor, x_scale: Tensor, weight: Tensor, w_scale: Tensor, w_zero: Optional[Tensor],
             bias: Optional[Tensor], *, bits: int, in_features: int, out_dtype: torch.dtype) -> Tensor:
    """Triton ``reference.int_gemm`` for 8- and 4-bit weights (other widths: the reference)."""
    groups = max(x_scale.shape[1], w_scale.shape[1])
    if bits not in (4, 8) or (groups > 1 and (in_features // groups) % MIN_GROUP):
        return reference.int_gemm(xq, x_scale, weight, w_scale, w_zero, bias, bits=bits,
                                  in_features=in_features, out_dtype=out_dtype)
    return _launch_scaled(xq, x_scale.float(), weight, w_scale.float(), w_zero, bias, bits=bits, fp8=False,
                          in_features=in_features, out_dtype=out_dtype)


def _scaled_mm_ok(xq, weight, out_dtype) -> bool:
    """cuBLAS FP8 row-wise needs a CUDA tensor, K and N multiples of 16 and (sm_90 CUTLASS path) bf16 out."""
    return (xq.is_cuda and out_dtype == torch.bfloat16 and xq.shape[1] % 16 == 0
            and weight.shape[0] % 16 == 0 and hasattr(torch, "_scaled_mm"))


def fp8_gemm(xq: Tensor, x_scale: Tensor, weight: Tensor, w_scale: Tensor, bias: Optional[Tensor], *,
             out_dtype: torch.dtype) -> Tensor:
    """Triton ``reference.fp8_gemm`` (per-token x per-channel scaled e4m3). On CUDA, aligned bf16
    problems go to cuBLAS ``torch._scaled_mm`` row-wise; GPUs below sm_89 have no fp8 MMA."""
    if xq.is_cuda and torch.cuda.get_device_capability(xq.device) < (8, 9):
        return reference.fp8_gemm(xq, x_scale, weight, w_scale, bias, out_dtype=out_dtype)
    if _scaled_mm_ok(xq, weight, out_dtype):
        return torch._scaled_mm(xq.contiguous(), weight.t(), scale_a=x_scale.float().reshape(-1, 1),
                                scale_b=w_scale.float().reshape(1, -1), bias=bias, out_dtype=out_dtype)
    return fp8_gemm_triton(xq, x_scale, weight, w_scale, bias, out_dtype=out_dtype)


def fp8_gemm_triton(xq, x_scale, weight, w_scale, bias, *, out_dtype):
    return _launch_scaled(xq, x_scale.float(), weight, w_scale.float(), None, bias, bits=8, fp8=True,
                          in_features=xq.shape[1], out_dtype=out_dtype)


def _launch_dequant(x, weight, w_scale, w_zero, codebook, bias, *, bits, in_features):
    x = x.contiguous()
    m, n, k = x.shape[0], weight.shape[0], in_features
    groups = w_scale.shape[1] if w_scale is not None else 1
    cb_dim = codebook.shape[-1] if codebook is not None else 0
    cb_stride = codebook.stride(0) if codebook is not None and codebook.shape[0] > 1 else 0
    y = empty_output((m, n), x.device, x.dtype)
    if m == 0:
        return y
    _dequant_gemm[_grid(m, n)](
        x, weight, w_scale if w_scale is not None else codebook, w_zero if w_zero is not None else x,
        codebook if codebook is not None else x, bias if bias is not None else x, y,
        m, n, k, weight.shape[1], k // groups, _m_bucket(m),
        x.stride(0), weight.stride(0), *_group_strides(w_scale), *_group_strides(w_zero), cb_stride, y.stride(0),
        BITS=bits, CB_DIM=cb_dim, HAS_ZERO=w_zero is not None, HAS_BIAS=bias is not None,
        CHANNEL_SCALE=w_scale is not None and groups == 1, UPCAST=INTERPRET and x.dtype == torch.bfloat16,
    )
    return y


def _dense(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The large-M path of the decoding GEMMs: the weight decoded once to x's dtype, then cuBLAS."""
    return torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)


def weight_only_linear(x: Tensor, weight: Tensor, w_scale: Tensor, w_zero: Optional[Tensor],
                       bias: Optional[Tensor], *, bits: int, weight_format: str, in_features: int,
                       smooth: Optional[Tensor] = None, rotation_signs: Optional[Tensor] = None,
                       rotation_block: Optional[int] = None) -> Tensor:
    """Triton ``reference.weight_only_linear`` for int8 / int4 / fp8 weights: decode fused into the GEMM
    up to ``FUSED_DECODE_MAX_M`` rows, decode once and the dense matmul above. Smoothing or rotation on
    a weight-only layer, other bit widths, and groups not a multiple of 32 use the reference."""
    groups = w_scale.shape[1]
    if (smooth is not None or rotation_signs is not None or (weight_format == "int" and bits not in (4, 8))
            or (groups > 1 and (in_features // groups) % MIN_GROUP)):
        return reference.weight_only_linear(
            x, weight, w_scale, w_zero, bias, bits=bits, weight_format=weight_format, in_features=in_features,
            smooth=smooth, rotation_signs=rotation_signs, rotation_block=rotation_block)
    if x.shape[0] > FUSED_DECODE_MAX_M:
        w = reference.dequant_weight(weight, w_scale, w_zero, bits=bits, weight_format=weight_format,
                                     in_features=in_features, dtype=x.dtype)
        return _dense(x, w, bias)
    return _launch_dequant(x, weight, w_scale.float(), w_zero, None, bias, bits=bits, in_features=in_features)


def codebook_linear(x: Tensor, indices: Tensor, codebook: Tensor, bias: Optional[Tensor], *, bits: int,
                    in_features: int) -> Tensor:
    """Triton ``reference.codebook_linear``: the packed-index decode and codebook gather fused into the
    GEMM for small M; for large M the weight is decoded once and the dense matmul runs (a codebook
    weight saves memory, not time, at large M)."""
    if x.shape[0] > FUSED_DECODE_MAX_M:
        return _dense(x, reference.codebook_decode(indices, codebook, bits=bits, in_features=in_features).to(x.dtype),
                      bias)
    return _launch_dequant(x, indices.contiguous(), None, None, codebook.contiguous(), bias, bits=bits,
                           in_features=in_features)
