"""ViDiT-Q quality on the built-in PixArt and the planted-outlier stress model (issue 3 acceptance).

For each model: calibrate once (2 prompts), quantize a fresh copy per preset, sample the same prompt
and seed, and compare with the full-precision sample: image PSNR (dB) and latent relative L2 error.
A preset may carry vidit-q option overrides, ``name:key=value,...`` (values parsed as JSON), e.g.
``vidit-q-w8a8:rotation="none"`` for the smoothing-only ablation.

    PYTHONPATH=<folder holding ditq> python3 bench/vidit_q_quality.py --steps 10
    ... --models stress --variant sigma --presets rtn-w8a8 vidit-q-w8a8
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

PRESETS = ("rtn-w8a8", "rtn-w8a8-dynamic", "rtn-w4a8", "vidit-q-w8a8", "vidit-q-w6a6", "vidit-q-w4a8-mp",
           "vidit-q-w4a8-mp:target_bits=4.5")
ABLATION = ('vidit-q-w8a8:smooth=false,rotation="none"', 'vidit-q-w8a8:rotation="none"',
            'vidit-q-w8a8:smooth=false', 'vidit-q-w8a8:rotation="block"')
PROMPTS = ["a red fox in snow", "a city at night"]


def sample(pipe, steps):
    """(latents, images in [0, 1]) of one seeded run."""
    from ditq.evaluation.builtin import PIXART_CALL

    kw = dict(PIXART_CALL, num_inference_steps=steps)
    lat = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    with torch.no_grad():
        img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
    return lat, pipe.image_processor.postprocess(img, output_type="pt")


def parse(spec: str):
    from ditq import QuantConfig

    name, _, overrides = spec.partition(":")
    cfg = QuantConfig.preset(name)
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        cfg.options[key] = json.loads(value)
    return cfg


def disk_ratio(model, report) -> float:
    """The report's layers' bytes in the safetensors ``model`` saves to (biases excluded) vs fp16."""
    from ditq.evaluation.compare import file_tensor_bytes
    from ditq.quant_core.serialization import WEIGHTS_NAME, save_quantized

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_quantized(model, Path(tmp) / "q")
        return file_tensor_bytes(folder / WEIGHTS_NAME, {r.name for r in report.layers}) / report.fp16_bytes


def evaluate(pipe, presets, steps):
    from ditq import calibrate, quantize
    from ditq.evaluation.builtin import PIXART_CALL
    from ditq.quant_core.metrics import psnr, rel_l2

    pipe.set_progress_bar_config(disable=True)
    ref_lat, ref_img = sample(pipe, steps)
    kw = {k: v for k, v in PIXART_CALL.items() if k != "num_inference_steps"}
    calib = calibrate(pipe, PROMPTS, num_inference_steps=steps, needs=("act_absmax", "act_samples"),
                      progress=False, **kw)
    for spec in presets:
        q = copy.deepcopy(pipe)
        t0 = time.time()
        report = quantize(q.transformer, parse(spec), calib, progress=False)
        seconds = time.time() - t0
        lat, img = sample(q, steps)
        yield spec, psnr(ref_img, img), rel_l2(ref_lat, lat), report.ratio, disk_ratio(q.transformer, report), seconds


def main(argv=None):
    from ditq.evaluation import builtin

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--ablation", action="store_true", help="add the channel-balancing ablation rows")
    ap.add_argument("--models", nargs="+", default=["tiny", "stress"], choices=["tiny", "stress"])
    ap.add_argument("--variant", default="alpha", choices=["alpha", "sigma"])
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    presets = args.presets + (list(ABLATION) if args.ablation else [])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import git_commit

    print(f"device: CPU ({platform.machine()}, 2 threads) · date: {datetime.date.today()} · commit: {git_commit()} · "
          f"command: `python bench/vidit_q_quality.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    print(f"{args.steps} steps, DPM-Solver, seed 0, PixArt-{args.variant} built-in, calibration 2 prompts")
    print("| model | preset | image PSNR dB | latent rel. error | block-Linear bytes / fp16 (memory) | on disk "
          "| quantize s |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        make = builtin.tiny_pixart_pipeline if model == "tiny" else builtin.stress_pixart_pipeline
        for spec, p, e, ratio, disk, sec in evaluate(make(variant=args.variant), presets, args.steps):
            print(f"| {model} | {spec} | {p:.2f} | {e:.4f} | {ratio:.3f} | {disk:.3f} | {sec:.1f} |", flush=True)


if __name__ == "__main__":
    main()
