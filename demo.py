"""``python -m ditq demo``: quantize a PixArt with every preset and show the cost and the result.

For each preset: quantize a copy of the transformer (calibrating once, for the presets that need
statistics), sample the same prompt and seed, and measure weight bytes (in memory and in the saved
checkpoint) and fidelity to the full-precision image. Writes a side-by-side PNG and a table.
"""
from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from .quant_core.builtin import PIXART_CALL, tiny_pixart_pipeline
from .quant_core.calibration import calibrate
from .quant_core.config import QuantConfig
from .quant_core.methods import get_method
from .quant_core.metrics import psnr, rel_l2, ssim
from .quant_core.prompts import load_prompts
from .quant_core.quantize import quantize
from .quant_core.serialization import WEIGHTS_NAME, save_quantized


def load_pipeline(model: str | None, dtype: torch.dtype = torch.float32):
    """The built-in tiny PixArt (``model`` None) or a diffusers PixArt folder / Hub repo id."""
    if model is None:
        return tiny_pixart_pipeline(), dict(PIXART_CALL)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    return pipe, dict(num_inference_steps=20)


def sample(pipe, prompt: str, seed: int, call: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and decoded images ``[1, 3, H, W]`` in [0, 1] for one prompt and seed."""
    gen = torch.Generator("cpu").manual_seed(seed)
    latents = pipe(prompt, generator=gen, output_type="latent", **call).images
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return latents.float(), pipe.image_processor.postprocess(decoded, output_type="pt").float()


def side_by_side(images: list[torch.Tensor], labels: list[str], path: Path, min_size: int = 160) -> None:
    from PIL import Image, ImageDraw

    tiles = []
    for img in images:
        arr = (img[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        tile = Image.fromarray(arr)
        if tile.width < min_size:  # tiny models: enlarge without smoothing so pixels stay visible
            factor = -(-min_size // tile.width)
            tile = tile.resize((tile.width * factor, tile.height * factor), Image.NEAREST)
        tiles.append(tile)
    w, h, pad = tiles[0].width, tiles[0].height, 18
    sheet = Image.new("RGB", (w * len(tiles), h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        sheet.paste(tile, (i * w, pad))
        draw.text((i * w + 3, 3), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def markdown_table(rows: list[dict]) -> str:
    head = ("| preset | weight format | weight bytes vs fp16 (memory) | on disk | checkpoint MB "
            "| image PSNR dB | SSIM | latent rel-L2 | quantize s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['format']} | {r['weight_ratio_memory']:.3f}x | "
                     f"{r['weight_ratio_disk']:.3f}x | {r['checkpoint_mb']:.2f} | {r['psnr_db']:.2f} | "
                     f"{r['ssim']:.4f} | {r['latent_rel_l2']:.4f} | {r['quantize_s']:.1f} |")
    return "\n".join(lines)


def run_demo(model: str | None = None, presets: list[str] | None = None, out: str = "demo_out",
             prompt: str | None = None, seed: int = 0, calib_prompts: int = 4, progress: bool = True) -> list[dict]:
    pipe, call = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    prompt = prompt or load_prompts("evaluation")[0]
    presets = presets or QuantConfig.presets()
    configs = {name: QuantConfig.preset(name) for name in presets}
    needs = sorted({s for cfg in configs.values() for s in get_method(cfg.method).needs(cfg)})
    fp_latents, fp_image = sample(pipe, prompt, seed, call)
    calib = None
    if needs:
        steps = call.get("num_inference_steps", 20)
        extra = {k: v for k, v in call.items() if k != "num_inference_steps"}
        calib = calibrate(pipe, load_prompts("calibration")[:calib_prompts], num_inference_steps=steps,
                          seed=seed, needs=needs, progress=progress, **extra)
    fp_transformer = pipe.transformer
    rows, images = [], [fp_image]
    for name, cfg in configs.items():
        transformer = copy.deepcopy(fp_transformer)
        t0 = time.perf_counter()
        report = quantize(transformer, cfg, calib, progress=progress)
        elapsed = time.perf_counter() - t0
        pipe.transformer = transformer
        try:
            latents, image = sample(pipe, prompt, seed, call)
        finally:
            pipe.transformer = fp_transformer
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_quantized(transformer, Path(tmp) / name)
            disk = quantized_tensor_bytes(folder / WEIGHTS_NAME, {r.name for r in report.layers})
            ckpt_mb = (folder / WEIGHTS_NAME).stat().st_size / 2**20
        formats = sorted({r.format for r in report.layers})
        rows.append(dict(preset=name, format=", ".join(formats) if len(formats) <= 2 else "mixed",
                         weight_ratio_memory=report.ratio, weight_ratio_disk=disk / report.fp16_bytes,
                         checkpoint_mb=ckpt_mb, psnr_db=psnr(fp_image, image), ssim=ssim(fp_image, image),
                         latent_rel_l2=rel_l2(fp_latents, latents), quantize_s=elapsed))
        images.append(image)
        del transformer
    out_dir = Path(out)
    side_by_side(images, ["FP"] + list(configs), out_dir / "side_by_side.png")
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


def quantized_tensor_bytes(path: Path, layers: set[str]) -> int:
    """Bytes of the quantized layers' weight tensors (values, scales, zero points, codebooks) as
    stored in the safetensors file; biases and the file header are not weight bytes."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            layer, _, buf = key.rpartition(".")
            if layer in layers and buf != "bias":
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return total
