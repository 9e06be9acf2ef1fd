"""ditq: post-training quantization for diffusion transformers (PixArt-α/Σ, DiT, video DiTs).

One folder, two faces: ``import ditq`` is the Python package, and the same folder dropped into
ComfyUI's ``custom_nodes/`` is a node pack (``comfy_entrypoint``). Importing it is cheap: the public
API below loads on first use, and nothing here imports ComfyUI.

>>> from ditq import QuantConfig, calibrate, quantize, save_quantized, load_quantized
>>> calib = calibrate(pipe, prompts, num_inference_steps=20, seed=0)
>>> report = quantize(pipe.transformer, QuantConfig.preset("rtn-w8a8-dynamic"), calib)
>>> save_quantized(pipe.transformer, "pixart-w8a8")
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "QuantConfig": "quant_core.config",
    "LayerScheme": "quant_core.config",
    "calibrate": "quant_core.calibration",
    "CalibrationData": "quant_core.calibration",
    "quantize": "quant_core.quantize",
    "QuantReport": "quant_core.quantize",
    "save_quantized": "quant_core.serialization",
    "load_quantized": "quant_core.serialization",
    "CheckpointError": "quant_core.serialization",
    "QuantLinear": "quant_core.layers",
    "NonFiniteError": "quant_core.quantizers",
    "lora_config": "quant_core.peft_lora",
    "register_lora_layers": "quant_core.peft_lora",
    "QuantizedPixArtPipeline": "pipelines.pipeline",
    "QuantizedDiTPipeline": "pipelines.pipeline",
    "QuantizedPipeline": "pipelines.pipeline",
}

__all__ = sorted(_LAZY)

# diffusers finds the "ditq" quantizer backend once diffusers is imported (pipelines/registration.py):
# this installs a one-shot import hook and imports nothing heavy. Only the package imported as `ditq`
# registers: a second copy of this folder under another name (pytest sets the checkout up as a
# package named after its folder; ComfyUI imports custom_nodes/<folder>) would otherwise claim the
# backend key with its own classes, and models it loads would fail `ditq` isinstance checks.
if __name__ == "ditq":
    importlib.import_module(".pipelines.registration", __name__).install()


async def comfy_entrypoint():
    """ComfyUI's V3 entry: the node pack (imports ComfyUI's API only here, inside ComfyUI).
    No NODE_CLASS_MAPPINGS in this module: ComfyUI would then load it as V1 and skip this."""
    from .nodes import make_extension

    return make_extension()


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
