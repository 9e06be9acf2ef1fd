"""ditq as a diffusers quantizer backend (``quant_method: "ditq"``).

With it registered, stock ``PixArtTransformer2DModel.from_pretrained(repo, subfolder="transformer")``
loads a ditq checkpoint: diffusers reads ``quantization_config`` from config.json, builds the model on
the meta device, and calls our hooks. We swap the listed layers for empty quantized modules (the
core's ``prepare_quantized_modules``) and hand every tensor of the checkpoint to the core's
``load_quantized_state``, which validates names, shapes and dtypes and keeps scales / packed weights
in their stored dtype under an fp16/bf16 load. diffusers has no public registry for third-party
backends (reference/diffusers.md §1.10), so ``register`` inserts into its two mapping dicts, the
route sdnq took before diffusers shipped a shim for it.
"""
from __future__ import annotations

import enum
import json
import re
import types
import warnings
from typing import Any, Sequence

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.configuration_utils import FrozenDict
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from ..quant_core.layers import QuantModule
from ..quant_core.serialization import (CONTENT_HASH_KEY, FORMAT_VERSION, MARKERS, WEIGHTS_HASH_KEY, CheckpointError,
                                        check_computed_buffers, check_quantization_config, compute_dtype,
                                        content_hash, load_quantized_state, mark_quantized,
                                        prepare_quantized_modules, quantization_config, quantized_layers,
                                        read_header, stored_dtype)

QUANT_METHOD = "ditq"


class DitqMethod(str, enum.Enum):
    # diffusers reads ``quantization_config.quant_method.value`` for its user agent: an Enum is required.
    DITQ = QUANT_METHOD


class DitqConfig(QuantizationConfigMixin):
    """diffusers' view of a ditq ``quantization_config``. Two kinds:

    * a checkpoint's description, the dict the core writes (format_version, layers, recipe, ...; see
      quant_core/serialization.py), kept verbatim as flat attributes, plus provenance for the model
      card (``base_model``, ``fidelity``); :func:`attach_quantizer` builds it from a quantized model;
    * a request to quantize while loading, ``DitqConfig(preset="rtn-w8a8-dynamic",
      modules_to_not_convert=["proj_out"], overrides={"include": [".*"]})``, for presets that need
      no calibration; ``overrides`` replaces QuantConfig fields of the preset.
    """

    def __init__(self, preset: str | None = None, modules_to_not_convert: list[str] | None = None,
                 overrides: dict[str, Any] | None = None, **fields: Any):
        fields.pop("quant_method", None)
        self.quant_method = DitqMethod.DITQ
        if preset is not None or modules_to_not_convert is not None or overrides is not None:
            if "layers" in fields:
                raise ValueError("DitqConfig: preset/modules_to_not_convert/overrides request quantization on "
                                 "load; a config with 'layers' describes a checkpoint that is already quantized")
            fields.update(preset=preset, modules_to_not_convert=list(modules_to_not_convert or []),
                          overrides=dict(overrides or {}))
        for key, value in fields.items():
            setattr(self, key, value)

    @property
    def describes_checkpoint(self) -> bool:
        return "layers" in self.__dict__

    def to_dict(self) -> dict[str, Any]:
        # config.json is written with json.dumps: quant_method as a plain string, and recipe options
        # that are not JSON (a method's state_path) as their str(), as the core's save writes them
        d = json.loads(json.dumps({**self.__dict__, "quant_method": QUANT_METHOD}, default=str))
        d.pop(WEIGHTS_HASH_KEY, None)  # names the weights it was loaded with, not those a re-save writes
        return d

    def to_diff_dict(self) -> dict[str, Any]:  # repr() calls it; the mixin does not define it
        return self.to_dict()


