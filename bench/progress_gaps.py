"""How often the core reports progress (and so how soon a GUI's Cancel is honoured, since the ComfyUI
adapter checks the interrupt flag in every report): seconds to the first report and the longest gap
between reports, through ``calibrate(..., on_progress=)`` and ``quantize(..., on_progress=)`` on the
built-in PixArt. Slow presets use their small settings unless ``--full``.

    PYTHONPATH=<folder holding ditq> python3 bench/progress_gaps.py [--presets P ...] [--full]
"""
from __future__ import annotations

import argparse
import copy
import time


def main() -> None:
    from ditq import QuantConfig, calibrate, quantize
    from ditq.evaluation.builtin import PIXART_CALL, tiny_pixart_pipeline

    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["q-dit-w4a8", "vq4dit-w2", "qua2sedimo-w3.5"])
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args()
    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    extra = {k: v for k, v in PIXART_CALL.items() if k != "num_inference_steps"}
    print("| preset | verb | seconds | first report s | longest gap s | reports |\n|---|---|---|---|---|---|")
    for preset in args.presets:
        cfg = QuantConfig.preset(preset, small=not args.full)
        calib = None
        for verb in ("calibrate", "quantize"):
            stamps = [time.monotonic()]
            hook = lambda stage, done, total: stamps.append(time.monotonic())  # noqa: E731
            if verb == "calibrate":
                calib = calibrate(pipe, ["a red fox in snow", "a city at night"], num_inference_steps=4,
                                  config=cfg, progress=False, on_progress=hook, **extra)
            else:
                quantize(copy.deepcopy(pipe.transformer), cfg, calib, progress=False, on_progress=hook)
            stamps.append(time.monotonic())
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            print(f"| {preset} | {verb} | {stamps[-1] - stamps[0]:.1f} | {gaps[0]:.2f} | {max(gaps):.2f} | "
                  f"{len(stamps) - 2} |", flush=True)


if __name__ == "__main__":
    main()
