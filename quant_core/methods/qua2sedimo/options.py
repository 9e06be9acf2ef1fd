"""Qua²SeDiMo's per-layer quantization options and the bank that computes them once (methods.md §5.2).

Each weight layer may take any option of {UAQ, K-Means-C, K-Means-A} × bits:

- ``uaq``: uniform affine per output channel; the clipping range is the (min, max) of the row shrunk
  by ``1 - 0.1 i`` (i = 0..9), the factor per row that minimises the Lp (p = 2.4) error. Stored as a
  :class:`QuantLinear` (packed integers, per-channel scale and zero point).
- ``kmc``: 1-D k-means over each output channel (``2^b`` centroids per channel);
- ``kma``: one 1-D k-means over the whole layer (``2^b`` centroids per layer).
  Both stored as a :class:`CodebookLinear` with d = 1 (packed indices + float16 centroids).

:class:`OptionBank` builds every (layer, option) module once, with its relative weight error and its
true stored size (``weight_nbytes``: packed values, scales, zero points, centroids and padding), so the
configuration search only swaps prebuilt modules in and out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ... import distributed as dist
from ...config import LayerScheme
from ...progress import report
from ...layers import LAYER_TYPES, CodebookLinear, QuantLinear, QuantModule
from ...quantizers import check_finite, dequantize, int_range, quantize

METHODS = ("uaq", "kmc", "kma")
METHOD_NAMES = {"uaq": "UAQ", "kmc": "K-Means-C", "kma": "K-Means-A"}
UAQ_SHRINK_STEPS = 10
UAQ_NORM = 2.4
KMEANS_ITERS = 100


@dataclass(frozen=True, order=True)
class Option:
    method: str
    bits: int

    @property
    def name(self) -> str:
        return f"{self.method}{self.bits}"

    @classmethod
    def parse(cls, name: str) -> "Option":
        for m in METHODS:
            if name.startswith(m) and name[len(m):].isdigit():
                return cls(m, int(name[len(m):]))
        raise ValueError(f"unknown Qua²SeDiMo option {name!r}; expected one of {METHODS} followed by bits, e.g. 'kma3'")


def option_grid(bits=(3, 4), methods=METHODS) -> list[Option]:
    for b in bits:
        if not 2 <= b <= 8:
            raise ValueError(f"option bits must be in 2..8, got {b}")
    return [Option(m, b) for b in bits for m in methods]


# -- UAQ -----------------------------------------------------------------------------------------
def uaq_quantize(w: torch.Tensor, bits: int, *, steps: int = UAQ_SHRINK_STEPS, p: float = UAQ_NORM):
    """Asymmetric per-channel quantization with the Lp-optimal clipping per row.

    Returns (q uint8 ``[N, K]``, scale ``[N, 1]``, zero ``[N, 1]``) in the core's conventions.
    """
    wf = w.float()
    qmin, qmax = int_range(bits, symmetric=False)
    lo0 = wf.amin(dim=1, keepdim=True).clamp(max=0.0)
    hi0 = wf.amax(dim=1, keepdim=True).clamp(min=0.0)
    best_err = torch.full_like(lo0, float("inf"))
    best_scale, best_zero = torch.empty_like(lo0), torch.empty_like(lo0)
    for i in range(steps):
        shrink = 1.0 - 0.1 * i
        lo, hi = lo0 * shrink, hi0 * shrink
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
        err = (dequantize(quantize(wf, scale, zero, bits, False), scale, zero) - wf).abs().pow(p).sum(1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return quantize(wf, best_scale, best_zero, bits, False), best_scale, best_zero


# -- 1-D k-means -----------------------------------------------------------------------------------
def kmeans_1d(x: torch.Tensor, k: int, iters: int = KMEANS_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on each row of ``x [R, n]`` independently, vectorised over rows.

    Deterministic: centroids start at the row's quantiles (i + 0.5) / k, so no seed is needed. In one
    dimension clusters are contiguous runs of the sorted row split at the midpoints of the sorted
    centroids, so each iteration costs O(k log n) per row through prefix sums. Empty clusters keep
    their previous centroid. Returns (centroids ``[R, k]`` sorted float32, assignment ``[R, n]`` int64).
    """
    xs, _ = x.double().sort(dim=1)
    rows, n = xs.shape
    csum = torch.cat([torch.zeros(rows, 1, dtype=torch.float64), xs.cumsum(dim=1)], dim=1)
    levels = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    cent = xs.gather(1, (levels * n).long().clamp(max=n - 1).expand(rows, k).contiguous())
    edges = None
    for _ in range(iters):
        cent, _ = cent.sort(dim=1)
        mids = (cent[:, 1:] + cent[:, :-1]) / 2
        inner = torch.searchsorted(xs.contiguous(), mids.contiguous())  # first element of clusters 1..k-1
        new_edges = torch.cat([torch.zeros(rows, 1, dtype=torch.int64), inner,
                               torch.full((rows, 1), n, dtype=torch.int64)], dim=1)
        if edges is not None and torch.equal(new_edges, edges):
            break
        edges = new_edges
        counts = edges[:, 1:] - edges[:, :-1]
        sums = csum.gather(1, edges[:, 1:]) - csum.gather(1, edges[:, :-1])
        cent = torch.where(counts > 0, sums / counts.clamp_min(1), cent)
    cent = cent.float()
    mids = (cent[:, 1:] + cent[:, :-1]) / 2
    return cent, torch.searchsorted(mids.contiguous(), x.float().contiguous())


