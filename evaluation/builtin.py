"""The built-in small models: real diffusers classes built from configs with seeded weights, so the
demo and the tests run offline on a CPU in seconds. Widths are large enough (>= 256 input channels)
for per-channel scales to cost what they cost on real models (2 / K bytes per weight).
"""
from __future__ import annotations

import torch

from ..quant_core.sampling import DIT_CALL, PIXART_CALL  # noqa: F401 (the tiny pipelines' calls)

# Keyword arguments the tiny Latte pipeline is called with (4 frames of 32x32).
LATTE_CALL = dict(num_inference_steps=10, guidance_scale=4.5, video_length=4, height=32, width=32,
                  clean_caption=False)


def tiny_text_encoder(d_model: int = 64, seed: int = 0):
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=384, d_model=d_model, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
                   relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False)
    return ByT5Tokenizer(), T5EncoderModel(cfg).eval()


def tiny_pixart_transformer(seed: int = 0, *, num_layers: int = 4, sample_size: int = 16,
                            caption_channels: int = 64, **config):
    """PixArt's layout at width 256 (4 heads of 64); ``config`` overrides any constructor argument."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**{
        "sample_size": sample_size, "num_layers": num_layers, "patch_size": 2, "attention_head_dim": 64,
        "num_attention_heads": 4, "caption_channels": caption_channels, "in_channels": 4, "out_channels": 8,
        "cross_attention_dim": 256, "attention_bias": True, "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
        "norm_eps": 1e-6, "use_additional_conditions": False, **config}).eval()
    return open_gates(model)


def adaln_single_blocks(transformer) -> list:
    """The blocks modulated by the shared adaLN-single: PixArt's, Latte's spatial and temporal ones."""
    return list(transformer.transformer_blocks) + list(getattr(transformer, "temporal_transformer_blocks", ()))


def open_gates(transformer):
    """At random init the adaLN gates are ~0.06, so every block is nearly the identity and any
    quantization looks lossless. Open the attention and MLP gates (rows 2 and 5) as training does,
    so the blocks shape the output and quantization error shows."""
    with torch.no_grad():
        for block in adaln_single_blocks(transformer):
            block.scale_shift_table[2] += 1.0
            block.scale_shift_table[5] += 1.0
    return transformer


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


def plant_modulation_outliers(transformer, channels=(3, 77, 200), factor: float = 100.0):
    """Make a PixArt (or Latte) transformer hard to quantize without changing what it computes.

    Real DiTs have a few input channels whose activations are orders of magnitude larger than the
    rest, produced by the adaLN modulation and varying with the timestep. We plant that structure:
    for each channel c, the modulated inputs of attn1 and ff (``norm(x)·(1+scale)+shift``) are
    multiplied by ``factor`` — through the shared ``adaln_single.linear`` rows and every block's
    ``scale_shift_table`` — and the matching input columns of the consuming Linears are divided by
    ``factor``. The full-precision output is unchanged (up to float rounding); per-tensor and
    per-token activation quantizers now see channels ``factor`` times larger than the rest.
    """
    import torch

    d = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    lin = transformer.adaln_single.linear  # D -> 6D: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
    consumers = {0: ("attn1.to_q", "attn1.to_k", "attn1.to_v"), 3: ("ff.net.0.proj",)}
    with torch.no_grad():
        for chunk, names in consumers.items():
            for c in channels:
                shift, scale = chunk * d + c, (chunk + 1) * d + c
                # (1 + s') = a (1 + s) and shift' = a shift, with s = table + lin(emb)
                for row in (shift, scale):
                    lin.weight[row] *= factor
                    lin.bias[row] *= factor
                lin.bias[scale] += factor - 1
                for block in adaln_single_blocks(transformer):
                    block.scale_shift_table[chunk, c] *= factor
                    block.scale_shift_table[chunk + 1, c] *= factor
                    for name in names:
                        block.get_submodule(name).weight[:, c] /= factor
    return transformer


def stress_pixart_pipeline(seed: int = 0, variant: str = "alpha"):
    """The built-in PixArt with planted modulation-path outliers (see plant_modulation_outliers)."""
    pipe = tiny_pixart_pipeline(seed, variant)
    plant_modulation_outliers(pipe.transformer)
    return pipe


def tiny_latte_pipeline(seed: int = 0):
    """A Latte text-to-video pipeline (the ViDiT-Q paper's video DiT in miniature): 2 spatial + 2
    temporal blocks of width 256, 4 frames of 16x16 latents, 32x32 frames; call with ``LATTE_CALL``."""
    from diffusers import DPMSolverMultistepScheduler, LattePipeline, LatteTransformer3DModel

    tokenizer, text_encoder = tiny_text_encoder(seed=seed)
    torch.manual_seed(seed)
    transformer = LatteTransformer3DModel(
        num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=2,
        sample_size=16, patch_size=2, cross_attention_dim=256, caption_channels=64, video_length=4,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6).eval()
    pipe = LattePipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(seed),
                         transformer=open_gates(transformer), scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stress_latte_pipeline(seed: int = 0):
    """The built-in Latte with planted modulation-path outliers in its spatial and temporal blocks."""
    pipe = tiny_latte_pipeline(seed)
    plant_modulation_outliers(pipe.transformer)
    return pipe


# Keyword arguments the tiny DiT pipeline is called with.


def tiny_dit_pipeline(seed: int = 0, num_classes: int = 10):  # labels 0..num_classes-1; 1000 is the null class
    """A class-conditional DiT (the paper setting of Q-DiT/VQ4DiT, DiT-XL/2 in miniature):
    4 blocks of width 256, 16x16 latents, 32x32 images, ``num_classes`` ImageNet-style labels."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=4,
        sample_size=16, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    ).eval()
    id2label = {i: f"class {i}" for i in range(num_classes)}
    return DiTPipeline(transformer=transformer, vae=tiny_vae(seed), scheduler=DDIMScheduler(), id2label=id2label)
