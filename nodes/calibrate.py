"""Calibrate DiT (ditq): sample once with ComfyUI's sampler and record what quantization needs."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..quant_core.calibration import CalibrationData
from ..quant_core.config import QuantConfig
from ..quant_core.methods import calibration_needs
from ..quant_core.models import select_layers
from . import comfy_adapter as ad
from .types import CATEGORY, Calibration, node_presets

RUN = "(run calibration)"


def needs_for(preset: str) -> tuple[str, ...]:
    """The statistics ``preset``'s method needs, plus per-channel maxima for the heat map."""
    cfg = QuantConfig.preset(preset)
    return tuple(dict.fromkeys(("act_absmax", *calibration_needs(cfg))))


def heat_map(calib: CalibrationData, cell: int = 8) -> torch.Tensor:
    """IMAGE ``[1, H, W, 3]``: rows = layers, columns = denoising steps, colour = log10 of the
    largest input |activation| (blue small, red large); where static ranges would break."""
    rows = [calib.get(layer, "act_absmax").amax(dim=1) for layer in calib.layers]
    v = torch.stack(rows).clamp_min(1e-6).log10()
    v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-6)
    rgb = torch.stack([v, 1 - (2 * v - 1).abs(), 1 - v], dim=-1)
    return rgb.repeat_interleave(cell, 0).repeat_interleave(cell, 1).unsqueeze(0).float()


class CalibrateDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        presets = node_presets()
        return io.Schema(
            node_id="DitqCalibrateDiT",
            display_name="Calibrate DiT (ditq)",
            category=CATEGORY,
            description="Runs the full-precision model once through ComfyUI's sampler and records the "
                        "per-layer, per-step activation statistics that quantization methods need.",
            inputs=[
                io.Model.Input("model", tooltip="The full-precision DiT to calibrate (e.g. PixArt from "
                                                "Load Diffusion Model)."),
                io.Conditioning.Input("positive", tooltip="Prompts typical of your use: calibration "
                                                          "sees the activations they cause."),
                io.Conditioning.Input("negative", tooltip="Negative / unconditional prompt, as you "
                                                          "sample with it (CFG)."),
                io.Latent.Input("latent_image", tooltip="Latent of the resolution you will generate "
                                                        "at (Empty Latent Image)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; calibration is deterministic for a seed."),
                io.Int.Input("steps", default=20, min=1, max=1000,
                             tooltip="Sampling steps; statistics are kept per step."),
                io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale, as you sample."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="Sampler, as you sample."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="Scheduler, as you sample."),
                io.Combo.Input("preset", options=presets,
                               default="rtn-w8a8" if "rtn-w8a8" in presets else presets[0],
                               tooltip="The preset you will quantize with: decides what is recorded "
                                       "(input samples for GPTQ-based methods, every model call's inputs "
                                       "for vq4dit)."),
                io.Combo.Input("load_calibration", options=[RUN, *ad.folder_files(ad.CALIB_FOLDER)],
                               default=RUN, tooltip="Reuse a calibration saved earlier in "
                                                    "models/ditq/calibration instead of sampling."),
                io.String.Input("save_as", default="",
                                tooltip="If set, save the calibration as models/ditq/calibration/"
                                        "<name>.safetensors to reuse it later."),
            ],
            outputs=[Calibration.Output(display_name="calibration"),
                     io.Image.Output(display_name="activation_heat_map")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                preset, load_calibration, save_as) -> io.NodeOutput:
        needs = needs_for(preset)
        if load_calibration != RUN:
            calib = CalibrationData.load(ad.full_path(ad.CALIB_FOLDER, load_calibration))
            missing = [n for n in select_layers(ad.diffusion_model(model)) if n not in calib.stats]
            lacking = calib.missing(needs)
            if missing or lacking:
                raise ValueError(f"Calibrate DiT (ditq): load_calibration {load_calibration!r} does not fit: "
                                 f"{'no layer ' + repr(missing[0]) if missing else 'it lacks ' + repr(lacking)}; "
                                 f"set load_calibration to {RUN!r} (preset {preset!r}) to calibrate this model")
        else:
            progress = ad.progress_callback(steps)
            calib = ad.calibrate_patcher(model, positive=positive, negative=negative, latent=latent_image,
                                         seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                                         scheduler=scheduler, needs=needs,
                                         on_progress=progress)
        if save_as:
            calib.save(ad.output_path(ad.CALIB_FOLDER, save_as))
        return io.NodeOutput(calib, heat_map(calib))
