"""Qua²SeDiMo (Mills et al., AAAI 2025; reference/methods.md §5).

- ``options``: the per-layer option bank (§3.1): {UAQ, K-Means-C, K-Means-A} × bits, built once per layer.
- ``graph``: the denoiser as a layer graph with op types and the subgraphs (§3.2).
- ``gnn``: the GATv2 predictor and its ensemble training with the ranking loss (§3.2–3.3).
- ``config_search``: labelling sampled configurations, node features, subgraph scoring and the budgeted
  construction (§3.3–3.4).
- ``method``: the pass that installs a searched assignment, :func:`search` (the whole flow) and the
  insight plots (§4); presets ``qua2sedimo-*``.
"""
from .method import SearchResult, search, write_insights

__all__ = ["SearchResult", "search", "write_insights"]
