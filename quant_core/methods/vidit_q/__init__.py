"""ViDiT-Q and ViDiT-Q-MP (Zhao et al., ICLR 2025; reference/methods.md §2).

- ``method``: the pass (§4.1–4.2): per-channel weights, dynamic per-token activations, static–dynamic
  channel balancing (``passes.smoothing`` then ``passes.rotation``), the MP bit plan (§4.3) and
  :func:`analyze_sensitivity`; presets ``vidit-q-*``.
- ``sensitivity``: metric-decoupled sensitivity analysis (§4.3): per layer group, block and timestep
  range, a metric per group (pluggable), the heat map, and the bit allocation under a budget.
- ``switching``: :class:`TimestepSwitchLinear`, the layer that switches weight variants by timestep
  range (the MP plan and the earlier timestep-aware smoothing).
"""
from .method import ViDiTQOptions, analyze_sensitivity, paper_bit_plan
from .sensitivity import SensitivityReport
from .switching import TimestepSwitchLinear

__all__ = ["SensitivityReport", "TimestepSwitchLinear", "ViDiTQOptions", "analyze_sensitivity", "paper_bit_plan"]
