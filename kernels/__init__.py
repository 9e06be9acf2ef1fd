"""Kernels: Triton implementations with a torch reference for each op, behind one dispatch point.

``quant_linear`` is what every quantized layer calls; it composes the ops (activation transform and
quantization, then the integer / FP8 GEMM, or the weight-only path) through ``dispatch.op``.
"""
from __future__ import annotations

if not __package__ or "." not in __package__:
    # The ditq checkout is on sys.path (e.g. `python -m ...` run from its root), so another
    # library looking for a top-level `kernels` package (diffusers probes for HF `kernels`) found
    # this folder. Say so instead of failing on a relative import.
    raise ImportError("this is ditq's kernels/ folder, imported as a top-level package because the ditq "
                      "checkout is on sys.path; run from another directory, or use the `ditq` / `pytest` "
                      "commands instead of `python -m` inside the checkout")

import torch

from ..quant_core import quantizers as qz
from .dispatch import backend, op, register_triton

__all__ = ["quant_linear", "plane_linear", "codebook_linear", "op", "backend", "register_triton"]


def quant_linear(
    x: torch.Tensor, *, weight, weight_scale, weight_zero=None, bias=None, bits: int,
    weight_format: str, in_features: int, act_mode: str | None, act_bits: int | None,
    group_size: int | None = None, input_scale=None, smooth=None, rotation_signs=None,
    rotation_block: int | None = None,
) -> torch.Tensor:
    """``x [M, K] -> y [M, N]`` in x's dtype, for one packed weight and activation format."""
    dev = x.device
    rot = dict(smooth=smooth, rotation_signs=rotation_signs, rotation_block=rotation_block)
    if act_mode is None:
        return op("weight_only_linear", dev)(
            x, weight, weight_scale, weight_zero, bias, bits=bits, weight_format=weight_format,
            in_features=in_features, **rot)
    if act_mode == "dynamic_token_fp8":
        xq, sx = op("act_quant_fp8", dev)(x, **rot)
        return op("fp8_gemm", dev)(xq, sx, weight, weight_scale, bias, out_dtype=x.dtype)
    if act_mode == "static_tensor":
        xq, sx = op("act_quant_static", dev)(x, input_scale, act_bits, **rot)
    else:
        gs = group_size if act_mode == "dynamic_token_group" else None
        xq, sx = op("act_quant", dev)(x, act_bits, gs, **rot)
    return op("int_gemm", dev)(xq, sx, weight, weight_scale, weight_zero, bias, bits=bits,
                               in_features=in_features, out_dtype=x.dtype)


def plane_linear(x: torch.Tensor, *, high, low, scale, view_scale, bias=None, bits: int, in_features: int,
                 act_bits: int, smooth=None, rotation_signs=None, rotation_block: int | None = None) -> torch.Tensor:
    """``x [M, K] -> y [M, N]`` for a weight stored as two packed 4-bit planes (``q8 = 16 * high +
    low``, quantizers.split_planes), activations dynamic per token. ``bits=4`` reads the high plane
    only, with its own ``view_scale``: one W4A8 GEMM over half the bytes. ``bits=8`` adds the low
    plane's W4A8 GEMM on the same quantized activations; the factor 16 goes on the activation scales,
    so nothing is derived from the weight per call."""
    if bits not in (4, 8):
        raise ValueError(f"plane_linear runs 4 (high plane) or 8 (both planes) weight bits, got {bits}")
    dev = x.device
    xq, sx = op("act_quant", dev)(x, act_bits, None, smooth=smooth, rotation_signs=rotation_signs,
                                  rotation_block=rotation_block)
    gemm = op("int_gemm", dev)
    if bits == 4:
        return gemm(xq, sx, high, view_scale, None, bias, bits=4, in_features=in_features, out_dtype=x.dtype)
    y = gemm(xq, sx * 16, high, scale, None, None, bits=4, in_features=in_features, out_dtype=torch.float32)
    y = y + gemm(xq, sx, low, scale, None, bias, bits=4, in_features=in_features, out_dtype=torch.float32)
    return y.to(x.dtype)


def codebook_linear(x: torch.Tensor, *, indices, codebook, bias=None, bits: int, in_features: int,
                    act_mode: str | None = None, act_bits: int | None = None) -> torch.Tensor:
    """``x [M, K] -> y [M, N]`` for a codebook (k-means / VQ) weight. With ``act_mode`` set the
    activations are quantized dynamically per token first; the product then runs on the decoded
    float weight (codebook weights have no integer GEMM)."""
    rows, entries, dim = codebook.shape
    if (entries != 2**bits or in_features % dim or rows not in (1, indices.shape[0]) or x.shape[1] != in_features
            or indices.shape[1] != qz.packed_width(in_features // dim, bits)):
        raise ValueError(f"codebook_linear: x {tuple(x.shape)}, codebook {tuple(codebook.shape)} and indices "
                         f"{tuple(indices.shape)} do not fit {bits}-bit indices over in_features={in_features}")
    dev = x.device
    if act_mode is not None:
        if act_mode != "dynamic_token":
            raise ValueError(f"codebook layers support act_mode 'dynamic_token' or None, got {act_mode!r}")
        xq, sx = op("act_quant", dev)(x, act_bits, None)
        x = (xq.float() * sx).to(x.dtype)
    return op("codebook_linear", dev)(x, indices, codebook, bias, bits=bits, in_features=in_features)
