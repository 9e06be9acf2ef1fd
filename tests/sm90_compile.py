"""Compile the Triton kernels ahead of time for sm_90 (no GPU needed) and report what came out.

    python tests/sm90_compile.py [CASE ...]                 # named cases, one JSON line each
    python tests/sm90_compile.py --sweep [--out FILE.md]    # every autotune candidate, markdown table

Run by tests/test_kernels_triton.py in a subprocess (TRITON_INTERPRET must be off, so the kernels are
real JIT functions). Per case: wgmma instruction shapes and whether their A operand comes from
registers (RS) or shared memory (SS), cp.async pipelining, shared memory, and from ``ptxas -v`` (the
ptxas that ships in the Triton wheel, run by Triton's own compile) registers and spilled bytes; for
the loop that holds the MMA, whether it is nested in another loop and whether it waits on cp.async
groups with later ones still in flight (loads overlapping the MMA).

``--sweep`` compiles every tile the autotuner keeps (``_prune``) at the PixArt-XL, Wan 2.1 14B and
Flux GEMM shapes (SHAPES), for every kernel form (FORMS).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time

os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit would skip ptxas, and with it the spill report
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ditq.kernels import triton_act_quant as aq  # noqa: E402
from ditq.kernels import triton_gemm as gm  # noqa: E402

_ALIGNED = {"N", "K", "KP", "GS", "stride_xm", "stride_wn", "stride_ym", "stride_qm"}
# zw_ptr: the zero-point pointer of the kernel before issue 21, so --sweep also runs on that tree
_SCALE_PTRS = {"sx_ptr": "*fp32", "sw_ptr": "*fp32", "zw_ptr": "*fp32", "zr_ptr": "*fp32", "zc_ptr": "*fp32",
               "b_ptr": "*bf16", "y_ptr": "*bf16"}
_FLOAT_PTRS = {"x_ptr": "*bf16", "sw_ptr": "*fp32", "zw_ptr": "*i8", "cb_ptr": "*fp16", "b_ptr": "*bf16",
               "y_ptr": "*bf16"}
_BASE = {"EVEN_K": True, "HAS_BIAS": True, "GROUP_M": 8}

# (M, K, N) of the models' linears (M: tokens x batch 2): PixArt-XL at 512/1024 px, Wan 2.1 14B
# (width 5120, FFN 13824), Flux (width 3072, FFN 12288)
SHAPES = {
    "pixart-xl": [(m, k, n) for m in (2048, 8192) for k, n in ((1152, 1152), (1152, 3456), (1152, 4608),
                                                               (4608, 1152))],
    "wan2.1-14b": [(m, k, n) for m in (2048, 8192) for k, n in ((5120, 5120), (5120, 13824), (13824, 5120))],
    "flux": [(m, k, n) for m in (2048, 8192) for k, n in ((3072, 3072), (3072, 12288), (12288, 3072))],
}
GROUP = 128  # the group size of the group-wise forms (W4A8 g128, Q-DiT's default)


def _scaled(x: str, w: str, bits: int, *, fp8=False, zero=False, grouped=False):
    return (gm._scaled_gemm_kernel, {"x_ptr": x, "w_ptr": w, **_SCALE_PTRS},
            {"BITS": bits, "FP8": fp8, "HAS_ZERO": zero, "WEIGHT_LHS": bits == 4}, grouped)


def _dequant(w: str, bits: int, *, cb_dim=0, zero=False, grouped=False):
    return (gm._dequant_gemm_kernel, {**_FLOAT_PTRS, "w_ptr": w},
            {"BITS": bits, "CB_DIM": cb_dim, "HAS_ZERO": zero, "UPCAST": False}, grouped)


# name -> (kernel, pointer types, constexprs, group-wise); each compiled with every tile _prune keeps
FORMS = {
    "w8a8": _scaled("*i8", "*i8", 8),
    "w8a8 asym": _scaled("*i8", "*i8", 8, zero=True),
    "w4a8": _scaled("*i8", "*u8", 4),
    "w4a8 g128 asym (Q-DiT)": _scaled("*i8", "*u8", 4, zero=True, grouped=True),
    "w8a8 g128 asym (Q-DiT)": _scaled("*i8", "*i8", 8, zero=True, grouped=True),
    "fp8": _scaled("*fp8e4nv", "*fp8e4nv", 8, fp8=True),
    "w4a16 g128 asym": _dequant("*u8", 4, zero=True, grouped=True),
    "w8a16": _dequant("*i8", 8),
    "fp8 weight-only": _dequant("*fp8e4nv", 8),
    # codebook weights: 6-bit indices straddle bytes (two loads), 8-bit ones are int8 (one load)
    "codebook b6 d2": _dequant("*u8", 6, cb_dim=2),
    "codebook b8 d4": _dequant("*i8", 8, cb_dim=4),
}
ACT_QUANT = {
    "act_quant rot128 k1152": (
        {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "smooth_ptr": "*fp32", "signs_ptr": "*i8",
         "static_ptr": "*fp32"},
        {"QMAX": 127.0, "FP8": False, "STATIC": False, "HAS_SMOOTH": True, "ROT": 128, "GP": 1, "GSP": 2048,
         "EPS": 1e-8}),
    "act_quant fp8 k4608": (
        {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "smooth_ptr": "*fp32", "signs_ptr": "*i8",
         "static_ptr": "*fp32"},
        {"QMAX": 448.0, "FP8": True, "STATIC": False, "HAS_SMOOTH": False, "ROT": 0, "GP": 1, "GSP": 8192,
         "EPS": 1e-8}),
}


def _form_constexprs(kernel, consts: dict, grouped: bool) -> dict:
    """The form's constexprs, with the kernel's shape flags (only those this kernel version takes)."""
    names = {p.name for p in kernel.params}
    flags = {"GROUPED": grouped, "CHANNEL_SCALE": not grouped and consts.get("CB_DIM", 0) == 0}
    return {**{k: v for k, v in flags.items() if k in names}, **_BASE, **consts}


def mma_loop(ttgir: str) -> dict:
    """The scf.for loops that hold the MMA: nested in another loop or not, and whether they wait on
    cp.async groups while later ones are still in flight (``ttg.async_wait {num = N}``, N > 0)."""
    lines = ttgir.splitlines()
    loops, found = [], []
    for i, line in enumerate(lines):
        if "scf.for" in line:
            indent = len(line) - len(line.lstrip())
            end = next(j for j in range(i + 1, len(lines))
                       if lines[j].strip().startswith("}") and len(lines[j]) - len(lines[j].lstrip()) == indent)
            loops.append((i, end))
    def holds_mma(a, b):
        return "warp_group_dot" in "\n".join(lines[a:b])

    for i, end in loops:
        if not holds_mma(i, end) or any(i < a and b < end and holds_mma(a, b) for a, b in loops):
            continue  # only the innermost loop around the MMA
        body = "\n".join(lines[i:end])
        waits = [int(n) for n in re.findall(r"async_wait[^\n]*\{num = (\d+) : i32\}", body)]
        found.append({"nested": any(a < i and end < b for a, b in loops),
                      "async_copies": "async_copy_global_to_local" in body,
                      "waits_in_flight": bool(waits) and min(waits) > 0})
    return {"mma_loops": found}


def ptxas_stats(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        return {"ptxas": "no ptxas -v report captured"}
    return {"registers": int(regs[-1]), "spill_stores": int(spills[-1][0]), "spill_loads": int(spills[-1][1])}


def compile_sm90(kernel, pointers: dict, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    names = [p.name for p in kernel.params]
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    sig = {n: "constexpr" if n in constexpr_names else pointers.get(n, "i32") for n in names}
    # what Triton infers at launch for 16-byte aligned pointers and sizes; without it nothing pipelines
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in pointers or n in _ALIGNED}
    log = io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(log):  # Triton prints the ptxas -v log (TRITON_DUMP_PTXAS_LOG)
        k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = k.asm["ptx"]
    wgmma = re.findall(r"(wgmma\.mma_async\.sync\.aligned\.\S+)\s+\{[^}]*\},\s*(\S+)", ptx)
    return {"wgmma": sorted({inst for inst, _ in wgmma}),
            "wgmma_a": sorted({"RS" if a.startswith("{") else "SS" for _, a in wgmma}),
            "mma_sync": "mma.sync" in ptx, "cp_async": "cp.async" in ptx, "shared": k.metadata.shared,
            "max_imprecise_acc": sorted({int(n) for n in re.findall(r"maxNumImpreciseAcc = (\d+)", k.asm["ttgir"])}),
            **ptxas_stats(log.getvalue()), **mma_loop(k.asm["ttgir"]), "seconds": round(time.monotonic() - start, 1)}


def _autotuner(kernel):
    return gm._scaled_gemm if kernel is gm._scaled_gemm_kernel else gm._dequant_gemm


def tiles(form: str, shapes) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of every config the autotuner keeps for
    ``form`` at any of ``shapes``, in the autotuner's order."""
    kernel, _, consts, grouped = FORMS[form]
    tuner = _autotuner(kernel)
    kept = []
    for m, k, _n in shapes:
        args = {"M": m, "K": k, "GS": GROUP if grouped else k}
        for c in tuner.early_config_prune(tuner.configs, args, **_form_constexprs(kernel, consts, grouped)):
            t = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            if t not in kept:
                kept.append(t)
    return kept


