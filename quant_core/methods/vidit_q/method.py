"""ViDiT-Q (Zhao et al., ICLR 2025): dynamic per-token activations, static-dynamic channel
balancing, and metric-decoupled mixed precision (ViDiT-Q-MP). Paper vs official code: see
reference/methods.md §2; where they differ we follow the paper and keep the code's trick as an option.

Per layer (§4.1-4.2):
- weights per output channel, RTN; activations dynamic per token, one scale per row of the
  flattened ``[B*T, K]`` input, so the CFG cond/uncond halves never share a scale (the paper's
  "condition-wise" split, without a second forward pass);
- channel balancing: a smoothing vector from the calibrated activation maxima (max over timesteps,
  floored) and the weight maxima with exponent ``alpha`` (smoothing.py), then a randomised Hadamard
  rotation (rotation.py; signs stored with the layer). PixArt's modulated LayerNorm has no affine
  weight to fold the smoothing into, so the activation side is applied online, inside the layer's
  activation quantization (fused on the kernel path);
- option ``timestep_aware``: the earlier version's per-timestep-range smoothing, one re-quantized
  weight per range, switched at inference (switching.py).

ViDiT-Q-MP (§4.3): weight bits per (layer group x block x timestep range), switched per step;
``bit_plan`` comes from :func:`analyze_sensitivity` + ``SensitivityReport.allocate`` or, without one,
the released W4A8-MP recipe (FFN and the first quarter of the steps at W8, the rest at W4).
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ...passes import rotation as rot
from ...passes import smoothing
from ...calibration import CalibrationData
from ...config import LayerScheme, QuantConfig, check_options, register_preset
from ...layers import QuantLinear
from ...metrics import rel_l2
from ...models import LayerInfo, select_layers, set_submodule
from .sensitivity import RunOutputs, SensitivityReport, group_metric, record_model_outputs
from .switching import (TimestepSwitchLinear, range_index, range_step_counts, timestep_boundaries,
                         timestep_hook, track_timesteps)
from .. import register_method

# Activation exponent per layer class (regex over the module name, last match wins). 0.3 is the
# official PixArt config; FFN outputs (fc2, after GELU) take the official DiT value 0.12 (diffusers
# ff / Wan ffn / MMDiT ff_context, ComfyUI mlp.fc2).
DEFAULT_ALPHA = {r".*": 0.3, r"(ff|ffn|ff_context)\.net\.2$|mlp\.fc2$": 0.12}
SWEEP_ALPHAS = (0.1, 0.3, 0.5, 0.7)  # the official sweep_alpha.py grid


@dataclass
class ViDiTQOptions:
    """``QuantConfig.options`` of method ``vidit-q`` (unknown keys are an error)."""

    alpha: float | dict[str, float] = field(default_factory=lambda: dict(DEFAULT_ALPHA))
    alpha_sweep: list[float] | None = None  # candidates scored per layer on calibration rows
    balance: str = r".*"                    # regex: layers that get smoothing + rotation
    smooth: bool = True
    rotation: str = "block"                 # block (default: fused on the GPU) | full | none
    rotation_block: int = 128               # max block for rotation="block"
    seed: int = 0
    act_floor: float = smoothing.ACT_FLOOR
    timestep_aware: bool = False            # per-range smoothing (the paper's earlier version)
    timestep_ranges: int = 2
    mixed_precision: bool = False           # ViDiT-Q-MP: weight bits per group x block x range
    mp_ranges: int = 4
    mp_high_bits: int = 8
    bit_plan: dict | None = None            # SensitivityReport.allocate(...) output

    @classmethod
    def from_config(cls, config: QuantConfig) -> "ViDiTQOptions":
        check_options(config, {f.name for f in dataclasses.fields(cls)})
        opts = cls(**config.options)
        rot.rotation_block(256, opts.rotation, opts.rotation_block)  # validates mode and block size
        if opts.mixed_precision and config.weight_bits >= opts.mp_high_bits:
            raise ValueError(f"vidit-q: mixed precision switches between weight_bits={config.weight_bits} "
                             f"and mp_high_bits={opts.mp_high_bits}; the first must be smaller")
        return opts

    def alpha_for(self, layer: str) -> float:
        if isinstance(self.alpha, (int, float)):
            return float(self.alpha)
        chosen = None
        for pattern, value in self.alpha.items():
            if re.search(pattern, layer):
                chosen = float(value)
        if chosen is None:
            raise ValueError(f"vidit-q: no alpha pattern matches layer {layer!r} (alpha={self.alpha})")
        return chosen


def cell_key(info: LayerInfo) -> str:
    """The mixed-precision unit: layer group (role) within one block."""
    return f"{info.role}:{info.block}"


def paper_bit_plan(layers: dict[str, LayerInfo], ranges: int, low: int, high: int) -> dict[str, list[int]]:
    """The released W4A8-MP recipe (methods.md §2.2): every layer at ``high`` bits in the first
    quarter of the steps, FFN at ``high`` bits throughout, the rest at ``low``."""
    early = max(1, ranges // 4)
    return {cell_key(i): [high if r < early or i.role == "ffn" else low for r in range(ranges)]
            for i in layers.values()}


class _Builder:
    """Builds one layer's quantized form from its Linear and the calibration statistics."""

    def __init__(self, config: QuantConfig, opts: ViDiTQOptions, calibration: CalibrationData):
        self.config, self.opts, self.calibration = config, opts, calibration

    def balanced(self, name: str, linear: nn.Linear, scheme: LayerScheme, alpha: float,
                 steps: torch.Tensor | None = None) -> QuantLinear:
        """Smooth (activation maxima over ``steps``, default all) and rotate, then RTN."""
        o = self.opts
        if not re.search(o.balance, name):
            return QuantLinear.from_linear(linear, scheme, name=name)
        w = linear.weight.detach().float()
        s = None
        if o.smooth:
            a = smoothing.activation_max(self.calibration.get(name, "act_absmax"), steps, o.act_floor)
            s = smoothing.smoothing_scale(a, w, alpha)
            w = w * s
        block = rot.rotation_block(w.shape[1], o.rotation, o.rotation_block)
        signs = rot.random_signs(w.shape[1], o.seed, name) if block else None
        if block:
            w = rot.rotate_weight(w, signs, block)
        return QuantLinear.from_linear(linear, scheme, name=name, weight=w, smooth_scale=s,
                                       rotation_signs=signs, rotation_block=block)

    def choose_alpha(self, name: str, linear: nn.Linear, scheme: LayerScheme) -> float:
        """The configured alpha, or the sweep candidate with the least output error on the
        calibration rows (``act_samples``) with the layer quantized as stored (``scheme``)."""
        if not self.opts.alpha_sweep or not self.opts.smooth or not re.search(self.opts.balance, name):
            return self.opts.alpha_for(name)
        x = self.calibration.get(name, "act_samples").to(linear.weight.dtype)
        ref = linear(x)
        errors = {a: rel_l2(ref, self.balanced(name, linear, scheme, a)(x)) for a in self.opts.alpha_sweep}
        return min(errors, key=errors.get)


