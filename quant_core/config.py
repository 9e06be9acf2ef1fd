"""Quantization configuration: plain dataclasses that round-trip through JSON.

``LayerScheme`` says how one Linear is stored and run; ``QuantConfig`` is the user's recipe (method,
default scheme, which layers, per-layer overrides, method options). Presets are registered by the
method modules (``quant_core/methods``), so a preset appears once its method exists.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

WEIGHT_FORMATS = ("int", "fp8")
WEIGHT_GRANULARITIES = ("channel", "group", "tensor")
ACT_MODES = ("dynamic_token", "dynamic_token_group", "static_tensor", "dynamic_token_fp8")


class _DictRoundTrip:
    """to_dict / from_dict for a dataclass, refusing unknown fields (a typo must not pass silently)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class LayerScheme(_DictRoundTrip):
    """Storage and runtime format of one quantized Linear.

    weight_format "int": ``weight_bits`` in 2..8, packed (see quantizers.pack_bits);
    "fp8": float8 e4m3 with a per-channel scale. ``weight_full_range`` (symmetric integer weights of
    fewer than 8 bits): values in [-2^(b-1), 2^(b-1) - 1] instead of ±(2^(b-1) - 1); files of format
    version < 3 have no such field and mean False (serialization.py). ``act_mode`` None means
    weight-only (activations stay in the compute dtype). Group-wise activations use the weight's
    ``group_size`` so an integer GEMM can accumulate each group exactly (Q-DiT).
    """

    weight_bits: int = 8
    weight_format: str = "int"
    weight_granularity: str = "channel"
    group_size: int | None = None
    weight_symmetric: bool = True
    act_bits: int | None = 8
    act_mode: str | None = "dynamic_token"
    weight_full_range: bool = False

    def validate(self, layer: str = "<layer>", in_features: int | None = None) -> "LayerScheme":
        def fail(msg: str):
            raise ValueError(f"layer {layer!r}: {msg}")

        if self.weight_format not in WEIGHT_FORMATS:
            fail(f"weight_format {self.weight_format!r} unsupported; expected one of {WEIGHT_FORMATS}")
        if self.weight_format == "int" and not (isinstance(self.weight_bits, int) and 2 <= self.weight_bits <= 8):
            fail(f"weight_bits={self.weight_bits!r} unsupported; integer weights take 2..8 bits")
        if self.weight_format == "fp8" and self.weight_bits != 8:
            fail(f"fp8 weights are 8-bit, got weight_bits={self.weight_bits}")
        if not isinstance(self.weight_full_range, bool):
            fail(f"weight_full_range={self.weight_full_range!r} must be true or false")
        if self.weight_full_range and not (self.weight_format == "int" and self.weight_symmetric
                                           and self.weight_bits < 8):
            fail("weight_full_range applies to symmetric integer weights of fewer than 8 bits")
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            fail(f"weight_granularity {self.weight_granularity!r} unsupported; expected {WEIGHT_GRANULARITIES}")
        grouped = self.weight_granularity == "group" or self.act_mode == "dynamic_token_group"
        if grouped and not self.group_size:
            fail("group-wise quantization needs group_size")
        if self.group_size and in_features is not None and (in_features % self.group_size):
            fail(f"group_size {self.group_size} does not divide in_features {in_features}")
        if self.act_mode is None:
            if self.act_bits is not None:
                fail("act_bits given but act_mode is None (weight-only)")
        else:
            if self.act_mode not in ACT_MODES:
                fail(f"act_mode {self.act_mode!r} unsupported; expected one of {ACT_MODES} or None")
            if self.act_mode == "dynamic_token_fp8":
                if self.act_bits != 8:
                    fail("fp8 activations are 8-bit")
            elif not (isinstance(self.act_bits, int) and 4 <= self.act_bits <= 8):
                fail(f"act_bits={self.act_bits!r} unsupported; integer activations take 4..8 bits")
        if self.weight_format == "fp8" and self.act_mode not in (None, "dynamic_token_fp8"):
            fail("fp8 weights pair with fp8 activations (act_mode 'dynamic_token_fp8') or weight-only")
        if self.act_mode == "dynamic_token_fp8" and self.weight_format != "fp8":
            fail("fp8 activations need fp8 weights")
        return self

    @property
    def name(self) -> str:
        """Short human-readable format, e.g. ``int4-g64 / a8-token``."""
        w = "fp8" if self.weight_format == "fp8" else f"int{self.weight_bits}"
        w += "-full" if self.weight_full_range else ""
        w += {"channel": "", "tensor": "-tensor", "group": f"-g{self.group_size}"}[self.weight_granularity]
        a = {
            None: "a16",
            "dynamic_token": f"a{self.act_bits}-token",
            "dynamic_token_group": f"a{self.act_bits}-token-g{self.group_size}",
            "static_tensor": f"a{self.act_bits}-static",
            "dynamic_token_fp8": "afp8-token",
        }[self.act_mode]
        return f"{w} / {a}"



