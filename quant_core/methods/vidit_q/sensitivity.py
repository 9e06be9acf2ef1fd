"""Metric-decoupled sensitivity (ViDiT-Q-MP §4.3): score how much quantizing one layer group in
one timestep range hurts the samples, each group with the metric of the visual aspect it mainly
drives, then allocate weight bits under an average-bit budget and a memory budget
(:func:`budget_plan`, shared with the quick calibration-data allocation in methods/vidit_q.py).

Metrics are pluggable: ``register_metric(name, fn)`` with ``fn(reference: RunOutputs, run: RunOutputs)
-> float`` (larger = more damage). Offline defaults, measured against the full-precision samples:
``structure`` (1 - SSIM of the images) for self-attention and FFN, ``text_fidelity`` (relative error
of the classifier-free-guidance direction ``eps_cond - eps_uncond`` over all steps: the part of the
prediction the prompt controls) for cross-attention; ``mse`` (image MSE) is the common currency that
splits the budget between groups. :func:`clip_score_metric` adds CLIP score where CLIP weights are
installed.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ...metrics import rel_l2, ssim


@dataclass
class RunOutputs:
    """What one sampling run leaves for the metrics: images ``[P, 3, H, W]`` in [0, 1], the
    transformer's output at each step (``[steps, batch, C, h, w]``), and the prompts."""

    images: torch.Tensor
    model_outputs: torch.Tensor
    prompts: list


@contextlib.contextmanager
def record_model_outputs(model):
    """Collect ``model``'s outputs into the yielded list, one per forward (denoising step)."""
    outs: list[torch.Tensor] = []

    def keep(module, args, output):
        y = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        outs.append(y.detach().float().cpu())

    handle = model.register_forward_hook(keep)
    try:
        yield outs
    finally:
        handle.remove()


def _guidance(run: RunOutputs) -> torch.Tensor:
    """``eps_cond - eps_uncond`` per step when the batch holds both CFG halves, else the outputs."""
    out = run.model_outputs
    p = len(run.prompts)
    if out.shape[1] == 2 * p:
        return out[:, p:] - out[:, :p]
    return out


def _structure(ref: RunOutputs, run: RunOutputs) -> float:
    return 1.0 - ssim(ref.images, run.images)


def _text_fidelity(ref: RunOutputs, run: RunOutputs) -> float:
    return rel_l2(_guidance(ref), _guidance(run))


def _mse(ref: RunOutputs, run: RunOutputs) -> float:
    return (ref.images.double() - run.images.double()).pow(2).mean().item()


METRICS: dict[str, Callable[[RunOutputs, RunOutputs], float]] = {
    "structure": _structure, "text_fidelity": _text_fidelity, "mse": _mse}
DEFAULT_GROUP_METRICS = {"self_attn": "structure", "ffn": "structure", "cross_attn": "text_fidelity"}


def register_metric(name: str, fn: Callable[[RunOutputs, RunOutputs], float]) -> None:
    METRICS[name] = fn


def group_metric(role: str) -> str:
    return DEFAULT_GROUP_METRICS.get(role, "structure")