@register_method("vidit-q")
class ViDiTQ:
    def needs(self, config: QuantConfig) -> tuple[str, ...]:
        opts = ViDiTQOptions.from_config(config)
        return ("act_absmax", "act_samples") if opts.alpha_sweep else ("act_absmax",)

    def apply(self, ctx) -> None:
        config, opts, calib = ctx.config, ViDiTQOptions.from_config(ctx.config), ctx.calibration
        builder = _Builder(config, opts, calib)
        ranges = opts.mp_ranges if opts.mixed_precision else opts.timestep_ranges
        plan_cells, boundaries = None, None
        if opts.mixed_precision or opts.timestep_aware:
            boundaries = (opts.bit_plan or {}).get("boundaries") or timestep_boundaries(calib.timesteps, ranges)
            ranges = len(boundaries) + 1
        if opts.mixed_precision:
            plan_cells = (opts.bit_plan or {}).get("cells") or paper_bit_plan(
                ctx.layers, ranges, config.weight_bits, opts.mp_high_bits)
        step_range = (torch.tensor([range_index(float(t), boundaries) for t in calib.timesteps])
                      if boundaries is not None else None)
        alphas: dict[str, float] = {}
        switched = False
        for name, info in ctx.iter_layers("vidit-q"):
            linear = ctx.linear(name)
            scheme = config.scheme_for(name, info.in_features)
            bits = self._layer_bits(plan_cells, info, ranges, scheme.weight_bits)
            # a layer that switches bits stores the widest and derives the others (symmetric views)
            stored = dataclasses.replace(scheme, weight_bits=max(bits), weight_symmetric=True) \
                if len(set(bits)) > 1 else dataclasses.replace(scheme, weight_bits=bits[0])
            alphas[name] = alpha = builder.choose_alpha(name, linear, stored)
            if opts.timestep_aware:
                variants = [builder.balanced(name, linear, stored, alpha, (step_range == r).nonzero().flatten())
                            for r in range(ranges)]
                layer = TimestepSwitchLinear(variants, boundaries, list(enumerate(bits)))
            elif len(set(bits)) > 1:
                layer = TimestepSwitchLinear([builder.balanced(name, linear, stored, alpha)], boundaries,
                                             [(0, b) for b in bits])
            else:
                layer = builder.balanced(name, linear, stored, alpha)
            switched |= isinstance(layer, TimestepSwitchLinear)
            ctx.replace(name, layer)
        if switched:
            track_timesteps(ctx.model)
        ctx.method_state.update({"alpha": alphas, "seed": opts.seed, "rotation": opts.rotation,
                                 "boundaries": boundaries, "bit_plan": plan_cells})

    @staticmethod
    def _layer_bits(cells, info: LayerInfo, ranges: int, default: int) -> list[int]:
        if cells is None:
            return [default] * ranges
        key = cell_key(info)
        if key not in cells:
            raise ValueError(f"vidit-q: bit_plan has no entry {key!r} for layer {info.name!r}")
        bits = [int(b) for b in cells[key]]
        if len(bits) != ranges:
            raise ValueError(f"vidit-q: bit_plan[{key!r}] has {len(bits)} entries for {ranges} timestep ranges")
        return bits


