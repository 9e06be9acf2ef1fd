"""Registers the Triton kernels with the dispatch point under the names of ``reference.OPS``.

Each op is also declared as a torch custom op (schema from the wrapper's annotations), used while
``torch.compile`` traces: the compiled graph then holds one opaque call per kernel, shaped by the fake
implementation below, instead of tracing the Triton launch and its autotuner. Eager calls go straight
to the Python wrapper and skip the custom-op dispatch overhead, which matters for small GEMMs.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import Tensor

from . import triton_act_quant as aq
from . import triton_gemm as gm
from .dispatch import register_triton

# "ditq" normally; ComfyUI imports this folder under its own module name, and both may coexist
_NS = re.sub(r"\W", "_", __package__.rsplit(".", 1)[0])


def _register(fn, fake, traced=None) -> None:
    """``traced``: a re-ordering of ``fn``'s signature for the custom op, where needed (custom ops
    take no keyword-only tensors); the dispatch passes those tensors by keyword, so both accept it."""
    op = torch.library.custom_op(f"{_NS}::{fn.__name__}", traced or fn, mutates_args=())
    op.register_fake(fake)

    def dispatch(*args, **kwargs):
        return (op if torch.compiler.is_compiling() else fn)(*args, **kwargs)

    dispatch.__doc__ = fn.__doc__
    register_triton(fn.__name__, dispatch)


def _weight_only_linear(x: Tensor, weight: Tensor, w_scale: Tensor, w_zero: Optional[Tensor],
                        bias: Optional[Tensor], smooth: Optional[Tensor] = None,
                        rotation_signs: Optional[Tensor] = None, *, bits: int, weight_format: str,
                        in_features: int, rotation_block: Optional[int] = None) -> Tensor:
    return gm.weight_only_linear(x, weight, w_scale, w_zero, bias, bits=bits, weight_format=weight_format,
                                 in_features=in_features, smooth=smooth, rotation_signs=rotation_signs,
                                 rotation_block=rotation_block)


def _quantized(x, groups, dtype):
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape[0], groups, dtype=torch.float32)


def _product(x, weight, dtype):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=dtype)


_register(aq.act_quant, lambda x, bits, group_size=None, *a, **k: _quantized(
    x, x.shape[1] // (group_size or x.shape[1]), torch.int8))
_register(aq.act_quant_static, lambda x, *a, **k: _quantized(x, 1, torch.int8))
_register(aq.act_quant_fp8, lambda x, *a, **k: _quantized(x, 1, torch.float8_e4m3fn))
_register(gm.int_gemm, lambda xq, xs, weight, *a, out_dtype, **k: _product(xq, weight, out_dtype))
_register(gm.fp8_gemm, lambda xq, xs, weight, *a, out_dtype, **k: _product(xq, weight, out_dtype))
_register(gm.weight_only_linear, lambda x, weight, *a, **k: _product(x, weight, x.dtype), _weight_only_linear)
_register(gm.codebook_linear, lambda x, indices, *a, **k: _product(x, indices, x.dtype))
