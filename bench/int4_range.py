"""int4 weights in the narrow range [-7, 7] (format <= 2) against the full range [-8, 7] (format 3),
at equal bytes: both store the same packed nibbles and the same float32 scales per row or group.

Per layer: weight SQNR and output SQNR (``x @ w.T`` on held-out inputs) at the PixArt-XL shapes
``[N, K]`` = 1152x1152 (attention), 4608x1152 (MLP up), 1152x4608 (MLP down), for Gaussian and
heavy-tailed (Student-t, 3 degrees of freedom) weights, under RTN per channel / per group of 128,
the MSE clip search (Q-DiT's "mse" quantizer) and GPTQ (Hessian from calibration inputs whose
channels differ in scale by a log-normal factor, as DiT activations do). End to end: the built-in
PixArt and DiT with rtn-w4a8 and Q-DiT W4A8, narrow vs full (``weight_full_range`` False / True).
Their weights are nn.Linear's uniform init, whose rows are nearly symmetric (max ~ -min): the full range
can hardly help there, so the built-in PixArt is also run with its block weights redrawn Gaussian at the
same standard deviation (trained DiT weights are bell-shaped, not uniform).

    python bench/int4_range.py            # ~25 min on a busy 2-core CPU
    python bench/int4_range.py --smoke    # one small shape, no end-to-end: seconds
    python bench/int4_range.py --seeds 8 --out bench/results/int4_range_seeds.md
        # rtn-w4a8 only, on 8 random built-in PixArts (uniform and Gaussian block weights): the spread
        # of the end-to-end effect from model to model
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

from ditq.quant_core import quantizers as qz
from ditq.quant_core.config import QuantConfig
from ditq.quant_core.metrics import sqnr
from ditq.quant_core.passes.gptq import gptq, hessian, minmax_scale_fn

HERE = Path(__file__).resolve().parent
SHAPES = [(1152, 1152), (4608, 1152), (1152, 4608)]
METHODS = ["rtn", "rtn-g128", "mse", "mse-g128", "gptq", "gptq-g128"]


def weights(n: int, k: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(n, k, generator=gen) * 0.02
    chi2 = torch.randn(n, k, 3, generator=gen).pow(2).sum(-1)  # Student-t(3) = z / sqrt(chi2_3 / 3)
    return torch.randn(n, k, generator=gen) / (chi2 / 3).sqrt() * 0.02


def inputs(rows: int, k: int, channel_scale: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(rows, k, generator=gen) * channel_scale


def quantize(method: str, w: torch.Tensor, h: torch.Tensor, full: bool) -> torch.Tensor:
    """The dequantized weight ``method`` gives at 4 bits, symmetric, narrow or full range."""
    base, _, group = method.partition("-g")
    groups = qz.num_groups(w.shape[1], int(group) if group else None)
    if base == "gptq":
        q, s, z = gptq(w, h, bits=4, group_size=int(group) if group else None, full_range=full,
                       scale_fn=minmax_scale_fn(4, True, full))
    elif base == "mse":
        s, z = qz.mse_clip_scale(w, 4, groups=groups, full_range=full)
        q = qz.quantize(w, s, z, 4, True, full)
    else:
        q, s, z = qz.quantize_weight(w, 4, group_size=int(group) if group else None, full_range=full)
    return qz.dequantize(q, s, z)


def layer_rows(shapes, kinds, methods, seed: int = 0) -> list[dict]:
    rows = []
    for n, k in shapes:
        for kind in kinds:
            gen = torch.Generator().manual_seed(seed)
            w = weights(n, k, kind, gen)
            channel_scale = torch.exp(torch.randn(k, generator=gen) * 0.75)
            h = hessian(inputs(2 * k, k, channel_scale, gen))
            x = inputs(256, k, channel_scale, gen)
            y = x @ w.t()
            for method in methods:
                row = dict(shape=f"{n}x{k}", weights=kind, method=method)
                for label, full in (("narrow", False), ("full", True)):
                    w_hat = quantize(method, w, h, full)
                    row[f"w_{label}"], row[f"y_{label}"] = sqnr(w, w_hat), sqnr(y, x @ w_hat.t())
                rows.append(row)
                print(f"{row['shape']} {kind:8s} {method:9s} weight {row['w_narrow']:.2f} -> {row['w_full']:.2f} dB, "
                      f"output {row['y_narrow']:.2f} -> {row['y_full']:.2f} dB", flush=True)
    return rows


def layer_table(rows: list[dict]) -> list[str]:
    lines = ["| [N, K] | weights | quantizer | weight SQNR [-7,7] | [-8,7] | gain dB | output SQNR [-7,7] | "
             "[-8,7] | gain dB |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['weights']} | {r['method']} | {r['w_narrow']:.2f} | {r['w_full']:.2f} | "
                     f"{r['w_full'] - r['w_narrow']:+.2f} | {r['y_narrow']:.2f} | {r['y_full']:.2f} | "
                     f"{r['y_full'] - r['y_narrow']:+.2f} |")
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        w_gain = sum(r["w_full"] - r["w_narrow"] for r in mine) / len(mine)
        y_gain = sum(r["y_full"] - r["y_narrow"] for r in mine) / len(mine)
        lines.append(f"| mean | | {method} | | | {w_gain:+.2f} | | | {y_gain:+.2f} |")
    return lines


def variants() -> dict[str, QuantConfig]:
    """rtn-w4a8 and Q-DiT W4A8 (GPTQ, g128, symmetric weights: the range choice is about symmetric
    ones; the q-dit-w4a8 preset's asymmetric weights already use all 16 levels and are unchanged)."""
    out = {}
    for name, changes in (("rtn-w4a8", {}), ("q-dit-w4a8", {"weight_symmetric": True})):
        base = QuantConfig.preset(name).to_dict()
        for label, full in (("[-7,7]", False), ("[-8,7]", True)):
            out[f"{name}{' sym' if changes else ''} {label}"] = QuantConfig.from_dict(
                {**base, **changes, "weight_full_range": full})
    out["q-dit-w4a8 (preset, asym)"] = QuantConfig.preset("q-dit-w4a8")
    return out


def gaussian_block_weights(pipe, seed: int = 0):
    """``pipe`` with every transformer-block Linear weight redrawn from a Gaussian of the same std."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in pipe.transformer.transformer_blocks.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * m.weight.std())
    return pipe


def end_to_end() -> list[str]:
    from ditq.evaluation import builtin
    from ditq.evaluation.compare import compare_presets, markdown_table
    from ditq.evaluation.prompts import load_prompts

    lines = []
    prompts, calib_prompts = load_prompts("evaluation")[:2], load_prompts("calibration")[:4]
    for name, build, call, conditions, calib in (
            ("pixart", builtin.tiny_pixart_pipeline, dict(builtin.PIXART_CALL), prompts, calib_prompts),
            ("pixart, Gaussian block weights", lambda: gaussian_block_weights(builtin.tiny_pixart_pipeline()),
             dict(builtin.PIXART_CALL), prompts, calib_prompts),
            ("dit", builtin.tiny_dit_pipeline, dict(builtin.DIT_CALL), [207, 360], [1, 88, 279, 980])):
        pipe = build()
        pipe.set_progress_bar_config(disable=True)
        rows, _ = compare_presets(pipe, call, variants(), conditions, [0], calib,
                                  calib_steps=call["num_inference_steps"], progress=False)
        lines += [f"### {name}", "", markdown_table(rows), ""]
        print("\n".join(lines[-3:]), flush=True)
    return lines


def rtn_over_seeds(seeds: int) -> list[str]:
    """Latent rel-L2 vs full precision of rtn-w4a8 narrow and full on ``seeds`` built-in PixArts."""
    import copy

    from ditq import quantize
    from ditq.evaluation import builtin
    from ditq.evaluation.prompts import load_prompts
    from ditq.quant_core.metrics import rel_l2
    from ditq.quant_core.sampling import sample

    prompts, call = load_prompts("evaluation")[:2], dict(builtin.PIXART_CALL)
    lines = ["| weights | model seed | latent rel-L2 [-7,7] | [-8,7] | full better |", "|---|---|---|---|---|"]
    for kind in ("uniform (nn.Linear init)", "Gaussian"):
        wins, sums = 0, {False: 0.0, True: 0.0}
        for seed in range(seeds):
            pipe = builtin.tiny_pixart_pipeline(seed=seed)
            pipe.set_progress_bar_config(disable=True)
            if kind == "Gaussian":
                gaussian_block_weights(pipe, seed)
            fp, fp_transformer = [sample(pipe, p, 0, call)[0] for p in prompts], pipe.transformer
            err = {}
            for full in (False, True):
                pipe.transformer = copy.deepcopy(fp_transformer)
                cfg = QuantConfig.from_dict({**QuantConfig.preset("rtn-w4a8").to_dict(), "weight_full_range": full})
                quantize(pipe.transformer, cfg, progress=False)
                err[full] = sum(rel_l2(f, sample(pipe, p, 0, call)[0]) for f, p in zip(fp, prompts)) / len(prompts)
            pipe.transformer = fp_transformer
            wins += err[True] < err[False]
            sums = {full: sums[full] + err[full] for full in sums}
            better = "yes" if err[True] < err[False] else "no"
            lines.append(f"| {kind} | {seed} | {err[False]:.4f} | {err[True]:.4f} | {better} |")
            print(lines[-1], flush=True)
        lines.append(f"| {kind} | mean | {sums[False] / seeds:.4f} | {sums[True] / seeds:.4f} | {wins} of {seeds} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="one 128x256 layer, RTN and GPTQ, no end-to-end")
    ap.add_argument("--seeds", type=int, help="only the rtn-w4a8 end-to-end comparison over this many models")
    ap.add_argument("--out", default=str(HERE / "results" / "int4_range.md"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    if args.seeds:
        rows, e2e = [], ["## rtn-w4a8 end to end over random built-in PixArts (2 prompts, seed 0 each)", "",
                         *rtn_over_seeds(args.seeds)]
    elif args.smoke:
        rows = layer_rows([(128, 256)], ["gaussian"], ["rtn", "gptq-g128"])
        e2e = []
    else:
        rows = layer_rows(SHAPES, ["gaussian", "student-t3"], METHODS)
        e2e = ["## End to end (built-in models, latent and image error vs full precision)", "", *end_to_end()]
    command = " ".join(["python bench/int4_range.py", *(argv if argv is not None else sys.argv[1:])])
    lines = ["# int4 range: [-7, 7] (format <= 2) vs [-8, 7] (format 3) at equal bytes", "",
             f"device: CPU ({platform.machine()}, {torch.get_num_threads()} threads) · date: "
             f"{datetime.date.today().isoformat()} · command: `{command}` · wall time "
             f"{time.perf_counter() - started:.0f} s", "",
             "Both ranges store the same packed int4 nibbles and float32 scales per row (or group of 128): "
             "equal bytes. Full-range scale per row/group: max(max(w, 0) / 7, -min(w, 0) / 8); the MSE clip "
             "search and GPTQ run on the [-8, 7] grid. Output SQNR: y = x @ w.T on 256 held-out inputs.", "",
             *(["## Per layer (PixArt-XL shapes)", "", *layer_table(rows), ""] if rows else []), *e2e]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