def tile_name(t) -> str:
    return f"{t[0]}x{t[1]}x{t[2]} w{t[3]} s{t[4]}"


def compile_form(form: str, tile) -> dict:
    kernel, ptrs, consts, grouped = FORMS[form]
    bm, bn, bk, w, s = tile
    consts = {**_form_constexprs(kernel, consts, grouped), "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    return compile_sm90(kernel, ptrs, consts, w, s)


def cases():
    """``"<form> <tile>"`` for every form and tile at the listed shapes, and the act_quant kernels."""
    every_shape = [s for shapes in SHAPES.values() for s in shapes]
    for form in FORMS:
        for t in tiles(form, every_shape):
            yield f"{form} {tile_name(t)}", lambda form=form, t=t: compile_form(form, t)
    for name, (ptrs, consts) in ACT_QUANT.items():
        yield name, lambda ptrs=ptrs, consts=consts: compile_sm90(aq._act_quant_kernel, ptrs, consts, 8, 1)


def run(name, fn) -> dict:
    try:
        return {"case": name, **fn()}
    except Exception as e:  # reported, and failed, by the test
        return {"case": name, "error": f"{type(e).__name__}: {str(e)[:500]}"}


def sweep_table(results: list[dict]) -> str:
    rows = ["| kernel form | tile (BMxBNxBK, warps, stages) | registers | spill stores B | spill loads B | "
            "shared KB | wgmma | MMA loop pipelined |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['case']} | | | | | | error: {r['error'][:80]} | |")
            continue
        loops = r.get("mma_loops") or [{}]
        piped = all(not lp.get("nested") and lp.get("waits_in_flight") for lp in loops)
        form, tile = r["case"].rsplit(" ", 3)[0], " ".join(r["case"].rsplit(" ", 3)[1:])
        wgmma = ",".join(".".join(i.split(".")[-3::2]) for i in r["wgmma"])  # e.g. s32.s8
        rows.append(f"| {form} | {tile} | {r.get('registers', '?')} | {r.get('spill_stores', '?')} | "
                    f"{r.get('spill_loads', '?')} | {r['shared'] / 1024:.0f} | {wgmma} {'/'.join(r['wgmma_a'])} | "
                    f"{'yes' if piped else 'no'} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="*", help="case names (default: all)")
    p.add_argument("--sweep", action="store_true", help="print a markdown table instead of JSON lines")
    p.add_argument("--out", help="with --sweep: also write the table here")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    args = p.parse_args(argv)
    selected = [(n, fn) for n, fn in cases() if not args.cases or n in args.cases]
    if args.list:
        print("\n".join(n for n, _ in selected))
        return
    missing = set(args.cases) - {n for n, _ in selected}
    results = [{"case": n, "error": "no such case"} for n in sorted(missing)]
    for name, fn in selected:
        results.append(run(name, fn))
        if not args.sweep:
            print(json.dumps(results[-1]), flush=True)
        else:
            print(results[-1]["case"], results[-1].get("spill_stores"), results[-1].get("seconds"),
                  file=sys.stderr, flush=True)
    if missing and not args.sweep:
        for r in results[:len(missing)]:
            print(json.dumps(r), flush=True)
    if args.sweep:
        table = (f"triton {triton.__version__}, target sm_90 (compile only, no GPU); shapes: "
                 + "; ".join(f"{name} {sorted({(k, n) for _, k, n in s})}" for name, s in SHAPES.items())
                 + f", M {sorted({m for s in SHAPES.values() for m, _, _ in s})}; group size {GROUP}\n\n"
                 + sweep_table(results))
        print(table)
        if args.out:
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                f.write(table)
            os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
