"""What the nodes share: their menu category and custom socket types."""
from __future__ import annotations

from comfy_api.latest import io

CATEGORY = "ditq"

# A ditq.CalibrationData (statistics per layer and denoising step).
Calibration = io.Custom("DITQ_CALIBRATION")