def kmeans_codebook(w: torch.Tensor, bits: int, per_channel: bool):
    """Indices ``[N, K]`` and float16 codebook ``[R, 2^b, 1]`` for K-Means-C (per channel) or -A."""
    rows = w.float() if per_channel else w.float().reshape(1, -1)
    cent, _ = kmeans_1d(rows, 2**bits)
    cent16 = cent.half().float()  # assign against the stored (fp16) centroids
    mids = (cent16[:, 1:] + cent16[:, :-1]) / 2
    idx = torch.searchsorted(mids.contiguous(), rows.contiguous()).reshape(w.shape)
    return idx, cent16.half().unsqueeze(-1)


def build_option(linear: nn.Linear, option: Option, *, name: str = "", act_bits: int | None = None) -> QuantModule:
    """The quantized module for ``linear`` under ``option`` (activations dynamic per token if act_bits)."""
    w = linear.weight.detach()
    check_finite(w, f"{name or 'linear'}.weight")
    if option.method == "uaq":
        scheme = LayerScheme(weight_bits=option.bits, weight_symmetric=False, act_bits=act_bits,
                             act_mode="dynamic_token" if act_bits else None)
        q, scale, zero = uaq_quantize(w, option.bits)
        return QuantLinear.from_quantized(linear, scheme, q, scale, zero, name=name)
    idx, book = kmeans_codebook(w, option.bits, per_channel=option.method == "kmc")
    return CodebookLinear.from_assignment(linear, idx, book, option.bits, name=name, act_bits=act_bits)


def relative_error(reference: torch.Tensor, module: QuantModule) -> float:
    """||W - W_hat||^2 / ||W||^2 of the stored weight."""
    ref = reference.double()
    return ((module.effective_weight().double() - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-300)).item()


def _decoded_linear(mod: QuantModule) -> nn.Linear:
    dtype = mod.bias.dtype if mod.bias is not None else torch.float32
    w = mod.effective_weight()
    lin = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, dtype=dtype)
    lin.weight.data = w.to(dtype)
    if mod.bias is not None:
        lin.bias.data = mod.bias.detach().clone()
    return lin


@dataclass
class OptionEntry:
    module: QuantModule
    error: float      # relative squared weight error
    nbytes: int       # stored bytes of the weight (everything)