def on_load_recipe(config: DitqConfig, keep_fp32: Sequence[str] = ()):
    """The QuantConfig a quantize-on-load request runs: the preset with ``overrides``, its ``exclude``
    extended by ``modules_to_not_convert`` (names matched as substrings, diffusers' convention) and
    diffusers' ``_keep_in_fp32_modules`` (dotted name components). Refuses presets
    whose method needs calibration statistics, pointing to the calibrated route."""
    from ..quant_core.config import QuantConfig
    from ..quant_core.methods import get_method

    preset = getattr(config, "preset", None)
    names = QuantConfig.presets()
    free = [n for n in names if not get_method(QuantConfig.preset(n).method).needs(QuantConfig.preset(n))]
    if preset is None:
        raise ValueError("to quantize while loading, pass DitqConfig(preset=...) with a preset that needs no "
                         f"calibration: {', '.join(free)}")
    recipe = QuantConfig.preset(preset)  # raises for an unknown name, listing the known ones
    overrides = getattr(config, "overrides", None) or {}
    if overrides:
        recipe = QuantConfig.from_dict({**recipe.to_dict(), **overrides})  # refuses unknown fields
    needs = get_method(recipe.method).needs(recipe)
    if needs:
        raise ValueError(
            f"preset {preset!r} needs calibration statistics {list(needs)}, which loading weights cannot "
            "provide: use ditq.QuantizedPixArtPipeline.from_pretrained(repo, quantization_config="
            f"{preset!r}, calibration_prompts=[...]) or ditq.quantize(model, QuantConfig.preset({preset!r}), "
            f"ditq.calibrate(pipe, prompts)); presets that quantize on load: {', '.join(free)}")
    recipe.exclude = [*recipe.exclude, *(re.escape(m) for m in getattr(config, "modules_to_not_convert", None) or []),
                      *(rf"(^|\.){re.escape(m)}(\.|$)" for m in keep_fp32)]
    return recipe


# Tensors only quantized layers hold (QuantLinear's scales, CodebookLinear's packed indices).
_QUANTIZED_KEYS = (".weight_scale", ".indices")


