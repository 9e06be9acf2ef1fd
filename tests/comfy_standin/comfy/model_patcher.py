"""Stand-in for comfy.model_patcher.ModelPatcher: holds a BaseModel; size = state-dict bytes. Weight
patches (LoRA as plain deltas) are applied in place by ``patch_model`` with the originals kept in
``backup``, a dict every clone shares, as ComfyUI does when it samples; they stay applied until
``unpatch_model``."""
import collections

import torch

Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
        self.patches, self.object_patches = {}, {}
        self.backup = {}
        self.model_options = {"transformer_options": {}}

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = sum(t.nbytes for t in self.model.state_dict().values())
        return self.size

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.model_size())
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.object_patches = dict(self.object_patches)
        n.backup = self.backup
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        for key, delta in patches.items():
            self.patches.setdefault(key, []).append((strength_patch, delta, strength_model, None, None))
        return list(patches)

    def _set(self, key, tensor):
        owner, _, attr = key.rpartition(".")
        setattr(self.model.get_submodule(owner), attr, torch.nn.Parameter(tensor, requires_grad=False))

    def patch_model(self):
        self.unpatch_model()
        for key, entries in self.patches.items():
            original = self.model.get_parameter(key).data
            self.backup[key] = Backup(original, False)
            w = original.clone()
            for strength, delta, strength_model, _, _ in entries:
                w = w * strength_model + strength * delta
            self._set(key, w)
        return self.model

    def unpatch_model(self):
        for key, saved in self.backup.items():
            self._set(key, saved.weight)
        self.backup.clear()
