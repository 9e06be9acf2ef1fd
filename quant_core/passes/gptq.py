"""GPTQ (Frantar et al., 2023): weight rounding that compensates each column's error on the columns
not yet quantized, using the inverse Hessian ``H = X^T X / n`` of the layer's calibration inputs.

A reusable pass over one Linear (Q-DiT uses it on top of its group sizes, methods.md §3.2a; any method
may call :func:`gptq_quantize_linear`). Columns are processed left to right; the inverse Hessian is
taken once as an upper Cholesky factor ``U`` (``H^-1 = U^T U``), so the error of column ``i`` moves
the later columns by ``err_i * U[i, i+1:] / U[i, i]``. Updates are applied lazily per block of
columns (the same result, fewer passes over ``W``). With group quantization, a group's scale is taken
when the first column of the group is reached, from the group's columns as updated so far, with the
layer's own group size (the released Q-DiT code passed block 0's group size to every layer; we don't).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import quantizers as qz
from ..config import LayerScheme
from ..progress import report

ScaleFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def hessian(samples: torch.Tensor, name: str = "layer") -> torch.Tensor:
    """``X^T X / n`` in float64 from input rows ``[n, K]``."""
    if samples.dim() != 2 or samples.shape[0] == 0:
        raise ValueError(f"{name}: GPTQ needs calibration input rows [n, K], got shape {tuple(samples.shape)}")
    qz.check_finite(samples, f"{name} calibration inputs")
    x = samples.double()
    k = x.shape[1]
    h = torch.empty(k, k, dtype=x.dtype, device=x.device)
    for j0 in range(0, k, 1024):  # in column slabs: X^T X at K = 4608 takes seconds on a busy CPU
        report("gptq hessian", j0, k)
        h[:, j0:j0 + 1024] = x.t() @ x[:, j0:j0 + 1024]
    return h / x.shape[0]


def minmax_scale_fn(bits: int, symmetric: bool, full_range: bool = False) -> ScaleFn:
    return lambda w: qz.compute_scale(w, bits, symmetric=symmetric, full_range=full_range)


def mse_scale_fn(bits: int, symmetric: bool, full_range: bool = False) -> ScaleFn:
    return lambda w: qz.mse_clip_scale(w, bits, symmetric=symmetric, full_range=full_range)


def _inverse_hessian_factor(h: torch.Tensor, damp: float, name: str, block: int = 512) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U = H^-1``).

    With ``P`` the index reversal and ``P H P = L L^T``: ``H^-1 = (P L^-1 P)^T (P L^-1 P)`` and
    ``P L^-1 P`` is upper triangular with a positive diagonal, so ``U = P L^-1 P``: one Cholesky and
    one triangular solve. The usual chol -> cholesky_inverse -> chol does three factorizations, and
    ``cholesky_inverse`` runs pathologically slowly on multi-threaded CPU BLAS (11 s against 0.3 s
    here at K = 1152, 81 s against 9.5 s at K = 4608). The solve goes in column blocks (column j of
    ``L^-1`` is zero above row j) so progress and Cancel are seen between them."""
    k = h.shape[0]
    h = h + damp * h.diagonal().mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    try:
        lower = _blocked_cholesky(h.flip(0, 1), block)
    except torch.linalg.LinAlgError:
        raise ValueError(f"{name}: Hessian not positive definite even with damp={damp}; raise the damping "
                         f"or calibrate on more inputs") from None
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    inverse = torch.zeros_like(h)
    for j0 in range(0, k, block):
        report("gptq hessian", k + j0, 2 * k)
        j1 = min(j0 + block, k)
        inverse[j0:, j0:j1] = torch.linalg.solve_triangular(lower[j0:, j0:], eye[j0:, j0:j1], upper=False)
    return inverse.flip(0, 1)


def _blocked_cholesky(a: torch.Tensor, block: int) -> torch.Tensor:
    """Lower ``L`` with ``L L^T = a``, one column panel at a time (right-looking), reporting between
    panels: one LAPACK call at K = 4608 takes seconds on a CPU, too long to go unseen by Cancel."""
    k = a.shape[0]
    a = a.clone()
    for j0 in range(0, k, block):
        report("gptq hessian", j0, 2 * k)
        j1 = min(j0 + block, k)
        a[j0:j1, j0:j1] = torch.linalg.cholesky(a[j0:j1, j0:j1])
        if j1 < k:  # panel below: A_ij L_jj^-T; then the trailing block loses its outer product
            a[j1:, j0:j1] = torch.linalg.solve_triangular(a[j0:j1, j0:j1].t(), a[j1:, j0:j1], upper=True, left=False)
            a[j1:, j1:] -= a[j1:, j0:j1] @ a[j1:, j0:j1].t()
    return a.tril()


