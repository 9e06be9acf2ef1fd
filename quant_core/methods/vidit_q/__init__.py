"""ViDiT-Q and ViDiT-Q-MP (Zhao et al., ICLR 2025; reference/methods.md §2).

- ``method``: the pass (§4.1–4.2): per-channel weights, dynamic per-token activations, static–dynamic
  channel balancing (``passes.smoothing`` then ``passes.rotation``), the MP bit plan (§4.3) and
  :func:`analyze_sensitivity`; presets ``vidit-q-*``.
- ``sensitivity``: metric-decoupled sensitivity analysis (§4.3): per layer group, block and timestep
  range, a metric per group (pluggable), the heat map, and the bit allocation under a budget.
- ``switching``: :class:`SplitPlaneLinear`, the MP plan's W8/W4 layer (W8 as two 4-bit planes, W4
  reads the high one), and :class:`TimestepSwitchLinear`, one weight variant per timestep range
  (the earlier timestep-aware smoothing; format-1 W8/W4 switches).
"""
from .method import ViDiTQOptions, analyze_sensitivity, paper_bit_plan
from .sensitivity import SensitivityReport, budget_plan
from .switching import SplitPlaneLinear, TimestepSwitchLinear

__all__ = ["SensitivityReport", "SplitPlaneLinear", "TimestepSwitchLinear", "ViDiTQOptions", "analyze_sensitivity",
           "budget_plan", "paper_bit_plan"]
