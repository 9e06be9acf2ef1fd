"""Quantize DiT (ditq): method preset and bits (+ calibration) -> a new, quantized MODEL."""
from __future__ import annotations

from comfy_api.latest import io

from ..quant_core.config import QuantConfig
from ..quant_core.methods import calibration_needs
from . import comfy_adapter as ad
from .types import CATEGORY, Calibration, node_presets

BITS = ["preset", "8", "6", "4", "3", "2"]


def build_config(preset: str, weight_bits: str) -> QuantConfig:
    cfg = QuantConfig.preset(preset)
    if weight_bits == "preset":
        return cfg
    fields = dict(cfg.to_dict(), weight_bits=int(weight_bits), name=f"{preset} (w{weight_bits})")
    if cfg.weight_format == "fp8":
        raise ValueError(f"preset {preset!r} stores fp8 weights; weight_bits must be 'preset'")
    return QuantConfig.from_dict(fields)


class QuantizeDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        presets = node_presets()
        return io.Schema(
            node_id="DitqQuantizeDiT",
            display_name="Quantize DiT (ditq)",
            category=CATEGORY,
            description="Quantizes the DiT's transformer-block Linear layers with a ditq method. The input "
                        "model is left untouched; the output is a new model holding packed integers.",
            inputs=[
                io.Model.Input("model", tooltip="The full-precision DiT (not already quantized, no LoRA "
                                                "yet: apply LoRAs after this node)."),
                io.Combo.Input("preset", options=presets,
                               default="rtn-w8a8-dynamic" if "rtn-w8a8-dynamic" in presets else presets[0],
                               tooltip="Method and format, e.g. rtn-w8a8-dynamic (no calibration), "
                                       "rtn-w8a8 (static activations, needs calibration)."),
                io.Combo.Input("weight_bits", options=BITS, default="preset",
                               tooltip="Override the preset's weight bits ('preset' keeps them)."),
                Calibration.Input("calibration", optional=True,
                                  tooltip="From Calibrate DiT (ditq); required by methods that use "
                                          "activation statistics."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, preset, weight_bits, calibration=None) -> io.NodeOutput:
        cfg = build_config(preset, weight_bits)
        needs = calibration_needs(cfg)
        if needs and calibration is None:
            raise ValueError(f"Quantize DiT (ditq): preset {preset!r} needs calibration {list(needs)}: connect "
                             f"Calibrate DiT (ditq) (with preset {preset!r}) to the calibration input")
        lacking = calibration.missing(needs, cfg.method) if calibration is not None else []
        if lacking:
            raise ValueError(f"Quantize DiT (ditq): the calibration input lacks {lacking}, which preset "
                             f"{preset!r} needs: set preset to {preset!r} in Calibrate DiT (ditq) and run it again")
        if cfg.method == "vq4dit":  # Cancel keeps the optimisation's progress: queueing it again resumes
            cfg.options["work_dir"] = ad.work_dir()
        progress = ad.core_progress()
        try:
            patcher, report = ad.quantize_patcher(model, cfg, calibration, on_progress=progress)
        except ad.ComfyAdapterError:
            raise
        except (ValueError, KeyError) as e:
            raise ValueError(f"Quantize DiT (ditq) with preset {preset!r}, weight_bits {weight_bits!r}: "
                             f"{e.args[0] if e.args else e}. Change the preset or weight_bits input, or "
                             f"re-run Calibrate DiT (ditq) with this preset") from e
        progress("done", len(report.layers), len(report.layers))
        text = f"{report}\n{ad.quant_summary(patcher)} (input {model.model_size()} B)"
        return io.NodeOutput(patcher, text, ui={"text": [text]})
