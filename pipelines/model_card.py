"""The model card (README.md) of a saved ditq pipeline: Hub metadata plus the recipe and the
measured figures. Sizes are computed from the model and the files just written; fidelity is what
``quantize`` measured against full precision, or "not measured"."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..quant_core.serialization import quantized_layers


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def size_figures(transformer, folder: Path) -> dict[str, Any]:
    """Quantized Linear weights vs the same weights in fp16, and the transformer file vs the whole
    transformer in fp16 (quantized layers counted at their original shape)."""
    layers = quantized_layers(transformer)
    quant = sum(m.weight_nbytes() for m in layers.values())
    fp16 = sum(2 * m.in_features * m.out_features for m in layers.values())
    prefixes = tuple(f"{name}." for name in layers)
    rest = sum(2 * t.numel() for k, t in transformer.state_dict().items() if not k.startswith(prefixes))
    biases = sum(2 * m.out_features for m in layers.values() if getattr(m, "bias", None) is not None)
    files = sorted((folder / "transformer").glob("*.safetensors"))
    file_bytes = sum(f.stat().st_size for f in files)
    whole_fp16 = fp16 + biases + rest
    return {"quantized_layers": len(layers), "linear_weight_bytes": quant, "linear_weight_bytes_fp16": fp16,
            "linear_weight_ratio": round(quant / fp16, 4), "transformer_file_bytes": file_bytes,
            "transformer_bytes_fp16": whole_fp16, "transformer_file_ratio": round(file_bytes / whole_fp16, 4)}


def bits_tags(qcfg: dict) -> list[str]:
    """``w8a8``-style tags, one per weight/activation width combination in the checkpoint."""
    combos = set()
    for spec in qcfg.get("layers", {}).values():
        s = spec.get("scheme")
        if s:
            w = "fp8" if s["weight_format"] == "fp8" else f"w{s['weight_bits']}"
            combos.add(f"{w}a{s['act_bits'] or 16}" if w != "fp8" else f"fp8-{'a8' if s['act_bits'] else 'a16'}")
    return sorted(combos)


# The family loader named in a card's usage snippet; other pipelines load through QuantizedPipeline.
_DOORS = (("PixArt", "QuantizedPixArtPipeline"), ("DiTPipeline", "QuantizedDiTPipeline"))


def build(transformer, qcfg: dict, folder: Path, *, base_model: str | None, pipeline_tag: str,
          tags: tuple[str, ...], pipeline_class: str, transformer_only: bool) -> ModelCard:
    recipe = qcfg.get("recipe") or {}
    method = qcfg.get("method") or "unknown"
    bits = bits_tags(qcfg)
    sizes = size_figures(transformer, folder)
    fidelity = qcfg.get("fidelity")
    data = ModelCardData(
        base_model=base_model, base_model_relation="quantized" if base_model else None,
        library_name="diffusers", pipeline_tag=pipeline_tag,
        tags=["ditq", "quantized", *tags, method, *bits],
        ditq={"method": method, "preset": recipe.get("name"), "bits": bits,
              "format_version": qcfg.get("format_version"), "sizes": sizes,
              "fidelity": fidelity or "not measured"})
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(qcfg, sizes, fidelity, base_model, pipeline_class, transformer_only, bits, type(transformer).__name__)}")


def _body(qcfg, sizes, fidelity, base_model, pipeline_class, transformer_only, bits, transformer_class) -> str:
    recipe = qcfg.get("recipe") or {}
    door = next((d for family, d in _DOORS if family in pipeline_class), "QuantizedPipeline")
    base = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a full-precision model"
    lines = [
        f"# {pipeline_class} quantized with ditq ({', '.join(bits) or 'custom'})", "",
        f"The transformer of {base}, quantized after training with [ditq](https://github.com/ditq/ditq): "
        f"method `{qcfg.get('method')}`" + (f", preset `{recipe['name']}`" if recipe.get("name") else "") + ". "
        "Quantized layers hold packed integer (or fp8) weights and their scales; no full-precision copy.", "",
    ]
    if transformer_only:
        lines += ["This repo holds only the quantized transformer; the text encoder, VAE, tokenizer and "
                  f"scheduler come from `{base_model}` (see `ditq_base_model.json`).", ""]
    lines += [
        "## Use", "", "```python", "import torch",
        f"from ditq import {door}",
        f'pipe = {door}.from_pretrained("<this repo>", torch_dtype=torch.float16)', "```", "",
        "Or, with `import ditq` done first, the stock diffusers loaders "
        f"(`{transformer_class}.from_pretrained(repo, subfolder=\"transformer\")`, and for full repos "
        f"`{pipeline_class}.from_pretrained(repo)`).", "",
        "## Measured", "",
        "| figure | value |", "|---|---|",
        f"| quantized Linear layers | {sizes['quantized_layers']} |",
        f"| their weights (packed + scales) | {_fmt_bytes(sizes['linear_weight_bytes'])} vs "
        f"{_fmt_bytes(sizes['linear_weight_bytes_fp16'])} fp16 ({sizes['linear_weight_ratio']:.3f}x) |",
        f"| transformer file | {_fmt_bytes(sizes['transformer_file_bytes'])} vs "
        f"{_fmt_bytes(sizes['transformer_bytes_fp16'])} in fp16 ({sizes['transformer_file_ratio']:.3f}x) |",
    ]
    if fidelity:
        lines.append(f"| image fidelity to full precision | PSNR {fidelity['psnr_db']} dB, SSIM {fidelity['ssim']} "
                     f"({len(fidelity['prompts'])} prompt(s), seed {fidelity['seed']}) |")
    else:
        lines.append("| image fidelity to full precision | not measured |")
    lines += ["", "## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)

