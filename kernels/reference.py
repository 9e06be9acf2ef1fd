"""Torch reference of every kernel op: the semantics the Triton kernels must reproduce.

Shapes: activations ``x`` are ``[M, K]``; weights are stored ``[N, K]`` (nn.Linear layout, K
contiguous), int8 or packed uint8 (quant_core.quantizers.pack_bits) or float8 e4m3; scales are
float32 ``[M, G]`` / ``[N, G]`` where ``G`` groups split K (G == 1: per token / per channel).
Integer products accumulate exactly (int32 semantics), then each group is rescaled in float32.
"""
from __future__ import annotations

import math

import torch

from ..quant_core import quantizers as qz


def hadamard_matrix(n: int, device=None) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (a power of two), float32, unnormalised."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard block size must be a power of two, got {n}")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def block_hadamard(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """Randomised block-diagonal Hadamard rotation ``(x * signs) @ blockdiag(H_b) / sqrt(b)``.

    Orthogonal, so applying it to both activations and weights leaves ``x @ w.T`` unchanged.
    """
    m, k = x.shape
    if k % block:
        raise ValueError(f"rotation block {block} does not divide width {k}")
    h = hadamard_matrix(block, x.device).to(torch.float32) / math.sqrt(block)
    xs = (x.float() * signs.float()).reshape(m, k // block, block)
    return (xs @ h).reshape(m, k)


def transform_input(x, smooth=None, rotation_signs=None, rotation_block=None) -> torch.Tensor:
    """Static-dynamic channel balancing on the activation side: divide by the smoothing vector, then
    rotate (ViDiT-Q). Returns float32."""
    xf = x.float()
    if smooth is not None:
        xf = xf / smooth.float()
    if rotation_signs is not None:
        xf = block_hadamard(xf, rotation_signs, rotation_block)
    return xf


def act_quant(x, bits, group_size=None, smooth=None, rotation_signs=None, rotation_block=None):
    """Dynamic symmetric per-token (x group) quantization, with the optional smoothing/rotation
    applied first. Returns (int8 ``[M, K]``, float32 scales ``[M, G]``)."""
    xt = transform_input(x, smooth, rotation_signs, rotation_block)
    return qz.quantize_per_token(xt, bits, group_size=group_size)


def act_quant_static(x, scale, bits, smooth=None, rotation_signs=None, rotation_block=None):
    """Static per-tensor quantization with a calibrated scale (the naive PTQ baseline)."""
    xt = transform_input(x, smooth, rotation_signs, rotation_block)
    qz.check_finite(xt, "activation")
    s = scale.float().reshape(1, 1)
    q = qz.quantize(xt, s, None, bits)
    return q, s.expand(x.shape[0], 1)


def act_quant_fp8(x, smooth=None, rotation_signs=None, rotation_block=None):
    xt = transform_input(x, smooth, rotation_signs, rotation_block)
    return qz.quantize_fp8(xt, per_row=True, name="activation")


def unpack_weight(weight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    return qz.unpack_bits(weight, bits, in_features)


def int_gemm(xq, x_scale, weight, w_scale, w_zero, bias, *, bits, in_features, out_dtype):
    """``Y[m, n] = sum_g sx[m,g] * sw[n,g] * sum_{k in g} xq[m,k] (wq[n,k] - z[n,g])`` + bias."""
    wq = unpack_weight(weight, bits, in_features)
    m, k = xq.shape
    n = wq.shape[0]
    groups = max(x_scale.shape[1], w_scale.shape[1])
    # float64 holds every integer below 2^53 exactly, and |sum| <= 128 * 256 * K stays far below that,
    # so BLAS float64 products give the int32-accumulation result exactly, much faster than int bmm.
    xg = xq.to(torch.float64).reshape(m, groups, k // groups).transpose(0, 1)
    wg = wq.to(torch.float64).reshape(n, groups, k // groups).permute(1, 2, 0)
    acc = torch.bmm(xg, wg)  # [G, M, N], exact integer sums
    if w_zero is not None:
        row_sums = xg.sum(dim=-1)  # [G, M]
        acc = acc - row_sums.unsqueeze(-1) * w_zero.double().t().unsqueeze(1)
    sx = x_scale.double().t().unsqueeze(-1).expand(groups, m, 1)
    sw = w_scale.double().t().unsqueeze(1).expand(groups, 1, n)
    y = (acc * sx * sw).sum(dim=0)
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


def fp8_gemm(xq, x_scale, weight, w_scale, bias, *, out_dtype):
    y = (xq.float() @ weight.float().t()) * x_scale.float() * w_scale.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def dequant_weight(weight, w_scale, w_zero, *, bits, weight_format, in_features, dtype):
    if weight_format == "fp8":
        return (weight.float() * w_scale.float()).to(dtype)
    return qz.dequantize(unpack_weight(weight, bits, in_features), w_scale, w_zero, dtype)


def weight_only_linear(x, weight, w_scale, w_zero, bias, *, bits, weight_format, in_features,
                       smooth=None, rotation_signs=None, rotation_block=None):
    """Decode the weight to the compute dtype, then matmul (memory saving only, no faster)."""
    w = dequant_weight(weight, w_scale, w_zero, bits=bits, weight_format=weight_format,
                       in_features=in_features, dtype=torch.float32)
    xt = transform_input(x, smooth, rotation_signs, rotation_block)
    y = xt @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def vq_decode(indices: torch.Tensor, codebook: torch.Tensor, in_features: int) -> torch.Tensor:
    """Weight ``[N, in_features]`` float32 from uint8 ``indices [N, ceil(K / d)]`` into ``codebook [k, d]``:
    row n is the concatenation of ``codebook[indices[n, j]]`` over j, cut to ``in_features``."""
    n = indices.shape[0]
    return codebook.float()[indices.long()].reshape(n, -1)[:, :in_features]


def vq_linear(x, indices, codebook, bias, *, d, in_features):
    """Linear with a vector-quantized weight (VQ4DiT): ``x @ vq_decode(...).T + bias``, in x's dtype."""
    if codebook.shape[1] != d:
        raise ValueError(f"codebook vectors have length {codebook.shape[1]}, expected d={d}")
    y = x.float() @ vq_decode(indices, codebook, in_features).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


OPS = {
    "act_quant": act_quant,
    "act_quant_static": act_quant_static,
    "act_quant_fp8": act_quant_fp8,
    "int_gemm": int_gemm,
    "fp8_gemm": fp8_gemm,
    "weight_only_linear": weight_only_linear,
    "vq_linear": vq_linear,
}
