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
  activation quantization (fused on the kernel path). With ``choose_balance`` (default) each layer
  keeps the form among {smoothing at alpha, none} x {rotation, none} whose output is closest to the
  full-precision one on the calibration rows, so balancing never costs accuracy where a layer has
  no outliers to balance;
- option ``timestep_aware``: the earlier version's per-timestep-range smoothing, one re-quantized
  weight per range, switched at inference (switching.py).

ViDiT-Q-MP (§4.3): weight bits W4 or W8 per (layer group x block x timestep range). The plan is an
explicit ``bit_plan`` (:func:`analyze_sensitivity` + ``SensitivityReport.allocate``), or allocated
here under ``memory_fraction`` (weight bytes vs fp16) and/or ``target_bits`` (average weight width
over parameters and steps) from a calibration-data proxy: the activation-weighted relative weight
error W4 vs W8 of each layer in each range (:func:`plane_gains`); with neither budget, the released
recipe (FFN and the first quarter of the steps at W8). Cells at W4 throughout are 4-bit QuantLinears,
at W8 throughout 8-bit ones, switching cells SplitPlaneLinear (two 4-bit planes, W4 ranges read
one); all three come from one plane split, so nothing is quantized twice.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ... import quantizers as qz
from ...passes import rotation as rot
from ...passes import smoothing
from ...calibration import CalibrationData
from ...config import LayerScheme, QuantConfig, check_options, register_preset
from ...layers import QuantLinear
from ...metrics import rel_l2
from ...models import LayerInfo, select_layers, set_submodule
from .sensitivity import (CellCost, RunOutputs, SensitivityReport, average_bits, budget_plan, group_metric,
                          record_model_outputs)
from .switching import (SplitPlaneLinear, TimestepSwitchLinear, range_index, range_step_counts,
                        timestep_boundaries, timestep_hook, track_timesteps)
from .. import register_method

# Activation exponent per layer class (regex over the module name, last match wins). 0.3 is the
# official PixArt config; FFN outputs (fc2, after GELU) take the official DiT value 0.12 (diffusers
# ff / Wan ffn / MMDiT ff_context, ComfyUI mlp.fc2).
DEFAULT_ALPHA = {r".*": 0.3, r"(ff|ffn|ff_context)\.net\.2$|mlp\.fc2$": 0.12}
SWEEP_ALPHAS = (0.1, 0.3, 0.5, 0.7)  # the official sweep_alpha.py grid
SCORE_ROWS = 128  # calibration rows a balancing candidate is scored on (enough to rank; cheap)
SCORE_OUTPUTS = 256  # output channels it is scored on (per-channel errors are independent: a sample ranks)
MP_LOW, MP_HIGH = 4, 8  # the plane format: W8 = two 4-bit planes, W4 = the high one


@dataclass
class ViDiTQOptions:
    """``QuantConfig.options`` of method ``vidit-q`` (unknown keys are an error)."""

    alpha: float | dict[str, float] = field(default_factory=lambda: dict(DEFAULT_ALPHA))
    alpha_sweep: list[float] | None = None  # candidates scored per layer on calibration rows
    balance: str = r".*"                    # regex: layers that may get smoothing + rotation
    smooth: bool = True
    rotation: str = "block"                 # block (default: fused on the GPU) | full | none
    rotation_block: int = 128               # max block for rotation="block"
    choose_balance: bool = True             # per layer, smoothing/rotation on or off by calibration error
    seed: int = 0
    act_floor: float = smoothing.ACT_FLOOR
    timestep_aware: bool = False            # per-range smoothing (the paper's earlier version)
    timestep_ranges: int = 2
    mixed_precision: bool = False           # ViDiT-Q-MP: W4/W8 per group x block x range
    mp_ranges: int = 4                      # at most; fewer when calibration has fewer steps
    mp_high_bits: int = MP_HIGH
    memory_fraction: float | None = None    # MP budget: block-Linear weight bytes vs fp16
    target_bits: float | None = None        # MP budget: average weight bits over params x steps
    bit_plan: dict | None = None            # SensitivityReport.allocate(...) output

    @classmethod
    def from_config(cls, config: QuantConfig) -> "ViDiTQOptions":
        check_options(config, {f.name for f in dataclasses.fields(cls)})
        opts = cls(**config.options)
        rot.rotation_block(256, opts.rotation, opts.rotation_block)  # validates mode and block size
        if opts.mixed_precision:
            if (config.weight_bits, opts.mp_high_bits) != (MP_LOW, MP_HIGH) or config.act_mode != "dynamic_token":
                raise ValueError(f"vidit-q: mixed precision stores W{MP_HIGH} as two {MP_LOW}-bit planes and "
                                 f"switches between them: it needs weight_bits={MP_LOW}, mp_high_bits={MP_HIGH} "
                                 f"and act_mode 'dynamic_token' (got {config.weight_bits}, {opts.mp_high_bits}, "
                                 f"{config.act_mode!r})")
            if opts.timestep_aware:
                raise ValueError("vidit-q: mixed_precision and timestep_aware cannot be combined")
        if opts.memory_fraction is not None and not 0 < opts.memory_fraction <= 1:
            raise ValueError(f"vidit-q: memory_fraction {opts.memory_fraction} must be in (0, 1]")
        if opts.target_bits is not None and not MP_LOW <= opts.target_bits <= MP_HIGH:
            raise ValueError(f"vidit-q: target_bits {opts.target_bits} must be in [{MP_LOW}, {MP_HIGH}]")
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

    def balance_candidates(self, layer: str) -> list[tuple[float | None, bool]]:
        """(smoothing alpha or None, rotate?) forms a layer may take."""
        if not re.search(self.balance, layer):
            return [(None, False)]
        alphas: list[float | None] = list(self.alpha_sweep or [self.alpha_for(layer)]) if self.smooth else []
        rotations = [self.rotation != "none"]
        if self.choose_balance:
            alphas, rotations = [None, *alphas], sorted({False, *rotations})
        return [(a, r) for a in (alphas or [None]) for r in rotations]


