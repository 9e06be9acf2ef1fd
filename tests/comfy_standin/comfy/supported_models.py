"""Stand-in for comfy.supported_models / model_base: one tiny PixArt-like DiT named PixArtMS with
ComfyUI's module names (blocks.N.attn.qkv/proj, cross_attn.q_linear/kv_linear/proj, mlp.fc1/fc2,
t_block, x_embedder, t_embedder, y_embedder, final_layer), built with ``device=`` like ComfyUI."""
import math
import uuid

import torch
from torch import nn


class _Mlp(nn.Module):
    def __init__(self, i, h, o, device):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(i, h, device=device), nn.Linear(h, o, device=device)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class _Attn(nn.Module):
    def __init__(self, h, heads, device):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(h, 3 * h, device=device), nn.Linear(h, h, device=device)

    def forward(self, x):
        b, n, h = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h))


class _Cross(nn.Module):
    def __init__(self, h, heads, device):
        super().__init__()
        self.heads = heads
        self.q_linear, self.kv_linear = nn.Linear(h, h, device=device), nn.Linear(h, 2 * h, device=device)
        self.proj = nn.Linear(h, h, device=device)

    def forward(self, x, c):
        b, n, h = x.shape
        d = h // self.heads
        q = self.q_linear(x).reshape(b, n, self.heads, d).transpose(1, 2)
        k, v = self.kv_linear(c).reshape(b, c.shape[1], 2, self.heads, d).permute(2, 0, 3, 1, 4)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h))


class _Block(nn.Module):
    def __init__(self, h, heads, device):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.empty(6, h, device=device))
        self.attn, self.cross_attn = _Attn(h, heads, device), _Cross(h, heads, device)
        self.mlp = _Mlp(h, 4 * h, h, device)

    def forward(self, x, c, t):
        sh1, sc1, g1, sh2, sc2, g2 = (self.scale_shift_table[None] + t.reshape(len(x), 6, -1)).chunk(6, dim=1)
        norm = lambda y: nn.functional.layer_norm(y, y.shape[-1:])  # noqa: E731
        x = x + g1 * self.attn(norm(x) * (1 + sc1) + sh1)
        x = x + self.cross_attn(x, c)
        return x + g2 * self.mlp(norm(x) * (1 + sc2) + sh2)


class PixArtMS(nn.Module):
    def __init__(self, hidden_size=64, num_heads=4, depth=2, patch_size=2, in_channels=4, caption_channels=32,
                 device=None, **kwargs):
        super().__init__()
        h, self.p, self.c = hidden_size, patch_size, in_channels
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Linear(in_channels * patch_size ** 2, h, device=device)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(64, h, device=device), nn.SiLU(), nn.Linear(h, h, device=device))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h, device=device))
        self.y_embedder = nn.Module()
        self.y_embedder.y_proj = _Mlp(caption_channels, h, h, device)
        self.blocks = nn.ModuleList([_Block(h, num_heads, device) for _ in range(depth)])
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(h, patch_size ** 2 * in_channels, device=device)

    def forward(self, x, timesteps, context, **kwargs):
        b, c, hh, ww = x.shape
        p = self.p
        tok = x.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        freqs = torch.exp(-math.log(10000) * torch.arange(32, dtype=torch.float32) / 32)
        temb = self.t_embedder.mlp(torch.cat([torch.cos(timesteps[:, None] * freqs), torch.sin(timesteps[:, None] * freqs)], -1))
        t = self.t_block(temb)
        y = self.y_embedder.y_proj(context)
        z = self.x_embedder.proj(tok)
        for block in self.blocks:
            z = block(z, y, t)
        out = self.final_layer.linear(z)
        return out.reshape(b, hh // p, ww // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww)


class BaseModel(nn.Module):
    def __init__(self, model_config, device=None):
        super().__init__()
        self.model_config, self.device = model_config, device
        cfg = {k: v for k, v in model_config.unet_config.items() if k != "image_model"}
        self.diffusion_model = PixArtMS(**cfg, device=device)

    def apply_model(self, x, t, c_crossattn=None, transformer_options=None, **kwargs):
        # as ComfyUI's samplers: per-call options with plain lists, UUIDs and tensors (not model inputs)
        opts = dict(transformer_options or {}, cond_or_uncond=[0, 1][:x.shape[0]], sigmas=t,
                    uuids=[uuid.UUID(int=i) for i in range(x.shape[0])])
        return self.diffusion_model(x, t * 999, context=c_crossattn, control=None, transformer_options=opts)


class PixArtSigma:
    def __init__(self, unet_config):
        self.unet_config = dict(unet_config)
        self.dtype = torch.float32

    @classmethod
    def matches(cls, unet_config):
        return unet_config.get("image_model") == "pixart_sigma"

    def set_inference_dtype(self, dtype, manual_cast_dtype):
        self.dtype = dtype

    def get_model(self, state_dict, prefix="", device=None):
        return BaseModel(self, device=device)


models = [PixArtSigma]
