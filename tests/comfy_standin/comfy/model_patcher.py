"""Stand-in for comfy.model_patcher.ModelPatcher: holds a BaseModel; size = state-dict bytes."""


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
        self.patches, self.object_patches = {}, {}
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
        return n
