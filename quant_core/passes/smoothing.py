"""Channel balancing by per-input-channel scaling (SmoothQuant; the static half of ViDiT-Q's
static-dynamic channel balancing, §4.2): ``x @ W.T == (x / s) @ (W * s).T``.

``s_j = a_j^alpha / w_j^(1 - alpha)`` with ``a_j`` the calibrated activation max of channel j (max
over timesteps: the static imbalance the scale-shift table puts there dominates the early steps) and
``w_j = max_i |W_ij|``; ``alpha`` moves quantization difficulty from activations to weights.
ViDiT-Q's newer code writes the same mask as ``m = w^a' / a^(1-a')`` applied as ``x * m``, i.e.
``alpha = 1 - a'`` here (its DiT ``a' = 0.88`` is ``alpha = 0.12``).
"""
from __future__ import annotations

import torch

from ..layers import MIN_SMOOTH_SCALE

ACT_FLOOR = 1e-3   # ViDiT-Q clamps tiny channel maxima to 1e-3 so dead channels do not blow up s
WEIGHT_FLOOR = 1e-5


def activation_max(absmax: torch.Tensor, steps: torch.Tensor | None = None,
                   floor: float = ACT_FLOOR) -> torch.Tensor:
    """Per-channel max over (the selected) timesteps of a ``[steps, K]`` calibration ``act_absmax``."""
    a = absmax if steps is None else absmax[steps]
    if a.numel() == 0:
        raise ValueError("no calibration steps selected for the activation maxima")
    return a.float().amax(dim=0).clamp_min(floor)


def smoothing_scale(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s [K]`` for a Linear with weight ``[N, K]``: divide activations by it, multiply weights."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    if act_max.shape[-1] != weight.shape[1]:
        raise ValueError(f"activation maxima have {act_max.shape[-1]} channels, weight has {weight.shape[1]}")
    w = weight.detach().float().abs().amax(dim=0).clamp_min(WEIGHT_FLOOR)
    a = act_max.float().clamp_min(ACT_FLOOR)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(MIN_SMOOTH_SCALE)
