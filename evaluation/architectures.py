"""The video DiTs and the image DiTs people run today, in miniature: the real diffusers classes
(Latte, CogVideoX, Wan 2.x T2V/I2V, HunyuanDiT, Flux, SD3/3.5) built from small configs with seeded
weights, and one seeded input batch each, so layer policies, quantize -> save -> load and the
methods are exercised on every architecture offline in seconds. Widths are 128 (two heads of 64):
the smallest at which per-channel scales cost about what they cost on real models.
"""
from __future__ import annotations

import torch

TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "latte": ("LatteTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, cross_attention_dim=128, caption_channels=32, video_length=3,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000)),
    "cogvideox": ("CogVideoXTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, num_layers=2,
        sample_width=8, sample_height=8, sample_frames=9, patch_size=2, text_embed_dim=32,
        time_embed_dim=32, max_text_seq_length=8)),
    "wan": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=256, num_layers=2, rope_max_seq_len=32)),
    "hunyuandit": ("HunyuanDiT2DModel", dict(
        num_attention_heads=2, attention_head_dim=64, hidden_size=128, in_channels=4, patch_size=2,
        sample_size=8, num_layers=4, cross_attention_dim=128, cross_attention_dim_t5=32,
        pooled_projection_dim=16, text_len=8, text_len_t5=8)),
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(16, 24, 24),
        guidance_embeds=True)),
    "sd3": ("SD3Transformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16)),
    "sd3.5": ("SD3Transformer2DModel", dict(  # SD3.5: qk-norm, an image-only attn2 in dual-attention blocks
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))),
}
# The released checkpoints' transformer configs (the fields that shape the Linears), for checking
# the layer policies and group sizes at real size on skeletons built on the meta device. The
# positional tables' sizes (sample_size, pos_embed_max_size) shape no Linear and are kept small.
HUB_CONFIGS: dict[str, tuple[str, dict]] = {
    "maxin-cn/Latte-1": ("LatteTransformer3DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=8, patch_size=2, cross_attention_dim=1152, caption_channels=4096, video_length=16,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000)),
    "THUDM/CogVideoX-5b": ("CogVideoXTransformer3DModel", dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=42,
        time_embed_dim=512, text_embed_dim=4096, use_rotary_positional_embeddings=True)),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads")),
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
        text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads")),
    "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers": ("HunyuanDiT2DModel", dict(
        num_attention_heads=16, attention_head_dim=88, hidden_size=1408, in_channels=4, patch_size=2,
        sample_size=128, num_layers=40, cross_attention_dim=1024, cross_attention_dim_t5=2048,
        pooled_projection_dim=1024, text_len=77, text_len_t5=256, use_style_cond_and_image_meta_size=False)),
    "black-forest-labs/FLUX.1-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
    "stabilityai/stable-diffusion-3.5-large": ("SD3Transformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=16, qk_norm="rms_norm")),
}
# Wan I2V: the T2V model plus the CLIP image tokens' projections; latents concatenated with the image's
TINY_CONFIGS["wan-i2v"] = ("WanTransformer3DModel", dict(TINY_CONFIGS["wan"][1], in_channels=8, image_dim=32,
                                                         added_kv_proj_dim=128))
HUB_CONFIGS["Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"] = ("WanTransformer3DModel", dict(
    HUB_CONFIGS["Wan-AI/Wan2.1-T2V-14B-Diffusers"][1], in_channels=36, image_dim=1280, added_kv_proj_dim=5120))
FRAMES, SIDE, TEXT_LEN = 3, 8, 8


def tiny_transformer(family: str, seed: int = 0, **overrides):
    """The family's diffusers transformer from its tiny config (fields in ``overrides`` replaced),
    seeded, in eval mode."""
    import diffusers

    try:
        class_name, config = TINY_CONFIGS[family]
    except KeyError:
        raise ValueError(f"unknown architecture {family!r}; known: {sorted(TINY_CONFIGS)}") from None
    torch.manual_seed(seed)
    return getattr(diffusers, class_name)(**{**config, **overrides}).eval()


def hub_skeleton(repo: str):
    """The released model's transformer with its real shapes and no weights (meta device)."""
    import diffusers
    from accelerate import init_empty_weights

    class_name, config = HUB_CONFIGS[repo]
    with init_empty_weights():
        return getattr(diffusers, class_name)(**config)


def example_inputs(family: str, seed: int = 0, batch: int = 2) -> dict:
    """Keyword arguments of one forward call of ``tiny_transformer(family)``, as its pipeline passes
    them (latents, timestep, text embeddings and the family's extra conditioning), seeded."""
    gen = torch.Generator().manual_seed(seed)
    _, cfg = TINY_CONFIGS[family]

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    timestep = torch.tensor([700.0, 300.0][:batch] + [500.0] * max(0, batch - 2))
    if family == "latte":
        return dict(hidden_states=randn(batch, 4, FRAMES, SIDE, SIDE), timestep=timestep,
                    encoder_hidden_states=randn(batch, TEXT_LEN, cfg["caption_channels"]))
    if family == "cogvideox":
        return dict(hidden_states=randn(batch, FRAMES, 4, SIDE, SIDE), timestep=timestep.long(),
                    encoder_hidden_states=randn(batch, TEXT_LEN, cfg["text_embed_dim"]))
    if family in ("wan", "wan-i2v"):
        # Wan I2V splits image from text tokens assuming the text encoder's 512 (hard-coded in diffusers)
        text_len = 512 if family == "wan-i2v" else TEXT_LEN
        out = dict(hidden_states=randn(batch, cfg["in_channels"], FRAMES, SIDE, SIDE), timestep=timestep,
                   encoder_hidden_states=randn(batch, text_len, cfg["text_dim"]))
        if family == "wan-i2v":
            out["encoder_hidden_states_image"] = randn(batch, 4, cfg["image_dim"])
        return out
    if family == "hunyuandit":
        from diffusers.models.embeddings import get_2d_rotary_pos_embed

        grid = SIDE // cfg["patch_size"]
        rope = get_2d_rotary_pos_embed(cfg["attention_head_dim"], ((0, 0), (grid, grid)), (grid, grid),
                                       output_type="pt")
        return dict(hidden_states=randn(batch, 4, SIDE, SIDE), timestep=timestep,
                    encoder_hidden_states=randn(batch, TEXT_LEN, cfg["cross_attention_dim"]),
                    text_embedding_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long),
                    encoder_hidden_states_t5=randn(batch, TEXT_LEN, cfg["cross_attention_dim_t5"]),
                    text_embedding_mask_t5=torch.ones(batch, TEXT_LEN, dtype=torch.long),
                    image_meta_size=torch.tensor([[SIDE * 8, SIDE * 8, SIDE * 8, SIDE * 8, 0, 0]] * batch,
                                                 dtype=torch.float32),
                    style=torch.zeros(batch, dtype=torch.long), image_rotary_emb=rope)
    if family == "flux":
        ys, xs = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(ys), ys, xs], -1).reshape(-1, 3).float()
        return dict(hidden_states=randn(batch, SIDE * SIDE, cfg["in_channels"]), timestep=timestep / 1000,
                    encoder_hidden_states=randn(batch, TEXT_LEN, cfg["joint_attention_dim"]),
                    pooled_projections=randn(batch, cfg["pooled_projection_dim"]),
                    img_ids=img_ids, txt_ids=torch.zeros(TEXT_LEN, 3), guidance=torch.full((batch,), 3.5))
    if family in ("sd3", "sd3.5"):
        return dict(hidden_states=randn(batch, 4, SIDE, SIDE), timestep=timestep,
                    encoder_hidden_states=randn(batch, TEXT_LEN, cfg["joint_attention_dim"]),
                    pooled_projections=randn(batch, cfg["pooled_projection_dim"]))
    raise ValueError(f"unknown architecture {family!r}; known: {sorted(TINY_CONFIGS)}")


