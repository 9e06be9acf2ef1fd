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

import copy
import enum
import warnings
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from ..quant_core.serialization import (CONTENT_HASH_KEY, FORMAT_VERSION, WEIGHTS_HASH_KEY, CheckpointError,
                                        check_computed_buffers, check_quantization_config, content_hash,
                                        load_quantized_state, prepare_quantized_modules, quantization_config,
                                        quantized_layers, read_header)

QUANT_METHOD = "ditq"


class DitqMethod(str, enum.Enum):
    # diffusers reads ``quantization_config.quant_method.value`` for its user agent: an Enum is required.
    DITQ = QUANT_METHOD


class DitqConfig(QuantizationConfigMixin):
    """diffusers' view of a ditq ``quantization_config``: the dict the core writes (format_version,
    layers, recipe, ...; see quant_core/serialization.py), kept verbatim as flat attributes, plus
    provenance for the model card (``base_model``, ``fidelity``). Build one from a quantized model
    with :func:`attach_quantizer`; users never construct it by hand."""

    def __init__(self, **fields: Any):
        fields.pop("quant_method", None)
        self.quant_method = DitqMethod.DITQ
        for key, value in fields.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        d = copy.deepcopy(self.__dict__)
        d["quant_method"] = QUANT_METHOD  # config.json is written with json.dumps: a plain string
        d.pop(WEIGHTS_HASH_KEY, None)  # names the weights it was loaded with, not those a re-save writes
        return d

    def to_diff_dict(self) -> dict[str, Any]:  # repr() calls it; the mixin does not define it
        return self.to_dict()


class DitqQuantizer(DiffusersQuantizer):
    """Loads pre-quantized ditq checkpoints. Quantizing on load needs calibration and a method
    pass, which is ``QuantizedPixArtPipeline.from_pretrained(..., quantization_config=...)``'s job."""

    requires_calibration = True
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: DitqConfig, **kwargs):
        if not kwargs.get("pre_quantized", True):
            raise ValueError(
                "ditq quantizes with a calibrated method pass, not while loading weights: use "
                "ditq.QuantizedPixArtPipeline.from_pretrained(repo, quantization_config=QuantConfig.preset(...), "
                "calibration_prompts=[...]) or ditq.quantize(model, config, calibrate(pipe, prompts))")
        super().__init__(quantization_config, **kwargs)
        self.compute_dtype: torch.dtype | None = None
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
                                      "enable_model_cpu_offload() on the pipeline instead.")

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
        self.compute_dtype = torch_dtype
        return torch_dtype

    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        if checkpoint_files:
            self._files = [str(f) for f in checkpoint_files]
            self.source = ", ".join(self._files)
        return loaded_keys

    def _process_model_before_weight_loading(self, model, **kwargs):
        qcfg = check_quantization_config(self.quantization_config.to_dict(), self.source)
        check_computed_buffers(model, self.source)
        prepare_quantized_modules(model, qcfg, self.source, dtype=self.compute_dtype or torch.float32)
        return model

    # -- loading: every tensor goes through the core's validation ----------------------------------
    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        return True

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
        load_quantized_state(model, self._tensors, self.source, self.compute_dtype or torch.float32)
        self._tensors, self._loaded = {}, True
        if device is not None and torch.device(device).type != "cpu":
            model.to(device)

    def _check_hashes(self) -> None:
        """The content hash ditq's own saves put in the header, and config.json's record of it, when
        the checkpoint is one file (diffusers hands us its tensors as stored)."""
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
        if not self._loaded:  # some tensors never came: the core names them
            self._load(model)
        return model

    # -- saving --------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        return state_dict, {"ditq_format_version": str(FORMAT_VERSION)}

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def attach_quantizer(model, **provenance: Any) -> DitqConfig:
    """Make a model quantized in memory by ``ditq.quantize`` look like one diffusers loaded: its
    config carries the ``quantization_config`` and ``model.hf_quantizer`` is set, so the stock
    ``save_pretrained`` writes a checkpoint that stock ``from_pretrained`` reads back.
    ``provenance`` (``base_model``, ``fidelity``) is stored alongside for the model card."""
    old = getattr(model.config, "quantization_config", None)
    kept = {k: v for k, v in (old.to_dict() if isinstance(old, DitqConfig) else {}).items()
            if k in ("base_model", "fidelity")}
    fields = {**quantization_config(model), **kept,
              **{k: v for k, v in provenance.items() if v is not None}}
    cfg = DitqConfig(**fields)
    model.register_to_config(quantization_config=cfg)
    model.hf_quantizer = DitqQuantizer(cfg, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = cfg.quant_method
    return cfg


def is_ditq_model(model) -> bool:
    return model is not None and bool(quantized_layers(model))


def register(auto_module=None) -> None:
    """Insert the backend into diffusers' quantizer maps (never replacing another backend's key)."""
    if auto_module is None:
        from diffusers.quantizers import auto as auto_module
    for mapping, value in ((auto_module.AUTO_QUANTIZER_MAPPING, DitqQuantizer),
                           (auto_module.AUTO_QUANTIZATION_CONFIG_MAPPING, DitqConfig)):
        current = mapping.setdefault(QUANT_METHOD, value)
        if current is not value and current.__name__ != value.__name__:
            warnings.warn(f"diffusers already maps quant_method {QUANT_METHOD!r} to {current!r}; "
                          "ditq did not replace it", stacklevel=2)
