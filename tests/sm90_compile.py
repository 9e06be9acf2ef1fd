"""Compile every Triton kernel ahead of time for sm_90 (no GPU needed) and report what came out.

Run by tests/test_kernels.py in a subprocess (TRITON_INTERPRET must be off, so the kernels are real
JIT functions); prints one JSON line per case: wgmma instruction shapes and whether their A operand
comes from registers (RS) or shared memory (SS), cp.async pipelining, shared memory in bytes.
"""
from __future__ import annotations

import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ditq.kernels import triton_act_quant as aq
from ditq.kernels import triton_gemm as gm

_SCALED_PTRS = {"sx_ptr": "*fp32", "sw_ptr": "*fp32", "zw_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16"}
_ALIGNED = {"N", "K", "KP", "GS", "stride_xm", "stride_wn", "stride_ym", "stride_qm"}


def compile_sm90(kernel, pointers: dict, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    names = [p.name for p in kernel.params]
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    sig = {n: "constexpr" if n in constexpr_names else pointers.get(n, "i32") for n in names}
    # what Triton infers at launch for 16-byte aligned pointers and sizes; without it nothing pipelines
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in pointers or n in _ALIGNED}
    k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = k.asm["ptx"]
    wgmma = re.findall(r"(wgmma\.mma_async\.sync\.aligned\.\S+)\s+\{[^}]*\},\s*(\S+)", ptx)
    return {"wgmma": sorted({inst for inst, _ in wgmma}),
            "wgmma_a": sorted({"RS" if a.startswith("{") else "SS" for _, a in wgmma}),
            "mma_sync": "mma.sync" in ptx, "cp_async": "cp.async" in ptx, "shared": k.metadata.shared}


def cases():
    base = {"EVEN_K": True, "HAS_BIAS": True, "GROUP_M": 8}
    for bm, bn, bk, w, s in gm.HOPPER_INT8:
        tile = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
        yield f"w8a8 {bm}x{bn}x{bk} w{w} s{s}", gm._scaled_gemm_kernel, {"x_ptr": "*i8", "w_ptr": "*i8", **_SCALED_PTRS}, \
            {**base, **tile, "BITS": 8, "FP8": False, "HAS_ZERO": False, "WEIGHT_LHS": False}, w, s
    tile = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), gm.HOPPER_INT8[2][:3]))
    w, s = gm.HOPPER_INT8[2][3:]
    yield "w4a8 per-channel", gm._scaled_gemm_kernel, {"x_ptr": "*i8", "w_ptr": "*u8", **_SCALED_PTRS}, \
        {**base, **tile, "BITS": 4, "FP8": False, "HAS_ZERO": False, "WEIGHT_LHS": True}, w, s
    yield "w4a8 group asym", gm._scaled_gemm_kernel, {"x_ptr": "*i8", "w_ptr": "*u8", **_SCALED_PTRS}, \
        {**base, **tile, "BITS": 4, "FP8": False, "HAS_ZERO": True, "WEIGHT_LHS": True}, w, s
    yield "fp8", gm._scaled_gemm_kernel, {"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", **_SCALED_PTRS}, \
        {**base, **tile, "BITS": 8, "FP8": True, "HAS_ZERO": False, "WEIGHT_LHS": False}, w, s
    bm, bn, bk, w, s = gm.HOPPER_FLOAT[1]
    ftile = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    fptrs = {"x_ptr": "*bf16", "sw_ptr": "*fp32", "zw_ptr": "*fp32", "cb_ptr": "*fp16", "b_ptr": "*bf16",
             "y_ptr": "*bf16"}
    yield "w4a16 group", gm._dequant_gemm_kernel, {**fptrs, "w_ptr": "*u8"}, \
        {**base, **ftile, "BITS": 4, "CB_DIM": 0, "HAS_ZERO": True, "UPCAST": False}, w, s
    # codebook weights: 6-bit indices straddle bytes (two loads), 8-bit ones are int8 (one load)
    yield "codebook b6 d2", gm._dequant_gemm_kernel, {**fptrs, "w_ptr": "*u8"}, \
        {**base, **ftile, "BITS": 6, "CB_DIM": 2, "HAS_ZERO": False, "UPCAST": False}, w, s
    yield "codebook b8 d4", gm._dequant_gemm_kernel, {**fptrs, "w_ptr": "*i8"}, \
        {**base, **ftile, "BITS": 8, "CB_DIM": 4, "HAS_ZERO": False, "UPCAST": False}, w, s
    yield "act_quant rot128 k1152", aq._act_quant_kernel, \
        {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "smooth_ptr": "*fp32", "signs_ptr": "*i8",
         "static_ptr": "*fp32"}, \
        {"QMAX": 127.0, "FP8": False, "STATIC": False, "HAS_SMOOTH": True, "ROT": 128, "GP": 1, "GSP": 2048,
         "EPS": 1e-8}, 8, 1
    yield "act_quant fp8 k4608", aq._act_quant_kernel, \
        {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "smooth_ptr": "*fp32", "signs_ptr": "*i8",
         "static_ptr": "*fp32"}, \
        {"QMAX": 448.0, "FP8": True, "STATIC": False, "HAS_SMOOTH": False, "ROT": 0, "GP": 1, "GSP": 8192,
         "EPS": 1e-8}, 8, 1


if __name__ == "__main__":
    only = set(sys.argv[1:])
    for name, kernel, ptrs, consts, w, s in cases():
        if only and name not in only:
            continue
        try:
            out = compile_sm90(kernel, ptrs, consts, w, s)
        except Exception as e:  # reported, and failed, by the test
            out = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(json.dumps({"case": name, **out}), flush=True)
