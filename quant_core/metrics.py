"""Fidelity metrics against a full-precision reference. All computed in float64."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def rel_l2(reference: torch.Tensor, approx: torch.Tensor) -> float:
    ref = reference.double()
    return ((ref - approx.double()).norm() / ref.norm().clamp_min(1e-300)).item()


def lora_effect(fp: torch.Tensor, fp_lora: torch.Tensor, quantized: torch.Tensor,
                quantized_lora: torch.Tensor) -> dict[str, float]:
    """How much of a LoRA's effect on FP outputs a quantized model delivers, as fractions of FP's
    effect ``e = fp_lora - fp``: ``norm`` = |q_lora - q| / |e|; ``along`` = the component of
    ``q_lora - q`` in the direction of ``e`` (1 = the LoRA fully delivered, 0 = rounded away);
    ``across`` = the rest, orthogonal to ``e``. An activation-quantized model re-rounds every moved
    activation, so ``across`` holds that rounding noise and inflates ``norm`` when ``e`` is small."""
    e = fp_lora.double() - fp.double()
    d = quantized_lora.double() - quantized.double()
    e2 = e.pow(2).sum().clamp_min(1e-300)
    along = (d * e).sum() / e2
    across = (d - along * e).norm() / e2.sqrt()
    return {"norm": (d.norm() / e2.sqrt()).item(), "along": along.item(), "across": across.item()}


def psnr(reference: torch.Tensor, approx: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB for images in ``[0, data_range]``."""
    mse = (reference.double() - approx.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] @ g[None, :]


def ssim(reference: torch.Tensor, approx: torch.Tensor, data_range: float = 1.0,
         window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) of images ``[N, C, H, W]`` (or ``[C, H, W]``),
    Gaussian window, constants K1=0.01, K2=0.03; the window shrinks to fit small images."""
    x, y = reference.double(), approx.double()
    if x.dim() == 3:
        x, y = x[None], y[None]
    c = x.shape[1]
    size = min(window, x.shape[-1], x.shape[-2])
    w = _gaussian_window(size, sigma).to(x.device).expand(c, 1, size, size)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean().item()
