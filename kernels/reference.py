"""Torch reference of every kernel op: the semantics the Triton kernels must reproduce.

Shapes: activations ``x`` are ``[M, K]``; weights are stored ``[N, K]`` (nn.Linear layout, K
contiguous), int8 or packed uint8 (quant_core.quantizers.pack_bits) or float8 e4m3; scales are
float32 ``[M, G]`` / ``[N, G]`` where ``G`` groups split K (G == 1: per token / per channel).
Integer products accumulate exactly (int32 semantics), then each group is rescaled in float32.
"""
from __future__ import annotations

import functools
import math

import torch

from ..quant_core import quantizers as qz


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley2(q: int) -> torch.Tensor:
    """Paley's second construction, order 2(q+1) for a prime q = 1 mod 4. The Jacobsthal matrix is
    symmetric for such q, so the result is a *symmetric* Hadamard matrix: normalised, it is its own
    inverse, like Sylvester's."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    c = torch.ones(q + 1, q + 1, dtype=torch.float64)
    c[0, 0] = 0
    c[1:, 1:] = chi[(idx[None, :] - idx[:, None]) % q]
    return (torch.kron(c, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
            + torch.kron(torch.eye(q + 1, dtype=torch.float64), torch.tensor([[1.0, -1.0], [-1.0, -1.0]],
                                                                              dtype=torch.float64)))


# Orders of the non-power-of-two symmetric Hadamard factors we build (Paley II, prime q = 1 mod 4):
# 12 * 2^k covers 768, 1536, 3072; 36 * 2^k covers 1152 (PixArt/DiT-XL hidden) and 4608 (their MLP).
PALEY_ORDERS = {12: 5, 28: 13, 36: 17, 60: 29, 76: 37, 84: 41, 108: 53, 124: 61}


def hadamard_factors(n: int) -> tuple[int, int]:
    """``n = m * p`` with ``p`` a power of two and ``m`` 1 or a Paley order; the Hadamard matrix of
    order n is ``H_m (x) H_p`` (Kronecker)."""
    for m in (1, *sorted(PALEY_ORDERS)):
        p = n // m
        if n % m == 0 and p >= 1 and not p & (p - 1):
            return m, p
    raise ValueError(f"no Hadamard rotation of size {n}: sizes are 2^k or m*2^k with m in "
                     f"{sorted(PALEY_ORDERS)}; use a block size that is a power of two dividing the width")


@functools.lru_cache(maxsize=None)
def _hadamard_cpu(n: int) -> torch.Tensor:
    m, p = hadamard_factors(n)
    h = _sylvester(p)
    return (torch.kron(_paley2(PALEY_ORDERS[m]), h) if m > 1 else h).float()


def hadamard_matrix(n: int, device=None) -> torch.Tensor:
    """Symmetric Hadamard matrix of order n, float32, unnormalised: Sylvester for powers of two,
    Paley-II (x) Sylvester for ``m * 2^k`` (see hadamard_factors)."""
    if n < 1:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    return _hadamard_cpu(n).to(device)


def block_hadamard(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """Randomised block-diagonal Hadamard rotation ``(x * signs) @ blockdiag(H_b) / sqrt(b)``.

    Orthogonal and symmetric (so its own inverse), so applying it to both activations and weights
    leaves ``x @ w.T`` unchanged. ``block`` may be the whole width (a full rotation); a non-power-of-two
    block ``m * p`` is applied through its Kronecker factors, ``H_m X H_p`` per block, which costs
    ``m + p`` instead of ``m * p`` multiply-adds per element.
    """
    m, k = x.shape
    if k % block:
        raise ValueError(f"rotation block {block} does not divide width {k}")
    a, p = hadamard_factors(block)
    xs = (x.float() * signs.float()).reshape(m * (k // block), a, p)
    y = xs @ hadamard_matrix(p, x.device)
    if a > 1:
        y = hadamard_matrix(a, x.device) @ y
    return (y / math.sqrt(block)).reshape(m, k)


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


def codebook_decode(indices, codebook, *, bits, in_features):
    """Codebook weights: ``indices`` packed b-bit ``[N, packed_width(K / d, b)]`` (unsigned index
    ``u`` stored as ``u - 2^(b-1)``, see quantizers.pack_bits), ``codebook`` ``[R, 2^b, d]`` with
    R == N (one codebook per output channel) or R == 1 (one per layer). Row ``n``, sub-vector ``j``
    decodes to ``codebook[n or 0, u[n, j]]``; d == 1 is scalar k-means (Qua²SeDiMo), d > 1 is VQ.
    Returns float32 ``[N, K]``."""
    rows, d = indices.shape[0], codebook.shape[-1]
    u = qz.unpack_bits(indices, bits, in_features // d).to(torch.int64) + 2 ** (bits - 1)
    book = codebook.float()
    if book.shape[0] == 1:
        w = book[0][u]  # [N, K/d, d]
    else:
        w = torch.gather(book, 1, u.unsqueeze(-1).expand(-1, -1, d))
    return w.reshape(rows, in_features)


def codebook_linear(x, indices, codebook, bias, *, bits, in_features):
    """Decode the codebook weight, then matmul in float32 (weight-only: memory saving only)."""
    w = codebook_decode(indices, codebook, bits=bits, in_features=in_features)
    y = x.float() @ w.t()
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
    "codebook_linear": codebook_linear,
}
