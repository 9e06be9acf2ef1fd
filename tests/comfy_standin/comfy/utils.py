"""Stand-in for comfy.utils: ProgressBar (instances recorded so tests can read progress), attribute
paths, load_torch_file."""
BARS = []


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current = total, 0
        BARS.append(self)

    def update(self, value):
        self.current += value

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = value


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr(obj, attr, value):
    *path, name = attr.split(".")
    owner = get_attr(obj, ".".join(path)) if path else obj
    prev = getattr(owner, name)
    setattr(owner, name, value)
    return prev


def set_attr_param(obj, attr, value):
    import torch

    return set_attr(obj, attr, torch.nn.Parameter(value, requires_grad=False))


def load_torch_file(path, safe_load=True):
    import safetensors.torch

    return safetensors.torch.load_file(str(path))
