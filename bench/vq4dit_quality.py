"""VQ4DiT vs RTN weight-only baselines on the built-in models: fidelity to the FP output.

    PYTHONPATH=<dir holding ditq> python3 bench/vq4dit_quality.py --models pixart [--steps 600]

Run from outside the repository root (its ``kernels/`` folder would shadow the ``kernels`` package
transformers probes for); one process per model runs them in parallel. Writes
``bench/results/vq4dit/<model>.md`` (device, date, commit, command): weight bytes vs fp16, mean weight
SQNR, the calibration objective (mean block-output MSE vs the FP model on held-out random prompts /
labels), image PSNR and latent relative L2 vs the FP pipeline (fixed prompts and seeds), and wall time.

Rows: RTN per channel and group-wise at 2/3/4 bits; VQ with k-means codebooks and nearest codewords
(no calibration); the same plus codebook/bias fine-tuning on the block loss with fixed assignments
(classic VQ calibration, the paper's baseline); and vq4dit (candidate-assignment calibration, then
codebook fine-tuning) with the same number of fine-tuning steps, as the preset runs it (the code's
distance-aware ratio init, quadratic regulariser and ratio lr) and with the paper's defaults (uniform
init, eq. 9 regulariser).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
PROMPTS = ["a red fox in snow", "a city at night", "a bowl of fruit on a wooden table", "a lighthouse at dawn"]


def _run(pipe, kind, output_type):
    from ditq.evaluation.builtin import DIT_CALL, PIXART_CALL

    gen = torch.Generator().manual_seed(0)
    if kind == "dit":
        return pipe(class_labels=[0, 3, 5, 7], generator=gen, output_type="np", **DIT_CALL).images
    return pipe(PROMPTS, generator=gen, output_type=output_type, **PIXART_CALL).images


def outputs(pipe, kind):
    """(latents or None, images in [0, 1]) of the fixed evaluation batch."""
    if kind == "dit":  # DiTPipeline has no latent output: compare decoded images only
        return None, torch.as_tensor(_run(pipe, kind, "np"))
    return _run(pipe, kind, "latent"), _run(pipe, kind, "pt")


def block_mse(teacher, student, calib) -> float:
    """VQ4DiT's objective on held-out calls: mean over calls and blocks of the block-output MSE."""
    from ditq.quant_core.calibration import decode_model_call
    from ditq.quant_core.methods.vq4dit.method import _BlockOutputs

    losses = []
    with torch.no_grad():
        for call in calib.inputs.calls:
            kwargs = decode_model_call(call, calib.inputs.tensors, torch.device("cpu"))
            with _BlockOutputs(teacher) as t:
                teacher(**kwargs)
            with _BlockOutputs(student) as s:
                student(**kwargs)
            losses += [F.mse_loss(a.float(), b.float()).item() for a, b in zip(s.outputs, t.outputs)]
    return sum(losses) / len(losses)


def configs(args):
    from ditq import QuantConfig
    from ditq.quant_core.methods.vq4dit.method import PRESET_OPTIONS

    rtn = lambda bits, **kw: QuantConfig(method="rtn", weight_bits=bits, act_bits=None, **kw)  # noqa: E731
    for bits in (2, 3, 4):
        yield f"RTN w{bits} per-channel", rtn(bits)
        yield f"RTN w{bits} g64", rtn(bits, weight_granularity="group", group_size=64)
    base = dict(kmeans_iters=args.kmeans_iters, seed=0)
    tune_steps = args.steps - int(args.steps * 0.5)
    for bits in (2, 3):
        vq = lambda **o: QuantConfig(method="vq4dit", weight_bits=bits, act_bits=None, options=dict(base, **o))  # noqa: E731
        yield f"VQ w{bits}: k-means, nearest codeword", vq(steps=0)
        yield f"VQ w{bits}: k-means + codebook fine-tune ({tune_steps} steps)", vq(steps=tune_steps, harden_at=0.0)
        yield f"vq4dit-w{bits} preset: code ratio settings ({args.steps} steps)", vq(steps=args.steps, **PRESET_OPTIONS)
        if bits == 2:
            yield f"vq4dit-w{bits} paper defaults: uniform init, eq. 9 ({args.steps} steps)", vq(steps=args.steps)