def cell_key(info: LayerInfo) -> str:
    """The mixed-precision unit: layer group (role) within one block."""
    return f"{info.role}:{info.block}"


def paper_bit_plan(layers: dict[str, LayerInfo], ranges: int, low: int, high: int) -> dict[str, list[int]]:
    """The released W4A8-MP recipe (methods.md §2.2): every layer at ``high`` bits in the first
    quarter of the steps, FFN at ``high`` bits throughout, the rest at ``low``."""
    early = max(1, ranges // 4)
    return {cell_key(i): [high if r < early or i.role == "ffn" else low for r in range(ranges)]
            for i in layers.values()}


@dataclass
class Balance:
    """A layer's channel balancing: weight in the balanced basis and what the layer stores for it."""

    weight: torch.Tensor
    smooth_scale: torch.Tensor | None
    rotation_signs: torch.Tensor | None
    rotation_block: int | None

    def stored(self) -> dict[str, Any]:
        return {"smooth_scale": self.smooth_scale, "rotation_signs": self.rotation_signs,
                "rotation_block": self.rotation_block}


class _Builder:
    """Builds one layer's quantized form from its Linear and the calibration statistics."""

    def __init__(self, config: QuantConfig, opts: ViDiTQOptions, calibration: CalibrationData):
        self.config, self.opts, self.calibration = config, opts, calibration

    def balance(self, name: str, linear: nn.Linear, alpha: float | None, rotate: bool,
                steps: torch.Tensor | None = None, rows: torch.Tensor | slice = slice(None)) -> Balance:
        """Smooth at ``alpha`` (activation maxima over ``steps``, default all; None: no smoothing),
        then rotate if ``rotate``. ``rows``: only these output channels' weight rows (the smoothing
        vector still comes from the whole weight, so they are exactly those rows of the full form)."""
        w = linear.weight.detach().float()
        s = None
        if alpha is not None:
            a = smoothing.activation_max(self.calibration.get(name, "act_absmax"), steps, self.opts.act_floor)
            s = smoothing.smoothing_scale(a, w, alpha)
        w = w[rows] if s is None else w[rows] * s
        block = rot.rotation_block(w.shape[1], self.opts.rotation, self.opts.rotation_block) if rotate else None
        signs = rot.random_signs(w.shape[1], self.opts.seed, name) if block else None
        if block:
            w = rot.rotate_weight(w, signs, block)
        return Balance(w, s, signs, block)

    def quant_linear(self, name: str, linear: nn.Linear, scheme: LayerScheme, b: Balance) -> QuantLinear:
        return QuantLinear.from_linear(linear, scheme, name=name, weight=b.weight, **b.stored())

    def choose(self, name: str, linear: nn.Linear, scheme: LayerScheme) -> tuple[tuple[float | None, bool], Balance]:
        """The balancing candidate whose ``scheme`` layer output is closest to the FP output on the
        calibration rows (``act_samples``), and its Balance; the only candidate when there is no choice.
        Where the output error is separable per output channel (per-channel RTN weights, per-token
        activations), candidates are scored on :data:`SCORE_OUTPUTS` of them: the balanced weight
        rows, their quantization and the GEMM cost that fraction of the layer, and only the winner is
        built in full."""
        candidates = self.opts.balance_candidates(name)
        if len(candidates) == 1:
            return candidates[0], self.balance(name, linear, *candidates[0])
        x = self.calibration.get(name, "act_samples")[:SCORE_ROWS].to(linear.weight.dtype)
        rows = score_outputs(linear.out_features) if _separable(scheme) else slice(None)
        ref = F.linear(x, linear.weight[rows], None if linear.bias is None else linear.bias[rows])
        errors = {}
        for c in candidates:
            b = self.balance(name, linear, *c, rows=rows)
            errors[c] = rel_l2(ref, self.simulate(name, linear, scheme, b, x, rows))
        best = min(errors, key=errors.get)
        return best, self.balance(name, linear, *best)

    def simulate(self, name: str, linear: nn.Linear, scheme: LayerScheme, b: Balance, x: torch.Tensor,
                 rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The layer's output for ``x`` with this balancing (output channels ``rows`` only, whose weight
        rows ``b`` holds), fake-quantized in float32 (scoring only: cheaper than building the packed
        layer and running the exact integer GEMM)."""
        if not _separable(scheme):
            return self.quant_linear(name, linear, scheme, b)(x)
        from ....kernels.reference import transform_input

        w = qz.fake_quantize(b.weight, scheme.weight_bits, symmetric=scheme.weight_symmetric,
                             full_range=scheme.weight_full_range)
        xt = transform_input(x, b.smooth_scale, b.rotation_signs, b.rotation_block)
        if scheme.act_mode is not None:
            xt = qz.fake_quantize(xt, scheme.act_bits)
        y = xt @ w.t()
        return y if linear.bias is None else y + linear.bias[rows].float()


def _separable(scheme: LayerScheme) -> bool:
    """Whether each output channel's error depends only on its own weight row (per-channel integer
    weights, per-token or no activation quantization): then a subset of channels scores exactly."""
    return scheme.weight_format == "int" and scheme.act_mode in ("dynamic_token", None) and \
        scheme.weight_granularity == "channel"


def score_outputs(out_features: int) -> torch.Tensor:
    """Evenly spaced output channels, at most :data:`SCORE_OUTPUTS`, that a candidate is scored on."""
    count = min(out_features, SCORE_OUTPUTS)
    return torch.arange(count) * out_features // count


def plane_gains(layer: SplitPlaneLinear, weight: torch.Tensor, act_absmax: torch.Tensor,
                step_range: torch.Tensor, ranges: int) -> list[float]:
    """Per timestep range: how much closer W8 is to ``weight`` than the W4 view, as relative error
    weighted by the range's activation scale, ``sum_j |dW_:j|^2 a_j^2 / sum_j |W_:j|^2 a_j^2`` with
    ``a_j^2`` the mean over the range's steps of the squared channel maxima (a diagonal-Hessian
    proxy of the output error), times the range's step count."""
    w = weight.detach().float()
    columns = {b: (w - layer.effective_weight(b)).pow(2).sum(dim=0) for b in (MP_LOW, MP_HIGH)}
    w2 = w.pow(2).sum(dim=0)
    gains = []
    for r in range(ranges):
        a2 = act_absmax[step_range == r].float().pow(2)
        if not len(a2):
            gains.append(0.0)
            continue
        a2 = a2.mean(dim=0)
        ref = (w2 * a2).sum().clamp_min(1e-30)
        gains.append(float(((columns[MP_LOW] - columns[MP_HIGH]) * a2).sum() / ref) * len(step_range[step_range == r]))
    return gains


