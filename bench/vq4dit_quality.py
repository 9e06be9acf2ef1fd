"""VQ4DiT vs RTN weight-only baselines on the built-in models: fidelity to the FP output.

    PYTHONPATH=<dir holding ditq> python3 bench/vq4dit_quality.py [--steps 120] [--kmeans-iters 20]

Run from outside the repository root (its ``kernels/`` folder would shadow the ``kernels`` package
transformers probes for). Prints a markdown table: weight bytes vs fp16, mean weight SQNR, image PSNR
and latent relative L2 vs the FP pipeline (same prompts/labels and seeds), and wall time.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

PROMPTS = ["a red fox in snow", "a city at night", "a bowl of fruit on a wooden table", "a lighthouse at dawn"]


def _run(pipe, kind, output_type):
    from ditq.quant_core.builtin import DIT_CALL, PIXART_CALL

    gen = torch.Generator().manual_seed(0)
    if kind == "dit":
        return pipe(class_labels=[0, 3, 5, 7], generator=gen, output_type="np" if output_type == "pil" else output_type,
                    **DIT_CALL).images
    return pipe(PROMPTS, generator=gen, output_type=output_type, **PIXART_CALL).images


def outputs(pipe, kind):
    """(latents, images in [0, 1]) of the fixed evaluation batch."""
    if kind == "dit":  # DiTPipeline has no latent output: compare decoded images only
        img = torch.as_tensor(_run(pipe, kind, "np"))
        return img, img
    return _run(pipe, kind, "latent"), _run(pipe, kind, "pt")


def configs(args):
    from ditq import QuantConfig

    rtn = lambda bits, **kw: QuantConfig(method="rtn", weight_bits=bits, act_bits=None, **kw)  # noqa: E731
    vq = dict(kmeans_iters=args.kmeans_iters, steps=args.steps, seed=0)
    yield "RTN w2 per-channel", rtn(2)
    yield "RTN w2 g64", rtn(2, weight_granularity="group", group_size=64)
    yield "RTN w3 per-channel", rtn(3)
    yield "RTN w4 per-channel", rtn(4)
    yield "RTN w4 g64", rtn(4, weight_granularity="group", group_size=64)
    for bits in (2, 3):
        yield f"VQ w{bits}, k-means only", QuantConfig(method="vq4dit", weight_bits=bits, act_bits=None,
                                                       options=dict(vq, steps=0))
        yield f"vq4dit-w{bits}", QuantConfig(method="vq4dit", weight_bits=bits, act_bits=None, options=vq)


def main():
    from ditq import quantize
    from ditq.quant_core import builtin, metrics
    from ditq.quant_core.methods import vq4dit

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="pixart,stress,dit")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--kmeans-iters", type=int, default=20)
    ap.add_argument("--samples", type=int, default=4, help="random prompts/labels for the teacher trajectory")
    ap.add_argument("--traj-steps", type=int, default=10, help="sampler steps per teacher trajectory")
    args = ap.parse_args()
    makers = {"pixart": (builtin.tiny_pixart_pipeline, "pixart"), "stress": (builtin.stress_pixart_pipeline, "pixart"),
              "dit": (builtin.tiny_dit_pipeline, "dit")}
    print("| model | method | bytes vs fp16 | weight SQNR dB | image PSNR dB | latent rel-L2 | time s |")
    print("|---|---|---|---|---|---|---|")
    for key in args.models.split(","):
        make, kind = makers[key]
        pipe = make()
        pipe.set_progress_bar_config(disable=True)
        ref_lat, ref_img = outputs(pipe, kind)
        extra = {} if kind == "dit" else {k: v for k, v in builtin.PIXART_CALL.items() if k != "num_inference_steps"}
        t = time.monotonic()
        calib = vq4dit.zero_data_calibration(pipe, num_samples=args.samples, num_inference_steps=args.traj_steps,
                                             progress=False, **extra)
        traj_s = time.monotonic() - t
        for name, cfg in configs(args):
            q = copy.deepcopy(pipe)
            t = time.monotonic()
            report = quantize(q.transformer, cfg, calib, progress=False)
            wall = time.monotonic() - t + (traj_s if cfg.method == "vq4dit" else 0)
            lat, img = outputs(q, kind)
            rel = "n/a" if kind == "dit" else f"{metrics.rel_l2(ref_lat, lat):.4f}"
            print(f"| {key} | {name} | {report.ratio:.4f} | {report.mean_sqnr_db:.2f} | "
                  f"{metrics.psnr(ref_img, img):.2f} | {rel} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
