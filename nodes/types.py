"""What the nodes share: their menu category and custom socket types."""
from __future__ import annotations

from comfy_api.latest import io

CATEGORY = "ditq"

# A ditq.CalibrationData (statistics per layer and denoising step).
Calibration = io.Custom("DITQ_CALIBRATION")


def node_presets() -> list[str]:
    """The presets the nodes can run: all but those whose method searches its configuration by
    sampling a diffusers pipeline (Qua²SeDiMo), which ComfyUI's sampler cannot drive; quantize those
    in Python (``ditq.calibrate(..., config=cfg)``) and load the file with Load Quantized DiT."""
    from ..quant_core.calibration import SEARCH
    from ..quant_core.config import QuantConfig
    from ..quant_core.methods import calibration_needs

    return [p for p in QuantConfig.presets() if SEARCH not in calibration_needs(QuantConfig.preset(p))]
