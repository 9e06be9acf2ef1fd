"""GEMM micro-benchmark at PixArt-XL shapes: ditq's Triton kernels against the built-in baselines.

    python bench/bench_gemm.py [--m 1024 4096 8192] [--kn 1152 4608] [--out bench/results/gemm_h100.md]

Every (M, K, N) with K, N drawn from ``--kn`` is timed (``triton.testing.do_bench``: median, L2
flushed) for: cuBLAS bf16 ``torch.mm``; ``torch._int_mm`` + scale epilogue; ``torch._scaled_mm`` FP8
row-wise; ditq W8A8 int8 (GEMM alone, and with the activation quantization pass in front), W4A8
(per-channel and g128), FP8 (Triton kernel) and W4A16; torchao int8 dynamic and comfy-kitchen
quantized-tensor layouts when those packages import. Output: a markdown table (TFLOP/s and speed-up
over cuBLAS bf16) headed by GPU, date, commit and command. Needs a CUDA GPU; exits with a message
otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import subprocess
import sys
from pathlib import Path

import torch

FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[1024, 4096, 8192], help="token counts M")
    p.add_argument("--kn", type=int, nargs="+", default=[1152, 4608], help="values for K and for N")
    p.add_argument("--dtype", choices=sorted(FLOAT_DTYPES), default="bf16", help="activation/output dtype")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    return p.parse_args(argv)


def shapes(args) -> list[tuple[int, int, int]]:
    """(M, K, N) for every M and every (K, N) pair from ``--kn``."""
    return [(m, k, n) for m in args.m for k, n in itertools.product(args.kn, repeat=2)]


def header(command: str) -> str:
    """GPU, date, commit, versions and the command: what a reader needs to trust the numbers."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    import triton

    return (f"GPU: {gpu} | date: {datetime.date.today()} | commit: {commit} | torch {torch.__version__} | "
            f"triton {triton.__version__} | python {platform.python_version()}\n\ncommand: `{command}`\n")


