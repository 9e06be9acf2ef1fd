"""Per-timestep switching of a layer's quantized form (ViDiT-Q §4.3 mixed precision, and the
timestep-aware channel balancing of its earlier version).

:class:`SplitPlaneLinear` is ViDiT-Q-MP's W8/W4 layer: its 8-bit integers are stored as two packed
4-bit planes (quantizers.split_planes), so a W4 range reads the high plane only (half the bytes, one
W4A8 GEMM, with its own least-squares scale) and a W8 range adds the low plane's GEMM; nothing is
re-rounded or re-packed per forward. :class:`TimestepSwitchLinear` holds one :class:`QuantLinear`
variant per range (timestep-aware smoothing); checkpoints of format 1 may also plan a lower-bit view
of a variant, which is derived once when the layer is built or loaded.

The current timestep comes from a forward pre-hook on the model root (:func:`track_timesteps`) that
writes it onto every module with ``tracks_timestep = True`` before each denoising step. The hook
walks the model on each call rather than capturing a layer list, so a deep copy of the model stays
self-contained; loading installs it through ``QuantModule.attach``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .... import kernels
from ... import quantizers as qz
from ...calibration import call_timestep
from ...layers import MIN_SMOOTH_SCALE, QuantLinear, QuantModule, _require, input_basis, register_layer_type


def range_index(timestep: float, boundaries: Sequence[float]) -> int:
    """Range of ``timestep`` for descending ``boundaries`` ``b0 > b1 > ...``: range 0 is
    ``t >= b0`` (the noisiest steps), range ``len(boundaries)`` is ``t < b_last``."""
    return sum(timestep < b for b in boundaries)


def timestep_boundaries(timesteps: torch.Tensor, ranges: int) -> list[float]:
    """Split the calibration run's steps into ``ranges`` runs of (nearly) equal step counts and return
    the timestep values between them, descending (midpoints, so nearby samplers fall alike). With
    fewer distinct steps than ``ranges``, each step is its own range."""
    t = sorted({float(v) for v in timesteps}, reverse=True)
    if ranges < 1 or not t:
        raise ValueError(f"cannot split {len(t)} calibration steps into {ranges} timestep ranges")
    ranges = min(ranges, len(t))
    cuts = [round(i * len(t) / ranges) for i in range(1, ranges)]
    return [(t[c - 1] + t[c]) / 2 for c in cuts]


def range_step_counts(timesteps: torch.Tensor, boundaries: Sequence[float]) -> list[int]:
    counts = [0] * (len(boundaries) + 1)
    for v in timesteps:
        counts[range_index(float(v), boundaries)] += 1
    return counts


def timestep_hook(module: nn.Module, args, kwargs) -> None:
    """Forward pre-hook for a model root: hand this call's timestep to the layers that track it."""
    t = call_timestep(args, kwargs)
    for m in module.modules():
        if getattr(m, "tracks_timestep", False):
            m.timestep = t


