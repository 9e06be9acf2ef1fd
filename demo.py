"""``python -m ditq demo``: quantize a PixArt with every preset and show the cost and the result.

For each preset: quantize a copy of the transformer (calibrating once, for the presets that need
statistics), sample the same prompt and seed, and measure weight bytes (in memory and in the saved
checkpoint) and fidelity to the full-precision image. Writes a side-by-side PNG and a table.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .evaluation.builtin import PIXART_CALL, tiny_pixart_pipeline
from .quant_core.config import QuantConfig
from .evaluation.compare import compare_presets, image_grid, markdown_table
from .evaluation.prompts import load_prompts


def load_pipeline(model: str | None, dtype: torch.dtype = torch.float32):
    """The built-in tiny PixArt (``model`` None) or a diffusers PixArt folder / Hub repo id."""
    if model is None:
        return tiny_pixart_pipeline(), dict(PIXART_CALL)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    return pipe, dict(num_inference_steps=20)


def run_demo(model: str | None = None, presets: list[str] | None = None, out: str = "demo_out",
             prompt: str | None = None, seed: int = 0, calib_prompts: int = 4, progress: bool = True) -> list[dict]:
    pipe, call = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    prompt = prompt or load_prompts("evaluation")[0]
    presets = presets or QuantConfig.presets(quick_only=True)
    rows, images = compare_presets(pipe, call, presets, [prompt], [seed],
                                   load_prompts("calibration")[:calib_prompts], progress=progress)
    out_dir = Path(out)
    image_grid([list(images.values())], list(images), out_dir / "side_by_side.png")
    table = markdown_table(rows)
    header = (f"model: {model or 'built-in tiny PixArt'}; prompt: {prompt!r}; seed {seed}; "
              f"{call.get('num_inference_steps')} steps")
    (out_dir / "results.md").write_text(f"{header}\n\n{table}\n")
    (out_dir / "results.json").write_text(json.dumps({"model": model, "prompt": prompt, "seed": seed,
                                                      "rows": rows}, indent=2))
    print(header)
    print(table)
    print(f"side-by-side image: {out_dir / 'side_by_side.png'}")
    return rows
