"""Offline stand-ins for the Hub files the vendored PixArt fast tests load, and the ditq side of
the adapter: quantizing the upstream dummy transformer."""
from __future__ import annotations

import torch

TINY_T5 = "hf-internal-testing/tiny-random-t5"


class OfflineAutoConfig:
    """``AutoConfig.from_pretrained(TINY_T5)``: a tiny T5 encoder config whose width is the
    ``caption_channels=32`` of the upstream dummy transformer."""

    @staticmethod
    def from_pretrained(name, *args, **kwargs):
        from transformers import T5Config

        assert name == TINY_T5, name
        return T5Config(vocab_size=384, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                        relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False)


class OfflineAutoTokenizer:
    """``AutoTokenizer.from_pretrained(TINY_T5)``: ByT5's byte tokenizer, built from nothing."""

    @staticmethod
    def from_pretrained(name, *args, **kwargs):
        from transformers import ByT5Tokenizer

        assert name == TINY_T5, name
        return ByT5Tokenizer()


def use_offline_hub_files(module) -> None:
    """Point a vendored test module's ``AutoConfig`` / ``AutoTokenizer`` at the offline stand-ins."""
    module.AutoConfig, module.AutoTokenizer = OfflineAutoConfig, OfflineAutoTokenizer


def quantized(transformer, preset: str):
    """The upstream dummy transformer quantized by bare ``ditq.quantize`` (no calibration: the
    presets used here need none), the entry path diffusers users take."""
    import ditq

    with torch.no_grad():
        ditq.quantize(transformer, ditq.QuantConfig.preset(preset), progress=False)
    return transformer


def save_tiny_transformer(folder) -> str:
    """ditq's built-in tiny PixArt transformer (4 blocks of width 256: wide enough for quantization
    to shrink memory as it does on real models) saved as a full-precision diffusers folder, the
    ``pretrained_model_name_or_path`` the upstream quantization tests load and quantize."""
    from ditq.evaluation.builtin import tiny_pixart_transformer

    tiny_pixart_transformer().save_pretrained(folder)
    return str(folder)


def tiny_transformer_inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(1, 4, 16, 16, generator=generator),
            "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 8, 64, generator=generator),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
