"""ComfyUI nodes: thin adapters over the quant core (no numerics here).

Only imported inside ComfyUI (from the pack's ``comfy_entrypoint``): the node modules import
``comfy_api``. ``comfy_adapter`` is the one module that touches ComfyUI internals.
"""
from __future__ import annotations

def make_extension():
    """The pack's ComfyExtension; imports ComfyUI's API on call, never at ``import ditq``."""
    from comfy_api.latest import ComfyExtension

    from . import comfy_adapter
    from .calibrate import CalibrateDiT
    from .io import LoadQuantizedDiT, SaveQuantizedDiT
    from .quantize import QuantizeDiT

    class DitqExtension(ComfyExtension):
        async def on_load(self) -> None:
            comfy_adapter.register_folders()

        async def get_node_list(self):
            return [CalibrateDiT, QuantizeDiT, LoadQuantizedDiT, SaveQuantizedDiT]

    return DitqExtension()
