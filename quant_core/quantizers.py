"""Tensor quantizers: the numeric reference every layer, method and kernel is checked against.

Conventions (methods.md §1):
- uniform affine: ``q = clamp(round(x / scale) + zero, qmin, qmax)``, ``x_hat = (q - zero) * scale``;
  ``torch.round`` rounds half to even, and the Triton kernels do the same.
- symmetric b-bit integers use the narrow range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (no -2^(b-1)), so
  negating a quantized tensor never overflows, or with ``full_range`` the full signed range
  ``[-2^(b-1), 2^(b-1) - 1]`` (int4: [-8, 7], 16 levels instead of 15) with the scale chosen for it,
  ``max(max(x, 0) / qmax, -min(x, 0) / -qmin)``: never coarser than the narrow range's and never
  clipping. Asymmetric ones use ``[0, 2^b - 1]`` with an integer zero point, and the range is widened
  to include 0 so zero is exact.
- granularities are expressed by the shape of ``scale``: a tensor ``[rows, K]`` is split along K into
  ``G = scale.shape[-1]`` equal groups (G == 1: per row; rows == 1 as well: per tensor).
- all-zero or constant rows get ``scale = eps`` instead of 0, so nothing divides by zero and the
  row dequantizes exactly.
- NaN/Inf input raises :class:`NonFiniteError` naming the tensor; quantization never invents NaNs.

Packed storage (``pack_bits``): b-bit values (b < 8) are stored offset-binary (``u = q + 2^(b-1)``)
along the last dimension, padded with zeros to a multiple of 8 values; each run of 8 values becomes
``b`` bytes of one little-endian bit string, value ``i`` at bits ``[i*b, (i+1)*b)``. For int4 this is
the usual nibble order: byte ``j`` holds value ``2j`` in its low nibble and ``2j+1`` in its high nibble.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_EPS = 1e-8


class NonFiniteError(ValueError):
    """NaN or Inf met where a quantizer needs finite values."""


def check_finite(x: torch.Tensor, what: str) -> None:
    # A data-dependent branch cannot be traced by torch.compile (and would sync the device); compiled
    # forwards skip the check, so non-finite input gives non-finite output there instead of an error.
    if torch.compiler.is_compiling():
        return
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise NonFiniteError(f"{what}: {bad} NaN/Inf value(s); quantization needs finite input")


def int_range(bits: int, symmetric: bool, full_range: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)``; ``full_range`` (symmetric only) adds -2^(b-1)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"integer bits must be in 2..8, got {bits}")
    if symmetric:
        return -(2 ** (bits - 1) - int(not full_range)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """View ``[rows, K]`` as ``[rows, groups, K // groups]``."""
    rows, k = x.shape
    if k % groups:
        raise ValueError(f"width {k} is not divisible into {groups} groups")
    return x.reshape(rows, groups, k // groups)


def num_groups(width: int, group_size: int | None) -> int:
    """Groups along a row of ``width`` for ``group_size`` (None: the whole row)."""
    if group_size is None or group_size == width:
        return 1
    if group_size <= 0 or width % group_size:
        raise ValueError(f"group_size {group_size} must divide the input width {width}")
    return width // group_size


def compute_scale(
    x: torch.Tensor, bits: int, *, symmetric: bool = True, groups: int = 1, per_tensor: bool = False,
    full_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale (and zero point when asymmetric) for a ``[rows, K]`` tensor.

    Returns ``scale`` of shape ``[rows, groups]`` (``[1, 1]`` per tensor), float32, and ``zero`` of the
    same shape (float32 holding integers) or None.
    """
    xf = x.float()
    g = xf.reshape(1, 1, -1) if per_tensor else _grouped(xf, groups)
    qmin, qmax = int_range(bits, symmetric, full_range)
    if symmetric:
        if full_range:  # each side against its own end of the grid (qmin < 0)
            scale = torch.maximum(g.amax(dim=-1) / qmax, g.amin(dim=-1) / qmin)
        else:
            scale = g.abs().amax(dim=-1) / qmax
        return scale.clamp_min(SCALE_EPS), None
    lo = g.amin(dim=-1).clamp(max=0.0)
    hi = g.amax(dim=-1).clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(SCALE_EPS)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero


def mse_clip_scale(
    x: torch.Tensor, bits: int, *, symmetric: bool = True, groups: int = 1, steps: int = 100,
    shrink: float = 0.001, norm: float = 2.4, full_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Like :func:`compute_scale`, but each (row, group) range is clipped by the factor
    ``1 - shrink * i`` (i < ``steps``) that minimises the ``norm``-power quantization error
    (the LAPQ-style "mse" weight quantizer Q-DiT uses, p = 2.4)."""
    g = _grouped(x.float(), groups)
    rows = g.shape[0]
    best_err = torch.full(g.shape[:2], float("inf"), device=x.device)
    best_scale = best_zero = None
    for i in range(steps):
        factor = 1.0 - shrink * i
        scale, zero = compute_scale((g * factor).reshape(rows, -1), bits, symmetric=symmetric, groups=groups,
                                    full_range=full_range)
        deq = dequantize(quantize(x, scale, zero, bits, symmetric, full_range), scale, zero)
        err = (_grouped(deq, groups) - g).abs().pow(norm).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = scale if best_scale is None else torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = zero if best_zero is None else torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, symmetric: bool = True,
    full_range: bool = False,
) -> torch.Tensor:
    """Quantize ``[rows, K]`` with ``scale``/``zero`` of shape ``[rows or 1, G]``; returns int8 (sym) or
    uint8 (asym) values in the integer range of ``bits``."""
    qmin, qmax = int_range(bits, symmetric, full_range)
    rows, k = x.shape
    groups = scale.shape[-1]
    g = _grouped(x.float(), groups)
    q = torch.round(g / scale.unsqueeze(-1))
    if zero is not None:
        q = q + zero.unsqueeze(-1)
    q = q.clamp(qmin, qmax).reshape(rows, k)
    return q.to(torch.int8 if symmetric else torch.uint8)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None, dtype=torch.float32
) -> torch.Tensor:
    rows, k = q.shape
    g = _grouped(q.float(), scale.shape[-1])
    if zero is not None:
        g = g - zero.float().unsqueeze(-1)
    return (g * scale.float().unsqueeze(-1)).reshape(rows, k).to(dtype)


def quantize_weight(
    w: torch.Tensor, bits: int, *, symmetric: bool = True, group_size: int | None = None,
    per_tensor: bool = False, full_range: bool = False, name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest weight quantization per output channel (or group / tensor)."""
    check_finite(w, name)
    groups = num_groups(w.shape[1], group_size)
    scale, zero = compute_scale(w, bits, symmetric=symmetric, groups=groups, per_tensor=per_tensor,
                                full_range=full_range)
    return quantize(w, scale, zero, bits, symmetric, full_range), scale, zero


PLANE_QMAX = 119  # 8-bit range whose high 4-bit plane, round(q / 16), stays in the symmetric [-7, 7]


def split_planes(w: torch.Tensor, name: str = "weight"):
    """An 8-bit per-channel RTN of ``w [N, K]`` stored as two signed 4-bit planes, ``q8 = 16 * high +
    low`` with ``high`` in [-7, 7] and ``low`` in [-8, 7] (so ``|q8| <= 119``), plus a 4-bit view.

    ``high`` alone is a 4-bit weight: ``high = round(q8 / 16)`` (ties up), on a grid 16x coarser than
    q8's. Its ``view_scale`` is the least-squares scale of ``high`` against ``w`` per row, so the
    view is at least as close to ``w`` as ``16 * scale`` would make it. Returns ``(high, low, scale,
    view_scale)``: int8, int8, float32 ``[N, 1]``, float32 ``[N, 1]``.
    """
    check_finite(w, name)
    wf = w.float()
    scale = (wf.abs().amax(dim=1, keepdim=True) / PLANE_QMAX).clamp_min(SCALE_EPS)
    q8 = torch.round(wf / scale).clamp(-PLANE_QMAX, PLANE_QMAX)
    high = torch.floor((q8 + 8) / 16)
    low = q8 - 16 * high
    hh = (high * high).sum(dim=1, keepdim=True)
    fitted = (high * wf).sum(dim=1, keepdim=True) / hh.clamp_min(1.0)
    view_scale = torch.where(hh > 0, fitted, 16 * scale).clamp_min(SCALE_EPS)
    return high.to(torch.int8), low.to(torch.int8), scale, view_scale


def quantize_per_token(
    x: torch.Tensor, bits: int = 8, *, group_size: int | None = None, name: str = "activation"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token (x per-group) quantization of ``[M, K]`` activations."""
    scale, _ = compute_scale(x, bits, groups=num_groups(x.shape[1], group_size))
    check_finite(scale, name)
    return quantize(x, scale, None, bits), scale


def quantize_fp8(x: torch.Tensor, *, per_row: bool = True, name: str = "tensor"):
    """Scaled float8 e4m3: ``x ≈ x_fp8 * scale`` with one scale per row (or per tensor)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if per_row else xf.abs().amax().reshape(1, 1)
    check_finite(amax, name)
    scale = (amax / FP8_MAX).clamp_min(SCALE_EPS)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fake_quantize(x: torch.Tensor, bits: int, *, symmetric: bool = True, group_size: int | None = None,
                  per_tensor: bool = False, full_range: bool = False) -> torch.Tensor:
    """Quantize then dequantize, in x's dtype. For calibration and analysis only: no memory saved."""
    flat = x.reshape(-1, x.shape[-1])
    q, scale, zero = quantize_weight(flat, bits, symmetric=symmetric, group_size=group_size,
                                     per_tensor=per_tensor, full_range=full_range, name="fake_quantize input")
    return dequantize(q, scale, zero, x.dtype).reshape(x.shape)


def packed_width(width: int, bits: int) -> int:
    """Bytes per row after :func:`pack_bits`."""
    return width if bits == 8 else -(-width // 8) * bits


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed b-bit values ``[rows, K]`` (int8) into uint8 ``[rows, packed_width(K, b)]``."""
    if bits == 8:
        return q.to(torch.int8)
    rows, k = q.shape
    u = (q.to(torch.int64) + 2 ** (bits - 1))
    pad = (-k) % 8
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(rows, -1, 8)
    shifts = torch.arange(8, device=q.device, dtype=torch.int64) * bits
    word = (u << shifts).sum(dim=-1)
    byte_shifts = torch.arange(bits, device=q.device, dtype=torch.int64) * 8
    packed = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return packed.reshape(rows, -1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int8 ``[rows, width]``."""
    if bits == 8:
        return packed.to(torch.int8)
    rows = packed.shape[0]
    b = packed.to(torch.int64).reshape(rows, -1, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=-1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    u = (word.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return (u.reshape(rows, -1)[:, :width] - 2 ** (bits - 1)).to(torch.int8)


def holds_full_range_min(packed: torch.Tensor, bits: int, width: int) -> bool:
    """Whether the signed values ``[rows, width]`` that :func:`pack_bits` stored in ``packed`` (8 or 4
    bits) include ``-2^(b-1)``, the value only the full range has. Read from the packed bytes (a
    4-bit -8 is a zero nibble) so a load never unpacks a whole model; padding is not looked at."""
    if bits == 8:
        return bool((packed.view(torch.int8) == -128).any())
    if bits != 4:
        raise ValueError(f"holds_full_range_min reads 8- or 4-bit values, got {bits} bits")
    pairs = packed[:, : width // 2]
    hit = bool(((pairs & 0x0F) == 0).any() or (pairs < 0x10).any())
    return hit or bool(width % 2 and ((packed[:, width // 2] & 0x0F) == 0).any())