@dataclass
class QuantConfig(_DictRoundTrip):
    """A quantization recipe.

    >>> cfg = QuantConfig.preset("rtn-w8a8-dynamic")
    >>> cfg = QuantConfig(method="rtn", weight_bits=4, act_bits=8)
    >>> QuantConfig.from_json(cfg.to_json()) == cfg
    True

    ``include``/``exclude`` are regexes over module names, applied on top of the architecture's
    layer policy; ``layers`` maps a regex to LayerScheme fields overriding the default for matching
    layers (last match wins); ``options`` holds method-specific settings. ``weight_full_range`` None
    (the default) resolves per layer: True for symmetric 4-bit integer weights, where the full range
    measured better at the same bytes (bench/results/int4_range.md), False otherwise.
    """

    method: str = "rtn"
    weight_bits: int = 8
    weight_format: str = "int"
    weight_granularity: str = "channel"
    group_size: int | None = None
    weight_symmetric: bool = True
    act_bits: int | None = 8
    act_mode: str | None = "dynamic_token"
    weight_full_range: bool | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    def __post_init__(self):
        if self.act_bits is None:
            self.act_mode = None
        self.default_scheme().validate("<default>")
        for pattern, fields in self.layers.items():
            re.compile(pattern)
            self._scheme(fields).validate(pattern)

    def _scheme(self, overrides: dict[str, Any]) -> LayerScheme:
        """The default scheme with ``overrides`` applied, then ``weight_full_range`` None resolved (after
        the overrides: a layer overridden to 8 bits gets the narrow range)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(LayerScheme)}
        fields.update(overrides)
        if fields["weight_full_range"] is None:
            fields["weight_full_range"] = (fields["weight_format"] == "int" and fields["weight_bits"] == 4
                                           and fields["weight_symmetric"] is True)
        return LayerScheme(**fields)

    def default_scheme(self) -> LayerScheme:
        return self._scheme({})

    def scheme_for(self, layer: str, in_features: int | None = None) -> LayerScheme:
        fields: dict[str, Any] = {}
        for pattern, override in self.layers.items():
            if re.search(pattern, layer):
                fields.update(override)
        return self._scheme(fields).validate(layer, in_features)

    def selects(self, layer: str) -> bool:
        """Apply include/exclude on top of a policy's choice."""
        if self.include and not any(re.search(p, layer) for p in self.include):
            return False
        return not any(re.search(p, layer) for p in self.exclude)

    # -- JSON --------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        return cls.from_dict(json.loads(text))

    # -- presets -----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, *, small: bool = False, options: dict[str, Any] | None = None) -> "QuantConfig":
        """The preset ``name``; ``small=True`` applies the method's documented small settings (slow
        presets only: fewer optimisation steps / labels, seconds on the built-in models, for tests and
        smoke runs); ``options`` then overrides single method options."""
        from .methods import load_all

        load_all()
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(_PRESETS))}")
        cfg = _PRESETS[name]()
        cfg.name = name
        extra = {**(_SMALL.get(name, {}) if small else {}), **(options or {})}
        if extra:
            cfg = cls.from_dict({**cfg.to_dict(), "options": {**cfg.options, **extra}})
        return cfg

    @classmethod
    def small_settings(cls, name: str) -> dict[str, Any]:
        """The options ``preset(name, small=True)`` sets (empty for presets that are quick already)."""
        cls.preset(name)
        return dict(_SMALL.get(name, {}))

    @classmethod
    def presets(cls, quick_only: bool = False) -> list[str]:
        """Preset names, every one runnable as ``calibrate(pipe, prompts, config=cfg)`` then
        ``quantize(model, cfg, calib)``; ``quick_only`` leaves out those that search their configuration
        or run minutes of optimisation (the demo and the quality bench skip them unless named)."""
        from .methods import load_all

        load_all()
        return sorted(n for n in _PRESETS if not quick_only or n not in _SLOW)


def check_options(config: QuantConfig, known) -> None:
    """Refuse ``config.options`` keys the method does not know (a typo must not pass silently)."""
    unknown = set(config.options) - set(known)
    if unknown:
        raise ValueError(f"{config.method}: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")


_PRESETS: dict[str, Callable[[], QuantConfig]] = {}
_SLOW: set[str] = set()
_SMALL: dict[str, dict[str, Any]] = {}


def register_preset(name: str, make: Callable[[], QuantConfig], *, quick: bool = True,
                    small: dict[str, Any] | None = None) -> None:
    """Called by a method module for each preset it provides; ``quick=False`` marks presets that need
    a search or a long optimisation (see ``QuantConfig.presets``); ``small`` are the options of their
    documented small setting (``QuantConfig.preset(name, small=True)``)."""
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} registered twice")
    _PRESETS[name] = make
    if not quick:
        _SLOW.add(name)
    if small:
        _SMALL[name] = dict(small)
