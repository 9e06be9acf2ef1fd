"""Qua²SeDiMo acceptance bench on the built-in PixArt and the stress model (docs/qua2sedimo.md).

For each model: run the preset's small search, then measure fidelity to FP (SQNR of the final
latents, dB) on prompts and seeds the search never saw, for the constructed configuration, for
uniform per-channel RTN at 3 and 4 bits (the frontier, linearly interpolated at the same average
bits) and for 20 random configurations moved to the same average bits.

    PYTHONPATH=<dir holding ditq> python3 bench/qua2sedimo_bench.py [--configs 80] [--epochs 300]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path



def evaluate(pipe, transformer, labeller) -> float:
    return labeller.quality(labeller.fitness(transformer))


def rtn_point(pipe, bits: int, symmetric: bool, labeller, include) -> tuple[float, float]:
    from ditq import QuantConfig, quantize

    q = copy.deepcopy(pipe.transformer)
    report = quantize(q, QuantConfig(method="rtn", weight_bits=bits, act_bits=None, weight_symmetric=symmetric,
                                     include=include), progress=False)
    numel = sum(r.fp16_bytes for r in report.layers) / 2
    return 8 * report.quant_bytes / numel, evaluate(pipe, q, labeller)


def run(name: str, pipe, args, out: Path) -> dict:
    from ditq import QuantConfig, quantize
    from ditq.quant_core.methods.qua2sedimo import config_search as qs
    from ditq.evaluation.builtin import PIXART_CALL
    from ditq.quant_core.passes.fitness import SampleFidelity
    from ditq.quant_core.methods.qua2sedimo.method import search

    cfg = QuantConfig.preset("qua2sedimo-w3.5")
    cfg.options.update(num_configs=args.configs, epochs=args.epochs)
    start = time.perf_counter()
    result = search(pipe, cfg, workdir=out / name, progress=True)
    search_s = time.perf_counter() - start
    fidelity = SampleFidelity(pipe, ["a bowl of fruit on a table", "a lighthouse in a storm"],
                              dict(PIXART_CALL, num_inference_steps=8), seed=123)
    held_out = qs.Labeller(pipe, fidelity, {})

    q = copy.deepcopy(pipe.transformer)
    report = quantize(q, result.config, progress=False)
    real_bits = 8 * report.quant_bytes / (report.fp16_bytes / 2)
    ours = evaluate(pipe, q, held_out)

    frontier = {}
    for sym in (True, False):
        frontier[sym] = [rtn_point(pipe, b, sym, held_out, cfg.include) for b in (3, 4)]
    interp = {}
    for sym, ((b3, f3), (b4, f4)) in frontier.items():
        interp[sym] = f3 + (f4 - f3) * (real_bits - b3) / (b4 - b3)
    rtn_at_bits = max(interp.values())

    bank = result.bank
    randoms = []
    for i in range(20):
        a = qs.sample_assignment(bank.layers, bank.options, 10_000 + i, seed=0)
        a = qs.repair_to_bits(bank, a, real_bits, 0.03, seed=i)
        randoms.append((bank.bits(a), held_out(bank, a)))
    best_random = max(f for _, f in randoms)
    return {"model": name, "labels": result.report.num_labels, "search_seconds": round(search_s, 1),
            "stage_seconds": {k: round(v, 1) for k, v in result.report.seconds.items()},
            "avg_bits": round(real_bits, 4), "fidelity_db": round(ours, 3),
            "rtn": {("sym" if s else "asym"): [(round(b, 4), round(f, 3)) for b, f in pts] for s, pts in frontier.items()},
            "rtn_interp_db": round(rtn_at_bits, 3), "best_random_db": round(best_random, 3),
            "random_bits": [round(b, 3) for b, _ in randoms],
            "heldout_spearman": round(result.report.test_srcc, 3),
            "fold_val_spearman": [round(v, 3) for v in result.report.val_srcc]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", type=int, default=80)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--out", default="bench/results/qua2sedimo")
    p.add_argument("--models", default="tiny,stress")
    args = p.parse_args()
    from ditq.evaluation import builtin

    out = Path(args.out)
    rows = []
    for name in args.models.split(","):
        pipe = (builtin.tiny_pixart_pipeline if name == "tiny" else builtin.stress_pixart_pipeline)()
        pipe.set_progress_bar_config(disable=True)
        rows.append(run(name, pipe, args, out))
        print(json.dumps(rows[-1]))
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
