"""Stand-in for comfy.model_management: devices and the interrupt flag."""
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