def layer_bytes(info: LayerInfo, planes: bool, balance: Balance) -> float:
    """Stored bytes of a layer, as the report counts them on disk (weight buffers and balancing
    vectors; bias excluded): 4-bit packed weight + scale, or two planes + two scales."""
    per_plane = info.out_features * (qz.packed_width(info.in_features, MP_LOW) + 4)
    extra = (0 if balance.smooth_scale is None else 4 * info.in_features) + \
        (0 if balance.rotation_signs is None else info.in_features)
    return per_plane * (2 if planes else 1) + extra


@register_method("vidit-q")
class ViDiTQ:
    def needs(self, config: QuantConfig) -> tuple[str, ...]:
        opts = ViDiTQOptions.from_config(config)
        choice = opts.choose_balance or opts.alpha_sweep
        return ("act_absmax", "act_samples") if choice else ("act_absmax",)

    def apply(self, ctx) -> None:
        opts = ViDiTQOptions.from_config(ctx.config)
        if opts.mixed_precision:
            self._apply_mixed(ctx, opts)
        else:
            self._apply_uniform(ctx, opts)

    def _apply_uniform(self, ctx, opts: ViDiTQOptions) -> None:
        config, calib = ctx.config, ctx.calibration
        builder = _Builder(config, opts, calib)
        boundaries = timestep_boundaries(calib.timesteps, opts.timestep_ranges) if opts.timestep_aware else None
        step_range = _step_ranges(calib, boundaries)
        chosen: dict[str, tuple[float | None, bool]] = {}
        for name, info in ctx.iter_layers("vidit-q"):
            linear = ctx.linear(name)
            scheme = config.scheme_for(name, info.in_features)
            chosen[name], balance = builder.choose(name, linear, scheme)
            alpha, rotate = chosen[name]
            if boundaries is not None:
                variants = [builder.quant_linear(name, linear, scheme, builder.balance(
                    name, linear, alpha, rotate, (step_range == r).nonzero().flatten()))
                    for r in range(len(boundaries) + 1)]
                layer = TimestepSwitchLinear(variants, boundaries, [(r, scheme.weight_bits) for r in range(len(variants))])
            else:
                layer = builder.quant_linear(name, linear, scheme, balance)
            ctx.replace(name, layer)
        if boundaries is not None:
            track_timesteps(ctx.model)
        ctx.method_state.update(_state(opts, chosen, boundaries, None))

    def _apply_mixed(self, ctx, opts: ViDiTQOptions) -> None:
        """Split every layer into planes once, allocate, then store each cell in the form its plan needs."""
        config, calib = ctx.config, ctx.calibration
        builder = _Builder(config, opts, calib)
        given = opts.bit_plan or {}
        boundaries = given.get("boundaries") or timestep_boundaries(calib.timesteps, opts.mp_ranges)
        ranges, step_range = len(boundaries) + 1, _step_ranges(calib, boundaries)
        chosen, planes, gains, costs = {}, {}, {}, {}
        for name, info in ctx.iter_layers("vidit-q plane split"):
            linear = ctx.linear(name)
            chosen[name], b = builder.choose(name, linear, _plane_scheme(config, name, info.in_features, MP_LOW))
            planes[name] = SplitPlaneLinear.from_weight(linear, b.weight, boundaries, [MP_HIGH] * ranges,
                                                        act_bits=config.act_bits, name=name, **b.stored())
            key = cell_key(info)
            layer_gain = plane_gains(planes[name], linear.weight, calib.get(name, "act_absmax"), step_range, ranges)
            gains[key] = [g + h for g, h in zip(gains.get(key, [0.0] * ranges), layer_gain)]
            c = costs.setdefault(key, CellCost(0, 0.0, 0.0))
            c.params += info.in_features * info.out_features
            c.low_bytes += layer_bytes(info, False, b)
            c.high_bytes += layer_bytes(info, True, b)
        steps = range_step_counts(calib.timesteps, boundaries)
        if given.get("cells"):
            cells = given["cells"]
        elif opts.memory_fraction is None and opts.target_bits is None:
            cells = paper_bit_plan(ctx.layers, ranges, MP_LOW, MP_HIGH)
        else:
            fp16 = sum(2 * c.params for c in costs.values())
            memory = None if opts.memory_fraction is None else opts.memory_fraction * fp16
            cells = budget_plan(gains, costs, steps, low=MP_LOW, high=MP_HIGH, memory_bytes=memory,
                                target_bits=opts.target_bits)
        switched = False
        for name, info in ctx.layers.items():
            bits = _layer_bits(cells, info, ranges)
            layer = _stored_form(planes.pop(name), ctx.linear(name), config, bits)
            switched |= isinstance(layer, SplitPlaneLinear)
            ctx.replace(name, layer)
        if switched:
            track_timesteps(ctx.model)
        state = _state(opts, chosen, boundaries, cells)
        state["average_bits"] = average_bits(cells, costs, steps)
        ctx.method_state.update(state)


