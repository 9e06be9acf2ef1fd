"""The only ditq code that touches ComfyUI internals: model folders, building a quantized
ModelPatcher, rebuilding a ComfyUI model from a ditq file, ComfyUI-native export, LoRA patches as
branches, driving the sampler.

ComfyUI surface used (and nothing else; tests/comfy_standin fakes exactly this):
``folder_paths`` (models_dir, folder_names_and_paths, get_filename_list, get_full_path_or_raise,
get_folder_paths), ``comfy.model_patcher`` (ModelPatcher, subclassed: ``load``,
``patch_weight_to_device``, ``partially_unload``, ``unpatch_model``; LowVramPatch),
``comfy.weight_adapter.LoRAAdapter`` (``weights``), ``comfy.lora.calculate_weight``, ``comfy.model_detection.
model_config_from_unet_config``, ``comfy.model_management`` (get_torch_device, unet_offload_device,
throw_exception_if_processing_interrupted), ``comfy.sample`` (sample, prepare_noise,
fix_empty_latent_channels), ``comfy.utils.ProgressBar``; on a model: ``patcher.model`` (a
BaseModel: ``diffusion_model``, ``model_config`` with ``unet_config``/``get_model``/
``set_inference_dtype``, ``device``), ``patcher.patches/object_patches/model_options/load_device/
offload_device/model_size()``.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..quant_core.calibration import CalibrationData, CalibrationRecorder
from ..quant_core.config import QuantConfig
from ..quant_core.layers import QuantLinear, QuantModule, branches_lifted
from ..quant_core.models import select_layers
from ..quant_core.quantize import quantize
from ..quant_core.serialization import (CheckpointError, atomic_save_file, load_quantized_state,
                                        prepare_quantized_modules, quantization_config, read_single_file,
                                        save_quantized)

FOLDER = "ditq"                      # models/ditq: quantized DiTs (ditq single files)
CALIB_FOLDER = "ditq_calibration"    # models/ditq/calibration: saved calibrations
COMFY_KEY = "comfyui"                # model_config entry that says how to rebuild the ComfyUI model


class ComfyAdapterError(ValueError):
    """A ComfyUI model or file cannot be handled; the message says why and what to do."""


# -- model folders -------------------------------------------------------------------------------
def register_folders() -> None:
    """Register models/ditq (and its calibration subfolder) for .safetensors only. An unknown key
    passed to add_model_folder_path would match every file, so the tuple is set explicitly."""
    import folder_paths

    base = os.path.join(folder_paths.models_dir, "ditq")
    for key, path in ((FOLDER, base), (CALIB_FOLDER, os.path.join(base, "calibration"))):
        if key not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[key] = ([path], {".safetensors"})


def folder_files(key: str) -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(key)


def checkpoint_files() -> list[str]:
    """Files in models/ditq that are ditq checkpoints: calibrations (models/ditq/calibration, or any
    file whose header says so) and foreign files are left out. Only headers are read."""
    from safetensors import safe_open

    def is_checkpoint(name: str) -> bool:
        try:
            with safe_open(full_path(FOLDER, name), framework="pt") as f:
                return "ditq.quantization_config" in (f.metadata() or {})
        except Exception:  # unreadable or not safetensors: not offered (Load would fail on it)
            return False

    return [n for n in folder_files(FOLDER) if is_checkpoint(n)]


def full_path(key: str, name: str) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise(key, name)


def work_dir() -> str:
    """models/ditq/work: the resumable state of long optimisations (vq4dit), each file named by the
    model, calibration and options it belongs to, and removed once its optimisation completes."""
    import folder_paths

    return os.path.join(folder_paths.get_folder_paths(FOLDER)[0], "work")


def output_path(key: str, name: str) -> Path:
    """Where a new file called ``name`` goes: the first folder registered for ``key``."""
    import folder_paths

    if not name or Path(name).name != name or name.startswith("."):
        raise ComfyAdapterError(f"file name {name!r} must be a plain name without folders")
    return Path(folder_paths.get_folder_paths(key)[0]) / (name if name.endswith(".safetensors")
                                                          else f"{name}.safetensors")


# -- progress and interrupts ----------------------------------------------------------------------
def progress_callback(total: int) -> Callable[[int, int], None]:
    """``cb(done, total)``: advance a ComfyUI progress bar and honour the Cancel button. The bar is
    shown at 0 at once, so the user sees the node working before the first unit ends."""
    import comfy.model_management as mm
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)
    bar.update_absolute(0, total)

    def cb(done: int, new_total: int | None = None) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, new_total)

    return cb


def core_progress(total: int = 1):
    """``on_progress(stage, done, total)`` for the core's long loops (GPTQ columns, k-means
    iterations, optimisation steps): checks Cancel on every call, moves the bar in the stage's own
    units. Each stage, and each restart of one (the next layer's GPTQ columns), gets a fresh
    ProgressBar: ComfyUI sends a bar's updates only when it moved 0.5 % past the last one sent, so
    one bar shared by stages whose counts restart at 0 went silent for seconds."""
    import comfy.model_management as mm
    import comfy.utils

    current = {"bar": None, "stage": None, "done": 0}

    def cb(stage: str, done: int, stage_total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        if current["bar"] is None or stage != current["stage"] or done < current["done"]:
            current["bar"] = comfy.utils.ProgressBar(max(stage_total, 1))
        current["stage"], current["done"] = stage, done
        current["bar"].update_absolute(done, max(stage_total, 1))

    cb("start", 0, total)  # shown at once, before the first unit of work ends
    return cb


# -- reading a patcher ---------------------------------------------------------------------------
def diffusion_model(patcher) -> nn.Module:
    model = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    if not isinstance(model, nn.Module):
        raise ComfyAdapterError(f"expected a ComfyUI MODEL (ModelPatcher with model.diffusion_model), "
                                f"got {type(patcher).__name__}")
    return model


def is_ditq_quantized(patcher) -> bool:
    return any(isinstance(m, QuantModule) for m in diffusion_model(patcher).modules())


def _check_plain(patcher, what: str) -> None:
    """Quantization reads the stored weights; patches would be silently dropped, so refuse them."""
    dm = diffusion_model(patcher)
    if is_ditq_quantized(patcher):
        raise ComfyAdapterError(f"{what}: the model is already quantized by ditq; connect the "
                                f"full-precision model (e.g. from Load Diffusion Model)")
    native = [n for n, m in dm.named_modules() if getattr(m, "layout_type", None) is not None]
    if native:
        raise ComfyAdapterError(f"{what}: the model is already quantized in ComfyUI's native format "
                                f"(layer {native[0]!r}); connect a full-precision checkpoint")
    if patcher.patches:
        raise ComfyAdapterError(f"{what}: the model carries {len(patcher.patches)} weight patch(es) "
                                f"(a LoRA?). Quantize the base model and apply the LoRA after "
                                f"Quantize DiT (ditq): LoRAs work on the quantized model")
    bad = [k for k in patcher.object_patches if k.startswith("diffusion_model")]
    if bad:
        raise ComfyAdapterError(f"{what}: the model has object patches on its diffusion model "
                                f"({bad[0]!r}); place that node after Quantize DiT (ditq)")


def model_description(patcher) -> dict[str, Any]:
    """What a ditq file stores so the ComfyUI model can be rebuilt without the FP checkpoint:
    ComfyUI's unet_config (JSON-able entries) and the compute dtype."""
    base = patcher.model
    # tuples (Wan's patch_size, window_size) travel as JSON lists, which the model classes accept
    unet = {k: list(v) if isinstance(v, tuple) else v for k, v in base.model_config.unet_config.items()
            if isinstance(v, (bool, int, float, str, list, tuple, type(None)))}
    dm = base.diffusion_model
    dtype = next((p.dtype for p in dm.parameters() if p.is_floating_point()), torch.float32)
    return {"_class_name": type(dm).__name__,
            COMFY_KEY: {"model_config": type(base.model_config).__name__, "unet_config": unet,
                        "dtype": str(dtype).removeprefix("torch.")}}


# -- building quantized patchers -----------------------------------------------------------------
def _empty_base_model(model_config, state_dict: dict[str, torch.Tensor]):
    """A ComfyUI BaseModel whose diffusion model lives on the meta device (no weight memory)."""
    return model_config.get_model(state_dict, "", device=torch.device("meta"))


def _new_patcher(base, like=None):
    import comfy.model_management as mm

    load = like.load_device if like is not None else mm.get_torch_device()
    offload = like.offload_device if like is not None else mm.unet_offload_device()
    base.device = offload
    adopt_for_comfy(base.diffusion_model)
    # size=0: ModelPatcher measures the state dict, i.e. the packed integer bytes (a clone would
    # inherit the FP parent's cached size).
    patcher = patcher_class()(base, load_device=load, offload_device=offload)
    if like is not None:
        patcher.model_options = {**like.model_options,
                                 "transformer_options": dict(like.model_options.get("transformer_options", {}))}
        patcher.object_patches = dict(like.object_patches)
    return patcher


def own_weights(patcher) -> dict[str, torch.Tensor]:
    """The diffusion model's own weights. ComfyUI patches weights (LoRA) in place when it samples and
    leaves them applied until another patcher loads the shared model, keeping the originals in
    ``patcher.backup`` (one dict shared by all clones, keyed like ``model.state_dict()``): where a
    backup exists, it holds the model's own weight and the live tensor is someone's patched copy."""
    tensors = diffusion_model(patcher).state_dict()
    prefix = "diffusion_model."
    for key, saved in (getattr(patcher, "backup", None) or {}).items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name in tensors:
            live = tensors[name]
            tensors[name] = getattr(saved, "weight", saved).to(device=live.device, dtype=live.dtype)
    return tensors


def quantize_patcher(src, config: QuantConfig, calibration: CalibrationData | None = None,
                     on_layer: Callable[[int, int, str], None] | None = None, on_progress=None):
    """A fresh ModelPatcher holding a quantized copy of ``src``'s diffusion model (its own weights,
    whatever patches an earlier prompt left applied); ``src`` is not touched. Returns ``(patcher, report)``."""
    _check_plain(src, "Quantize DiT")
    tensors = own_weights(src)
    base = _empty_base_model(src.model.model_config, tensors)
    # assign=True shares the source's storage: no second FP copy. Quantized layers get new
    # buffers; the few kept FP tensors are cloned afterwards so the models stay independent.
    base.diffusion_model.load_state_dict(tensors, strict=True, assign=True)
    report = quantize(base.diffusion_model, config, calibration, progress=False, on_layer=on_layer,
                      on_progress=on_progress)
    shared = {t.untyped_storage().data_ptr() for t in tensors.values()}
    for mod in base.diffusion_model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is not None and t.untyped_storage().data_ptr() in shared:
                    t.data = t.data.clone()
    base.diffusion_model.ditq_comfy = model_description(src)
    return _new_patcher(base, like=src), report


def load_patcher(path) -> Any:
    """Build a ComfyUI MODEL from a ditq single file alone (no FP checkpoint)."""
    import comfy.model_detection

    tensors, qcfg, model_cfg = read_single_file(path)
    comfy_cfg = model_cfg.get(COMFY_KEY)
    if not isinstance(comfy_cfg, dict) or not isinstance(comfy_cfg.get("unet_config"), dict):
        raise CheckpointError(f"{path}: a ditq file for {model_cfg.get('_class_name', '?')}, but not one "
                              f"written for ComfyUI (no {COMFY_KEY!r} model description); use "
                              f"ditq.load_quantized in Python, or save it with Save Quantized DiT (ditq)")
    dtype = getattr(torch, str(comfy_cfg.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{path}: unknown compute dtype {comfy_cfg.get('dtype')!r}")
    unet_config = dict(comfy_cfg["unet_config"])
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, tensors)
    if model_config is None:
        raise CheckpointError(f"{path}: this ComfyUI does not know the model "
                              f"{comfy_cfg.get('model_config')!r} (unet_config {unet_config}); update ComfyUI")
    model_config.set_inference_dtype(dtype, None)
    base = _empty_base_model(model_config, tensors)
    dm = base.diffusion_model
    if type(dm).__name__ != model_cfg.get("_class_name"):
        raise CheckpointError(f"{path}: file is for {model_cfg.get('_class_name')!r}, ComfyUI built "
                              f"{type(dm).__name__!r} from its unet_config")
    prepare_quantized_modules(dm, qcfg, str(path), dtype=dtype)
    load_quantized_state(dm, tensors, str(path), torch_dtype=dtype)
    dm.ditq_comfy = model_cfg
    return _new_patcher(base)


def save_patcher(patcher, path) -> Path:
    """Write a ditq-quantized MODEL as one safetensors file (ComfyUI key names, config in header)."""
    dm = diffusion_model(patcher)
    if not is_ditq_quantized(patcher):
        raise ComfyAdapterError("Save Quantized DiT: the model is not quantized by ditq; connect the "
                                "output of Quantize DiT (ditq) or Load Quantized DiT (ditq)")
    desc = getattr(dm, "ditq_comfy", None) or model_description(patcher)
    with _as_saved(dm):
        return save_quantized(dm, path, model_config=desc)


# -- ComfyUI-native export -----------------------------------------------------------------------
def native_layer(mod: QuantModule, name: str) -> tuple[dict[str, torch.Tensor], dict, str]:
    """One ditq layer as ComfyUI's mixed-precision layout: ``(tensors, comfy_quant, note)``.

    int8 per-channel symmetric weights with dynamic per-token int8 activations map exactly onto
    ``int8_tensorwise`` with per-row ``weight_scale`` (ComfyUI quantizes activations per row at run
    time). fp8 per-channel weights are re-quantized to ComfyUI's per-tensor ``float8_e4m3fn`` (a
    fidelity change, reported). Anything else has no native twin and is refused.
    """
    s = getattr(mod, "scheme", None)
    plain = (isinstance(mod, QuantLinear) and mod.smooth_scale is None and mod.rotation_signs is None
             and s.weight_symmetric and s.weight_granularity == "channel")
    if plain and s.weight_format == "int" and s.weight_bits == 8 and s.act_mode == "dynamic_token" and s.act_bits == 8:
        return ({"weight": mod.weight, "weight_scale": mod.weight_scale.reshape(-1, 1).float()},
                {"format": "int8_tensorwise"}, "exact")
    if plain and s.weight_format == "fp8":
        from ..quant_core.metrics import sqnr
        from ..quant_core.quantizers import quantize_fp8

        w = mod.effective_weight()
        q, scale = quantize_fp8(w, per_row=False, name=f"{name}.weight")
        note = f"fp8 per-tensor, weight SQNR {sqnr(w, q.float() * scale):.1f} dB"
        return {"weight": q, "weight_scale": scale.reshape(()).float()}, {"format": "float8_e4m3fn"}, note
    fmt = s.name if s is not None else mod.layer_type
    raise ComfyAdapterError(
        f"layer {name!r} ({fmt}{', smoothed/rotated' if plain is False and s is not None else ''}) has no "
        f"ComfyUI-native format: native export supports rtn int8 per-channel W8A8 dynamic "
        f"(int8_tensorwise) and fp8 (float8_e4m3fn). Save in the 'ditq' format instead")


def export_native(patcher, path) -> tuple[Path, list[str]]:
    """Write a file stock ComfyUI loads with Load Diffusion Model (per-layer ``.comfy_quant``)."""
    dm = diffusion_model(patcher)
    qlayers = {n: m for n, m in dm.named_modules() if isinstance(m, QuantModule)}
    if not qlayers:
        raise ComfyAdapterError("native export: the model is not quantized by ditq")
    tensors = dict(dm.state_dict())
    layers, notes = {}, []
    for name, mod in qlayers.items():
        for key in list(tensors):
            if key.startswith(f"{name}.") and key != f"{name}.bias":
                del tensors[key]
        parts, layer_meta, note = native_layer(mod, name)
        tensors.update({f"{name}.{k}": v for k, v in parts.items()})
        layers[name] = layer_meta
        notes.append(f"{name}: {note}")
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    atomic_save_file(tensors, path, meta)
    return Path(path), notes


# -- LoRA and offloading on ditq layers ----------------------------------------------------------
COMFY_BRANCH = "comfy:"  # names of the branches a ModelPatcher attached to a layer: comfy:<patch index>


def low_rank_factors(patch) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(down [K, r], up [r, N], scale)`` of one ModelPatcher patch ``(strength, adapter,
    strength_model, offset, function)`` when it is a plain LoRA (ComfyUI's LoRAAdapter without DoRA,
    LoCon mid or reshape, on the whole weight, model strength 1): ComfyUI adds
    ``strength * alpha / r * up @ down`` to the weight, i.e. ``scale * (x @ down.T) @ up.T`` to the
    output. None for any other patch."""
    from comfy.weight_adapter import LoRAAdapter

    strength, adapter, strength_model, offset, function = patch
    if not isinstance(adapter, LoRAAdapter) or strength_model != 1.0 or offset is not None or function is not None:
        return None
    up, down, alpha, mid, dora_scale, reshape = adapter.weights
    if mid is not None or dora_scale is not None or reshape is not None or up.dim() != 2 or down.dim() != 2:
        return None
    return down.T, up.T, strength * (alpha / down.shape[0] if alpha is not None else 1.0)


class DensePatch:
    """Weight function for patches that are not plain LoRAs (LoHa, LoKr, DoRA, full diffs, merges):
    ComfyUI's own ``calculate_weight`` on the dequantized weight. The layer adds
    ``x @ (patched - dequantized)^T`` to its quantized output, so the packed weight is still never
    re-encoded; exact, at the cost of a dense product per call."""

    def __init__(self, key: str, patches: list):
        self.key, self.patches = key, patches

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        import comfy.lora

        return comfy.lora.calculate_weight(self.patches, weight, self.key)


def _ditq_layers(model: nn.Module):
    return ((n, m) for n, m in model.named_modules() if isinstance(m, _ComfyQuantMixin))


def attach_patches(layer: QuantModule, key: str, patches: list, device) -> None:
    """Turn the ModelPatcher patches of ``layer``'s weight into branches (all plain LoRAs) or one
    DensePatch (anything else: exact, slower), replacing what a previous patcher attached."""
    detach_patches(layer)
    if not patches:
        return
    factors = [low_rank_factors(p) for p in patches]
    if any(f is None for f in factors):
        layer.weight_function.append(DensePatch(key, patches))
        return
    for i, (down, up, scale) in enumerate(factors):
        layer.add_branch(f"{COMFY_BRANCH}{i}", down.to(device), up.to(device), scale, dtype=layer.branch_dtype())


def detach_patches(layer: QuantModule) -> None:
    for name in [n for n in layer.lora_branches if n.startswith(COMFY_BRANCH)]:
        layer.remove_branch(name)
    layer.weight_function = [f for f in layer.weight_function if not isinstance(f, DensePatch)]


class _LoraAsBranches:
    """ModelPatcher behaviour for models with ditq layers (ComfyUI-GGUF's pattern: a ModelPatcher
    subclass, so stock LoraLoader / LoraLoaderModelOnly and clones keep working unchanged).

    Patches on a ditq layer's ``weight`` key become branches of the layer each time the patcher loads
    the model, and are dropped when it unpatches it, as merged weights would be restored: the packed
    weight is never re-encoded. ``force_patch_weights`` keeps ComfyUI from giving ditq layers
    LowVramPatch weight functions on offloaded (lowvram) loads; full-precision layers are patched
    the stock way.
    """

    def load(self, *args, force_patch_weights=False, **kwargs):
        out = super().load(*args, force_patch_weights=True, **kwargs)
        device = self.model.device
        for name, layer in _ditq_layers(self.model):
            key = f"{name}.weight"
            attach_patches(layer, key, self.patches.get(key, []), device if device is not None else layer.weight.device)
        return out

    def patch_weight_to_device(self, key, *args, **kwargs):
        try:
            owner = self.model.get_submodule(key.rsplit(".", 1)[0])
        except AttributeError:
            owner = None
        if not isinstance(owner, _ComfyQuantMixin):
            return super().patch_weight_to_device(key, *args, **kwargs)
        # ditq layers: branches, attached by load(); asked for the weight (e.g. to save a
        # checkpoint), they give their stored one, since a patch cannot be merged into it
        return owner.weight if kwargs.get("return_weight") else None

    def partially_unload(self, *args, **kwargs):
        import comfy.model_patcher

        freed = super().partially_unload(*args, **kwargs)
        for _, layer in _ditq_layers(self.model):  # their patches are already attached
            layer.weight_function = [f for f in layer.weight_function
                                     if not isinstance(f, comfy.model_patcher.LowVramPatch)]
        return freed

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        out = super().unpatch_model(device_to, unpatch_weights)
        if unpatch_weights:
            for _, layer in _ditq_layers(self.model):
                detach_patches(layer)
        return out


_PATCHER_CLASS: list[type] = []


def patcher_class() -> type:
    """ComfyUI's ModelPatcher with ditq's LoRA-as-branches behaviour (built once ComfyUI is importable)."""
    if not _PATCHER_CLASS:
        import comfy.model_patcher

        _PATCHER_CLASS.append(type("DitqModelPatcher", (_LoraAsBranches, comfy.model_patcher.ModelPatcher), {}))
    return _PATCHER_CLASS[0]


class _ComfyQuantMixin:
    """What ComfyUI's ModelPatcher needs from a layer, added to ditq's quantized layers.

    * ``weight`` is a (frozen) Parameter, so the patcher lists the layer, moves it between load and
      offload devices and accepts LoRA patches on ``<layer>.weight``. Codebook and timestep-switch
      layers have no single weight tensor: they get an empty stand-in (0 bytes, never computed with).
    * LoRA: the patcher (DitqModelPatcher) attaches patches as branches; never merged and re-encoded.
    * Weight functions (DensePatch, or a stock patcher's lowvram patches) run on the dequantized
      weight; their change is added to the quantized output.
    * Offloaded layers (weights not on the input's device) are moved per call.
    """

    comfy_cast_weights = False

    def convert_weight(self, weight, inplace=False, **kwargs):
        return self.effective_weight().to(device=weight.device)

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        if return_weight:  # a weight function's result: used dequantized, as patch_delta does
            return weight
        raise ComfyAdapterError(
            f"layer {self.layer_name!r}: ComfyUI tried to merge a patch into the quantized weight, which "
            f"would re-round it. ditq models carry LoRAs as branches through their own ModelPatcher "
            f"(DitqModelPatcher); a node replaced it with a plain one. Apply the LoRA to the MODEL output "
            f"of Quantize DiT / Load Quantized DiT (ditq) directly")

    def patch_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ (f(W) - W)^T (+ bias change)`` for the weight/bias functions ``f`` ComfyUI attached."""
        w = self.effective_weight().to(x.device)
        patched = w.clone()
        for f in self.weight_function:
            patched = f(patched)
        bias = None
        if self.bias_function and self.bias is not None:
            b = self.bias.to(x.device)
            patched_b = b.clone()
            for f in self.bias_function:
                patched_b = f(patched_b)
            bias = (patched_b - b).to(x.dtype)
        return nn.functional.linear(x, (patched - w).to(x.dtype), bias)

    def forward(self, x, *args, **kwargs):
        if self.weight.device != x.device:
            moved = {n: t.to(x.device, non_blocking=True) for n, t in
                     list(self.named_parameters(recurse=False)) + list(self.named_buffers(recurse=False))}
            return torch.func.functional_call(self, moved, (x, *args), kwargs)
        y = super().forward(x, *args, **kwargs)
        if self.weight_function or self.bias_function:
            y = y + self.patch_delta(x)
        return y


_ADOPTED: dict[type, type] = {}


def adopt_for_comfy(model: nn.Module) -> None:
    """Give every ditq layer of ``model`` the ModelPatcher contract (see _ComfyQuantMixin)."""
    for mod in model.modules():
        if not isinstance(mod, QuantModule) or isinstance(mod, _ComfyQuantMixin):
            continue
        cls = type(mod)
        if cls not in _ADOPTED:
            _ADOPTED[cls] = type(f"Comfy{cls.__name__}", (_ComfyQuantMixin, cls), {})
        mod.__class__ = _ADOPTED[cls]
        w = mod._buffers.pop("weight", None)
        mod.weight_stand_in = w is None
        if w is None:
            w = torch.empty(0, dtype=mod.branch_dtype(), device=next(mod.buffers()).device)
        mod.weight = nn.Parameter(w, requires_grad=False)
        mod.weight_function, mod.bias_function = [], []


@contextmanager
def _as_saved(model: nn.Module):
    """``model`` as its file holds it: without weight stand-ins and without LoRA branches (a MODEL's
    patches are not part of the quantized model)."""
    stand_ins = {m: m._parameters.pop("weight") for m in model.modules() if getattr(m, "weight_stand_in", False)}
    try:
        with branches_lifted(model):
            yield
    finally:
        for m, w in stand_ins.items():
            m._parameters["weight"] = w


# -- calibration through ComfyUI's sampler -------------------------------------------------------
# Arguments ComfyUI passes the diffusion model that are per-call bookkeeping, not model inputs (lists of
# UUIDs, patch callbacks, ControlNet): a replayed call (VQ4DiT) runs without them, as a plain forward.
SAMPLER_ONLY_ARGS = ("transformer_options", "control")


def calibrate_patcher(patcher, *, positive, negative, latent: dict, seed: int, steps: int, cfg: float,
                      sampler_name: str, scheduler: str, needs, on_progress=None) -> CalibrationData:
    """Sample once with ComfyUI's own sampler while the recorder's hooks sit on the diffusion model;
    the same statistics (and model inputs) ditq.calibrate gathers from a diffusers pipeline.
    ``on_progress(done, total)`` after every recorded layer (steps x layers in all): a step of a
    large model on a CPU takes seconds, and Cancel is seen there too."""
    import comfy.sample

    _check_plain(patcher, "Calibrate DiT")
    dm = diffusion_model(patcher)
    layers = list(select_layers(dm))
    x = comfy.sample.fix_empty_latent_channels(patcher, latent["samples"])
    noise = comfy.sample.prepare_noise(x, seed)
    total = steps * len(layers)
    on_layer = None if on_progress is None else \
        (lambda step, i: on_progress(min(step * len(layers) + i + 1, total), total))
    rec = CalibrationRecorder(dm, layers, needs, skip_inputs=SAMPLER_ONLY_ARGS, on_layer=on_layer)
    with rec, torch.no_grad():
        rec.new_run()
        comfy.sample.sample(patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative, x,
                            seed=seed, disable_pbar=True)
    return rec.result({"model": type(dm).__name__, "num_inference_steps": steps, "seed": seed,
                       "sampler": sampler_name, "scheduler": scheduler, "cfg": cfg, "needs": list(needs),
                       "driver": "comfyui"})


def quant_summary(patcher) -> str:
    cfg = quantization_config(diffusion_model(patcher))
    return f"ditq {cfg.get('method')} on {len(cfg['layers'])} layers, model size {patcher.model_size()} B"

