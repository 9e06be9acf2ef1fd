"""The shared quant core: config, quantizers, layers, calibration, methods, models, serialization,
metrics. Everything that is neither a ComfyUI node nor a kernel."""