class OptionBank:
    """Every (layer, option) quantized once: ``bank[layer][option_name] -> OptionEntry``.

    ``numel[layer]`` is the layer's weight count, so ``bits(assignment)`` is the honest size-weighted
    average bit width of a configuration (total stored bits / total weights). ``weights_sha256``: the
    FP weights the options were built from (a bank on disk is reused only for the same weights).
    """

    def __init__(self, entries: dict[str, dict[str, OptionEntry]], numel: dict[str, int], act_bits: int | None,
                 weights_sha256: str, decoded_cache_bytes: int = 2 << 30):
        self.entries, self.numel, self.act_bits = entries, numel, act_bits
        self.weights_sha256 = weights_sha256
        self.decoded_cache_bytes = decoded_cache_bytes  # decoded stand-ins kept for reuse across labels
        self._decoded: dict[tuple[str, str], nn.Linear] = {}
        self._decoded_bytes = 0

    @classmethod
    def build(cls, model: nn.Module, layers, options: list[Option], *, act_bits: int | None = None,
              progress: bool = True) -> "OptionBank":
        """Every option of every layer; under torch.distributed each layer is built on one rank and
        its modules shared (through the CPU) with the others."""
        from tqdm.auto import tqdm

        from ...serialization import layers_sha256

        def row(name: str) -> dict[str, OptionEntry]:
            linear = model.get_submodule(name)
            out = {}
            for opt in options:
                mod = build_option(linear, opt, name=name, act_bits=act_bits)
                out[opt.name] = OptionEntry(mod, relative_error(linear.weight.detach(), mod), mod.weight_nbytes())
            return out

        def size(name: str) -> int:
            return model.get_submodule(name).weight.numel()

        entries, numel = {}, {}
        names = list(layers)
        with tqdm(total=len(names), desc="qua2sedimo options", disable=not progress or not dist.is_main(),
                  leave=False) as bar:
            for name, built in dist.map_balanced(row, names, cost=size):
                device = model.get_submodule(name).weight.device
                for e in built.values():
                    e.module.to(device)
                entries[name], numel[name] = built, size(name)
                bar.update(1)
                report("qua2sedimo options", len(entries), len(names))
        return cls(entries, numel, act_bits, layers_sha256(model, names))

    @property
    def layers(self) -> list[str]:
        return list(self.entries)

    @property
    def options(self) -> list[str]:
        return list(next(iter(self.entries.values())))

    def nbytes(self, assignment: dict[str, str]) -> int:
        return sum(self.entries[n][o].nbytes for n, o in assignment.items())

    def bits(self, assignment: dict[str, str]) -> float:
        """Average stored bits per weight over the assigned layers (overhead and padding included)."""
        return 8 * self.nbytes(assignment) / sum(self.numel[n] for n in assignment)

    def install(self, model: nn.Module, assignment: dict[str, str], *, decoded: bool = False) -> None:
        """Swap the prebuilt modules of ``assignment`` into ``model`` (no recomputation).

        ``decoded=True`` (labelling only, weight-only banks) installs fake-quantized ``nn.Linear``
        stand-ins holding each module's decoded weight: the same product as the packed module, without
        unpacking the weight again at every denoising step.
        """
        from ...models import set_submodule

        if decoded and self.act_bits is not None:
            raise ValueError("decoded stand-ins are weight-only; this bank quantizes activations too")
        for name, opt in assignment.items():
            mod = self.entries[name][opt].module
            if decoded:
                key = (name, opt)
                if key not in self._decoded:
                    lin = _decoded_linear(mod)
                    size = lin.weight.numel() * lin.weight.element_size()
                    if self._decoded_bytes + size > self.decoded_cache_bytes:
                        set_submodule(model, name, lin)
                        continue
                    self._decoded[key], self._decoded_bytes = lin, self._decoded_bytes + size
                mod = self._decoded[key]
            set_submodule(model, name, mod)

    # -- cache on disk ---------------------------------------------------------------------------
    def save(self, path) -> None:
        from ...serialization import atomic_save_file

        tensors, meta = {}, {}
        for name, row in self.entries.items():
            meta[name] = {"numel": self.numel[name], "options": {}}
            for opt, e in row.items():
                for key, t in e.module.state_dict().items():
                    tensors[f"{name}/{opt}/{key}"] = t.contiguous()
                meta[name]["options"][opt] = {"spec": e.module.spec(), "error": e.error, "nbytes": e.nbytes}
        atomic_save_file(tensors, Path(path), {"ditq.qua2sedimo_bank": json.dumps(
            {"act_bits": self.act_bits, "weights_sha256": self.weights_sha256, "layers": meta})})

    @classmethod
    def load(cls, path) -> "OptionBank":
        from ...serialization import CheckpointError, read_safetensors

        tensors, header = read_safetensors(path)
        try:
            meta = json.loads(header["ditq.qua2sedimo_bank"])
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a Qua²SeDiMo option bank ({e})") from None
        entries, numel = {}, {}
        for name, lm in meta["layers"].items():
            numel[name] = lm["numel"]
            entries[name] = {}
            for opt, om in lm["options"].items():
                mod = LAYER_TYPES[om["spec"]["layer_type"]].from_spec(om["spec"])
                prefix = f"{name}/{opt}/"
                mod.load_state_dict({k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)},
                                    assign=True)
                mod.layer_name = name
                entries[name][opt] = OptionEntry(mod, om["error"], om["nbytes"])
        if "weights_sha256" not in meta:
            raise CheckpointError(f"{path}: option bank without the hash of its FP weights (made before it was "
                                  f"recorded); delete it, the search rebuilds it")
        return cls(entries, numel, meta["act_bits"], meta["weights_sha256"])
