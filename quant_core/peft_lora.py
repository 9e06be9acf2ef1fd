"""PEFT LoRA on ditq-quantized layers, through PEFT's own custom-module extension point.

PEFT chooses a LoRA wrapper by the type of the targeted layer; for types it does not know, a
``LoraConfig`` can map them to a library's wrapper (``LoraConfig._register_custom_module``). This
module provides that wrapper for every ditq layer type and a config that has it registered, so
PEFT's machinery (``inject_adapter_in_model``, ``get_peft_model``, adapter switching, disabling,
deleting, saving adapters) works on a quantized transformer:

>>> from peft import inject_adapter_in_model
>>> inject_adapter_in_model(ditq.lora_config(r=8, target_modules=["to_q", "to_v"]), pipe.transformer)

The adapter is never merged into the packed weight (re-rounding would lose a small LoRA): it runs as
a full-precision branch on the layer's raw input, and ``merge`` moves it into the layer's own
:attr:`QuantModule.lora_branches` (still a branch, no re-quantization); ``unmerge`` takes it out
again, so ``merge_and_unload`` / diffusers' ``fuse_lora`` leave quantized layers carrying branches.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .layers import QuantModule

BRANCH_PREFIX = "peft:"  # names of merged PEFT adapters among a layer's lora_branches


class QuantLoraLayer(nn.Module, LoraLayer):
    """PEFT LoRA around a ditq :class:`QuantModule`: ``base(x) + scaling * lora_B(lora_A(x))`` per
    active adapter, the packed weight untouched. Plain LoRA only (no DoRA, no LoRA bias)."""

    def __init__(self, base_layer: QuantModule, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        if config.lora_bias:
            raise ValueError(f"{type(self).__name__} (ditq layer {base_layer.layer_name!r}): lora_bias "
                             "is not supported on quantized layers")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: QuantModule) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        device = next((b.device for b in base_layer.buffers() if b is not None), None)
        return device, base_layer.branch_dtype()

    # -- merging = keeping the adapter as the layer's own branch -----------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Move the active adapters into the quantized layer as branches (no re-rounding: the packed
        weight is never changed). ``safe_merge`` checks the factors are finite first."""
        base = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            down, up = self.lora_A[name].weight.T, self.lora_B[name].weight.T
            if safe_merge and not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                raise ValueError(f"NaNs detected in adapter {name!r} of layer {base.layer_name!r}")
            base.add_branch(BRANCH_PREFIX + name, down, up, self.scaling[name])
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            self.get_base_layer().remove_branch(BRANCH_PREFIX + self.merged_adapters.pop())

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            self.get_base_layer().remove_branch(BRANCH_PREFIX + adapter_name)
            self.merged_adapters.remove(adapter_name)
        super().delete_adapter(adapter_name)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense ``[N, K]`` update (for PEFT's reports; merging does not use it)."""
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            h = b(a(self.lora_dropout[name](self._cast_input_dtype(x, a.weight.dtype))))
            result = result + (h * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_lora_layers(config: LoraConfig) -> LoraConfig:
    """Map every ditq layer type to :class:`QuantLoraLayer` in ``config`` (PEFT's custom-module hook)
    and return it; PEFT then wraps quantized layers it targets instead of refusing them."""
    config._register_custom_module({QuantModule: QuantLoraLayer})
    return config


def lora_config(**kwargs: Any) -> LoraConfig:
    """A ``peft.LoraConfig(**kwargs)`` that can target ditq's quantized layers."""
    return register_lora_layers(LoraConfig(**kwargs))
