"""Stand-in for comfy.model_patcher: ModelPatcher with ComfyUI's weight-patch life cycle, reduced to
what decides where a LoRA goes (re-implemented after ComfyUI's model_patcher.py, 2025-26):

* ``add_patches`` keeps ``(strength_patch, adapter, strength_model, offset, function)`` per state-dict
  key; clones share the model and the ``backup`` of merged weights.
* ``load(device, lowvram_model_memory, force_patch_weights, full_load)``: modules (with parameters)
  past the memory budget go lowvram: their patches become ``LowVramPatch`` weight functions, or are
  merged through ``patch_weight_to_device`` when forced; the others are merged through
  ``patch_weight_to_device`` (``convert_<param>`` -> ``calculate_weight`` -> ``set_<param>``).
* ``unpatch_model`` restores merged weights from ``backup``; ``partially_load`` unpatches first when
  another clone's patches are on the model (``current_weight_patches_uuid``); ``partially_unload``
  moves loaded modules back to lowvram, turning their patches into LowVramPatch weight functions.
"""
import collections
import uuid

import comfy.lora
import comfy.utils

Backup = collections.namedtuple("Backup", ["weight", "inplace_update"])


class LowVramPatch:
    def __init__(self, key, patches, convert_func=None, set_func=None):
        self.key, self.patches = key, patches

    def __call__(self, weight):
        return comfy.lora.calculate_weight(self.patches[self.key], weight, self.key, intermediate_dtype=weight.dtype)


def get_key_weight(model, key):
    op_name, param = key.rsplit(".", 1)
    op = comfy.utils.get_attr(model, op_name)
    return getattr(op, param), getattr(op, f"set_{param}", None), getattr(op, f"convert_{param}", None)


def wipe_lowvram_weight(m):
    if hasattr(m, "prev_comfy_cast_weights"):
        m.comfy_cast_weights = m.prev_comfy_cast_weights
        del m.prev_comfy_cast_weights
    if hasattr(m, "weight_function"):
        m.weight_function, m.bias_function = [], []


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
        self.weight_inplace_update = weight_inplace_update
        self.patches, self.object_patches, self.backup = {}, {}, {}
        self.model_options = {"transformer_options": {}}
        self.patches_uuid = uuid.uuid4()
        for attr, default in (("model_lowvram", False), ("current_weight_patches_uuid", None),
                              ("model_loaded_weight_memory", 0)):
            if not hasattr(model, attr):
                setattr(model, attr, default)

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = sum(t.nbytes for t in self.model.state_dict().values())
        return self.size

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size,
                           weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = dict(self.object_patches)
        n.model_options = {**self.model_options, "transformer_options": dict(self.model_options["transformer_options"])}
        n.backup = self.backup
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        model_sd = self.model.state_dict()
        added = []
        for k, v in patches.items():
            key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            if key in model_sd:
                added.append(k)
                self.patches.setdefault(key, []).append((strength_patch, v, strength_model, offset, function))
        self.patches_uuid = uuid.uuid4()
        return added

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return
        weight, set_func, convert_func = get_key_weight(self.model, key)
        if key not in self.backup:
            self.backup[key] = Backup(weight.to(device=self.offload_device, copy=inplace_update), inplace_update)
        temp = weight.to(device_to if device_to is not None else weight.device).float().clone()
        if convert_func is not None:
            temp = convert_func(temp, inplace=True)
        out = comfy.lora.calculate_weight(self.patches[key], temp, key)
        if set_func is None:
            comfy.utils.set_attr_param(self.model, key, out.to(weight.dtype))
        else:
            set_func(out, inplace_update=inplace_update, seed=0)

    def _load_list(self):
        out = []
        for n, m in self.model.named_modules():
            own = [name for name, _ in m.named_parameters(recurse=False)]
            if any(name not in own for name, _ in m.named_parameters()):
                continue  # not a leaf holder of weights
            if own or hasattr(m, "comfy_cast_weights"):
                out.append((sum(p.nbytes for p in m.parameters()), n, m, own))
        return out

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        mem, lowvram = 0, 0
        for size, n, m, params in sorted(self._load_list(), key=lambda e: -e[0]):
            weight_key = f"{n}.weight"
            if not full_load and hasattr(m, "comfy_cast_weights") and mem + size >= lowvram_model_memory:
                lowvram += 1
                m.weight_function, m.bias_function = [], []
                if weight_key in self.patches:
                    if force_patch_weights:
                        self.patch_weight_to_device(weight_key)
                    else:
                        _, set_func, convert_func = get_key_weight(self.model, weight_key)
                        m.weight_function = [LowVramPatch(weight_key, self.patches, convert_func, set_func)]
                m.prev_comfy_cast_weights, m.comfy_cast_weights = m.comfy_cast_weights, True
                continue
            if hasattr(m, "comfy_cast_weights"):
                wipe_lowvram_weight(m)
            mem += size
            if not getattr(m, "comfy_patched_weights", False):
                for p in params:
                    self.patch_weight_to_device(f"{n}.{p}", device_to=device_to)
                m.comfy_patched_weights = True
        self.model.model_lowvram = lowvram > 0
        self.model.device = device_to
        self.model.model_loaded_weight_memory = mem
        self.model.current_weight_patches_uuid = self.patches_uuid

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        for k, obj in self.object_patches.items():
            comfy.utils.set_attr(self.model, k, obj)
        if load_weights:
            self.load(device_to, lowvram_model_memory=lowvram_model_memory,
                      force_patch_weights=force_patch_weights, full_load=lowvram_model_memory == 0)
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if not unpatch_weights:
            return
        if self.model.model_lowvram:
            for m in self.model.modules():
                wipe_lowvram_weight(m)
            self.model.model_lowvram = False
        for k, bk in self.backup.items():
            comfy.utils.set_attr_param(self.model, k, bk.weight)
        self.backup.clear()
        self.model.current_weight_patches_uuid = None
        self.model.model_loaded_weight_memory = 0
        for m in self.model.modules():
            if hasattr(m, "comfy_patched_weights"):
                del m.comfy_patched_weights

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        current = self.model.current_weight_patches_uuid
        self.unpatch_model(self.offload_device, unpatch_weights=current is not None and current != self.patches_uuid)
        if not self.model.model_lowvram and self.model.model_loaded_weight_memory > 0:
            return 0
        full = self.model.model_loaded_weight_memory + extra_memory > self.model_size()
        self.load(device_to, lowvram_model_memory=extra_memory, force_patch_weights=force_patch_weights, full_load=full)
        return self.model.model_loaded_weight_memory

    def partially_unload(self, device_to, memory_to_free=0):
        freed = 0
        for size, n, m, params in sorted(self._load_list(), key=lambda e: e[0]):
            if memory_to_free < freed:
                break
            if not getattr(m, "comfy_patched_weights", False) or not hasattr(m, "comfy_cast_weights"):
                continue
            for p in params:
                bk = self.backup.pop(f"{n}.{p}", None)
                if bk is not None:
                    comfy.utils.set_attr_param(self.model, f"{n}.{p}", bk.weight)
            weight_key = f"{n}.weight"
            if weight_key in self.patches:
                _, set_func, convert_func = get_key_weight(self.model, weight_key)
                m.weight_function.append(LowVramPatch(weight_key, self.patches, convert_func, set_func))
            m.prev_comfy_cast_weights, m.comfy_cast_weights = m.comfy_cast_weights, True
            m.comfy_patched_weights = False
            freed += size
        self.model.model_lowvram = True
        self.model.model_loaded_weight_memory -= freed
        return freed
