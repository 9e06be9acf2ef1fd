"""Randomised Hadamard rotations of a Linear's input basis (QuaRot; ViDiT-Q's channel balancing,
reusable by any method): ``x @ W.T == (x D H) @ (W D H).T`` for random signs ``D`` and a normalised
Hadamard ``H`` (kernels.reference.block_hadamard), which spreads any channel's outlier over the
whole block. Signs are drawn from a seed and the layer name and *stored* with the layer
(``QuantLinear.rotation_signs``), so a loaded model never depends on an RNG stream.
"""
from __future__ import annotations

import zlib

import torch

from ...kernels import reference

ROTATIONS = ("full", "block", "none")


def rotation_block(width: int, mode: str, max_block: int = 128) -> int | None:
    """Block size for ``mode``: ``"full"`` rotates the whole width (power of two, or ``m * 2^k`` with
    a Paley factor m such as 36 for 1152/4608); ``"block"`` uses the largest power of two dividing the
    width, at most ``max_block`` (what the fused Triton kernel tiles); ``"none"``: no rotation."""
    if mode not in ROTATIONS:
        raise ValueError(f"rotation {mode!r} unknown; expected one of {ROTATIONS}")
    if mode == "none":
        return None
    if mode == "full":
        reference.hadamard_factors(width)  # raises a clear error for unsupported widths
        return width
    if max_block < 1 or max_block & (max_block - 1):
        raise ValueError(f"rotation_block {max_block} must be a power of two")
    return min(width & -width, max_block)


def random_signs(width: int, seed: int, name: str) -> torch.Tensor:
    """±1 (int8) signs for layer ``name``: deterministic in (seed, name), different across layers."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randint(0, 2, (width,), generator=gen) * 2 - 1).to(torch.int8)


def rotate_weight(weight: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """The weight in the rotated input basis: each row gets the transform the activations get."""
    return reference.block_hadamard(weight.float(), signs, block)