def _optional_baselines(x, w, bias):
    """torchao int8 dynamic (compiled, as it is meant to run) and comfy-kitchen layouts, if importable."""
    out = {}
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        lin = torch.nn.Linear(w.shape[1], w.shape[0], device=x.device, dtype=x.dtype)
        lin.weight.data.copy_(w)
        lin.bias.data.copy_(bias)
        quantize_(lin, Int8DynamicActivationInt8WeightConfig())
        out["torchao int8dq (compiled)"] = torch.compile(lin)
    except Exception as e:  # not installed, or an API this version lacks
        print(f"torchao int8 dynamic: skipped ({type(e).__name__}: {e})", file=sys.stderr)
    try:
        from comfy_kitchen import tensor as ck

        for name in sorted(n for n in dir(ck) if n.endswith("Layout") and n != "Layout"):
            try:
                layout = getattr(ck, name)
                wq = ck.QuantizedTensor.from_float(w, layout)
                out[f"comfy-kitchen {name}"] = (
                    lambda a, wq=wq, layout=layout: torch.nn.functional.linear(
                        ck.QuantizedTensor.from_float(a, layout), wq, bias))
                out[f"comfy-kitchen {name}"](x)
            except Exception as e:  # layout needs other hardware (e.g. NVFP4 on Blackwell)
                out.pop(f"comfy-kitchen {name}", None)
                print(f"comfy-kitchen {name}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
    except ImportError as e:
        print(f"comfy-kitchen: skipped ({e})", file=sys.stderr)
    return out


def candidates(m, k, n, dtype):
    """name -> zero-argument callable, all computing (approximately) x @ w.T + bias."""
    from ditq.kernels import triton_act_quant as aq
    from ditq.kernels import triton_gemm as gm
    from ditq.quant_core import quantizers as qz

    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=dtype)
    w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
    bias = torch.randn(n, device=dev, dtype=dtype)
    xq, sx = aq.act_quant(x, 8)
    w8, sw8, _ = qz.quantize_weight(w, 8)
    w4c, sw4c, _ = qz.quantize_weight(w, 4)
    w4g, sw4g, _ = qz.quantize_weight(w, 4, group_size=128)
    w4c, w4g = qz.pack_bits(w4c, 4), qz.pack_bits(w4g, 4)
    xq_g, sx_g = aq.act_quant(x, 8, 128)
    xf8, sxf8 = aq.act_quant_fp8(x)
    wf8, swf8 = qz.quantize_fp8(w, per_row=True)
    wt8 = w8.t()  # [K, N] view of the K-contiguous weight: the column-major operand cuBLAS wants
    c = {
        "cuBLAS bf16/fp16 mm": lambda: torch.nn.functional.linear(x, w, bias),
        "torch._int_mm + scales": lambda: (torch._int_mm(xq, wt8).float() * sx * sw8.t() + bias).to(dtype),
        "torch._scaled_mm fp8 row-wise": lambda: torch._scaled_mm(
            xf8, wf8.t(), scale_a=sxf8, scale_b=swf8.t(), bias=bias if dtype == torch.bfloat16 else None,
            out_dtype=dtype),
        "ditq W8A8 GEMM": lambda: gm.int_gemm(xq, sx, w8, sw8, None, bias, bits=8, in_features=k, out_dtype=dtype),
        "ditq W8A8 quant+GEMM": lambda: gm.int_gemm(*aq.act_quant(x, 8), w8, sw8, None, bias, bits=8,
                                                    in_features=k, out_dtype=dtype),
        "ditq W4A8 GEMM": lambda: gm.int_gemm(xq, sx, w4c, sw4c, None, bias, bits=4, in_features=k, out_dtype=dtype),
        "ditq W4A8-g128 GEMM": lambda: gm.int_gemm(xq_g, sx_g, w4g, sw4g, None, bias, bits=4, in_features=k,
                                                   out_dtype=dtype),
        "ditq FP8 GEMM (Triton)": lambda: gm.fp8_gemm_triton(xf8, sxf8, wf8, swf8, bias, out_dtype=dtype),
        "ditq W4A16-g128": lambda: gm.weight_only_linear(x, w4g, sw4g, None, bias, bits=4, weight_format="int",
                                                         in_features=k),
    }
    for name, fn in _optional_baselines(x, w, bias).items():
        c[name] = lambda fn=fn: fn(x)
    # correctness at full size before timing: every candidate against the fp32 product
    y_ref = x.float() @ w.float().t() + bias.float()
    errors = {}
    for name, fn in list(c.items()):
        try:
            y = fn().float()
        except RuntimeError as e:  # e.g. a baseline that does not support this dtype on this GPU
            print(f"{name}: skipped ({e})", file=sys.stderr)
            del c[name]
            continue
        errors[name] = ((y - y_ref).norm() / y_ref.norm()).item()
    return c, errors


def run(args) -> str:
    import triton.testing

    dtype = FLOAT_DTYPES[args.dtype]
    rows = []
    for m, k, n in shapes(args):
        fns, errors = candidates(m, k, n, dtype)
        base = None
        for name, fn in fns.items():
            ms = triton.testing.do_bench(fn, warmup=25, rep=100)
            base = base or ms
            tflops = 2 * m * n * k / ms / 1e9
            rows.append(f"| {m} | {k} | {n} | {name} | {ms * 1e3:.1f} | {tflops:.0f} | {base / ms:.2f}x | "
                        f"{errors[name]:.1e} |")
            print(rows[-1], flush=True)
    table = ["| M | K | N | kernel | µs | TFLOP/s | vs cuBLAS bf16 | rel. error vs fp32 |",
             "|---|---|---|---|---|---|---|---|", *rows]
    return header("python " + " ".join(sys.argv)) + "\n" + "\n".join(table) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gemm.py needs a CUDA GPU (none found); the shapes it would run: "
                         + ", ".join(f"{m}x{k}x{n}" for m, k, n in shapes(args)))
    report = run(args)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
