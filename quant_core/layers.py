"""Quantized layers: packed integer (or fp8) weights and scales, never a full-precision copy.

Every quantized layer type derives from :class:`QuantModule`, registers itself under a ``layer_type``
name, and can describe itself as a JSON-able ``spec`` from which an empty twin is built before the
state dict is loaded. That is how a model is rebuilt from the file alone (serialization.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from .. import kernels
from . import quantizers as qz
from .config import LayerScheme

LAYER_TYPES: dict[str, type["QuantModule"]] = {}
FP16_MAX = 65504.0  # dequantized weights must fit the compute dtype ditq targets
MIN_SMOOTH_SCALE = 1e-8  # smoothing divides activations by it: a denormal one turns them into Inf


def _require(ok: torch.Tensor | bool, what: str) -> None:
    if not bool(ok):
        raise ValueError(what)


def register_layer_type(name: str):
    def deco(cls):
        cls.layer_type = name
        LAYER_TYPES[name] = cls
        return cls

    return deco


class LowRankBranch(NamedTuple):
    """A full-precision adapter on a quantized layer: adds ``scale * (x @ down) @ up`` to its output."""

    down: torch.Tensor  # [K, r]
    up: torch.Tensor    # [r, N]
    scale: float


class QuantModule(nn.Module):
    """Base of quantized layers: spec round trip, byte counts, dtype-stable buffers, LoRA branches.

    Buffers named in ``_fixed_dtype`` keep their dtype under ``.to(dtype)`` / ``.half()``: scales stay
    float32 and fp8 weights stay fp8 when the model is cast to the compute dtype.

    ``lora_branches`` (name -> :class:`LowRankBranch`) are low-rank adapters (LoRA) kept beside the
    packed weight instead of being merged into it, where re-rounding would lose a small LoRA: each
    adds ``scale * (x @ down) @ up`` computed on the layer's raw input (before any smoothing or
    rotation), in the order added. They are not buffers: not in the state dict nor the saved file,
    and they cost exactly their factors. With none attached the output is the quantized one, bit for bit.
    """

    layer_type = "abstract"
    _fixed_dtype: tuple[str, ...] = ()
    _weight_buffers: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.layer_name = ""
        self.lora_branches: dict[str, LowRankBranch] = {}

    def add_branch(self, name: str, down: torch.Tensor, up: torch.Tensor, scale: float = 1.0,
                   dtype: torch.dtype | None = None) -> None:
        """Attach ``y += scale * (x @ down) @ up`` (``down`` ``[K, r]``, ``up`` ``[r, N]``) under ``name``;
        ``dtype`` (the compute dtype) casts the factors, which are detached, never copied otherwise."""
        layer = self.layer_name or type(self).__name__
        if name in self.lora_branches:
            raise ValueError(f"layer {layer!r}: a LoRA branch named {name!r} is already attached")
        k, n = self.in_features, self.out_features
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != k or up.shape[1] != n or down.shape[1] != up.shape[0]:
            raise ValueError(f"layer {layer!r}: LoRA branch {name!r} has factors {tuple(down.shape)} @ "
                             f"{tuple(up.shape)}; a {n}x{k} layer needs [{k}, r] @ [r, {n}]")
        down, up = down.detach(), up.detach()
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        self.lora_branches[name] = LowRankBranch(down, up, float(scale))

    def branch_dtype(self) -> torch.dtype:
        """The compute dtype (the bias's; float32 without a bias): what branch factors are kept in."""
        bias = next((b for n, b in self.named_buffers() if n.rsplit(".", 1)[-1] == "bias"), None)
        return bias.dtype if bias is not None else torch.float32

    @property
    def qweight(self) -> torch.Tensor:
        """A stored tensor of this layer: PEFT places a new adapter on the device of a layer's
        ``qweight`` (its name for packed weights), which codebook and switch layers have no other way
        to show (no ``weight``, no parameters)."""
        return next(self.buffers())

    def remove_branch(self, name: str) -> LowRankBranch:
        if name not in self.lora_branches:
            raise KeyError(f"layer {self.layer_name or type(self).__name__!r}: no LoRA branch {name!r} "
                           f"(attached: {sorted(self.lora_branches)})")
        return self.lora_branches.pop(name)

    def with_branches(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (this layer's quantized output for raw input ``x``) plus every attached branch."""
        for b in self.lora_branches.values():
            h = (x.to(b.down.dtype) @ b.down.to(x.device)) * b.scale
            y = y + (h @ b.up.to(x.device)).to(y.dtype)
        return y

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype = torch.float32) -> "QuantModule":
        raise NotImplementedError

    @classmethod
    def attach(cls, model: nn.Module) -> None:
        """Called once per layer type present after a model is rebuilt from a file, for layer types
        that need model-level hooks (e.g. the current timestep); the default needs none."""

    def effective_weight(self) -> torch.Tensor:
        """The float32 ``[N, K]`` weight this layer computes with, in the original input basis
        (for reports and tests; the forward never materialises it on integer paths)."""
        raise NotImplementedError

    def format_name(self) -> str:
        return self.layer_type

    def check_state(self) -> None:
        """Raise ValueError if loaded buffers are inconsistent in a way shapes and dtypes cannot show
        (called by serialization after loading)."""

    def weight_nbytes(self) -> int:
        """Bytes that stand for the weight matrix: packed values, scales, zero points, codebooks."""
        return sum(self._buffers[n].numel() * self._buffers[n].element_size()
                   for n in self._weight_buffers if self._buffers.get(n) is not None)

    def _apply(self, fn, recurse=True):
        keep = {id(b) for n, b in self._buffers.items() if n in self._fixed_dtype and b is not None}

        def keep_dtype(t):
            out = fn(t)
            if id(t) in keep and out.dtype != t.dtype:
                out = t.to(device=out.device)
            return out

        out = super()._apply(keep_dtype, recurse)
        self.lora_branches = {k: LowRankBranch(fn(b.down), fn(b.up), b.scale) for k, b in self.lora_branches.items()}
        return out


@contextmanager
def branches_lifted(model: nn.Module):
    """Detach every LoRA branch of ``model`` for the duration (e.g. to save or measure the bare
    quantized model) and put them back afterwards."""
    lifted = {m: m.lora_branches for m in model.modules() if isinstance(m, QuantModule) and m.lora_branches}
    for m in lifted:
        m.lora_branches = {}
    try:
        yield
    finally:
        for m, branches in lifted.items():
            m.lora_branches = branches


def input_basis(w: torch.Tensor, smooth: torch.Tensor | None, signs: torch.Tensor | None,
                block: int | None) -> torch.Tensor:
    """A weight stored in the balanced basis (smoothed, then rotated) back in the original input
    basis: undo the rotation (the normalised Hadamard matrices are symmetric: their own inverse),
    then the smoothing."""
    from ..kernels import reference

    if signs is not None:
        w = reference.block_hadamard(w, torch.ones_like(signs), block) * signs.float()
    if smooth is not None:
        w = w / smooth.float()
    return w


# Stored dtypes of asymmetric weights' zero points: int8 (the signed offsets of every bit width fit;
# float32 would cost 4x the bytes), and float32 in older files, which still load.
ZERO_POINT_DTYPES = {"int8": torch.int8, "float32": torch.float32}


@register_layer_type("linear")
class QuantLinear(QuantModule):
    """A Linear whose weight is stored quantized per ``scheme`` (see config.LayerScheme).

    Deliberately not an ``nn.Linear`` subclass: tools that take any ``nn.Linear`` treat ``weight``
    as its float matrix; PEFT's default LoRA layer, for one, would merge into the packed integers.

    Buffers: ``weight`` (int8 ``[N, K]`` for 8 bits, uint8 ``[N, packed_width(K, b)]`` packed for
    fewer, float8 e4m3 ``[N, K]`` for fp8), ``weight_scale`` float32 ``[N, G]``, optional
    ``weight_zero_point`` int8 ``[N, G]`` (asymmetric; the integers offset to the signed range fit
    int8 at every bit width; older files hold them as float32, which still loads:
    ``zero_point_dtype`` in the spec), ``bias`` in the compute dtype, optional
    ``input_scale`` float32 ``[1]`` (static activations), optional ``smooth_scale`` float32 ``[K]`` and
    ``rotation_signs`` int8 ``[K]`` with ``rotation_block`` (channel balancing, ViDiT-Q).
    """

    _fixed_dtype = ("weight", "weight_scale", "weight_zero_point", "input_scale", "smooth_scale",
                    "rotation_signs")
    _weight_buffers = ("weight", "weight_scale", "weight_zero_point")

    def __init__(self, in_features: int, out_features: int, scheme: LayerScheme, *, bias: bool = True,
                 smooth: bool = False, rotation_block: int | None = None, dtype=torch.float32,
                 device=None, zero_point_dtype: torch.dtype = torch.int8):
        super().__init__()
        scheme.validate("QuantLinear", in_features)
        if zero_point_dtype not in ZERO_POINT_DTYPES.values():
            raise ValueError(f"QuantLinear: zero_point_dtype {zero_point_dtype} must be one of "
                             f"{sorted(ZERO_POINT_DTYPES)}")
        if rotation_block is not None:
            from ..kernels.reference import hadamard_factors

            if not isinstance(rotation_block, int) or rotation_block < 1 or in_features % rotation_block:
                raise ValueError(f"QuantLinear: rotation_block {rotation_block!r} must be a positive divisor "
                                 f"of in_features {in_features}")
            hadamard_factors(rotation_block)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.rotation_block = rotation_block
        groups = qz.num_groups(in_features, scheme.group_size) if scheme.weight_granularity == "group" else 1
        rows = 1 if scheme.weight_granularity == "tensor" else out_features
        if scheme.weight_format == "fp8":
            w = torch.empty(out_features, in_features, dtype=qz.FP8_DTYPE, device=device)
        elif scheme.weight_bits == 8:
            w = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        else:
            w = torch.empty(out_features, qz.packed_width(in_features, scheme.weight_bits),
                            dtype=torch.uint8, device=device)
        self.register_buffer("weight", w)
        self.register_buffer("weight_scale", torch.empty(rows, groups, dtype=torch.float32, device=device))
        zp = None if scheme.weight_symmetric else torch.empty(rows, groups, dtype=zero_point_dtype, device=device)
        self.register_buffer("weight_zero_point", zp)
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        static = scheme.act_mode == "static_tensor"
        self.register_buffer("input_scale", torch.empty(1, device=device) if static else None)
        self.register_buffer("smooth_scale", torch.empty(in_features, device=device) if smooth else None)
        signs = torch.empty(in_features, dtype=torch.int8, device=device) if rotation_block else None
        self.register_buffer("rotation_signs", signs)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: LayerScheme, *, name: str = "",
                    weight: torch.Tensor | None = None, input_scale: float | torch.Tensor | None = None,
                    smooth_scale: torch.Tensor | None = None, rotation_signs: torch.Tensor | None = None,
                    rotation_block: int | None = None) -> "QuantLinear":
        """Quantize ``linear`` (or a transformed ``weight`` a method computed for it) by RTN.

        Methods that choose integer values themselves (GPTQ) use :meth:`from_quantized`.
        """
        w = (linear.weight if weight is None else weight).detach().float()
        layer = name or "linear"
        if scheme.weight_format == "fp8":
            q, scale = qz.quantize_fp8(w, per_row=True, name=f"{layer}.weight")
            zero = None
        else:
            q, scale, zero = qz.quantize_weight(
                w, scheme.weight_bits, symmetric=scheme.weight_symmetric,
                group_size=scheme.group_size if scheme.weight_granularity == "group" else None,
                per_tensor=scheme.weight_granularity == "tensor", full_range=scheme.weight_full_range,
                name=f"{layer}.weight")
        return cls.from_quantized(linear, scheme, q, scale, zero, name=name, input_scale=input_scale,
                                  smooth_scale=smooth_scale, rotation_signs=rotation_signs,
                                  rotation_block=rotation_block)

    @classmethod
    def from_quantized(cls, linear: nn.Linear, scheme: LayerScheme, q: torch.Tensor, scale: torch.Tensor,
                       zero: torch.Tensor | None, *, name: str = "", input_scale=None, smooth_scale=None,
                       rotation_signs=None, rotation_block=None) -> "QuantLinear":
        """Wrap already-quantized integer values ``q`` (unpacked, ``[N, K]``) with their scales."""
        out_f, in_f = linear.weight.shape
        dtype = linear.weight.dtype if linear.weight.is_floating_point() else torch.float32
        mod = cls(in_f, out_f, scheme, bias=linear.bias is not None, smooth=smooth_scale is not None,
                  rotation_block=rotation_block, dtype=dtype, device=linear.weight.device)
        mod.layer_name = name
        if scheme.weight_format == "fp8":
            mod.weight.copy_(q)
        else:
            if not scheme.weight_symmetric:  # store offset to signed so packing is one code path
                half = 2 ** (scheme.weight_bits - 1)
                q, zero = q.to(torch.int16) - half, zero - half
            mod.weight.copy_(qz.pack_bits(q.to(torch.int8), scheme.weight_bits))
        mod.weight_scale.copy_(scale.reshape(mod.weight_scale.shape))
        if zero is not None:
            if not torch.equal(zero, zero.round()):
                raise ValueError(f"layer {name!r}: weight zero points must be integers")
            mod.weight_zero_point.copy_(zero.reshape(mod.weight_zero_point.shape))
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        if mod.input_scale is not None:
            if input_scale is None:
                raise ValueError(f"layer {name!r}: static activations need a calibrated input_scale")
            mod.input_scale.copy_(torch.as_tensor(input_scale, dtype=torch.float32).reshape(1))
        if smooth_scale is not None:
            mod.smooth_scale.copy_(smooth_scale)
        if rotation_signs is not None:
            mod.rotation_signs.copy_(rotation_signs)
        return mod

    def spec(self) -> dict[str, Any]:
        out = {
            "layer_type": self.layer_type, "in_features": self.in_features,
            "out_features": self.out_features, "bias": self.bias is not None,
            "scheme": self.scheme.to_dict(), "smooth": self.smooth_scale is not None,
            "rotation_block": self.rotation_block,
        }
        if self.weight_zero_point is not None:
            out["zero_point_dtype"] = str(self.weight_zero_point.dtype).removeprefix("torch.")
        return out

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype = torch.float32) -> "QuantLinear":
        zdt = spec.get("zero_point_dtype", "float32")  # files before int8 zero points hold float32
        if zdt not in ZERO_POINT_DTYPES:
            raise ValueError(f"zero_point_dtype {zdt!r} must be one of {sorted(ZERO_POINT_DTYPES)}")
        return cls(spec["in_features"], spec["out_features"], LayerScheme.from_dict(spec["scheme"]),
                   bias=spec["bias"], smooth=spec.get("smooth", False),
                   rotation_block=spec.get("rotation_block"), dtype=dtype, device="meta",
                   zero_point_dtype=ZERO_POINT_DTYPES[zdt])

    # -- use ---------------------------------------------------------------------------------
    def weight_view(self, bits: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The stored weight, or a lower-bit view of it: ``(packed weight, scale, bits)``.

        A ``bits`` view of a symmetric integer weight re-rounds the stored integers onto the coarser
        grid, ``q_b = round(q * qmax_b / qmax)`` with ``scale_b = scale * qmax / qmax_b`` (the RTN
        scale of b bits), packed at b bits. Analysis and load-time derivation only (a checkpoint's
        legacy W8/W4 switch derives its views once, switching.TimestepSwitchLinear): a forward
        takes a prepared view and never re-rounds.
        """
        s = self.scheme
        if bits is None or bits == s.weight_bits:
            return self.weight, self.weight_scale, s.weight_bits
        if s.weight_format != "int" or not s.weight_symmetric or bits > s.weight_bits:
            raise ValueError(f"layer {self.layer_name or '<unnamed>'}: a {bits}-bit view needs a symmetric "
                             f"integer weight of more bits; this one is {s.name}")
        from ..kernels import reference

        qmax, qmax_b = qz.int_range(s.weight_bits, True)[1], qz.int_range(bits, True)[1]
        q = reference.unpack_weight(self.weight, s.weight_bits, self.in_features).float()
        q_b = torch.round(q * (qmax_b / qmax)).clamp(-qmax_b, qmax_b).to(torch.int8)
        return qz.pack_bits(q_b, bits), self.weight_scale * (qmax / qmax_b), bits

    def effective_weight(self, bits: int | None = None) -> torch.Tensor:
        from ..kernels import reference

        weight, scale, stored_bits = self.weight_view(bits)
        w = reference.dequant_weight(weight, scale, self.weight_zero_point,
                                     bits=stored_bits, weight_format=self.scheme.weight_format,
                                     in_features=self.in_features, dtype=torch.float32)
        return input_basis(w, self.smooth_scale, self.rotation_signs, self.rotation_block)

    def format_name(self) -> str:
        return self.scheme.name

    def check_state(self) -> None:
        """The format's rules: weight scales finite, > 0 and small enough that the largest dequantized
        weight fits float16; zero points finite integers in the stored range; symmetric 8- and 4-bit
        weights without ``weight_full_range`` never -2^(b-1) (-128, -8); static input scales and
        smoothing scales finite and > 0 (smoothing ones >= MIN_SMOOTH_SCALE); rotation signs +-1; fp8
        weights finite. (Full-precision tensors such as the bias are checked finite by serialization
        for every layer type.)"""
        s = self.scheme
        scale = self.weight_scale
        _require(torch.isfinite(scale).all(), "non-finite weight scales")
        _require((scale > 0).all(), "weight scales must be > 0")
        qmax = qz.FP8_MAX if s.weight_format == "fp8" else 2**s.weight_bits  # largest |q - zero|, rounded up
        _require((scale * qmax <= FP16_MAX).all(), f"weight scales above {FP16_MAX / qmax:g} (dequantized "
                                                    "weights beyond float16)")
        if s.weight_format == "fp8":
            _require(torch.isfinite(self.weight.float()).all(), "fp8 weight has NaN values")
        if (s.weight_format == "int" and s.weight_symmetric and not s.weight_full_range and s.weight_bits in (4, 8)
                and qz.holds_full_range_min(self.weight, s.weight_bits, self.in_features)):
            raise ValueError(f"weight holds {-2 ** (s.weight_bits - 1)}, outside the symmetric range "
                             f"+-{2 ** (s.weight_bits - 1) - 1} of a layer without weight_full_range")
        zp = self.weight_zero_point
        if zp is not None:
            half = 2 ** (s.weight_bits - 1)
            zf = zp.float()
            _require((torch.isfinite(zf) & (zf == zf.round()) & (zf >= -half) & (zf <= half - 1)).all(),
                     f"weight zero points must be integers in [{-half}, {half - 1}]")
        for name in ("input_scale", "smooth_scale"):
            t = getattr(self, name)
            if t is not None:
                _require((torch.isfinite(t) & (t > 0)).all(), f"{name} must be finite and > 0")
        if self.smooth_scale is not None:
            _require((self.smooth_scale >= MIN_SMOOTH_SCALE).all(), f"smooth_scale below {MIN_SMOOTH_SCALE:g}")
        if self.rotation_signs is not None:
            _require((self.rotation_signs.abs() == 1).all(), "rotation_signs must all be +1 or -1")

    def forward(self, x: torch.Tensor, view: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        """``view`` = ``(packed weight, scale, bits)`` prepared by :meth:`weight_view` runs in place of
        the stored weight (same scheme otherwise)."""
        s = self.scheme
        weight, weight_scale, bits = view or (self.weight, self.weight_scale, s.weight_bits)
        x2 = x.reshape(-1, self.in_features)
        try:
            if s.act_mode is None:  # quantized activations check on the way; weight-only must too
                qz.check_finite(x2, "activation")
            y = kernels.quant_linear(
                x2, weight=weight, weight_scale=weight_scale, weight_zero=self.weight_zero_point,
                bias=self.bias, bits=bits, weight_format=s.weight_format, in_features=self.in_features,
                act_mode=s.act_mode, act_bits=s.act_bits, group_size=s.group_size, input_scale=self.input_scale,
                smooth=self.smooth_scale, rotation_signs=self.rotation_signs, rotation_block=self.rotation_block)
        except qz.NonFiniteError as e:
            raise qz.NonFiniteError(f"layer {self.layer_name or '<unnamed>'}: input {e}") from None
        return self.with_branches(x, y.reshape(*x.shape[:-1], self.out_features))

    def extra_repr(self) -> str:
        extras = []
        if self.smooth_scale is not None:
            extras.append("smoothed")
        if self.rotation_block:
            extras.append(f"hadamard{self.rotation_block}")
        tail = (", " + ", ".join(extras)) if extras else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.scheme.name}, bias={self.bias is not None}{tail}")


@register_layer_type("codebook")
class CodebookLinear(QuantModule):
    """A Linear whose weight is a codebook plus packed indices (k-means / vector quantization).

    The weight rows are split into sub-vectors of ``dim`` consecutive input channels; each stores a
    ``bits``-bit index into a codebook of ``2^bits`` entries. ``per_channel`` codebooks
    (``[N, 2^b, dim]``, Qua²SeDiMo's K-Means-C) or one per layer (``[1, 2^b, dim]``, K-Means-A, VQ4DiT).
    Buffers: ``indices`` uint8 ``[N, packed_width(K / dim, bits)]``, int8 ``[N, K / dim]`` for 8 bits
    (see quantizers.pack_bits, index ``u`` stored as ``u - 2^(bits-1)``): ``bits / dim`` bits per weight
    (rows padded to 8 indices) plus the codebook; ``codebook`` float16, ``bias`` in the compute dtype.
    ``act_bits`` (with ``act_mode="dynamic_token"``) quantizes activations per token before the product.
    """

    _fixed_dtype = ("indices", "codebook")
    _weight_buffers = ("indices", "codebook")

    def __init__(self, in_features: int, out_features: int, bits: int, *, dim: int = 1,
                 per_channel: bool = False, bias: bool = True, act_bits: int | None = None,
                 act_mode: str | None = None, dtype=torch.float32, device=None):
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"CodebookLinear: index bits must be in 1..8, got {bits}")
        if in_features % dim:
            raise ValueError(f"CodebookLinear: sub-vector length {dim} does not divide in_features {in_features}")
        if (act_mode is None) != (act_bits is None) or act_mode not in (None, "dynamic_token"):
            raise ValueError(f"CodebookLinear: act_mode {act_mode!r} / act_bits {act_bits!r}; expected "
                             "both None (weight-only) or 'dynamic_token' with act_bits")
        self.in_features, self.out_features, self.bits, self.dim = in_features, out_features, bits, dim
        self.per_channel, self.act_bits, self.act_mode = per_channel, act_bits, act_mode
        width = qz.packed_width(in_features // dim, bits)
        dt = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("indices", torch.empty(out_features, width, dtype=dt, device=device))
        rows = out_features if per_channel else 1
        self.register_buffer("codebook", torch.empty(rows, 2**bits, dim, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_assignment(cls, linear: nn.Linear, indices: torch.Tensor, codebook: torch.Tensor, bits: int, *,
                        name: str = "", act_bits: int | None = None) -> "CodebookLinear":
        """Wrap unsigned indices ``[N, K / d]`` (int64, < 2^bits) and a codebook ``[R, 2^bits, d]`` for
        ``linear`` (its shape, bias and dtype)."""
        out_f, in_f = linear.weight.shape
        rows, entries, dim = codebook.shape
        if entries != 2**bits or rows not in (1, out_f) or tuple(indices.shape) != (out_f, in_f // dim):
            raise ValueError(f"layer {name or 'linear'!r}: codebook {tuple(codebook.shape)} / indices "
                             f"{tuple(indices.shape)} do not fit a {out_f}x{in_f} weight at {bits} bits")
        return cls.from_codes(indices, codebook, linear.bias, name=name, act_bits=act_bits,
                              dtype=linear.weight.dtype)

    @classmethod
    def from_codes(cls, indices: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None, *,
                   name: str = "", act_bits: int | None = None, dtype=torch.float32) -> "CodebookLinear":
        """Wrap unsigned indices ``[N, K / d]`` and a codebook ``[R, 2^b, d]`` (R = 1 or N); the index
        width ``b`` is the codebook's, ``K`` is ``d`` times the index columns."""
        layer = name or "<unnamed>"
        if codebook.dim() != 3 or indices.dim() != 2 or codebook.shape[0] not in (1, indices.shape[0]):
            raise ValueError(f"layer {layer!r}: expected indices [N, K/d] and a codebook [1 or N, 2^b, d], "
                             f"got {tuple(indices.shape)} and {tuple(codebook.shape)}")
        rows, entries, dim = codebook.shape
        bits = entries.bit_length() - 1
        if entries != 2**bits or not 1 <= bits <= 8:
            raise ValueError(f"layer {layer!r}: a codebook of {entries} entries; packed indices need 2^b, b in 1..8")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= entries):
            raise ValueError(f"layer {layer!r}: indices outside the {entries}-entry codebook")
        out_f, in_f = indices.shape[0], indices.shape[1] * dim
        mod = cls(in_f, out_f, bits, dim=dim, per_channel=rows > 1, bias=bias is not None, act_bits=act_bits,
                  act_mode="dynamic_token" if act_bits else None, dtype=dtype, device=codebook.device)
        mod.layer_name = name
        mod.indices.copy_(qz.pack_bits((indices.long() - 2 ** (bits - 1)).to(torch.int8), bits))
        mod.codebook.copy_(codebook.detach())
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    def spec(self) -> dict[str, Any]:
        return {"layer_type": self.layer_type, "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "dim": self.dim, "per_channel": self.per_channel, "bias": self.bias is not None,
                "act_bits": self.act_bits, "act_mode": self.act_mode}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype = torch.float32) -> "CodebookLinear":
        return cls(spec["in_features"], spec["out_features"], spec["bits"], dim=spec["dim"],
                   per_channel=spec["per_channel"], bias=spec["bias"], act_bits=spec.get("act_bits"),
                   act_mode=spec.get("act_mode"), dtype=dtype, device="meta")

    def check_state(self) -> None:
        _require(torch.isfinite(self.codebook).all(), "codebook has NaN/Inf entries")

    def effective_weight(self) -> torch.Tensor:
        from ..kernels import reference

        return reference.codebook_decode(self.indices, self.codebook, bits=self.bits, in_features=self.in_features)

    def format_name(self) -> str:
        book = "channel" if self.per_channel else "layer"
        act = f"a{self.act_bits}-token" if self.act_bits else "a16"
        return f"codebook{self.bits}-d{self.dim}-{book} / {act}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        try:
            if self.act_mode is None:  # quantized activations check on the way; weight-only must too
                qz.check_finite(x2, "activation")
            y = kernels.codebook_linear(x2, indices=self.indices, codebook=self.codebook, bias=self.bias,
                                        bits=self.bits, in_features=self.in_features, act_mode=self.act_mode,
                                        act_bits=self.act_bits)
        except qz.NonFiniteError as e:
            raise qz.NonFiniteError(f"layer {self.layer_name or '<unnamed>'}: input {e}") from None
        return self.with_branches(x, y.reshape(*x.shape[:-1], self.out_features))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format_name()}, bias={self.bias is not None}")
