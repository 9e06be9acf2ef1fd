"""Quantization methods, one package (or module) each, registered by name. A method is a pass:
``apply(ctx)`` walks ``ctx.layers``, decides each layer's quantized form from ``ctx.model``,
``ctx.config`` and ``ctx.calibration``, and installs it with ``ctx.replace``.

Method packages register themselves (and their presets) at import; ``load_all`` imports every
module and package here, so adding a method means adding a package. Adapters (nodes, pipelines, CLI,
evaluation) ask :func:`calibration_needs` what to record and then call ``quantize``.
"""
from __future__ import annotations

import importlib
import pkgutil

_METHODS: dict[str, type] = {}
_loaded = False


def register_method(name: str):
    def deco(cls):
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str):
    load_all()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]()


def calibration_needs(*configs) -> tuple[str, ...]:
    """What ``calibrate`` must record for these configs (statistic names and/or ``model_inputs``), in
    order, without repeats; empty when every config's method quantizes from the weights alone."""
    return tuple(dict.fromkeys(need for config in configs for need in get_method(config.method).needs(config)))
