"""Stand-in for comfy.lora: LoRA key maps, load_lora (LoRA and full-difference patches) and
calculate_weight, as ComfyUI applies them: for each patch in order, scale the weight by
``strength_model``, then add ``strength`` times the adapter's change."""
import torch

import comfy.weight_adapter as weight_adapter


def model_lora_keys_unet(model, key_map={}):
    for k in model.state_dict():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            name = k[len("diffusion_model."):-len(".weight")]
            key_map[f"lora_unet_{name.replace('.', '_')}"] = k
            key_map[f"diffusion_model.{name}"] = k
    return key_map


def load_lora(lora, to_load, log_missing=True):
    patch_dict = {}
    for x, target in to_load.items():
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        for cls in weight_adapter.adapters:
            adapter = cls.load(x, lora, alpha, None)
            if adapter is not None:
                patch_dict[target] = adapter
        if f"{x}.diff" in lora:
            patch_dict[target] = ("diff", (lora[f"{x}.diff"],))
    return patch_dict


def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
    for strength, v, strength_model, offset, function in patches:
        function = function if function is not None else (lambda a: a)
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(v, weight_adapter.WeightAdapterBase):
            weight = v.calculate_weight(weight, key, strength, strength_model, offset, function, intermediate_dtype)
            continue
        patch_type, v = ("diff", v) if len(v) == 1 else v
        if patch_type != "diff":
            raise NotImplementedError(f"stand-in calculate_weight: patch type {patch_type!r}")
        if strength != 0.0:
            weight += function(strength * v[0].to(weight.device, weight.dtype))
    return weight
