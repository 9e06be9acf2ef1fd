"""Video quality of the presets on the built-in Latte (and its planted-outlier stress twin), plus an
architecture x preset table on the tiny video and MMDiT transformers (issue 18).

Video: calibrate once (2 prompts), quantize a fresh copy per preset, sample the same prompt and seed,
and compare the decoded frames with the full-precision video: per-frame PSNR (mean and worst frame)
and SSIM, a temporal-consistency proxy (relative error of the frame-to-frame differences, 0 = the
motion of the FP video exactly), block-Linear bytes vs fp16, quantize seconds.

Architectures: each tiny pipeline of evaluation/architectures.py (Latte, CogVideoX, Wan, HunyuanDiT,
Flux, SD3 around the real diffusers classes) is calibrated through ``calibrate(pipe, prompts,
config=cfg)`` per preset (the search of Qua²SeDiMo included), a copy of its transformer quantized,
and a held-out prompt sampled: relative L2 error of the final latents vs full precision, block-Linear
bytes vs fp16, calibrate (+ search) and quantize seconds. Slow presets run at their small settings.
A preset that cannot apply to an architecture gets its error message as the row.

    PYTHONPATH=<folder holding ditq> python3 bench/video_quality.py [--steps 10] [--out bench/results/video_quality.md]
    ... --models latte-stress --presets rtn-w8a8 vidit-q-w8a8 --architectures   (video rows only)
    ... --models --architectures flux sd3 --arch-presets vq4dit-w3 qua2sedimo-w3.5   (architecture rows only)
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

VIDEO_PRESETS = ("rtn-w8a8", "rtn-w8a8-dynamic", "vidit-q-w8a8", "vidit-q-w6a6", "rtn-w4a8", "vidit-q-w4a8-mp",
                 "q-dit-w4a8")
ARCH_PRESETS = ("rtn-w8a8", "vidit-q-w8a8", "rtn-w4a8", "vidit-q-w4a8-mp", "q-dit-w4a8", "vq4dit-w3",
                "qua2sedimo-w3.5")
ARCH_STEPS = 4  # denoising steps of the architecture rows (calibration and the held-out sample)
PROMPTS = ["a red fox running in snow", "waves breaking on a beach"]


def video(pipe, steps):
    """Frames ``[F, 3, H, W]`` in [0, 1] of one seeded run."""
    from ditq.evaluation.builtin import LATTE_CALL

    call = dict(LATTE_CALL, num_inference_steps=steps)
    return pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="pt", **call).frames[0].float()


def video_metrics(ref: torch.Tensor, out: torch.Tensor) -> dict:
    from ditq.quant_core.metrics import psnr, rel_l2, ssim

    frames = [psnr(r, o) for r, o in zip(ref, out)]
    return {"psnr": sum(frames) / len(frames), "worst_psnr": min(frames), "ssim": ssim(ref, out),
            "temporal": rel_l2(ref[1:] - ref[:-1], out[1:] - out[:-1])}


def evaluate_video(pipe, presets, steps):
    from ditq import QuantConfig, calibrate, quantize
    from ditq.quant_core.methods import calibration_needs
    from ditq.evaluation.builtin import LATTE_CALL

    ref = video(pipe, steps)
    configs = {p: QuantConfig.preset(p) for p in presets}
    call = {k: v for k, v in LATTE_CALL.items() if k != "num_inference_steps"}
    calib = calibrate(pipe, PROMPTS, num_inference_steps=steps, progress=False,
                      needs=calibration_needs(*configs.values()), **call)
    for name, config in configs.items():
        q = copy.deepcopy(pipe)
        t0 = time.time()
        report = quantize(q.transformer, config, calib, progress=False)
        seconds = time.time() - t0
        yield name, dict(video_metrics(ref, video(q, steps)), ratio=report.ratio, seconds=seconds)


def evaluate_architecture(family, presets):
    """Per preset: calibrate the tiny ``family`` pipeline on PROMPTS, quantize a copy of its
    transformer, and compare the final latents of a held-out prompt with full precision."""
    from ditq import QuantConfig, calibrate, quantize
    from ditq.evaluation.architectures import PIPELINE_CALLS, tiny_pipeline
    from ditq.quant_core.metrics import rel_l2

    pipe = tiny_pipeline(family)
    call = dict(PIPELINE_CALLS[family], num_inference_steps=ARCH_STEPS)
    fp = pipe.transformer

    def latents():
        return pipe("a lighthouse in a storm", generator=torch.Generator().manual_seed(5), output_type="latent",
                    **call)[0].float()

    ref = latents()
    for name in presets:
        config = QuantConfig.preset(name, small=name in QuantConfig.presets() and
                                    name not in QuantConfig.presets(quick_only=True))
        try:
            t0 = time.time()
            calib = calibrate(pipe, PROMPTS, config=config, progress=False, **call)
            t1 = time.time()
            q = copy.deepcopy(fp)
            report = quantize(q, config, calib, progress=False)
            t2 = time.time()
        except (ValueError, NotImplementedError) as e:
            yield name, dict(error=str(e).splitlines()[0])
            continue
        pipe.transformer = q
        try:
            yield name, dict(rel=rel_l2(ref, latents()), ratio=report.ratio, calib_s=t1 - t0, quant_s=t2 - t1)
        finally:
            pipe.transformer = fp


def main(argv=None):
    from ditq.evaluation import builtin
    from ditq.evaluation.architectures import PIPELINE_CALLS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--presets", nargs="+", default=list(VIDEO_PRESETS))
    ap.add_argument("--arch-presets", nargs="+", default=list(ARCH_PRESETS))
    ap.add_argument("--models", nargs="*", default=["latte-stress", "latte"], choices=["latte-stress", "latte"])
    ap.add_argument("--architectures", nargs="*", default=list(PIPELINE_CALLS), choices=list(PIPELINE_CALLS))
    ap.add_argument("--out", type=Path, help="also write the tables (markdown) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # the tiny text encoders truncate every prompt, and say so
    makers = {"latte": builtin.tiny_latte_pipeline, "latte-stress": builtin.stress_latte_pipeline}
    lines = []
    if args.models:
        lines += [f"Latte built-in (2 spatial + 2 temporal blocks, width 256), 4 frames 32x32, {args.steps} "
                  "steps DPM-Solver, CFG 4.5, seed 0, calibration 2 prompts; metrics vs the FP video", "",
                  "| model | preset | per-frame PSNR dB (mean / worst) | SSIM | temporal rel. error | "
                  "block-Linear bytes / fp16 | quantize s |", "|---|---|---|---|---|---|---|"]
        print("\n".join(lines), flush=True)
    for model in args.models:
        for name, m in evaluate_video(makers[model](), args.presets, args.steps):
            lines.append(f"| {model} | {name} | {m['psnr']:.2f} / {m['worst_psnr']:.2f} | {m['ssim']:.4f} | "
                         f"{m['temporal']:.4f} | {m['ratio']:.3f} | {m['seconds']:.1f} |")
            print(lines[-1], flush=True)
    if args.architectures:
        lines += ["", f"Tiny pipelines (transformers of width 128), {ARCH_STEPS} steps; calibration on "
                  f"{len(PROMPTS)} prompts through calibrate(pipe, prompts, config=cfg); final latents of a "
                  "held-out prompt vs FP; slow presets at small=True", "",
                  "| architecture | preset | latents rel. L2 error | block-Linear bytes / fp16 | calibrate s | "
                  "quantize s |", "|---|---|---|---|---|---|"]
        print("\n".join(lines[-5:]), flush=True)
    for family in args.architectures:
        for name, m in evaluate_architecture(family, args.arch_presets):
            lines.append(f"| {family} | {name} | not applicable: {m['error']} | | | |" if "error" in m else
                         f"| {family} | {name} | {m['rel']:.4f} | {m['ratio']:.3f} | {m['calib_s']:.2f} | "
                         f"{m['quant_s']:.2f} |")
            print(lines[-1], flush=True)
    if args.out:
        from ditq.quant_core.serialization import atomic_write_text

        atomic_write_text("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