def _step_ranges(calib: CalibrationData, boundaries: list[float] | None) -> torch.Tensor | None:
    if boundaries is None:
        return None
    return torch.tensor([range_index(float(t), boundaries) for t in calib.timesteps])


def _state(opts: ViDiTQOptions, chosen: dict, boundaries, cells) -> dict:
    return {"alpha": {n: a for n, (a, _) in chosen.items()}, "rotated": {n: r for n, (_, r) in chosen.items()},
            "seed": opts.seed, "rotation": opts.rotation, "boundaries": boundaries, "bit_plan": cells}


def _layer_bits(cells: dict, info: LayerInfo, ranges: int) -> list[int]:
    key = cell_key(info)
    if key not in cells:
        raise ValueError(f"vidit-q: bit_plan has no entry {key!r} for layer {info.name!r}")
    bits = [int(b) for b in cells[key]]
    if len(bits) != ranges:
        raise ValueError(f"vidit-q: bit_plan[{key!r}] has {len(bits)} entries for {ranges} timestep ranges")
    if not set(bits) <= {MP_LOW, MP_HIGH}:
        raise ValueError(f"vidit-q: bit_plan[{key!r}] = {bits}; mixed precision runs {MP_LOW} or {MP_HIGH} bits")
    return bits


def _plane_scheme(config: QuantConfig, name: str, in_features: int, bits: int) -> LayerScheme:
    """The layer's scheme at ``bits`` in the planes' symmetric ranges (the high plane is [-7, 7]: the
    full int4 range does not apply to the plane format)."""
    return dataclasses.replace(config.scheme_for(name, in_features), weight_bits=bits, weight_symmetric=True,
                               weight_full_range=False)


