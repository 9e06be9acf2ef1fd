"""How often vq4dit's optimisation reports progress (and so checks Cancel in a GUI) at a real width.

A PixArt transformer of PixArt-XL's width (1152, 16 heads, one block) at 320x320 (400 tokens, CFG batch
2), the size the real-ComfyUI test uses; calibrated through the public API, then quantized with
vq4dit-w2 (2 k-means iterations, the first ``--steps`` optimisation steps). Prints the time per step and
the largest gap between two progress reports, per step and between the passes within one.

    PYTHONPATH=<folder holding ditq> python3 bench/vq4dit_step_ticks.py [--steps 12]
"""
from __future__ import annotations

import argparse
import time

import torch


def wide_pipeline():
    from ditq.evaluation import builtin

    pipe = builtin.tiny_pixart_pipeline()
    pipe.transformer = builtin.tiny_pixart_transformer(num_layers=1, sample_size=40, attention_head_dim=72,
                                                       num_attention_heads=16, cross_attention_dim=1152)
    return pipe


def main(argv=None) -> None:
    from ditq import QuantConfig, calibrate, quantize

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args(argv)
    pipe = wide_pipeline()
    cfg = QuantConfig.preset("vq4dit-w2", options={"kmeans_iters": 2, "steps": args.steps})
    # the tiny VAE downsamples 2x: 80x80 pixels are the 40x40 latents of a 320x320 image at 8x
    calib = calibrate(pipe, ["a red fox in snow"], config=cfg, num_inference_steps=4, height=80, width=80,
                      guidance_scale=4.0, progress=False, use_resolution_binning=False)
    ticks: list[tuple[float, int]] = []

    def on_progress(stage, done, total):
        if stage == "vq4dit calibrate":
            ticks.append((time.perf_counter(), done))

    quantize(pipe.transformer, cfg, calib, progress=False, on_progress=on_progress)
    times = [t for t, _ in ticks]
    gaps = [b - a for a, b in zip(times, times[1:])]
    starts = [t for i, (t, d) in enumerate(ticks) if i == 0 or ticks[i - 1][1] != d]
    steps = [b - a for a, b in zip(starts, starts[1:])]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(steps)} steps timed")
    print(f"time per step: median {sorted(steps)[len(steps) // 2]:.2f} s, max {max(steps):.2f} s")
    print(f"largest gap between progress reports: {max(gaps):.2f} s (reports per step: "
          f"{len(ticks) / (len(steps) + 1):.1f})")


if __name__ == "__main__":
    main()