def forward(model, inputs: dict) -> torch.Tensor:
    """The model's prediction for ``inputs`` (the first output, as a float tensor)."""
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].float()


# -- whole pipelines: the real diffusers pipeline classes around the tiny transformers ----------
# Text encoders are tiny T5 / CLIP models behind a byte-level tokenizer (no vocabulary files), the
# VAEs are tiny; calibration runs the pipelines' own denoising loops (CFG, Flux's distilled guidance,
# MMDiT joint tokens, video frames) up to the latents.
PIPELINE_CALLS = {
    "latte": dict(height=16, width=16, video_length=FRAMES, guidance_scale=4.5, clean_caption=False),
    "cogvideox": dict(height=16, width=16, num_frames=9, guidance_scale=6.0, max_sequence_length=TEXT_LEN),
    "wan": dict(height=64, width=64, num_frames=5, guidance_scale=5.0, max_sequence_length=TEXT_LEN),
    "hunyuandit": dict(height=64, width=64, guidance_scale=5.0, use_resolution_binning=False),
    "flux": dict(height=16, width=16, guidance_scale=3.5, max_sequence_length=TEXT_LEN),
    "sd3": dict(height=16, width=16, guidance_scale=5.0, max_sequence_length=TEXT_LEN),
}


def _byte_tokenizer(max_length: int):
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(model_max_length=max_length)


