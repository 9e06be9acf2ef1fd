"""VQ4DiT (Deng et al., AAAI 2025; reference/methods.md §4).

- ``method``: the whole pass: codebooks by k-means over sub-vectors (§4.2.1, ``passes.kmeans``),
  candidate sets and softmax ratios (eq. 5–6, :class:`SoftVQLinear`), zero-data block-wise calibration
  with progressive freezing (eq. 8–10, :func:`zero_data_calibration` records the teacher), storage as
  ``CodebookLinear``; presets ``vq4dit-w2/w3``.
"""
from .method import VQ4DiTOptions, random_prompts, zero_data_calibration

__all__ = ["VQ4DiTOptions", "random_prompts", "zero_data_calibration"]
