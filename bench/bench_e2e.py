"""End-to-end PixArt-XL transformer latency and peak memory: bf16 against ditq's quantized formats.

    python bench/bench_e2e.py [--px 512 1024] [--formats bf16 w8a8 w4a8 fp8] [--out bench/results/e2e_h100.md]

One denoiser forward of the full-size PixArt-XL/2 transformer (28 blocks, width 1152, random
weights: speed and memory do not depend on the values) at batch 2 (classifier-free guidance), eager
and ``torch.compile``d, for each format (RTN, dynamic per-token activations; the layer choice is
ditq's PixArt policy). Reports the median of ``--iters`` timed forwards after warm-up, the peak
allocated memory and the transformer's resident size. Needs a CUDA GPU; exits with a message
otherwise. ``--config tiny`` swaps in a small transformer to check the script itself.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import header  # noqa: E402

# PixArt-XL/2 (PixArt-α / Σ transformer), without the α-1024 size conditioning
PIXART_XL = dict(num_layers=28, attention_head_dim=72, num_attention_heads=16, caption_channels=4096,
                 cross_attention_dim=1152)
TINY = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, caption_channels=32, cross_attention_dim=32)
CONFIGS = {"pixart-xl": PIXART_XL, "tiny": TINY}
PRESETS = {"w8a8": "rtn-w8a8-dynamic", "w4a8": "rtn-w4a8", "fp8": "rtn-fp8", "w4a16": "rtn-w4a16"}
TEXT_TOKENS = 120


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--px", type=int, nargs="+", default=[512, 1024], help="image sizes (latent = px / 8)")
    p.add_argument("--formats", nargs="+", default=["bf16", "w8a8", "w4a8", "fp8"],
                   choices=["bf16", *PRESETS], help="weight/activation formats")
    p.add_argument("--batch", type=int, default=2, help="2 = one prompt with classifier-free guidance")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--config", choices=sorted(CONFIGS), default="pixart-xl")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    return p.parse_args(argv)


def build_transformer(config: str, px: int, device, dtype):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)  # every format starts from the same weights
    with torch.device(device):
        model = PixArtTransformer2DModel(
            **CONFIGS[config], sample_size=px // 8, patch_size=2, in_channels=4, out_channels=8,
            attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            use_additional_conditions=False)
    return model.to(dtype).eval()


def quantize_transformer(model, fmt: str):
    """Quantize in place with ditq (no calibration: dynamic activations need none); returns the model."""
    if fmt != "bf16":
        from ditq import QuantConfig, quantize

        quantize(model, QuantConfig.preset(PRESETS[fmt]), None, progress=False)
    return model


def make_inputs(model, batch: int, px: int, device, dtype) -> dict:
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(0)
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, px // 8, px // 8, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, cfg.caption_channels, generator=g).to(device, dtype),
        timestep=torch.full((batch,), 500, device=device, dtype=torch.long),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
    )


def resident_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def time_forward(fn, inputs, iters: int) -> tuple[float, int]:
    """Median latency (ms) over ``iters`` forwards after warm-up, and the peak allocated bytes."""
    with torch.inference_mode():
        for _ in range(3):  # warm-up: autotuning, compilation, allocator
            fn(**inputs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(**inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated()


def run(args) -> str:
    dtype = torch.bfloat16
    rows, base = [], {}
    for px in args.px:
        for fmt in args.formats:
            model = quantize_transformer(build_transformer(args.config, px, "cuda", dtype), fmt)
            inputs = make_inputs(model, args.batch, px, "cuda", dtype)
            modes = [("eager", model)] + ([] if args.no_compile else [("compiled", torch.compile(model))])
            for mode, fn in modes:
                ms, peak = time_forward(fn, inputs, args.iters)
                base.setdefault((px, mode), ms)
                rows.append(f"| {px} | {fmt} | {mode} | {ms:.1f} | {base[(px, mode)] / ms:.2f}x | "
                            f"{peak / 2**30:.2f} | {resident_bytes(model) / 2**30:.2f} |")
                print(rows[-1], flush=True)
            del model, modes
            torch.cuda.empty_cache()
    table = [f"config {args.config}, batch {args.batch}, one transformer forward, bf16 activations",
             "", "| px | format | mode | ms | speed-up vs bf16 (same mode) | peak GiB | weights GiB |",
             "|---|---|---|---|---|---|---|", *rows]
    return header("python " + " ".join(sys.argv)) + "\n" + "\n".join(table) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(f"bench_e2e.py needs a CUDA GPU (none found); it would time {args.config} at "
                         f"{args.px} px, batch {args.batch}, formats {args.formats}")
    report = run(args)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
