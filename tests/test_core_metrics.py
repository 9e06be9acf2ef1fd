"""Metrics against known answers."""
import math

import pytest
import torch

from ditq.quant_core.metrics import lora_effect, psnr, rel_l2, sqnr, ssim


def test_known_answers():
    ref = torch.ones(4, 4)
    assert sqnr(ref, ref * 1.1) == pytest.approx(20.0)  # noise = 0.1 * signal -> 20 dB
    assert psnr(torch.zeros(10), torch.full((10,), 0.1)) == pytest.approx(20.0)
    assert rel_l2(ref, ref * 0.5) == pytest.approx(0.5)
    assert sqnr(ref, ref) == math.inf and psnr(ref, ref) == math.inf


def test_ssim_properties():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 32, 32, generator=g)
    assert ssim(img, img) == pytest.approx(1.0)
    noisy = (img + 0.1 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    very = (img + 0.4 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    assert 1 > ssim(img, noisy) > ssim(img, very) > -1
    # a constant shift changes luminance only: SSIM stays high though PSNR drops
    assert ssim(img * 0.5, img * 0.5 + 0.05) > 0.95


def test_lora_effect_splits_delivered_effect_from_noise():
    g = torch.Generator().manual_seed(0)
    fp, e = torch.randn(64, generator=g), torch.randn(64, generator=g)
    noise = torch.randn(64, generator=g)
    noise -= (noise @ e) / (e @ e) * e          # orthogonal to the effect, |noise| = 0.5 |e|
    noise *= 0.5 * e.norm() / noise.norm()
    q = fp + 0.01 * torch.randn(64, generator=g)
    got = lora_effect(fp, fp + e, q, q + 0.8 * e + noise)
    assert got["along"] == pytest.approx(0.8) and got["across"] == pytest.approx(0.5)
    assert got["norm"] == pytest.approx(math.hypot(0.8, 0.5))
    assert lora_effect(fp, fp + e, q, q) == {"norm": 0.0, "along": 0.0, "across": 0.0}