def _t5(d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=384, d_model=d_model, d_ff=64, d_kv=16, num_heads=2, num_layers=2,
                                   relative_attention_num_buckets=8, is_encoder_decoder=False,
                                   use_cache=False)).eval()


def _clip(hidden: int, seed: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=384, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or hidden,
                         pad_token_id=0, bos_token_id=0, eos_token_id=1)  # ByT5's ids
    return (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def _bert(hidden: int, seed: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=384, hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                pad_token_id=0), add_pooling_layer=False).eval()


def _image_vae(seed: int, levels: int = 2):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32,) * levels, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=4, norm_num_groups=32,
                         sample_size=32, shift_factor=0.0).eval()  # Flux and SD3 decode with a shift


def _cogvideox_vae(seed: int):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 2,
                                  up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(8, 8),
                                  latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                  temporal_compression_ratio=4).eval()


def tiny_pipeline(family: str, seed: int = 0):
    """The family's diffusers pipeline (``LattePipeline``, ``CogVideoXPipeline``, ``WanPipeline``,
    ``HunyuanDiTPipeline``, ``FluxPipeline``, ``StableDiffusion3Pipeline``) around
    ``tiny_transformer(family)``; call it with ``PIPELINE_CALLS[family]``."""
    import diffusers

    if family == "latte":  # Latte encodes 120 T5 tokens and keeps those the mask covers
        pipe = diffusers.LattePipeline(tokenizer=_byte_tokenizer(120), text_encoder=_t5(32, seed),
                                       vae=_image_vae(seed), transformer=tiny_transformer("latte", seed),
                                       scheduler=diffusers.DPMSolverMultistepScheduler())
    elif family == "cogvideox":  # 9 frames -> 3 latent frames (the VAE's 4x temporal compression)
        pipe = diffusers.CogVideoXPipeline(tokenizer=_byte_tokenizer(226), text_encoder=_t5(32, seed),
                                           vae=_cogvideox_vae(seed), transformer=tiny_transformer("cogvideox", seed),
                                           scheduler=diffusers.CogVideoXDDIMScheduler(timestep_spacing="trailing"))
    elif family == "hunyuandit":
        # the pipeline pads CLIP-side (BERT) text to 77 and T5 text to 256 tokens, and places RoPE on
        # a grid of height / 8: the transformer's text lengths and an 8x VAE follow
        pipe = diffusers.HunyuanDiTPipeline(
            vae=_image_vae(seed, levels=4), text_encoder=_bert(128, seed), tokenizer=_byte_tokenizer(77),
            transformer=tiny_transformer("hunyuandit", seed, text_len=77, text_len_t5=256),
            scheduler=diffusers.DDPMScheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, text_encoder_2=_t5(32, seed + 1), tokenizer_2=_byte_tokenizer(256))
    elif family == "wan":
        torch.manual_seed(seed)
        vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                         temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                         latents_std=[1.0] * 4).eval()  # one per latent channel, for decoding
        pipe = diffusers.WanPipeline(tokenizer=_byte_tokenizer(512), text_encoder=_t5(32, seed), vae=vae,
                                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                     transformer=tiny_transformer("wan", seed))
    elif family == "flux":
        pipe = diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_image_vae(seed),
            text_encoder=_clip(32, seed), tokenizer=_byte_tokenizer(77),
            text_encoder_2=_t5(32, seed + 1), tokenizer_2=_byte_tokenizer(512),
            transformer=tiny_transformer("flux", seed))
    elif family == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=tiny_transformer("sd3", seed), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=_image_vae(seed), text_encoder=_clip(16, seed, 16), tokenizer=_byte_tokenizer(77),
            text_encoder_2=_clip(16, seed + 1, 16), tokenizer_2=_byte_tokenizer(77),
            text_encoder_3=_t5(32, seed + 2), tokenizer_3=_byte_tokenizer(512))
    else:
        raise ValueError(f"no tiny pipeline for {family!r}; have: {sorted(PIPELINE_CALLS)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe
