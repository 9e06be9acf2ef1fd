"""Quality, size and cost bench: every preset, measured the same way, on the same prompts and seeds.

Models: the built-in PixArt, the stress model (the built-in PixArt with function-preserving planted
modulation outliers, checked here to leave the full-precision output unchanged), a small
class-conditional DiT, and any diffusers PixArt folder / Hub repo given with ``--model``. For each
preset: weight bytes in memory and on disk vs fp16, resident and FP sizes, PSNR/SSIM of decoded images
and relative latent error vs full precision, mean weight SQNR, calibration and quantization seconds.
Results go to ``bench/results/quality.{md,json}`` with device, date, commit and the exact command, and
a PNG grid per model. GPU speed results of ``bench/bench_gemm.py`` / ``bench_e2e.py`` (``results/gemm.md``, ``results/e2e.md``)
are linked when present.

    python bench/quality.py            # full run (CPU, < 15 min)
    python bench/quality.py --smoke    # < 1 min, used by the tests
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from ditq.evaluation import builtin
from ditq.quant_core.config import QuantConfig
from ditq.evaluation.compare import compare_presets, image_grid, markdown_table
from ditq.quant_core.sampling import sample
from ditq.quant_core.metrics import rel_l2
from ditq.evaluation.prompts import load_prompts

HERE = Path(__file__).resolve().parent
# The papers' orderings we check where both presets ran: (model, better, worse, claim).
ORDERINGS = [
    ("stress", "vidit-q-w8a8", "rtn-w8a8", "ViDiT-Q W8A8 recovers what naive static RTN W8A8 loses"),
    ("stress", "rtn-w8a8-dynamic", "rtn-w8a8", "dynamic per-token activations beat static per-tensor"),
    ("pixart", "q-dit-w4a8", "rtn-w4a8", "Q-DiT W4A8 beats per-channel RTN W4A8"),
    ("dit", "q-dit-w4a8", "rtn-w4a8", "Q-DiT W4A8 beats per-channel RTN W4A8 (class-conditional DiT)"),
    ("pixart", "vq4dit-w2", "rtn-w2a16", "VQ4DiT 2-bit far above 2-bit RTN"),
]


def models(smoke: bool, user_model: str | None):
    steps = 3 if smoke else builtin.PIXART_CALL["num_inference_steps"]
    pixart_call = dict(builtin.PIXART_CALL, num_inference_steps=steps)
    prompts = load_prompts("evaluation")[: 1 if smoke else 2]
    yield "pixart", builtin.tiny_pixart_pipeline, pixart_call, prompts
    if smoke:
        return
    yield "stress", builtin.stress_pixart_pipeline, pixart_call, prompts
    yield "dit", builtin.tiny_dit_pipeline, dict(builtin.DIT_CALL), [207, 360]
    if user_model:
        from diffusers import DiffusionPipeline

        yield user_model, lambda: DiffusionPipeline.from_pretrained(user_model), dict(num_inference_steps=20), prompts


def check_stress_preserves_function() -> float:
    """The planting must not change what the model computes: relative latent error vs the plain model."""
    call = dict(builtin.PIXART_CALL)
    plain, stressed = builtin.tiny_pixart_pipeline(), builtin.stress_pixart_pipeline()
    for p in (plain, stressed):
        p.set_progress_bar_config(disable=True)
    prompt = load_prompts("evaluation")[0]
    return rel_l2(sample(plain, prompt, 0, call)[0], sample(stressed, prompt, 0, call)[0])


def orderings(results: dict[str, list[dict]]) -> list[str]:
    lines = []
    for model, better, worse, claim in ORDERINGS:
        rows = {r["preset"]: r for r in results.get(model, [])}
        if better not in rows or worse not in rows:
            lines.append(f"- not measured: {claim} ({model}: {better} / {worse} not in this run; "
                         f"name them with --presets)")
            continue
        b, w = rows[better], rows[worse]
        holds = b["latent_rel_l2"] < w["latent_rel_l2"]
        lines.append(f"- {'holds' if holds else 'DOES NOT HOLD'}: {claim} — {model}: {better} latent rel-L2 "
                     f"{b['latent_rel_l2']:.4f} / PSNR {b['psnr_db']:.2f} dB vs {worse} "
                     f"{w['latent_rel_l2']:.4f} / {w['psnr_db']:.2f} dB")
    return lines


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="one model, two presets, 3 steps: < 1 minute")
    ap.add_argument("--presets", nargs="+", help="default: every preset (smoke: rtn-w8a8, rtn-w4a8)")
    ap.add_argument("--model", help="also measure this diffusers PixArt folder or Hub repo id")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    presets = args.presets or (["rtn-w8a8", "rtn-w4a8"] if args.smoke else QuantConfig.presets(quick_only=True))
    out = Path(args.out)
    started = time.perf_counter()
    results, sections = {}, []
    for name, build, call, conditions in models(args.smoke, args.model):
        pipe = build()
        pipe.set_progress_bar_config(disable=True)
        text = isinstance(conditions[0], str)
        calib_conditions = load_prompts("calibration")[:4] if text else [1, 88, 279, 980]
        runnable = [p for p in presets if text or not p.startswith("vidit-q")]  # ViDiT-Q targets PixArt
        rows, images = compare_presets(pipe, call, runnable, conditions, [0], calib_conditions,
                                       calib_steps=call["num_inference_steps"], progress=False)
        results[name] = rows
        grid = image_grid([list(images.values())], list(images), out / f"grid_{name.replace('/', '_')}.png")
        sections.append(f"### {name}\n\n{markdown_table(rows)}\n\n![{name}]({grid.name})\n")
        print(f"[{time.perf_counter() - started:6.1f}s] {name}: {len(rows)} presets", flush=True)
    stress_err = None if args.smoke else check_stress_preserves_function()
    meta = dict(device=f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                date=datetime.date.today().isoformat(), commit=git_commit(),
                command=" ".join(["python bench/quality.py", *(argv if argv is not None else sys.argv[1:])]),
                seconds=round(time.perf_counter() - started, 1), stress_fp_rel_l2=stress_err)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Quality, size and cost ({'smoke' if args.smoke else 'full'})", "",
             f"device: {meta['device']} · date: {meta['date']} · commit: {meta['commit']} · "
             f"command: `{meta['command']}` · wall time {meta['seconds']} s", ""]
    if stress_err is not None:
        lines += [f"Stress model check: planting the outliers changes the FP latents by rel-L2 {stress_err:.2e} "
                  "(function preserved).", ""]
    lines += ["## Papers' orderings on our models", "", *orderings(results), "", "## Results", "", *sections]
    speed = [p for p in (HERE / "results" / "gemm.md", HERE / "results" / "e2e.md") if p.is_file()]
    lines += ["## Speed (GPU)", ""] + ([f"- [{p.stem}]({p.name})" for p in speed] or
                                      ["No GPU results yet: `bench/bench_gemm.py` and `bench/bench_e2e.py` "
                                       "need a CUDA GPU."])
    stem = "quality_smoke" if args.smoke else "quality"
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
