"""Triton activation quantization: per-token (x group) int8 / fp8, with smoothing and rotation fused.

One program quantizes one token row, held in registers as a ``[GP, GSP]`` tile (groups x group
width, both padded to powers of two), so the absmax, the scale and the quantized values come from a
single read of the row (kernels.md §3.1). Before the absmax the row is divided by the smoothing
vector and rotated by the randomised block-Hadamard transform of ``reference.block_hadamard``
(in-register fast Walsh-Hadamard butterflies, §3.3). The semantics are ``reference.act_quant*``:

- rounding is half-to-even like ``torch.round``: after clamping to the integer range, adding and
  subtracting 1.5 * 2^23 rounds an fp32 exactly that way (libdevice ``rint`` does not run under
  ``TRITON_INTERPRET=1``); divisions use ``div_rn`` so scales and quotients are bit-identical to torch;
- values are clamped before the cast (the interpreter's float->int8 cast wraps, the GPU's saturates),
  and fp8 values are rounded onto the e4m3 grid in fp32 first, so the cast itself is exact;
- without rotation the int8 / fp8 output equals the reference bit for bit; with rotation the butterflies
  sum in another order than the reference matmul, so a value sitting on a rounding tie may move by one.

Not fused here (the wrapper calls the torch reference instead): rotation blocks that are not powers
of two or that straddle activation groups, and rows wider than ``MAX_ROW``. Unlike the reference, the
kernel does not raise on NaN/Inf input (that check would cost a device sync per layer); non-finite
input gives non-finite output.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference, triton_gemm
from ..quant_core import quantizers as qz

MAX_ROW = 32768  # widest padded row kept in registers by one program
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + M - M rounds |x| < 2**22 to the nearest even integer


@triton.jit
def _fwht(x, R: tl.constexpr, B: tl.constexpr, H: tl.constexpr):
    """Unnormalised Walsh-Hadamard transform of each length-B row of ``x [R, B]`` (= x @ H_B),
    one butterfly stage of stride H per recursion level."""
    if H < B:
        pairs = tl.permute(tl.reshape(x, (R, B // (2 * H), 2, H)), (0, 1, 3, 2))
        a, b = tl.split(pairs)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (R, B))
        x = _fwht(x, R, B, 2 * H)
    return x


@triton.jit
def _round_to_e4m3(v):
    """Round fp32 ``v`` (|v| <= 448) half-to-even onto the float8 e4m3 grid, so the following cast
    is exact: the GPU's cast rounds to nearest even but the interpreter's rounds ties away from 0."""
    biased_exp = tl.maximum((v.to(tl.int32, bitcast=True) >> 23) & 0xFF, 127 - 6)  # subnormals: 2^-9 grid
    ulp = ((biased_exp - 3) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    return ((tl.div_rn(v, ulp) + _ROUND_MAGIC) - _ROUND_MAGIC) * ulp


@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, smooth_ptr, signs_ptr, static_ptr,
    G, GS, stride_xm, stride_qm, stride_sm,
    QMAX: tl.constexpr, FP8: tl.constexpr, STATIC: tl.constexpr, HAS_SMOOTH: tl.constexpr,
    ROT: tl.constexpr, GP: tl.constexpr, GSP: tl.constexpr, EPS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GP)[:, None]
    j = tl.arange(0, GSP)[None, :]
    col = g * GS + j
    mask = (g < G) & (j < GS)
    x = tl.load(x_ptr + row * stride_xm + col, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = tl.div_rn(x, tl.load(smooth_ptr + col, mask=mask, other=1.0))
    if ROT > 0:
        x = x * tl.load(signs_ptr + col, mask=mask, other=0).to(tl.float32)
        x = tl.reshape(_fwht(tl.reshape(x, (GP * GSP // ROT, ROT)), GP * GSP // ROT, ROT, 1), (GP, GSP))
        x = x * (1.0 / tl.sqrt(ROT * 1.0))
    if STATIC:
        scale = tl.load(static_ptr) + tl.zeros((GP,), tl.float32)
    else:
        scale = tl.maximum(tl.div_rn(tl.max(tl.abs(x), axis=1), QMAX), EPS)
        tl.store(s_ptr + row * stride_sm + tl.arange(0, GP), scale, mask=tl.arange(0, GP) < G)
    v = tl.clamp(tl.div_rn(x, scale[:, None]), -QMAX, QMAX)
    if FP8:
        q = _round_to_e4m3(v).to(tl.float8e4nv)
    else:
        q = ((v + _ROUND_MAGIC) - _ROUND_MAGIC).to(tl.int8)
    tl.store(q_ptr + row * stride_qm + col, q, mask=mask)


def _fusable(k: int, group_size: int | None, rotation_block: int | None) -> bool:
    gs = group_size or k
    if triton.next_power_of_2(k // gs) * triton.next_power_of_2(gs) > MAX_ROW:
        return False
    if rotation_block is None:
        return True
    return rotation_block & (rotation_block - 1) == 0 and gs % rotation_block == 0


def _launch(x, *, qmax, fp8, group_size=None, static_scale=None, smooth=None, rotation_signs=None,
            rotation_block=None):
    x = x.contiguous()
    m, k = x.shape
    gs = group_size or k
    groups = k // gs
    gp, gsp = triton.next_power_of_2(groups), triton.next_power_of_2(gs)
    q = triton_gemm.empty_output((m, k), x.device, qz.FP8_DTYPE if fp8 else torch.int8)
    scale = triton_gemm.empty_output((m, groups), x.device, torch.float32)
    dummy = scale  # never read: the matching constexpr switches the load off
    rot = rotation_block if rotation_signs is not None else 0
    if m:
        _act_quant_kernel[(m,)](
            x, q, scale,
            smooth.float().contiguous() if smooth is not None else dummy,
            rotation_signs.contiguous() if rot else dummy,
            static_scale.float().reshape(1) if static_scale is not None else dummy,
            groups, gs, x.stride(0), q.stride(0), scale.stride(0),
            QMAX=float(qmax), FP8=fp8, STATIC=static_scale is not None, HAS_SMOOTH=smooth is not None,
            ROT=rot, GP=gp, GSP=gsp, EPS=qz.SCALE_EPS,
            num_warps=max(1, min(8, gp * gsp // 256)),
        )
    return q, scale


def act_quant(x: Tensor, bits: int, group_size: Optional[int] = None, smooth: Optional[Tensor] = None,
              rotation_signs: Optional[Tensor] = None, rotation_block: Optional[int] = None
              ) -> tuple[Tensor, Tensor]:
    """Triton ``reference.act_quant`` (dynamic symmetric per-token x group int quantization)."""
    if not _fusable(x.shape[1], group_size, rotation_block if rotation_signs is not None else None):
        return reference.act_quant(x, bits, group_size, smooth, rotation_signs, rotation_block)
    qz.num_groups(x.shape[1], group_size)  # same error as the reference for a bad group size
    return _launch(x, qmax=qz.int_range(bits, True)[1], fp8=False, group_size=group_size, smooth=smooth,
                   rotation_signs=rotation_signs, rotation_block=rotation_block)


def act_quant_static(x: Tensor, scale: Tensor, bits: int, smooth: Optional[Tensor] = None,
                     rotation_signs: Optional[Tensor] = None, rotation_block: Optional[int] = None
                     ) -> tuple[Tensor, Tensor]:
    """Triton ``reference.act_quant_static`` (one calibrated scale for the whole tensor)."""
    if _fusable(x.shape[1], None, rotation_block if rotation_signs is not None else None):
        q, _ = _launch(x, qmax=qz.int_range(bits, True)[1], fp8=False, static_scale=scale, smooth=smooth,
                       rotation_signs=rotation_signs, rotation_block=rotation_block)
    else:
        q, _ = reference.act_quant_static(x, scale, bits, smooth, rotation_signs, rotation_block)
    # a fresh tensor, not the reference's broadcast view of ``scale`` (custom ops may not alias inputs)
    return q, scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()


def act_quant_fp8(x: Tensor, smooth: Optional[Tensor] = None, rotation_signs: Optional[Tensor] = None,
                  rotation_block: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Triton ``reference.act_quant_fp8`` (per-token float8 e4m3, scale = absmax / 448)."""
    if not _fusable(x.shape[1], None, rotation_block if rotation_signs is not None else None):
        return reference.act_quant_fp8(x, smooth, rotation_signs, rotation_block)
    return _launch(x, qmax=qz.FP8_MAX, fp8=True, smooth=smooth, rotation_signs=rotation_signs,
                   rotation_block=rotation_block)