def track_timesteps(model: nn.Module) -> None:
    """Install (once) the hook that tells timestep-switching layers which step is running."""
    if not any(h is timestep_hook for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(timestep_hook, with_kwargs=True)


def _current(module, entries: Sequence, key) -> Any:
    """The plan entry for the module's current timestep, or (timestep unknown, e.g. a call outside
    a hooked model) the entry with the most weight bits, the most accurate one."""
    if module.timestep is None:
        return max(entries, key=key)
    return entries[range_index(module.timestep, module.boundaries)]


def _check_boundaries(boundaries: Sequence[float], entries: int) -> list[float]:
    if entries != len(boundaries) + 1:
        raise ValueError(f"plan has {entries} entries for {len(boundaries) + 1} timestep ranges")
    if list(boundaries) != sorted(boundaries, reverse=True):
        raise ValueError(f"timestep boundaries must descend, got {list(boundaries)}")
    return [float(b) for b in boundaries]


@register_layer_type("timestep_switch")
class TimestepSwitchLinear(QuantModule):
    """Runs ``variants[v]`` at ``bits`` weight bits where ``plan[r] = (v, bits)`` for timestep range
    ``r`` (see :func:`range_index`). ``bits`` below the variant's stored width (format-1 checkpoints'
    W8/W4 switch) runs a view derived once, when the layer is built or its state is loaded, and
    held in non-persistent buffers (counted in ``weight_nbytes``)."""

    tracks_timestep = True

    def __init__(self, variants: Sequence[QuantLinear], boundaries: Sequence[float],
                 plan: Sequence[Sequence[int]]):
        super().__init__()
        self.boundaries = _check_boundaries(boundaries, len(plan))
        self.variants = nn.ModuleList(variants)
        self.plan = [(int(v), int(b)) for v, b in plan]
        for v, bits in self.plan:
            if not 0 <= v < len(self.variants):
                raise ValueError(f"plan names variant {v}, but there are {len(self.variants)}")
            if bits > self.variants[v].scheme.weight_bits:
                raise ValueError(f"plan asks {bits} bits of a {self.variants[v].scheme.weight_bits}-bit variant")
        first = self.variants[0]
        self.in_features, self.out_features = first.in_features, first.out_features
        self.timestep: float | None = None
        self.views = sorted({(v, b) for v, b in self.plan if b < self.variants[v].scheme.weight_bits})
        if not first.weight.is_meta:
            self._derive_views()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._derive_views())

    def _derive_views(self) -> None:
        for v, bits in self.views:
            weight, scale, _ = self.variants[v].weight_view(bits)
            self.register_buffer(f"view{v}_w{bits}", weight, persistent=False)
            self.register_buffer(f"view{v}_w{bits}_scale", scale, persistent=False)

    def current(self) -> tuple[int, int]:
        return _current(self, self.plan, key=lambda e: e[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, bits = self.current()
        view = None
        if (v, bits) in self.views:
            view = (getattr(self, f"view{v}_w{bits}"), getattr(self, f"view{v}_w{bits}_scale"), bits)
        return self.with_branches(x, self.variants[v](x, view))

    def spec(self) -> dict[str, Any]:
        return {"layer_type": self.layer_type, "boundaries": self.boundaries,
                "plan": [list(e) for e in self.plan], "variants": [v.spec() for v in self.variants]}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype = torch.float32) -> "TimestepSwitchLinear":
        variants = [QuantLinear.from_spec(v, dtype) for v in spec["variants"]]
        return cls(variants, spec["boundaries"], spec["plan"])

    @classmethod
    def attach(cls, model: nn.Module) -> None:
        track_timesteps(model)

    def weight_nbytes(self) -> int:
        views = sum(b.numel() * b.element_size() for n, b in self._buffers.items() if n.startswith("view"))
        return sum(v.weight_nbytes() for v in self.variants) + views

    def effective_weight(self) -> torch.Tensor:
        """The weight of the coarsest plan entry (the worst case the report should show)."""
        v, bits = min(self.plan, key=lambda e: e[1])
        return self.variants[v].effective_weight(bits)

    def format_name(self) -> str:
        bits = "/".join(f"w{b}" if len(self.variants) == 1 else f"v{v}w{b}" for v, b in self.plan)
        return f"{self.variants[0].scheme.name} switch[{bits}]"

    def extra_repr(self) -> str:
        return f"boundaries={self.boundaries}, plan={self.plan}"


@register_layer_type("split_planes")
class SplitPlaneLinear(QuantModule):
    """ViDiT-Q-MP's W8/W4 switching Linear, activations dynamic per token at ``act_bits``.

    Buffers: ``weight_high`` / ``weight_low`` uint8 ``[N, packed_width(K, 4)]`` (the signed 4-bit
    planes, ``q8 = 16 * high + low``), ``weight_scale`` float32 ``[N, 1]`` (of q8), ``view_scale``
    float32 ``[N, 1]`` (of ``high`` alone, the W4 view), ``bias``, optional ``smooth_scale`` /
    ``rotation_signs`` (channel balancing, as in QuantLinear). ``bits[r]`` (4 or 8) is the weight
    width in timestep range ``r``; with no known timestep it runs W8.
    """

    tracks_timestep = True
    _fixed_dtype = ("weight_high", "weight_low", "weight_scale", "view_scale", "smooth_scale", "rotation_signs")
    _weight_buffers = ("weight_high", "weight_low", "weight_scale", "view_scale")

    def __init__(self, in_features: int, out_features: int, boundaries: Sequence[float], bits: Sequence[int], *,
                 act_bits: int = 8, bias: bool = True, smooth: bool = False, rotation_block: int | None = None,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.boundaries = _check_boundaries(boundaries, len(bits))
        if not set(bits) <= {4, 8}:
            raise ValueError(f"SplitPlaneLinear runs 4 or 8 weight bits per range, got {list(bits)}")
        self.bits = [int(b) for b in bits]
        self.in_features, self.out_features, self.act_bits = in_features, out_features, act_bits
        self.rotation_block = rotation_block
        self.timestep: float | None = None
        width = qz.packed_width(in_features, 4)
        for plane in ("weight_high", "weight_low"):
            self.register_buffer(plane, torch.empty(out_features, width, dtype=torch.uint8, device=device))
        for name in ("weight_scale", "view_scale"):
            self.register_buffer(name, torch.empty(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("smooth_scale", torch.empty(in_features, device=device) if smooth else None)
        signs = torch.empty(in_features, dtype=torch.int8, device=device) if rotation_block else None
        self.register_buffer("rotation_signs", signs)

    @classmethod
    def from_weight(cls, linear: nn.Linear, weight: torch.Tensor, boundaries: Sequence[float], bits: Sequence[int],
                    *, act_bits: int = 8, name: str = "", smooth_scale=None, rotation_signs=None,
                    rotation_block=None) -> "SplitPlaneLinear":
        """Quantize ``weight`` (``linear``'s, in the balanced basis the smoothing/rotation define)."""
        high, low, scale, view_scale = qz.split_planes(weight, f"{name or 'linear'}.weight")
        dtype = linear.weight.dtype if linear.weight.is_floating_point() else torch.float32
        mod = cls(linear.in_features, linear.out_features, boundaries, bits, act_bits=act_bits,
                  bias=linear.bias is not None, smooth=smooth_scale is not None, rotation_block=rotation_block,
                  dtype=dtype, device=linear.weight.device)
        mod.layer_name = name
        for buf, value in (("weight_high", qz.pack_bits(high, 4)), ("weight_low", qz.pack_bits(low, 4)),
                           ("weight_scale", scale), ("view_scale", view_scale), ("bias", linear.bias),
                           ("smooth_scale", smooth_scale), ("rotation_signs", rotation_signs)):
            if value is not None:
                getattr(mod, buf).copy_(value.detach())
        return mod

    def spec(self) -> dict[str, Any]:
        return {"layer_type": self.layer_type, "in_features": self.in_features, "out_features": self.out_features,
                "boundaries": self.boundaries, "bits": self.bits, "act_bits": self.act_bits,
                "bias": self.bias is not None, "smooth": self.smooth_scale is not None,
                "rotation_block": self.rotation_block}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype = torch.float32) -> "SplitPlaneLinear":
        return cls(spec["in_features"], spec["out_features"], spec["boundaries"], spec["bits"],
                   act_bits=spec["act_bits"], bias=spec["bias"], smooth=spec["smooth"],
                   rotation_block=spec["rotation_block"], dtype=dtype, device="meta")

    @classmethod
    def attach(cls, model: nn.Module) -> None:
        track_timesteps(model)

    def current(self) -> int:
        return _current(self, self.bits, key=lambda b: b)

    def forward(self, x: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        """``bits`` overrides the timestep's plan (analysis)."""
        x2 = x.reshape(-1, self.in_features)
        try:
            y = kernels.plane_linear(
                x2, high=self.weight_high, low=self.weight_low, scale=self.weight_scale, view_scale=self.view_scale,
                bias=self.bias, bits=bits or self.current(), in_features=self.in_features, act_bits=self.act_bits,
                smooth=self.smooth_scale, rotation_signs=self.rotation_signs, rotation_block=self.rotation_block)
        except qz.NonFiniteError as e:
            raise qz.NonFiniteError(f"layer {self.layer_name or '<unnamed>'}: input {e}") from None
        return self.with_branches(x, y.reshape(*x.shape[:-1], self.out_features))

    def check_state(self) -> None:
        """The format's rules, as for QuantLinear: both scales finite and > 0, smoothing scales finite
        and >= MIN_SMOOTH_SCALE, rotation signs +-1; the high plane in [-7, 7] (never -8: it is the
        W4 view, of the symmetric range)."""
        _require(not qz.holds_full_range_min(self.weight_high, 4, self.in_features),
                 "weight_high holds -8, outside the high plane's range [-7, 7]")
        for name in ("weight_scale", "view_scale"):
            t = getattr(self, name)
            _require((torch.isfinite(t) & (t > 0)).all(), f"{name} must be finite and > 0")
        if self.smooth_scale is not None:
            _require((torch.isfinite(self.smooth_scale) & (self.smooth_scale >= MIN_SMOOTH_SCALE)).all(),
                     f"smooth_scale must be finite and >= {MIN_SMOOTH_SCALE:g}")
        if self.rotation_signs is not None:
            _require((self.rotation_signs.abs() == 1).all(), "rotation_signs must all be +1 or -1")

    def planes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unpacked int8 planes ``(high, low)``."""
        return (qz.unpack_bits(self.weight_high, 4, self.in_features),
                qz.unpack_bits(self.weight_low, 4, self.in_features))

    def balanced_weight(self, bits: int) -> torch.Tensor:
        """The float32 weight of ``bits`` (4: the high plane's view, 8: both planes), balanced basis."""
        high, low = self.planes()
        if bits == 4:
            return high.float() * self.view_scale
        return (16 * high.float() + low.float()) * self.weight_scale

    def effective_weight(self, bits: int | None = None) -> torch.Tensor:
        """In the original input basis; ``bits`` None: the coarsest plan entry (the report's worst case)."""
        w = self.balanced_weight(bits or min(self.bits))
        return input_basis(w, self.smooth_scale, self.rotation_signs, self.rotation_block)

    def format_name(self) -> str:
        return f"int8=2x int4 planes / a{self.act_bits}-token switch[{'/'.join(f'w{b}' for b in self.bits)}]"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, boundaries={self.boundaries}, "
                f"bits={self.bits}, bias={self.bias is not None}")
