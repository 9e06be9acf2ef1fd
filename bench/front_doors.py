"""Every preset x every front door on the built-in PixArt: fidelity of the quantized transformer to
full precision (SQNR dB of the final latents, one prompt, seed 0) through the Python API's three
verbs, the CLI (``ditq quantize --preset P``) and ``QuantizedPixArtPipeline.from_pretrained(...,
quantization_config=P)``, plus seconds per door. Slow presets run their documented small settings
unless ``--full``. The doors calibrate on the CLI's prompts and share a work folder per preset, so a
searched preset's later doors resume its work files (their seconds exclude the search).

    PYTHONPATH=<folder holding ditq> python3 bench/front_doors.py [--presets P ...] [--doors api cli diffusers]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

CALIB_STEPS = 4


def main() -> None:
    from ditq import QuantConfig
    from ditq.evaluation import front_doors as fd
    from ditq.evaluation.builtin import PIXART_CALL, tiny_pixart_pipeline
    from ditq.evaluation.prompts import load_prompts

    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=QuantConfig.presets())
    ap.add_argument("--doors", nargs="+", default=["api", "cli", "diffusers"])
    ap.add_argument("--steps", type=int, default=6, help="sampling steps of the fidelity probe")
    ap.add_argument("--full", action="store_true", help="slow presets at their full settings")
    args = ap.parse_args()
    prompts = load_prompts("calibration")[:2]
    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = dict(PIXART_CALL, num_inference_steps=args.steps)
    calib_call = dict(call, num_inference_steps=CALIB_STEPS)
    work = Path(tempfile.mkdtemp(prefix="ditq_doors_"))
    fp_dir = work / "fp"
    pipe.save_pretrained(fp_dir)
    print(f"| preset | {' | '.join(f'{d} dB | {d} s' for d in args.doors)} |")
    print("|---|" + "---|---|" * len(args.doors))
    for preset in args.presets:
        cfg = QuantConfig.preset(preset, small=not args.full)
        cells, shared = [], work / preset
        for door in args.doors:
            t0 = time.perf_counter()
            if door == "api":
                model = fd.through_api(pipe, cfg, prompts, calib_call, calib_steps=CALIB_STEPS, workdir=shared)
            elif door == "cli":
                model = fd.through_cli(preset, work / f"{preset}.safetensors", calib_prompts=len(prompts),
                                       steps=CALIB_STEPS, small=not args.full, workdir=shared)
            else:
                model = fd.through_diffusers(fp_dir, cfg, prompts, dict(calib_call, workdir=shared))
            seconds = time.perf_counter() - t0
            cells.append(f"{fd.fidelity_db(pipe, model, 'a red fox in snow', call):.1f} | {seconds:.1f}")
        print(f"| {preset} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
