"""Measuring a quantized pipeline against its full-precision self: byte counts, picture grids and
the side-by-side preset comparison the demo and the benches print."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..quant_core.sampling import sample


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (what it costs in memory)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def file_tensor_bytes(path, layers: set[str]) -> int:
    """Bytes the given layers' tensors occupy in a safetensors file, biases excluded (the weight's
    packed values, scales, zero points, codebooks, smoothing vectors)."""
    from safetensors import safe_open

    prefixes = tuple(f"{layer}." for layer in layers)
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # nested tensors count too (a switching layer holds its variants)
            if key.startswith(prefixes) and not key.endswith(".bias"):
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return total


def image_grid(rows: list[list[torch.Tensor]], labels: list[str], path, min_size: int = 128) -> Path:
    """Save a PNG grid: one row per prompt, one column per label (images ``[1, 3, H, W]``)."""
    from PIL import Image, ImageDraw

    def tile(img):
        arr = (img[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        t = Image.fromarray(arr)
        if t.width < min_size:  # tiny models: enlarge without smoothing so pixels stay visible
            f = -(-min_size // t.width)
            t = t.resize((t.width * f, t.height * f), Image.NEAREST)
        return t

    tiles = [[tile(img) for img in row] for row in rows]
    w, h, pad = tiles[0][0].width, tiles[0][0].height, 16
    sheet = Image.new("RGB", (w * len(labels), pad + h * len(tiles)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, label in enumerate(labels):
        draw.text((j * w + 3, 2), label[: w // 6], fill="black")
    for i, row in enumerate(tiles):
        for j, t in enumerate(row):
            sheet.paste(t, (j * w, pad + i * h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def compare_presets(pipe, call: dict, presets: list[str] | dict, conditions: list, seeds: list[int],
                    calib_conditions: list, *, calib_steps: int | None = None, progress: bool = True):
    """Quantize a copy of ``pipe.transformer`` with each preset and measure it against full precision.
    ``presets``: preset names, or ``{label: QuantConfig}`` to compare variants of one.

    Calibrates once (the union of what the presets' methods need) on ``calib_conditions``; samples every
    (condition, seed) pair. Returns ``(rows, images)``: one dict of figures per preset (weight bytes in
    memory and on disk vs fp16, resident and checkpoint bytes, PSNR/SSIM of images, latent rel-L2,
    weight SQNR, calibration/quantization seconds) and, per preset, the images of the first pair
    (``images["FP"]`` too). ``fp_resident_mb`` is the full-precision transformer's size.
    """
    import copy
    import tempfile
    import time

    from ..quant_core.calibration import SEARCH, calibrate
    from ..quant_core.config import QuantConfig
    from ..quant_core.methods import calibration_needs
    from ..quant_core.metrics import psnr, rel_l2, ssim
    from ..quant_core.quantize import quantize
    from ..quant_core.serialization import WEIGHTS_NAME, save_quantized

    configs = presets if isinstance(presets, dict) else {name: QuantConfig.preset(name) for name in presets}
    pairs = [(c, s) for c in conditions for s in seeds]
    fp = [sample(pipe, c, s, call) for c, s in pairs]
    needs = [n for n in calibration_needs(*configs.values()) if n != SEARCH]  # searches run per config
    calib, calib_s = None, 0.0
    extra = {k: v for k, v in call.items() if k != "num_inference_steps"}
    if needs:
        t0 = time.perf_counter()
        calib = calibrate(pipe, calib_conditions, num_inference_steps=calib_steps or call["num_inference_steps"],
                          needs=needs, progress=progress, **extra)
        calib_s = time.perf_counter() - t0
    fp_transformer = pipe.transformer
    fp_mb = resident_bytes(fp_transformer) / 2**20
    rows, images = [], {"FP": fp[0][1]}
    for name, cfg in configs.items():
        transformer = copy.deepcopy(fp_transformer)
        t0 = time.perf_counter()
        searched = (calibrate(pipe, calib_conditions, config=cfg, needs=(SEARCH,), progress=progress, **extra)
                    if SEARCH in calibration_needs(cfg) else calib)
        report = quantize(transformer, cfg, searched, progress=progress)
        quant_s = time.perf_counter() - t0
        pipe.transformer = transformer
        try:
            outs = [sample(pipe, c, s, call) for c, s in pairs]
        finally:
            pipe.transformer = fp_transformer
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_quantized(transformer, Path(tmp) / "q")
            disk = file_tensor_bytes(folder / WEIGHTS_NAME, {r.name for r in report.layers})
            ckpt = (folder / WEIGHTS_NAME).stat().st_size
        formats = sorted({r.format for r in report.layers})
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        rows.append(dict(
            preset=name, format=", ".join(formats) if len(formats) <= 2 else f"mixed ({len(formats)} formats)",
            weight_ratio_memory=report.ratio, weight_ratio_disk=disk / report.fp16_bytes,
            resident_mb=resident_bytes(transformer) / 2**20, fp_resident_mb=fp_mb, checkpoint_mb=ckpt / 2**20,
            psnr_db=mean([psnr(f[1], o[1]) for f, o in zip(fp, outs)]),
            ssim=mean([ssim(f[1], o[1]) for f, o in zip(fp, outs)]),
            latent_rel_l2=mean([rel_l2(f[0], o[0]) for f, o in zip(fp, outs)]),
            weight_sqnr_db=report.mean_sqnr_db, calibrate_s=calib_s if calibration_needs(cfg) else 0.0,
            quantize_s=quant_s))
        images[name] = outs[0][1]
        del transformer
    return rows, images


def markdown_table(rows: list[dict]) -> str:
    """The rows of :func:`compare_presets` as a markdown table."""
    head = ("| preset | weight format | weight bytes vs fp16 (memory) | on disk | resident MB (FP) "
            "| image PSNR dB | SSIM | latent rel-L2 | weight SQNR dB | calibrate s | quantize s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['format']} | {r['weight_ratio_memory']:.3f}x | "
                     f"{r['weight_ratio_disk']:.3f}x | {r['resident_mb']:.2f} ({r['fp_resident_mb']:.2f}) | "
                     f"{r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['latent_rel_l2']:.4f} | "
                     f"{r['weight_sqnr_db']:.1f} | {r['calibrate_s']:.1f} | {r['quantize_s']:.1f} |")
    return "\n".join(lines)
