"""Register the "ditq" diffusers backend without importing diffusers at ``import ditq``.

``import ditq`` must stay cheap, yet ``import ditq`` followed by a plain
``PixArtTransformer2DModel.from_pretrained(...)`` must find the backend. diffusers looks backends up
in ``diffusers.quantizers.auto``, so that module is the moment to register:

* already imported (diffusers came first): register now;
* not yet: a one-shot import hook (a meta-path finder) wraps that module's loader and registers right
  after the module has executed, whoever imports it and however (``from diffusers import X`` loads it
  through ``diffusers.models.modeling_utils``).

ditq's own diffusers-facing API calls :func:`ensure_registered` as well, so it never depends on the
hook. This module imports nothing beyond ``sys`` up front (the import protocol is duck-typed).
"""
from __future__ import annotations

import sys
import warnings

TARGET = "diffusers.quantizers.auto"


def _register(auto_module=None) -> None:
    from .quantizer import register

    register(auto_module)


def ensure_registered() -> None:
    """Register now (imports diffusers). Idempotent."""
    _register()


class _RegisteringLoader:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            _register(module)
        except Exception as e:  # never break `import diffusers` because of ditq
            warnings.warn(f"ditq could not register its diffusers quantizer backend: {e!r}", stacklevel=2)


class _DiffusersHook:
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        import importlib.util

        uninstall()
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


_HOOK = _DiffusersHook()


def uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Called by ``ditq/__init__``: register now if diffusers' quantizer maps exist, else on import."""
    if TARGET in sys.modules:
        try:
            _register(sys.modules[TARGET])
        except Exception as e:
            warnings.warn(f"ditq could not register its diffusers quantizer backend: {e!r}", stacklevel=2)
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