def clip_score_metric(model_path: str, device: str = "cpu") -> Callable[[RunOutputs, RunOutputs], float]:
    """CLIP-score drop vs the FP samples, from local CLIP weights (``transformers`` CLIPModel folder
    or a cached Hub id; never downloads). Register it: ``register_metric("clip", clip_score_metric(p))``
    and pass ``metrics={"cross_attn": "clip"}`` to the analysis."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(model_path, local_files_only=True).to(device).eval()
        processor = CLIPProcessor.from_pretrained(model_path, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(f"CLIP weights not found at {model_path!r} (clip_score_metric reads local "
                                f"files only): {e}") from None

    @torch.no_grad()
    def score(run: RunOutputs) -> float:
        inputs = processor(text=run.prompts, images=list(run.images), return_tensors="pt", padding=True,
                           do_rescale=False).to(device)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (100 * (img * txt).sum(-1)).clamp_min(0).mean().item()

    cache: dict[int, float] = {}

    def drop(ref: RunOutputs, run: RunOutputs) -> float:
        if id(ref) not in cache:
            cache[id(ref)] = score(ref)
        return cache[id(ref)] - score(run)

    return drop


@dataclass
class SensitivityReport:
    """Sensitivity per (role, block, timestep range, bits): the group's own metric and image MSE.

    ``boundaries`` split the timesteps into ranges (descending; range 0 = noisiest), ``range_steps``
    counts calibration steps per range, ``params`` counts weights per ``"role:block"`` cell.
    """

    boundaries: list[float]
    range_steps: list[int]
    bits: list[int]
    high_bits: int
    params: dict[str, int]
    metrics: dict[str, str]
    entries: list[dict] = field(default_factory=list)

    def add(self, role: str, block: int, rng: int, bits: int, metric: str, ref: RunOutputs, run: RunOutputs):
        if metric not in METRICS:
            raise ValueError(f"unknown sensitivity metric {metric!r}; registered: {sorted(METRICS)}")
        self.metrics[role] = metric
        self.entries.append({"role": role, "block": block, "range": rng, "bits": bits,
                             "metric": METRICS[metric](ref, run), "mse": METRICS["mse"](ref, run)})

    # -- views -----------------------------------------------------------------------------------
    def range_labels(self) -> list[str]:
        edges = [None, *self.boundaries, None]
        labels = []
        for hi, lo in zip(edges[:-1], edges[1:]):
            labels.append(f"t>={lo:g}" if hi is None else f"t<{hi:g}" if lo is None else f"{lo:g}<=t<{hi:g}")
        return labels

    def cells(self) -> list[str]:
        return sorted({f"{e['role']}:{e['block']}" for e in self.entries},
                      key=lambda k: (k.split(":")[0], int(k.split(":")[1])))

    def grid(self, bits: int, key: str = "metric") -> list[list[float | None]]:
        """Rows = cells (role:block), columns = timestep ranges."""
        rows = self.cells()
        g = [[None] * len(self.range_steps) for _ in rows]
        for e in self.entries:
            if e["bits"] == bits:
                g[rows.index(f"{e['role']}:{e['block']}")][e["range"]] = e[key]
        return g

    def table(self, bits: int | None = None) -> str:
        bits = bits or min(self.bits)
        labels = self.range_labels()
        head = f"{'group:block':<16} {'metric':<14}" + "".join(f"{lab:>18}" for lab in labels)
        lines = [f"sensitivity at W{bits}A8 (group metric / image MSE; larger = more sensitive)", head]
        for key, m_row, e_row in zip(self.cells(), self.grid(bits), self.grid(bits, "mse")):
            cells = "".join(f"{'-':>18}" if m is None else f"{m:>9.4f}/{e:<8.1e}" for m, e in zip(m_row, e_row))
            lines.append(f"{key:<16} {self.metrics[key.split(':')[0]]:<14}{cells}")
        return "\n".join(lines)

    def heatmap(self, path, bits: int | None = None) -> None:
        """PNG heat map (group x block rows, timestep-range columns); colour = the group metric
        relative to its group's largest value, text = the metric."""
        from ...plotting import heatmap_png
        from ...serialization import atomic_write_bytes

        bits = bits or min(self.bits)
        grid = self.grid(bits)
        rows = self.cells()
        peak: dict[str, float] = {}
        for key, row in zip(rows, grid):
            role = key.split(":")[0]
            peak[role] = max([peak.get(role, 0.0)] + [v for v in row if v is not None])
        colour = [[None if v is None else v / (peak[k.split(':')[0]] or 1.0) for v in row]
                  for k, row in zip(rows, grid)]
        text = [["" if v is None else f"{v:.3g}" for v in row] for row in grid]
        row_labels = [f"{k} ({self.metrics[k.split(':')[0]]})" for k in rows]
        png = heatmap_png(colour, row_labels, self.range_labels(), text,
                          title=f"ViDiT-Q-MP sensitivity, W{bits}A8 (colour: relative to group max)")
        atomic_write_bytes(png, path)

    # -- bit allocation ------------------------------------------------------------------------
    def allocate(self, target_bits: float | None, low: int | None = None, *,
                 memory_fraction: float | None = None) -> dict:
        """Weight bits per cell and timestep range with a parameter- and step-weighted average of at
        most ``target_bits`` and weight bytes of at most ``memory_fraction`` x fp16 (parameters
        only: scales are not counted here; quantize() counts them when it allocates). Start every
        cell at ``low`` bits; each group gets a share of the budget in proportion to the image MSE
        its quantization causes (summed over its cells), which scales the group's own metric
        (normalised by the group's mean) into one priority; cells are promoted to ``high_bits`` in
        order of priority while the budgets allow (§4.3: groups split the budget by MSE, layers
        inside a group ranked by the group's metric)."""
        low = low or min(self.bits)
        if target_bits is not None and not low <= target_bits <= self.high_bits:
            raise ValueError(f"target_bits {target_bits} outside [{low}, {self.high_bits}]")
        entries = [e for e in self.entries if e["bits"] == low]
        if not entries:
            raise ValueError(f"no sensitivity measured at {low} bits (measured: {self.bits})")
        mse_by_role: dict[str, float] = {}
        metric_by_role: dict[str, list[float]] = {}
        for e in entries:
            mse_by_role[e["role"]] = mse_by_role.get(e["role"], 0.0) + e["mse"]
            metric_by_role.setdefault(e["role"], []).append(e["metric"])
        total_mse = sum(mse_by_role.values()) or 1.0

        def priority(e):
            mean = sum(metric_by_role[e["role"]]) / len(metric_by_role[e["role"]]) or 1.0
            return e["metric"] / mean * mse_by_role[e["role"]] / total_mse

        costs = {k: CellCost(self.params[k], self.params[k] * low / 8, self.params[k] * self.high_bits / 8)
                 for k in self.cells()}
        gains = {k: [0.0] * len(self.range_steps) for k in costs}
        for e in entries:  # priority per bit-step: the report ranks cells by priority alone
            key = f"{e['role']}:{e['block']}"
            gains[key][e["range"]] = priority(e) * self.params[key] * self.range_steps[e["range"]]
        memory = None if memory_fraction is None else memory_fraction * 2 * sum(self.params.values())
        cells = budget_plan(gains, costs, self.range_steps, low=low, high=self.high_bits,
                            memory_bytes=memory, target_bits=target_bits)
        return {"boundaries": list(self.boundaries), "cells": cells, "target_bits": target_bits,
                "memory_fraction": memory_fraction,
                "average_bits": average_bits(cells, costs, self.range_steps)}

    # -- files ---------------------------------------------------------------------------------
    def save(self, path) -> None:
        from ...serialization import atomic_write_text

        atomic_write_text(json.dumps(asdict(self), indent=1), path)

    @classmethod
    def load(cls, path) -> "SensitivityReport":
        with io.open(path) as f:
            return cls(**json.load(f))


