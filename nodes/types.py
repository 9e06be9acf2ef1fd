"""Custom socket types shared by the nodes."""
from __future__ import annotations

from comfy_api.latest import io

# A ditq.CalibrationData (statistics per layer and denoising step).
Calibration = io.Custom("DITQ_CALIBRATION")
