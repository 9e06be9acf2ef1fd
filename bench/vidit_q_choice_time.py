"""What ViDiT-Q's per-layer balancing choice (``choose_balance``) costs in quantization time at full
size: the PixArt-XL/2 architecture (28 blocks x 1152, seeded random weights), calibrated as in
vidit_q_fullsize.py, quantized with ``vidit-q-w8a8`` with the choice off and on, alternately, for
``--rounds`` rounds in one process. Reports each run's wall and CPU seconds and the ratio of the
medians (on / off). One thread by default: CPU seconds then count only this process's work, so they
compare on a shared machine where wall time does not (with several threads, OpenMP's spin-waiting
while a thread is descheduled inflates them). Issue 19's limit is 2x.

    PYTHONPATH=<folder holding ditq> python3 bench/vidit_q_choice_time.py --out bench/results/vidit_q/choice_time.md
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_e2e import build_transformer, make_inputs  # noqa: E402
from quality import git_commit  # noqa: E402
from vidit_q_fullsize import PX, calibrate_direct, load, save  # noqa: E402
from vidit_q_quality import parse  # noqa: E402

VARIANTS = {"off": "vidit-q-w8a8:choose_balance=false", "on": "vidit-q-w8a8"}


def main(argv=None):
    from ditq import quantize
    from ditq.evaluation.builtin import plant_modulation_outliers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--outliers", choices=["on", "off"], default="on")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"device: CPU ({platform.machine()}, {args.threads} threads) · date: {datetime.date.today()} · "
             f"commit: {git_commit()} · load average (1/5/15 min): {load()} · "
             f"command: `python bench/vidit_q_choice_time.py {' '.join(argv or sys.argv[1:])}`", "",
             f"PixArt-XL/2 architecture, planted outliers {args.outliers}; `vidit-q-w8a8` quantize time with "
             f"choose_balance off and on, alternately, {args.rounds} rounds.", "",
             "| round | choose_balance | quantize s (wall) | quantize s (CPU) |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    model = build_transformer("pixart-xl", PX, "cpu", torch.float32)
    if args.outliers == "on":
        plant_modulation_outliers(model)
    calib = calibrate_direct(model, make_inputs(model, 1, PX, "cpu", torch.float32), [800.0, 200.0])
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in VARIANTS}
    for r in range(args.rounds):
        for key, spec in VARIANTS.items():
            q = copy.deepcopy(model)
            t0, c0 = time.perf_counter(), time.process_time()
            quantize(q, parse(spec), calib, progress=False)
            runs[key].append((time.perf_counter() - t0, time.process_time() - c0))
            del q
            lines.append(f"| {r + 1} | {key} | {runs[key][-1][0]:.1f} | {runs[key][-1][1]:.1f} |")
            print(lines[-1], flush=True)
    median = {k: [statistics.median(v[i] for v in runs[k]) for i in (0, 1)] for k in runs}
    lines += ["", f"median on / off: wall {median['on'][0] / median['off'][0]:.2f}x, "
              f"CPU {median['on'][1] / median['off'][1]:.2f}x · load average at the end: {load()}"]
    print(lines[-1], flush=True)
    save(lines, args.out)


if __name__ == "__main__":
    main()