@dataclass
class CellCost:
    """One mixed-precision cell (layer group x block): its weights, and its stored bytes at the low
    width throughout vs. stored so that any range can run the high width."""

    params: int
    low_bytes: float
    high_bytes: float


def budget_plan(gains: dict[str, list[float]], costs: dict[str, CellCost], range_steps: list[int], *,
                low: int, high: int, memory_bytes: float | None, target_bits: float | None) -> dict[str, list[int]]:
    """Weight bits per cell and timestep range, greedy under two budgets.

    ``gains[cell][r]`` is what running the cell at ``high`` instead of ``low`` bits in range ``r``
    is worth (any additive unit). Memory first: cells are made high-capable in order of total gain
    per extra byte while the stored bytes stay within ``memory_bytes`` (None: no limit). Then time:
    with ``target_bits`` (the parameter- and step-weighted average weight width), the (cell, range)
    pairs of high-capable cells are promoted in order of gain per bit-step while the average stays
    within it; without it, high-capable cells run ``high`` in every range.
    """
    capable = [k for k in gains if sum(gains[k]) > 0]
    if memory_bytes is not None:
        spare = memory_bytes - sum(c.low_bytes for c in costs.values())
        if spare < 0:
            raise ValueError(f"memory budget {memory_bytes:.0f} B is below the all-W{low} size "
                             f"{memory_bytes - spare:.0f} B")
        chosen = []
        for key in sorted(capable, key=lambda k: sum(gains[k]) / (costs[k].high_bytes - costs[k].low_bytes),
                          reverse=True):
            extra = costs[key].high_bytes - costs[key].low_bytes
            if extra <= spare:
                spare -= extra
                chosen.append(key)
        capable = chosen
    cells = {k: [low] * len(range_steps) for k in gains}
    if target_bits is None:
        for key in capable:
            cells[key] = [high] * len(range_steps)
        return cells
    budget = (target_bits - low) * sum(costs[k].params for k in gains) * sum(range_steps)

    def bit_steps(key, r):
        return (high - low) * costs[key].params * range_steps[r]

    pairs = [(k, r) for k in capable for r in range(len(range_steps)) if range_steps[r] and gains[k][r] > 0]
    for key, r in sorted(pairs, key=lambda p: gains[p[0]][p[1]] / bit_steps(*p), reverse=True):
        if bit_steps(key, r) <= budget:
            budget -= bit_steps(key, r)
            cells[key][r] = high
    return cells


def average_bits(cells: dict[str, list[int]], costs: dict[str, CellCost], range_steps: list[int]) -> float:
    """Parameter- and step-weighted average weight width of a plan."""
    total = sum(costs[k].params for k in cells) * sum(range_steps)
    return sum(costs[k].params * range_steps[r] * b for k, row in cells.items() for r, b in enumerate(row)) / total