class DitqQuantizer(DiffusersQuantizer):
    """Loads pre-quantized ditq checkpoints, or quantizes a full-precision one while loading
    (``quantization_config=DitqConfig(preset=...)``, presets that need no calibration)."""

    requires_calibration = False  # on-load requests are checked per preset (on_load_recipe)
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: DitqConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if self.pre_quantized != quantization_config.describes_checkpoint:
            if self.pre_quantized:
                raise CheckpointError("the checkpoint's quantization_config is a quantize-on-load request, not a "
                                      "ditq checkpoint description (no 'layers')")
            raise ValueError("this DitqConfig describes a quantized checkpoint; to quantize a full-precision "
                             "model while loading pass DitqConfig(preset=...)")
        if not self.pre_quantized:
            on_load_recipe(quantization_config)  # refuse before any weight is read
        self.compute_dtype: torch.dtype | None = None
        self.keep_fp32: list[str] = []
        self.source = "ditq checkpoint"
        self._files: list[str] = []
        self._tensors: dict[str, torch.Tensor] = {}
        self._expected: set[str] | None = None
        self._loaded = False

    # -- before loading ------------------------------------------------------------------------
    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and len({str(d) for d in device_map.values()}) > 1:
            raise NotImplementedError("ditq loads a quantized model onto one device; got a device_map spanning "
                                      f"{sorted({str(d) for d in device_map.values()})}. Use "
                                      "enable_model_cpu_offload() or enable_group_offload() instead.")

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        """No torch_dtype: the dtype the checkpoint's full-precision tensors were saved in (so a
        reload computes exactly as the saved model did), float32 for full-precision loads. diffusers
        records the result as ``_pre_quantization_dtype``."""
        stored = stored_dtype(self.quantization_config.to_dict()) if self.pre_quantized else None
        self.compute_dtype = torch_dtype or stored or torch.float32
        return self.compute_dtype

    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        if checkpoint_files:
            self._files = [str(f) for f in checkpoint_files]
            self.source = ", ".join(self._files)
        return loaded_keys

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, **kwargs):
        self.keep_fp32 = list(keep_in_fp32_modules or [])
        if self.pre_quantized:
            qcfg = check_quantization_config(self.quantization_config.to_dict(), self.source)
            check_computed_buffers(model, self.source)
            prepare_quantized_modules(model, qcfg, self.source, dtype=self.compute_dtype, mark=False)
        return model

    # -- loading: every tensor of a ditq checkpoint goes through the core's validation ----------
    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        return self.pre_quantized

    def create_quantized_param(self, model, param_value, param_name, param_device, state_dict,
                               unexpected_keys=None, **kwargs):
        """diffusers calls this per tensor with the whole shard. We take the shard's tensors as
        stored (``param_value`` was already cast to torch_dtype, fp32 scales included) and load the
        model in one validated step as soon as every expected tensor has been seen."""
        if self._loaded:
            return
        self._tensors.update(state_dict)
        if self._expected is None:
            self._expected = set(model.state_dict())
        if self._expected <= self._tensors.keys():
            self._load(model, param_device)

    def _load(self, model, device=None) -> None:
        self._check_hashes()
        load_quantized_state(model, self._tensors, self.source, self.compute_dtype, keep_fp32=self.keep_fp32)
        self._tensors, self._loaded = {}, True
        if device is not None and torch.device(device).type != "cpu":
            model.to(device)

    def _check_hashes(self) -> None:
        """The content hash ditq's own saves put in the header, and config.json's record of it, when
        the checkpoint is one file (diffusers hands us its tensors as stored)."""
        pickled = [f for f in self._files if not f.endswith(".safetensors")]
        if pickled:
            raise CheckpointError(f"{pickled[0]}: ditq checkpoints are safetensors only; this is a pickle file")
        if len(self._files) != 1:
            return
        _, meta = read_header(self._files[0])
        recorded = getattr(self.quantization_config, WEIGHTS_HASH_KEY, None)
        if recorded is not None and recorded != meta.get(CONTENT_HASH_KEY):
            raise CheckpointError(f"{self.source}: config.json and the weights come from different saves (a save "
                                  "interrupted between them?)")
        if CONTENT_HASH_KEY in meta and content_hash(self._tensors, meta) != meta[CONTENT_HASH_KEY]:
            raise CheckpointError(f"{self.source}: content hash mismatch: the file was altered or corrupted "
                                  "after it was saved")

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            if not self._loaded:  # some tensors never came: the core names them
                self._load(model)
            mark_quantized(model, model.ditq_state)
        else:
            from ..quant_core.quantize import quantize

            quantize(model, on_load_recipe(self.quantization_config, self.keep_fp32), progress=False)
        self.quantization_config = model.config.quantization_config  # what save_pretrained writes
        return model

    # -- saving --------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        if not safe_serialization:
            raise ValueError("ditq writes quantized models as safetensors only (a pickle file could run code "
                             "when loaded): save with safe_serialization=True, the default")
        self._check_layers(state_dict)
        return state_dict, {"ditq_format_version": str(FORMAT_VERSION)}

    def _check_layers(self, state_dict) -> None:
        """Refuse to write a config that no longer describes the tensors (layers replaced, fused or
        dequantized after the model was marked): the reload would be silently wrong."""
        layers = getattr(self.quantization_config, "layers", None) or {}
        quantized = [k for k in state_dict if k.endswith(_QUANTIZED_KEYS)]
        listed = [n for n in layers if not any(k.startswith(f"{n}.") for k in quantized)]
        unlisted = sorted({k.rsplit(".", 1)[0] for k in quantized if not any(k.startswith(f"{n}.") for n in layers)})
        if listed or unlisted:
            raise ValueError(f"cannot save: the ditq quantization_config no longer matches the model (layers "
                             f"{(listed + unlisted)[:3]} changed since it was quantized); ditq.quantize or a "
                             "ditq loader must produce the model that is saved")

    def _dequantize(self, model):
        return dequantize_model(model)

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def attach_quantizer(model, *, quantizer: DitqQuantizer | None = None, **provenance: Any) -> DitqConfig:
    """Make a ditq-quantized diffusers model look like one diffusers' loader produced: its config
    carries the ``quantization_config`` (and ``_pre_quantization_dtype``), ``model.hf_quantizer``,
    ``is_quantized`` and ``quantization_method`` are set, so the stock ``save_pretrained`` writes a
    checkpoint that stock ``from_pretrained`` reads back and diffusers' dtype rules apply.
    ``num_parameters`` / ``get_memory_footprint`` count the quantized weights and
    ``fuse_qkv_projections`` refuses quantized projections (instance methods: the class is stock).
    ``provenance`` (``base_model``, ``fidelity``) is stored alongside for the model card.
    Called through ``quant_core.serialization.mark_quantized`` by every entry path."""
    old = getattr(model.config, "quantization_config", None)
    kept = {k: v for k, v in (old.to_dict() if isinstance(old, DitqConfig) else {}).items()
            if k in ("base_model", "base_revision", "fidelity")}
    fields = {**quantization_config(model), **kept,
              **{k: v for k, v in provenance.items() if v is not None}}
    cfg = DitqConfig(**fields)
    model.register_to_config(quantization_config=cfg, _pre_quantization_dtype=compute_dtype(model))
    if quantizer is None:
        quantizer = DitqQuantizer(cfg, pre_quantized=True)
    quantizer.quantization_config = cfg
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = cfg.quant_method
    for name, method in _MODEL_METHODS.items():
        setattr(model, name, types.MethodType(method, model))
    return cfg


