"""Q-DiT (Chen et al., CVPR 2025; reference/methods.md §3).

- ``method``: the pass: group quantization along input channels with a group size per layer, dynamic
  per-token × group activations, GPTQ / min-max / MSE-clipped weights (``passes.gptq``); the group-size
  genome search (:func:`search_group_sizes`, over ``passes.evolution`` with ``passes.fitness``); presets
  ``q-dit-*``.
"""
from .method import SMALL_SEARCH, search_group_sizes

__all__ = ["SMALL_SEARCH", "search_group_sizes"]
