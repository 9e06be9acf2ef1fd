"""Round-to-nearest: the naive PTQ baseline every paper compares against.

Weights: per-output-channel (or group / tensor) min-max RTN. Activations: either static per-tensor
with the scale from calibration (the max over all timesteps and channels, the baseline that breaks
on DiTs because timesteps and channels differ by orders of magnitude), or dynamic per token.
"""
from __future__ import annotations

from ..config import QuantConfig, register_preset
from ..layers import QuantLinear
from ..quantizers import int_range
from . import register_method


@register_method("rtn")
class RTN:
    def needs(self, config: QuantConfig) -> tuple[str, ...]:
        uses_static = config.act_mode == "static_tensor" or any(
            o.get("act_mode") == "static_tensor" for o in config.layers.values())
        return ("act_absmax",) if uses_static else ()

    def apply(self, ctx) -> None:
        for name, info in ctx.iter_layers("rtn"):
            scheme = ctx.config.scheme_for(name, info.in_features)
            input_scale = None
            if scheme.act_mode == "static_tensor":
                absmax = ctx.calibration.get(name, "act_absmax").max()
                input_scale = absmax / int_range(scheme.act_bits, True)[1]
            ctx.replace(name, QuantLinear.from_linear(ctx.linear(name), scheme, name=name, input_scale=input_scale))


register_preset("rtn-w8a8", lambda: QuantConfig(method="rtn", weight_bits=8, act_bits=8, act_mode="static_tensor"))
register_preset("rtn-w8a8-dynamic", lambda: QuantConfig(method="rtn", weight_bits=8, act_bits=8))
register_preset("rtn-w4a8", lambda: QuantConfig(method="rtn", weight_bits=4, act_bits=8))
register_preset("rtn-w4a16", lambda: QuantConfig(method="rtn", weight_bits=4, act_bits=None))
register_preset("rtn-fp8", lambda: QuantConfig(method="rtn", weight_bits=8, weight_format="fp8", act_bits=8,
                                               act_mode="dynamic_token_fp8"))
# Low-bit weight-only baselines the VQ and mixed-precision methods are measured against.
register_preset("rtn-w3a16", lambda: QuantConfig(method="rtn", weight_bits=3, act_bits=None))
register_preset("rtn-w2a16", lambda: QuantConfig(method="rtn", weight_bits=2, act_bits=None))