def gptq(w: torch.Tensor, h: torch.Tensor, *, bits: int, symmetric: bool = True, group_size: int | None = None,
         damp: float = 0.01, block_size: int = 128, scale_fn: ScaleFn | None = None, full_range: bool = False,
         name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``w [N, K]`` given the Hessian ``h [K, K]``.

    Returns ``(q, scale, zero)`` as :func:`quantizers.quantize_weight` does: integer values ``[N, K]``
    (int8 symmetric / uint8 asymmetric), float32 ``scale`` and ``zero`` (or None) of shape ``[N, G]``.
    ``scale_fn`` maps weight columns ``[N, c]`` to a per-row ``(scale, zero)`` (min-max by default);
    ``full_range`` rounds symmetric weights onto [-2^(b-1), 2^(b-1) - 1] (the default ``scale_fn`` then
    takes that range's min-max scale; a given one must be for that range too).
    ``block_size`` only batches the updates: it is rounded up to a multiple of ``group_size`` so every
    group is scaled from fully updated columns.
    """
    qz.check_finite(w, f"{name}.weight")
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"{name}: Hessian shape {tuple(h.shape)} does not match weight width {k}")
    scale_fn = scale_fn or minmax_scale_fn(bits, symmetric, full_range)
    groups = qz.num_groups(k, group_size)
    gs = k // groups
    w = w.double().clone()
    h = h.double().clone()
    dead = h.diagonal() == 0  # channels never active in calibration: any value is exact there
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_hessian_factor(h, damp, name)

    qmin, qmax = qz.int_range(bits, symmetric, full_range)
    q = torch.empty(n, k, dtype=torch.float64, device=w.device)
    scales = torch.empty(n, groups, dtype=torch.float32, device=w.device)
    zeros = None if symmetric else torch.empty(n, groups, dtype=torch.float32, device=w.device)
    block = -(-max(block_size, 1) // gs) * gs if groups > 1 else max(block_size, 1)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1]
        errs = torch.empty_like(wb)
        for i in range(b1 - b0):
            col = b0 + i
            if col % 32 == 0:  # a 128-column block of a 4608-row layer takes seconds on a busy CPU
                report("gptq columns", col, k)
            if col % gs == 0:  # a new group lies inside this block (wb is a view of w): scale it as it is now
                scale, zero = scale_fn(w[:, col:col + gs].float())
                scales[:, col // gs] = scale[:, 0]
                if zeros is not None:
                    zeros[:, col // gs] = zero[:, 0]
                s = scale[:, 0]
                z = torch.zeros_like(s) if zero is None else zero[:, 0]
            # quantizers.quantize / dequantize of one column, inlined (float32 rounding, as there):
            # this loop runs K times
            qc = (torch.round(wb[:, i].float() / s) + z).clamp_(qmin, qmax)
            q[:, col] = qc
            err = (wb[:, i] - ((qc - z) * s).double()) / u[col, col]
            wb[:, i + 1:] -= err.unsqueeze(1) * u[col, col + 1:b1].unsqueeze(0)
            errs[:, i] = err
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    return q.to(torch.int8 if symmetric else torch.uint8), scales, zeros


def gptq_weights(linear: nn.Linear, scheme: LayerScheme, samples: torch.Tensor, *, name: str = "",
                 damp: float = 0.01, block_size: int = 128, clip: str = "minmax"):
    """``(q, scale, zero)`` that GPTQ chooses for ``linear`` under ``scheme`` on ``samples`` (input rows
    ``[n, K]``, e.g. calibration statistic ``act_samples``). ``clip``: how each group's range is set,
    ``"minmax"`` or ``"mse"`` (:func:`quantizers.mse_clip_scale`)."""
    if scheme.weight_format != "int" or scheme.weight_granularity == "tensor":
        raise ValueError(f"layer {name!r}: GPTQ quantizes integer weights per channel or group, "
                         f"not {scheme.name}")
    fns = {"minmax": minmax_scale_fn, "mse": mse_scale_fn}
    if clip not in fns:
        raise ValueError(f"layer {name!r}: unknown clip {clip!r}; expected one of {sorted(fns)}")
    group = scheme.group_size if scheme.weight_granularity == "group" else None
    sym, full = scheme.weight_symmetric, scheme.weight_full_range
    return gptq(linear.weight.detach(), hessian(samples.to(linear.weight.device), name),
                bits=scheme.weight_bits, symmetric=sym, group_size=group, damp=damp, block_size=block_size,
                scale_fn=fns[clip](scheme.weight_bits, sym, full), full_range=full, name=name)


def gptq_quantize_linear(linear: nn.Linear, scheme: LayerScheme, samples: torch.Tensor, *, name: str = "",
                         damp: float = 0.01, block_size: int = 128, clip: str = "minmax"):
    """A :class:`QuantLinear` for ``linear`` whose integer weights :func:`gptq_weights` chose."""
    from ..layers import QuantLinear

    q, scale, zero = gptq_weights(linear, scheme, samples, name=name, damp=damp, block_size=block_size, clip=clip)
    return QuantLinear.from_quantized(linear, scheme, q, scale, zero, name=name)
