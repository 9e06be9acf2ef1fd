"""Load Quantized DiT (ditq) and Save Quantized DiT (ditq): the single-file format in models/ditq,
and the ComfyUI-native export into models/diffusion_models."""
from __future__ import annotations

import os

from comfy_api.latest import io

from . import comfy_adapter as ad
from .types import CATEGORY

FORMATS = ["ditq", "comfyui-native"]


def download_hub_file(spec: str) -> str:
    """``owner/repo/path/in/repo.safetensors`` -> local path via the Hugging Face cache."""
    parts = spec.strip().split("/")
    if len(parts) < 3 or not parts[-1].endswith(".safetensors"):
        raise ValueError(f"hub_file {spec!r}: expected 'owner/repo/file.safetensors'")
    from huggingface_hub import hf_hub_download

    return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))


class LoadQuantizedDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DitqLoadQuantizedDiT",
            display_name="Load Quantized DiT (ditq)",
            category=CATEGORY,
            description="Builds a quantized DiT from a ditq file alone (no full-precision checkpoint).",
            inputs=[
                io.Combo.Input("model_name", options=ad.checkpoint_files() or ["(no ditq checkpoints in models/ditq)"],
                               tooltip="A file written by Save Quantized DiT (ditq), in models/ditq."),
                io.String.Input("hub_file", default="", optional=True,
                                tooltip="Instead: 'owner/repo/file.safetensors' on the Hugging Face Hub "
                                        "(downloaded once, then cached; needs network)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def fingerprint_inputs(cls, model_name, hub_file=""):
        if hub_file:
            return hub_file
        try:
            return f"{model_name}:{os.path.getmtime(ad.full_path(ad.FOLDER, model_name))}"
        except (FileNotFoundError, OSError):
            return model_name

    @classmethod
    def execute(cls, model_name, hub_file="") -> io.NodeOutput:
        path = download_hub_file(hub_file) if hub_file else ad.full_path(ad.FOLDER, model_name)
        return io.NodeOutput(ad.load_patcher(path))


class SaveQuantizedDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DitqSaveQuantizedDiT",
            display_name="Save Quantized DiT (ditq)",
            category=CATEGORY,
            description="Writes a quantized DiT as one .safetensors file.",
            inputs=[
                io.Model.Input("model", tooltip="Output of Quantize DiT (ditq) or Load Quantized DiT (ditq)."),
                io.String.Input("filename", default="pixart_ditq",
                                tooltip="File name (without folders); '.safetensors' is added."),
                io.Combo.Input("format", options=FORMATS, default="ditq",
                               tooltip="'ditq': any ditq method, into models/ditq (Load Quantized DiT). "
                                       "'comfyui-native': into models/diffusion_models for the stock Load "
                                       "Diffusion Model; only int8 W8A8 dynamic (exact) and fp8 (re-scaled "
                                       "per tensor) have a native format."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name."),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename, format, overwrite) -> io.NodeOutput:
        key = ad.FOLDER if format == "ditq" else "diffusion_models"
        path = ad.output_path(key, filename)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; choose another filename or enable overwrite")
        if format == "ditq":
            ad.save_patcher(model, path)
            text = f"saved {path}"
        else:
            _, notes = ad.export_native(model, path)
            text = f"saved {path} (ComfyUI-native)\n" + "\n".join(notes)
        return io.NodeOutput(str(path), ui={"text": [text]})
