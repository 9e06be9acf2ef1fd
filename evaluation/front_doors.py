"""Every preset through every front door: the Python API's three verbs, the command line and the
diffusers pipeline class, each door's quantized transformer measured against the full-precision
pipeline (SQNR in dB of the final latents for a fixed prompt and seed). Shared by
``tests/test_front_doors.py`` (floors per preset) and ``bench/front_doors.py`` (the table).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..quant_core.metrics import sqnr
from ..quant_core.sampling import sample, takes_prompts


def final_latents(pipe, transformer: nn.Module, condition, call: dict, seed: int = 0) -> torch.Tensor:
    """``pipe``'s final latents for one prompt (or class label) with ``transformer`` in place."""
    original = pipe.transformer
    pipe.transformer = transformer
    try:
        with torch.no_grad():
            return sample(pipe, condition, seed, call)[0]
    finally:
        pipe.transformer = original


def fidelity_db(pipe, transformer: nn.Module, condition, call: dict, seed: int = 0) -> float:
    """SQNR (dB) of the final latents with ``transformer`` against ``pipe``'s own (FP) transformer."""
    reference = final_latents(pipe, pipe.transformer, condition, call, seed)
    return sqnr(reference, final_latents(pipe, transformer, condition, call, seed))


def through_api(pipe, config, prompts: list, call: dict, *, calib_steps: int, workdir=None) -> nn.Module:
    """The README's three verbs on a copy of ``pipe.transformer``: ``calibrate(pipe, prompts,
    config=cfg)`` then ``quantize(model, cfg, calib)``."""
    from ..quant_core.calibration import calibrate
    from ..quant_core.quantize import quantize

    extra = {k: v for k, v in call.items() if k != "num_inference_steps"} if takes_prompts(pipe) else {}
    calib = calibrate(pipe, prompts, num_inference_steps=calib_steps, config=config, progress=False,
                      workdir=workdir, **extra)
    model = copy.deepcopy(pipe.transformer)
    quantize(model, config, calib, progress=False)
    return model


def through_cli(preset: str, out: Path, *, calib_prompts: int, steps: int, small: bool = True,
                workdir=None, model=None, labels: list[int] | None = None) -> nn.Module:
    """``ditq quantize --preset P`` (in process) on the built-in PixArt or the diffusers folder
    ``model`` (a DiT calibrated on ``labels``), loaded back from its output."""
    from ..cli import main
    from ..quant_core.serialization import load_quantized

    args = ["quantize", "--preset", preset, "--out", str(out), "--calib-prompts", str(calib_prompts),
            "--steps", str(steps), "--workdir", str(workdir or Path(out).with_suffix(".work"))]
    args += ["--model", str(model)] if model else []
    args += ["--calib-labels", *map(str, labels)] if labels else []
    if main(args + (["--small"] if small else [])) != 0:
        raise RuntimeError(f"ditq {' '.join(args)} failed")
    return load_quantized(out)


def through_diffusers(fp_dir, config, prompts: list, call: dict) -> nn.Module:
    """``QuantizedPixArtPipeline.from_pretrained(fp_dir, quantization_config=cfg, calibration_prompts=...)``
    (``QuantizedDiTPipeline`` for a class-conditional folder); returns its transformer."""
    from ..pipelines.pipeline import QuantizedDiTPipeline, QuantizedPixArtPipeline

    cls = QuantizedDiTPipeline if all(isinstance(p, int) for p in prompts) else QuantizedPixArtPipeline
    pipe = cls.from_pretrained(fp_dir, quantization_config=config, calibration_prompts=prompts,
                               fidelity_prompts=0, calibration_kwargs=dict(call, progress=False))
    return pipe.transformer
