"""Mutation testing of the numerics and the loader's checks: plant one single-line bug at a time,
run the tests that should notice, and report how many bugs the suite kills.

    OMP_NUM_THREADS=1 .venv/bin/python bench/mutation_test.py            # all mutants
    .venv/bin/python bench/mutation_test.py --only alpha-swap int8-range  # some

Each mutant edits one line of the working tree in place and puts it back afterwards (also on Ctrl-C);
the script refuses to start if a file it would edit has uncommitted changes. A mutant is killed when
its tests fail (or exceed --timeout). The baseline run (no mutant) must pass first.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINS = "tests/test_numeric_pins.py"
HOSTILE = "tests/test_checkpoint_hostile.py"
PYTEST = str(Path(sys.executable).parent / "pytest")
NO_FUZZ = ["--deselect", f"{HOSTILE}::test_fuzz_every_case_loads_finite_or_is_refused"]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    # the six the issue-22 audit saw survive
    Mutant("alpha-swap", "quant_core/passes/smoothing.py", "a.pow(alpha) / w.pow(1.0 - alpha)",
           "a.pow(1.0 - alpha) / w.pow(alpha)", (PINS, "tests/test_vidit_q.py", "-k", "smoothing")),
    Mutant("int8-range-128", "quant_core/quantizers.py", "return -(2 ** (bits - 1) - int(not full_range)), 2 ** (bits - 1) - 1",
           "return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1", (PINS, "tests/test_core_quantizers.py")),
    Mutant("zero-row-floor", "quant_core/quantizers.py", "return scale.clamp_min(SCALE_EPS), None",
           "return scale, None", (PINS, "tests/test_core_quantizers.py")),
    Mutant("shape-vs-numel", "quant_core/serialization.py", "if tuple(shape) != tuple(ref.shape):",
           "if math.prod(shape) != ref.numel():", (HOSTILE, "-k", "corpus")),
    Mutant("finite-scale-check", "quant_core/layers.py",
           '_require(torch.isfinite(scale).all(), "non-finite weight scales")', "pass",
           (HOSTILE, "-k", "values_outside")),
    Mutant("kmeans-empty-cluster", "quant_core/passes/kmeans.py",
           "return torch.where((counts > 0).reshape(batch, k, 1), means, old)", "return means",
           (PINS, "-k", "kmeans")),
    # further single-line bugs
    Mutant("fp8-zero-row-floor", "quant_core/quantizers.py", "scale = (amax / FP8_MAX).clamp_min(SCALE_EPS)",
           "scale = amax / FP8_MAX", (PINS, "tests/test_core_quantizers.py")),
    Mutant("asym-zero-unrounded", "quant_core/quantizers.py", "zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)",
           "zero = (qmin - lo / scale).clamp(qmin, qmax)", (PINS, "tests/test_core_quantizers.py")),
    Mutant("dequant-zero-sign", "quant_core/quantizers.py", "g = g - zero.float().unsqueeze(-1)",
           "g = g + zero.float().unsqueeze(-1)", (PINS, "tests/test_core_quantizers.py")),
    Mutant("smooth-weight-floor", "quant_core/passes/smoothing.py", "w = weight.detach().float().abs().amax(dim=0).clamp_min(WEIGHT_FLOOR)",
           "w = weight.detach().float().abs().amax(dim=0)", (PINS, "-k", "smoothing")),
    Mutant("per-token-finite-check", "quant_core/quantizers.py", "    check_finite(scale, name)\n    return quantize(x, scale, None, bits), scale",
           "    return quantize(x, scale, None, bits), scale", ("tests/test_core_quantizers.py",)),
    Mutant("content-hash-check", "quant_core/serialization.py",
           "if CONTENT_HASH_KEY in meta and content_hash(tensors, meta) != meta[CONTENT_HASH_KEY]:",
           "if False:", (HOSTILE, "-k", "corpus")),
    Mutant("weights-hash-check", "quant_core/serialization.py",
           "if recorded is not None and recorded != meta.get(CONTENT_HASH_KEY):", "if False:",
           (HOSTILE, "-k", "interrupted")),
    Mutant("rotation-sign-check", "quant_core/layers.py", "(self.rotation_signs.abs() == 1).all()",
           "(self.rotation_signs.abs() >= 0).all()", (HOSTILE, "-k", "corpus or values_outside")),
    Mutant("input-scale-positive", "quant_core/layers.py", "(torch.isfinite(t) & (t > 0)).all()",
           "torch.isfinite(t).all()", (HOSTILE, "-k", "corpus")),
    Mutant("fp16-range-check", "quant_core/serialization.py", "if t.numel() and t.abs().max() > FP16_MAX:",
           "if False:", (HOSTILE, "-k", "values_outside")),
    Mutant("json-recursion-caught", "quant_core/serialization.py", "except RecursionError:",
           "except ZeroDivisionError:", (HOSTILE, "-k", "corpus or deep")),
    Mutant("full-range-scale-one-end", "quant_core/quantizers.py",
           "scale = torch.maximum(g.amax(dim=-1) / qmax, g.amin(dim=-1) / qmin)", "scale = g.abs().amax(dim=-1) / qmax",
           (PINS, "tests/test_core_quantizers.py")),
    Mutant("narrow-range-min-check", "quant_core/layers.py",
           "and qz.holds_full_range_min(self.weight, s.weight_bits, self.in_features)):", "and False):",
           (HOSTILE, "-k", "lowest_integer")),
    Mutant("quantize-restore", "quant_core/quantize.py", "            set_submodule(model, name, module)\n",
           "            pass\n", (HOSTILE, "-k", "failed_quantize")),
]


def pytest(args: tuple[str, ...], timeout: int) -> tuple[bool, float]:
    """(passed, seconds) of one pytest run; a timeout counts as a failure."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    try:
        # the console script, not `python -m pytest`, which would put the checkout itself on sys.path
        res = subprocess.run([PYTEST, "-q", "-x", *NO_FUZZ, *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=timeout)
        passed = res.returncode == 0
        if res.returncode not in (0, 1):  # 2-5: usage errors, nothing collected: not a kill
            raise RuntimeError(f"pytest {' '.join(args)} exited {res.returncode}:\n{res.stdout[-2000:]}")
    except subprocess.TimeoutExpired:
        passed = False
    return passed, time.perf_counter() - t0


def plant(m: Mutant) -> str:
    """Apply ``m``; returns the original text to restore."""
    path = ROOT / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise RuntimeError(f"mutant {m.name}: expected the line once in {m.path}, found it {text.count(m.old)} times")
    path.write_text(text.replace(m.old, m.new))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", help="mutant names to run")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per test run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    files = sorted({m.path for m in chosen})
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *files], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    if dirty:
        sys.exit(f"uncommitted changes in files a mutant edits; commit or stash first:\n{dirty}")
    tests = sorted({a for m in chosen for a in m.tests if a.endswith(".py")})
    ok, secs = pytest(tuple(tests), args.timeout)
    print(f"baseline ({' '.join(tests)}): {'pass' if ok else 'FAIL'} in {secs:.0f}s", flush=True)
    if not ok:
        return 2
    rows = []
    for m in chosen:
        original = plant(m)
        try:
            passed, secs = pytest(m.tests, args.timeout)
        finally:
            (ROOT / m.path).write_text(original)
        rows.append({"mutant": m.name, "file": m.path, "killed": not passed, "seconds": round(secs, 1)})
        print(f"{m.name:24s} {'killed' if not passed else 'SURVIVED'}  ({secs:.0f}s)", flush=True)
    killed = sum(r["killed"] for r in rows)
    print(f"kill rate: {killed}/{len(rows)}")
    if args.json:
        args.json.write_text(json.dumps({"killed": killed, "mutants": len(rows), "results": rows}, indent=1))
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
