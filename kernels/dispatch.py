"""The one dispatch point: which implementation runs each op.

``DITQ_KERNELS`` (read at every call) forces a backend: ``torch`` (the reference), ``triton``, or
``auto`` (default: Triton for CUDA tensors when it is importable, the torch reference elsewhere).
Triton implementations register themselves under the same op names as ``reference.OPS``; the CPU
never imports Triton unless ``DITQ_KERNELS=triton`` asks for it (tests do, with TRITON_INTERPRET=1).
"""
from __future__ import annotations

import importlib
import os

import torch

from . import reference

_TRITON_OPS: dict = {}
_triton_loaded = False
_triton_error: Exception | None = None


def register_triton(name: str, fn) -> None:
    if name not in reference.OPS:
        raise KeyError(f"unknown kernel op {name!r}; reference ops are {sorted(reference.OPS)}")
    _TRITON_OPS[name] = fn


def _load_triton() -> bool:
    global _triton_loaded, _triton_error
    if not _triton_loaded:
        _triton_loaded = True
        try:
            importlib.import_module(f"{__package__}.triton_ops")
        except ImportError as e:
            _triton_error = e
    return _triton_error is None


def backend() -> str:
    choice = os.environ.get("DITQ_KERNELS", "auto").lower()
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"DITQ_KERNELS={choice!r}; expected auto, torch or triton")
    return choice


def op(name: str, device: torch.device):
    """The implementation of ``name`` for tensors on ``device``."""
    choice = backend()
    if choice == "torch":
        return reference.OPS[name]
    if choice == "auto" and device.type != "cuda":
        return reference.OPS[name]
    if not _load_triton():
        if choice == "triton":
            raise RuntimeError(f"DITQ_KERNELS=triton but the Triton kernels failed to import: {_triton_error}")
        return reference.OPS[name]
    return _TRITON_OPS.get(name, reference.OPS[name])
