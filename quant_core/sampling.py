"""Driving a diffusers pipeline deterministically: does it take prompts or class labels, one seeded
sample returning both the final latents and the decoded images, and the keyword arguments the
built-in pipelines are called with. Calibration, the search fitness of methods and the evaluation
helpers all sample through here."""
from __future__ import annotations

import inspect

import torch

# Keyword arguments the tiny pipelines are called with (no resolution binning, short captions).
PIXART_CALL = dict(num_inference_steps=10, guidance_scale=4.5, use_resolution_binning=False,
                   max_sequence_length=80, clean_caption=False)
DIT_CALL = dict(num_inference_steps=10, guidance_scale=4.0)


def takes_prompts(pipe) -> bool:
    return "prompt" in inspect.signature(pipe.__call__).parameters


def sample(pipe, condition, seed: int, call: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Final latents (as handed to the VAE) and images ``[N, 3, H, W]`` in [0, 1] (one image, or a
    video's frames) for one prompt (text pipelines) or class label (``DiTPipeline``), one seed."""
    captured = {}
    vae = pipe.vae
    original = vae.decode

    def decode(z, *args, **kwargs):
        captured["latents"] = z.detach().float().clone()
        return original(z, *args, **kwargs)

    vae.decode = decode
    try:
        gen = torch.Generator("cpu").manual_seed(seed)
        if takes_prompts(pipe):
            out = pipe(condition, generator=gen, output_type="pt", **call)
        else:
            out = pipe(class_labels=[condition], generator=gen, output_type="pt", **call)
    finally:
        del vae.decode  # drop the instance attribute: the class method is visible again
    pixels = out.images if hasattr(out, "images") else out.frames  # video: [1, F, 3, H, W]
    return captured["latents"], pixels.reshape(-1, *pixels.shape[-3:]).float()
