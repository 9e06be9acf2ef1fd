"""Stand-in for comfy.model_management: devices, the interrupt flag, load_models_gpu."""
import torch

_interrupted = False


class InterruptProcessingException(Exception):
    pass


def interrupt_current_processing(value=True):
    global _interrupted
    _interrupted = value


def throw_exception_if_processing_interrupted():
    global _interrupted
    if _interrupted:
        _interrupted = False
        raise InterruptProcessingException()


def get_torch_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


LOWVRAM_BUDGET = None  # bytes of weights the "GPU" holds; None: everything fits (full load)


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    """Load (patch) each model the way ComfyUI's LoadedModel.model_load does: partially_load with the
    memory available, which unpatches another clone's patches from the shared model first."""
    for m in models:
        budget = float("inf") if LOWVRAM_BUDGET is None else LOWVRAM_BUDGET
        m.partially_load(get_torch_device(), extra_memory=budget, force_patch_weights=force_patch_weights)