def _logical_size(layer) -> int:
    """Parameters the full-precision Linear had: weight and bias."""
    has_bias = any(n.rsplit(".", 1)[-1] == "bias" for n, _ in layer.named_buffers())
    return layer.in_features * layer.out_features + (layer.out_features if has_bias else 0)


def _num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """diffusers' count plus the quantized layers' weights and biases (stored as buffers, not trainable)."""
    count = type(self).num_parameters(self, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    return count if only_trainable else count + sum(_logical_size(m) for m in quantized_layers(self).values())


def _get_memory_footprint(self, return_buffers: bool = True) -> int:
    """Bytes held, with the quantized weights (buffers) counted even when ``return_buffers=False``."""
    mem = type(self).get_memory_footprint(self, return_buffers=return_buffers)
    if not return_buffers:
        mem += sum(b.nelement() * b.element_size() for m in quantized_layers(self).values() for b in m.buffers())
    return mem


def _fuse_qkv_projections(self, *args, **kwargs):
    """Refuse before touching the model when a projection to fuse is quantized: separately quantized
    to_q / to_k / to_v have their own scales (and calibration), so their packed weights cannot be
    concatenated into one full-precision Linear."""
    quantized = [f"{n}.{p}" for n, m in self.named_modules() for p in ("to_q", "to_k", "to_v", "add_k_proj")
                 if isinstance(getattr(m, p, None), QuantModule)]
    if quantized:
        raise ValueError(f"fuse_qkv_projections(): {quantized[0]} (and {len(quantized) - 1} more) are ditq-quantized "
                         "and cannot be fused; the model is unchanged. Fuse the full-precision model before "
                         "quantizing it, or run unfused.")
    return type(self).fuse_qkv_projections(self, *args, **kwargs)


_MODEL_METHODS = {"num_parameters": _num_parameters, "get_memory_footprint": _get_memory_footprint,
                  "fuse_qkv_projections": _fuse_qkv_projections}


def dequantize_model(model):
    """Replace every ditq layer by an ``nn.Linear`` holding its dequantized weight (in the original
    input basis: smoothing and rotation undone, LoRA branches merged) and bias, in the model's
    compute dtype, and drop the
    quantized marks: the model is then an ordinary full-precision one (diffusers' ``dequantize()``)."""
    from ..quant_core.models import set_submodule

    dtype = compute_dtype(model)
    for name, layer in quantized_layers(model).items():
        try:
            weight = layer.effective_weight()
        except NotImplementedError:
            raise NotImplementedError(f"layer {name!r} ({layer.layer_type}) has no single weight to dequantize "
                                      "(it switches between variants per timestep)") from None
        for branch in layer.lora_branches.values():  # LoRA kept beside the packed weight: merged now
            weight = weight + branch.scale * (branch.down.float() @ branch.up.float()).T.to(weight.device)
        bias = dict(layer.named_buffers()).get("bias")
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                                 device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        set_submodule(model, name, linear)
    marks = ("quantization_config", "_pre_quantization_dtype")
    model._internal_dict = FrozenDict({k: v for k, v in model._internal_dict.items() if k not in marks})
    for name in (*_MODEL_METHODS, "ditq_state", "quantization_method"):
        model.__dict__.pop(name, None)
    return model


def mark_diffusers_model(model) -> None:
    """The diffusers adapter's entry in the core's ``MARKERS``: diffusers models get diffusers' marks."""
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):
        attach_quantizer(model)


def is_ditq_model(model) -> bool:
    return model is not None and bool(quantized_layers(model))


def register(auto_module=None) -> None:
    """Insert the backend into diffusers' quantizer maps (never replacing another backend's key),
    and have every ditq-quantized diffusers model carry diffusers' marks."""
    if mark_diffusers_model not in MARKERS:
        MARKERS.append(mark_diffusers_model)
    if auto_module is None:
        from diffusers.quantizers import auto as auto_module
    for mapping, value in ((auto_module.AUTO_QUANTIZER_MAPPING, DitqQuantizer),
                           (auto_module.AUTO_QUANTIZATION_CONFIG_MAPPING, DitqConfig)):
        current = mapping.setdefault(QUANT_METHOD, value)
        if current is not value and current.__name__ != value.__name__:
            warnings.warn(f"diffusers already maps quant_method {QUANT_METHOD!r} to {current!r}; "
                          "ditq did not replace it", stacklevel=2)
