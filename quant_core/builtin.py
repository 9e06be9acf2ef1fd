"""The built-in small models: real diffusers classes built from configs with seeded weights, so the
demo and the tests run offline on a CPU in seconds. Widths are large enough (>= 256 input channels)
for per-channel scales to cost what they cost on real models (2 / K bytes per weight).
"""
from __future__ import annotations

import torch

# Keyword arguments the tiny pipelines are called with (no resolution binning, short captions).
PIXART_CALL = dict(num_inference_steps=10, guidance_scale=4.5, use_resolution_binning=False,
                   max_sequence_length=32, clean_caption=False)


def tiny_text_encoder(d_model: int = 64, seed: int = 0):
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=384, d_model=d_model, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
                   relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False)
    return ByT5Tokenizer(), T5EncoderModel(cfg).eval()


def tiny_pixart_transformer(seed: int = 0, *, num_layers: int = 4, sample_size: int = 16,
                            caption_channels: int = 64):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=num_layers, patch_size=2, attention_head_dim=64,
        num_attention_heads=4, caption_channels=caption_channels, in_channels=4, out_channels=8,
        cross_attention_dim=256, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6, use_additional_conditions=False,
    ).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                         norm_num_groups=32, sample_size=32).eval()


def tiny_pixart_pipeline(seed: int = 0, variant: str = "alpha"):
    """A PixArt-α (or ``variant="sigma"``) pipeline: 4 blocks of width 256, 16x16 latents, 32x32 images."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    cls = {"alpha": PixArtAlphaPipeline, "sigma": PixArtSigmaPipeline}[variant]
    tokenizer, text_encoder = tiny_text_encoder(seed=seed)
    return cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(seed),
               transformer=tiny_pixart_transformer(seed), scheduler=DPMSolverMultistepScheduler())
