"""Stand-in for comfy.weight_adapter: the LoRA adapter (``weights`` = up, down, alpha, mid, dora_scale,
reshape) that comfy.lora.load_lora builds for ``<name>.lora_up.weight`` / ``.lora_down.weight`` keys."""
import torch


class WeightAdapterBase:
    name = ""


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys, self.weights = loaded_keys, weights

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        up, down = f"{x}.lora_up.weight", f"{x}.lora_down.weight"
        if up not in lora or down not in lora:
            return None
        return cls({up, down}, (lora[up], lora[down], alpha, None, dora_scale, None))

    def calculate_weight(self, weight, key, strength, strength_model, offset, function, intermediate_dtype=torch.float32,
                         original_weight=None):
        up, down, alpha, mid, dora_scale, reshape = self.weights
        if mid is not None or dora_scale is not None or reshape is not None:
            raise NotImplementedError("stand-in LoRAAdapter: plain LoRA only")
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = torch.mm(up.to(weight.device, intermediate_dtype), down.to(weight.device, intermediate_dtype))
        weight += function(((strength * scale) * diff.reshape(weight.shape)).type(weight.dtype))
        return weight


adapters = [LoRAAdapter]