def main(argv=None) -> int:
    from ditq import quantize
    from ditq.evaluation import builtin
    from ditq.quant_core import metrics
    from ditq.quant_core.methods.vq4dit import method as vq4dit
    from quality import git_commit  # bench/ is on sys.path when run as a script

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="pixart,stress,dit")
    ap.add_argument("--steps", type=int, default=600, help="vq4dit optimizer steps (half assignment, half codebook)")
    ap.add_argument("--kmeans-iters", type=int, default=20)
    ap.add_argument("--samples", type=int, default=4, help="random prompts/labels for the teacher trajectory")
    ap.add_argument("--traj-steps", type=int, default=10, help="sampler steps per teacher trajectory")
    ap.add_argument("--out", default=str(HERE / "results" / "vq4dit"))
    args = ap.parse_args(argv)
    makers = {"pixart": (builtin.tiny_pixart_pipeline, "pixart"), "stress": (builtin.stress_pixart_pipeline, "pixart"),
              "dit": (builtin.tiny_dit_pipeline, "dit")}
    for key in args.models.split(","):
        started = time.monotonic()
        make, kind = makers[key]
        pipe = make()
        pipe.set_progress_bar_config(disable=True)
        ref_lat, ref_img = outputs(pipe, kind)
        extra = {} if kind == "dit" else {k: v for k, v in builtin.PIXART_CALL.items() if k != "num_inference_steps"}
        t = time.monotonic()
        calib = vq4dit.zero_data_calibration(pipe, num_samples=args.samples, num_inference_steps=args.traj_steps,
                                             progress=False, **extra)
        traj_s = time.monotonic() - t
        held = vq4dit.zero_data_calibration(pipe, num_samples=2, num_inference_steps=args.traj_steps, seed=7,
                                            progress=False, **extra)
        rows = ["| method | bytes vs fp16 | weight SQNR dB | held-out block MSE | image PSNR dB | latent rel-L2 | "
                "quantize s |", "|---|---|---|---|---|---|---|"]
        for name, cfg in configs(args):
            q = copy.deepcopy(pipe)
            t = time.monotonic()
            report = quantize(q.transformer, cfg, calib, progress=False)
            wall = time.monotonic() - t
            lat, img = outputs(q, kind)
            rel = "n/a" if lat is None else f"{metrics.rel_l2(ref_lat, lat):.4f}"
            rows.append(f"| {name} | {report.ratio:.4f} | {report.mean_sqnr_db:.2f} | "
                        f"{block_mse(pipe.transformer, q.transformer, held):.3e} | {metrics.psnr(ref_img, img):.2f} | "
                        f"{rel} | {wall:.0f} |")
            print(rows[-1], flush=True)
        command = " ".join(["python bench/vq4dit_quality.py", *(argv if argv is not None else sys.argv[1:])])
        head = [f"# VQ4DiT vs RTN (weight-only) — {key}", "",
                f"device: CPU ({platform.machine()}, {torch.get_num_threads()} thread) · date: "
                f"{datetime.date.today().isoformat()} · commit: {git_commit()} · command: `{command}` · "
                f"wall time {time.monotonic() - started:.0f} s", "",
                f"Zero-data teacher trajectory: {args.samples} random {'labels' if kind == 'dit' else 'prompts'} × "
                f"{args.traj_steps} steps ({len(calib.inputs.calls)} model calls, recorded in {traj_s:.1f} s); "
                f"k-means {args.kmeans_iters} iterations. Held-out block MSE: 2 other random conditions × "
                f"{args.traj_steps} steps.", ""]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{key}.md").write_text("\n".join(head + rows) + "\n")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
