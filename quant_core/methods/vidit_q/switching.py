"""Per-timestep switching of a layer's quantized form (ViDiT-Q §4.3 mixed precision, and the
timestep-aware channel balancing of its earlier version).

A :class:`TimestepSwitchLinear` holds one or more :class:`QuantLinear` variants and a plan: for each
timestep range, which variant runs and at how many weight bits (fewer bits than stored = a derived
view of the stored integers, see ``QuantLinear.weight_view``, so W8/W4 switching stores W8 once).
Everything it holds is counted in ``weight_nbytes``.

The current timestep comes from a forward pre-hook on the model root (:func:`track_timesteps`) that
writes it onto every module with ``tracks_timestep = True`` before each denoising step. The hook
walks the model on each call rather than capturing a layer list, so a deep copy of the model stays
self-contained; loading installs it through ``QuantModule.attach``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ...calibration import call_timestep
from ...layers import QuantLinear, QuantModule, register_layer_type


def range_index(timestep: float, boundaries: Sequence[float]) -> int:
    """Range of ``timestep`` for descending ``boundaries`` ``b0 > b1 > ...``: range 0 is
    ``t >= b0`` (the noisiest steps), range ``len(boundaries)`` is ``t < b_last``."""
    return sum(timestep < b for b in boundaries)


def timestep_boundaries(timesteps: torch.Tensor, ranges: int) -> list[float]:
    """Split the calibration run's steps into ``ranges`` runs of (nearly) equal step counts and return
    the timestep values between them, descending (midpoints, so nearby samplers fall alike). A run of
    fewer steps than ``ranges`` gets one range per step: statistics only exist per recorded step."""
    t = sorted((float(v) for v in timesteps), reverse=True)
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


@register_layer_type("timestep_switch")
class TimestepSwitchLinear(QuantModule):
    """Runs ``variants[v]`` at ``bits`` weight bits where ``plan[r] = (v, bits)`` for timestep range
    ``r`` (see :func:`range_index`). Called with no known timestep (outside a hooked model), it runs
    the plan entry with the most weight bits, the most accurate one."""

    tracks_timestep = True

    def __init__(self, variants: Sequence[QuantLinear], boundaries: Sequence[float],
                 plan: Sequence[Sequence[int]]):
        super().__init__()
        if len(plan) != len(boundaries) + 1:
            raise ValueError(f"plan has {len(plan)} entries for {len(boundaries) + 1} timestep ranges")
        if list(boundaries) != sorted(boundaries, reverse=True):
            raise ValueError(f"timestep boundaries must descend, got {list(boundaries)}")
        self.variants = nn.ModuleList(variants)
        self.boundaries = [float(b) for b in boundaries]
        self.plan = [(int(v), int(b)) for v, b in plan]
        for v, bits in self.plan:
            if not 0 <= v < len(self.variants):
                raise ValueError(f"plan names variant {v}, but there are {len(self.variants)}")
            if bits > self.variants[v].scheme.weight_bits:
                raise ValueError(f"plan asks {bits} bits of a {self.variants[v].scheme.weight_bits}-bit variant")
        first = self.variants[0]
        self.in_features, self.out_features = first.in_features, first.out_features
        self.timestep: float | None = None

    def current(self) -> tuple[int, int]:
        if self.timestep is None:
            return max(self.plan, key=lambda e: e[1])
        return self.plan[range_index(self.timestep, self.boundaries)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, bits = self.current()
        return self.with_branches(x, self.variants[v](x, weight_bits=bits))

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
        return sum(v.weight_nbytes() for v in self.variants)

    def effective_weight(self) -> torch.Tensor:
        """The weight of the coarsest plan entry (the worst case the report should show)."""
        v, bits = min(self.plan, key=lambda e: e[1])
        return self.variants[v].effective_weight(bits)

    def format_name(self) -> str:
        bits = "/".join(f"w{b}" if len(self.variants) == 1 else f"v{v}w{b}" for v, b in self.plan)
        return f"{self.variants[0].scheme.name} switch[{bits}]"

    def extra_repr(self) -> str:
        return f"boundaries={self.boundaries}, plan={self.plan}"