# -- ViDiT-Q-MP sensitivity analysis -------------------------------------------------------------
class _Probe(nn.Module):
    """Analysis-only wrapper: the FP Linear, plus its balanced quantized twin that runs only in the
    timestep ranges listed in ``active`` ({range: weight bits})."""

    tracks_timestep = True

    def __init__(self, fp: nn.Linear, quant: QuantLinear, boundaries: list[float]):
        super().__init__()
        self.fp, self.quant, self.boundaries = fp, quant, boundaries
        self.active: dict[int, int] = {}
        self.timestep: float | None = None

    def forward(self, x):
        r = None if self.timestep is None else range_index(self.timestep, self.boundaries)
        if r in self.active:
            return self.quant(x, weight_bits=self.active[r])
        return self.fp(x)


def analyze_sensitivity(pipe, calibration: CalibrationData, prompts: Sequence, config: QuantConfig | None = None,
                        *, bits: Sequence[int] = (4,), ranges: int | None = None, seed: int = 0,
                        metrics: dict[str, str] | None = None, progress: bool = True,
                        **call_kwargs) -> SensitivityReport:
    """ViDiT-Q-MP's metric-decoupled sensitivity: for every layer group x block x timestep range x
    bit width, quantize only that group (W``bits`` A8, balanced, during that range only), sample,
    and score the result against the full-precision samples with the group's own metric
    (``metrics`` {role: metric name}, defaults in sensitivity.DEFAULT_GROUP_METRICS) and with
    image MSE. ``call_kwargs`` go to the pipeline (steps, guidance, ...). The pipeline is restored.

    >>> report = analyze_sensitivity(pipe, calib, ["a red fox"], num_inference_steps=20)
    >>> cfg = QuantConfig.preset("vidit-q-w4a8-mp")
    >>> cfg.options["bit_plan"] = report.allocate(target_bits=5.0)
    """
    from tqdm.auto import tqdm

    config = copy.deepcopy(config or QuantConfig.preset("vidit-q-w4a8-mp"))
    opts = ViDiTQOptions.from_config(config)
    ranges = ranges or opts.mp_ranges
    boundaries = timestep_boundaries(calibration.timesteps, ranges)
    model = pipe.transformer
    layers = select_layers(model, config)
    builder = _Builder(config, opts, calibration)
    probes: dict[str, _Probe] = {}
    for name, info in layers.items():
        linear = model.get_submodule(name)
        high = dataclasses.replace(config.scheme_for(name, info.in_features), weight_bits=opts.mp_high_bits,
                                   weight_symmetric=True)
        with torch.no_grad():
            quant = builder.balanced(name, linear, high, builder.opts.alpha_for(name))
        probes[name] = _Probe(linear, quant, boundaries)
    cells: dict[str, list[str]] = {}
    for name, info in layers.items():
        cells.setdefault(cell_key(info), []).append(name)
    hook = model.register_forward_pre_hook(timestep_hook, with_kwargs=True)

    def run() -> RunOutputs:
        gen = torch.Generator("cpu").manual_seed(seed)
        with record_model_outputs(model) as outs, torch.no_grad():
            images = pipe(list(prompts), generator=gen, output_type="pt", **call_kwargs).images
        return RunOutputs(images.float().cpu(), torch.stack(outs), list(prompts))

    report = SensitivityReport(boundaries=boundaries, range_steps=range_step_counts(calibration.timesteps, boundaries),
                               bits=list(bits), high_bits=opts.mp_high_bits,
                               params={k: sum(layers[n].in_features * layers[n].out_features for n in v)
                                       for k, v in cells.items()},
                               metrics={})
    try:
        for name, probe in probes.items():
            set_submodule(model, name, probe)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        reference = run()
        todo = [(b, r, key) for b in bits for r in range(ranges) for key in cells]
        for b, r, key in tqdm(todo, desc="sensitivity", disable=not progress):
            for name in cells[key]:
                probes[name].active = {r: b}
            out = run()
            for name in cells[key]:
                probes[name].active = {}
            role, block = key.rsplit(":", 1)
            metric_name = (metrics or {}).get(role) or group_metric(role)
            report.add(role, int(block), r, b, metric_name, reference, out)
    finally:
        hook.remove()
        for name, probe in probes.items():
            set_submodule(model, name, probe.fp)
    return report


register_preset("vidit-q-w8a8", lambda: QuantConfig(method="vidit-q", weight_bits=8, act_bits=8))
register_preset("vidit-q-w6a6", lambda: QuantConfig(method="vidit-q", weight_bits=6, act_bits=6))
register_preset("vidit-q-w4a8-mp", lambda: QuantConfig(method="vidit-q", weight_bits=4, act_bits=8,
                                                       options={"mixed_precision": True}))
