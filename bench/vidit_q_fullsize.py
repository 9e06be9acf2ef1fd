"""ViDiT-Q at full size on the CPU: the PixArt-XL/2 transformer architecture (28 blocks x 1152, seeded
random weights), with and without planted modulation outliers (builtin.plant_modulation_outliers).

Per model: calibrate on direct transformer calls at ``--calib-timesteps`` (batch ``--batch``, 120
random text tokens, a 32x32 latent), then for each preset quantize a fresh copy, time the
quantization (wall and this process's CPU seconds: the CPU time is what compares between rows on a
shared machine), run one forward at timestep 500 and report the SQNR of the output against the
full-precision forward, and the block-Linear weight bytes vs fp16 in memory (the report) and on disk
(the saved safetensors, biases excluded). The header and the last line give the load average.
Presets take vidit-q option overrides as in vidit_q_quality.py (``name:key=value,...``).

    PYTHONPATH=<folder holding ditq> python3 bench/vidit_q_fullsize.py --out bench/results/vidit_q/fullsize.md
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_e2e import build_transformer, make_inputs  # noqa: E402
from quality import git_commit  # noqa: E402
from vidit_q_quality import disk_ratio, parse  # noqa: E402

PRESETS = ("rtn-w8a8-dynamic", "vidit-q-w8a8", "vidit-q-w8a8:choose_balance=false", "vidit-q-w4a8-mp")
PX = 256  # 32x32 latent


def calibrate_direct(model, inputs, timesteps):
    from ditq.quant_core.calibration import CalibrationRecorder
    from ditq.quant_core.models import select_layers

    rec = CalibrationRecorder(model, select_layers(model), ("act_absmax", "act_samples"))
    with rec, torch.no_grad():
        for t in timesteps:
            model(**dict(inputs, timestep=torch.full_like(inputs["timestep"], t)))
    return rec.result()


def evaluate(planted: bool, presets, timesteps, batch: int):
    from ditq import quantize
    from ditq.evaluation.builtin import plant_modulation_outliers
    from ditq.quant_core.metrics import sqnr

    model = build_transformer("pixart-xl", PX, "cpu", torch.float32)
    if planted:
        plant_modulation_outliers(model)
    inputs = make_inputs(model, batch, PX, "cpu", torch.float32)
    t0 = time.perf_counter()
    calib = calibrate_direct(model, inputs, timesteps)
    print(f"calibration ({len(timesteps)} forwards): {time.perf_counter() - t0:.0f} s", flush=True)
    with torch.no_grad():
        ref = model(**inputs)[0]
    for spec in presets:
        q = copy.deepcopy(model)
        t0, c0 = time.perf_counter(), time.process_time()
        report = quantize(q, parse(spec), calib, progress=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        with torch.no_grad():
            out = q(**inputs)[0]
        yield spec, sqnr(ref, out), report.ratio, disk_ratio(q, report), seconds, cpu
        del q


def load() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def save(lines: list[str], out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--outliers", choices=["both", "on", "off"], default="both")
    ap.add_argument("--calib-timesteps", nargs="+", type=float, default=[800.0, 200.0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    planted = {"both": [False, True], "on": [True], "off": [False]}[args.outliers]
    lines = [f"device: CPU ({platform.machine()}, {args.threads} threads) · date: {datetime.date.today()} · "
             f"commit: {git_commit()} · load average (1/5/15 min): {load()} · "
             f"command: `python bench/vidit_q_fullsize.py {' '.join(argv or sys.argv[1:])}`",
             "", f"PixArt-XL/2 architecture (28 blocks x 1152, seeded random weights), batch {args.batch}, 32x32 latent, "
             f"120 text tokens; calibration at timesteps {args.calib_timesteps}; one forward at t=500.", "",
             "| planted outliers | preset | output SQNR vs FP dB | block-Linear bytes / fp16 (memory) | on disk "
             "| quantize s (wall) | quantize s (CPU) |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for p in planted:
        for spec, db, ratio, disk, sec, cpu in evaluate(p, args.presets, args.calib_timesteps, args.batch):
            lines.append(f"| {'yes' if p else 'no'} | {spec} | {db:.2f} | {ratio:.3f} | {disk:.3f} | {sec:.1f} "
                         f"| {cpu:.1f} |")
            print(lines[-1], flush=True)
    lines += ["", f"load average at the end: {load()}"]
    print(lines[-1], flush=True)
    save(lines, args.out)


if __name__ == "__main__":
    main()