def _stored_form(planes: SplitPlaneLinear, linear: nn.Linear, config: QuantConfig, bits: list[int]):
    """The layer the plan needs, from its planes without re-rounding: the high plane as a 4-bit
    QuantLinear (W4 throughout), ``16 * high + low`` as an 8-bit one (W8 throughout), or the planes."""
    if len(set(bits)) > 1:
        planes.bits = bits
        return planes
    high, low = planes.planes()
    if bits[0] == MP_LOW:
        q, scale = high, planes.view_scale
    else:
        q, scale = (16 * high.to(torch.int16) + low).to(torch.int8), planes.weight_scale
    scheme = _plane_scheme(config, planes.layer_name, planes.in_features, bits[0])
    return QuantLinear.from_quantized(linear, scheme, q, scale, None, name=planes.layer_name,
                                      smooth_scale=planes.smooth_scale, rotation_signs=planes.rotation_signs,
                                      rotation_block=planes.rotation_block)


# -- ViDiT-Q-MP sensitivity analysis -------------------------------------------------------------
class _Probe(nn.Module):
    """Analysis-only wrapper: the FP Linear, plus its balanced plane-split twin that runs only in the
    timestep ranges listed in ``active`` ({range: weight bits})."""

    tracks_timestep = True

    def __init__(self, fp: nn.Linear, quant: SplitPlaneLinear, boundaries: list[float]):
        super().__init__()
        self.fp, self.quant, self.boundaries = fp, quant, boundaries
        self.active: dict[int, int] = {}
        self.timestep: float | None = None

    def forward(self, x):
        r = None if self.timestep is None else range_index(self.timestep, self.boundaries)
        if r in self.active:
            return self.quant(x, bits=self.active[r])
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
    boundaries = timestep_boundaries(calibration.timesteps, ranges or opts.mp_ranges)
    ranges = len(boundaries) + 1
    model = pipe.transformer
    layers = select_layers(model, config)
    builder = _Builder(config, opts, calibration)
    probes: dict[str, _Probe] = {}
    for name in layers:
        linear = model.get_submodule(name)
        with torch.no_grad():  # the configured balancing (no choice: the analysis needs only act_absmax)
            b = builder.balance(name, linear, opts.alpha_for(name) if opts.smooth else None, opts.rotation != "none")
            quant = SplitPlaneLinear.from_weight(linear, b.weight, boundaries, [MP_HIGH] * (len(boundaries) + 1),
                                                 act_bits=config.act_bits, name=name, **b.stored())
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

    if not set(bits) <= {MP_LOW}:
        raise ValueError(f"analyze_sensitivity: the plane format measures W{MP_LOW} ranges; got bits={list(bits)}")
    report = SensitivityReport(boundaries=boundaries, range_steps=range_step_counts(calibration.timesteps, boundaries),
                               bits=list(bits), high_bits=MP_HIGH,
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
                                                       options={"mixed_precision": True, "memory_fraction": 0.32}))
