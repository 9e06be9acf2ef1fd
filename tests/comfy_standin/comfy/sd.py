"""Stand-in for comfy.sd.load_lora_for_models (what LoraLoader / LoraLoaderModelOnly call): map the
LoRA's keys onto the model's state-dict keys and add them as patches to a clone of the patcher."""
import comfy.lora


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    loaded = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(model.model, {}))
    new = model.clone()
    new.add_patches(loaded, strength_model)
    return new, None
