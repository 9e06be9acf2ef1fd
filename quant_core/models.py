"""Which Linear layers to quantize in each known architecture, and what role each plays.

A policy is a table: module-name regex -> role. Layers matching no row stay in full precision
(embedders, adaLN / timestep MLPs, caption projection, the final projection: tiny, and the papers
keep them FP). Roles feed the mixed-precision methods: ``self_attn``, ``cross_attn``, ``ffn``.
Adding an architecture means adding a table row and a test.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .config import QuantConfig
from .layers import QuantModule


@dataclass(frozen=True)
class LayerInfo:
    name: str
    role: str
    block: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LayerPolicy:
    name: str
    rows: tuple[tuple[str, str], ...]  # (regex over module names, role)

    def role(self, module_name: str) -> str | None:
        for pattern, role in self.rows:
            if re.fullmatch(pattern, module_name):
                return role
        return None


_ATTN = r"(to_q|to_k|to_v|to_out\.0)"
POLICIES: dict[str, LayerPolicy] = {
    # diffusers PixArtTransformer2DModel (PixArt-α/Σ): 10 Linears per block.
    "PixArtTransformer2DModel": LayerPolicy("diffusers-pixart", (
        (rf"transformer_blocks\.\d+\.attn1\.{_ATTN}", "self_attn"),
        (rf"transformer_blocks\.\d+\.attn2\.{_ATTN}", "cross_attn"),
        (r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)", "ffn"),
    )),
    # diffusers DiTTransformer2DModel (DiT-XL/2): norm1.emb / adaLN-Zero Linears stay FP.
    "DiTTransformer2DModel": LayerPolicy("diffusers-dit", (
        (rf"transformer_blocks\.\d+\.attn1\.{_ATTN}", "self_attn"),
        (r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)", "ffn"),
    )),
    # ComfyUI's native PixArtMS (original PixArt key names).
    "PixArtMS": LayerPolicy("comfy-pixart", (
        (r"blocks\.\d+\.attn\.(qkv|proj)", "self_attn"),
        (r"blocks\.\d+\.cross_attn\.(q_linear|kv_linear|proj)", "cross_attn"),
        (r"blocks\.\d+\.mlp\.(fc1|fc2)", "ffn"),
    )),
}
POLICIES["PixArt"] = POLICIES["PixArtMS"]

# Generic DiT: Linears inside a numbered block, except modulation / embedding / norm Linears.
_BLOCK = re.compile(r"(?:^|\.)(?:transformer_blocks|single_transformer_blocks|blocks|layers)\.(\d+)\.")
_KEEP_FP = re.compile(r"(adaLN|adaln|ada_norm|norm|emb|t_block|time|modulation|final|proj_out)", re.I)
_GENERIC_ROLES = ((r"(cross|attn2)", "cross_attn"), (r"(attn|qkv|to_q|to_k|to_v|to_out)", "self_attn"),
                  (r"(mlp|ff|fc)", "ffn"))


def policy_for(model: nn.Module) -> LayerPolicy | None:
    """The known policy for ``model``'s class (None: use the generic rule)."""
    return POLICIES.get(type(model).__name__)


def _generic_role(name: str) -> str | None:
    if not _BLOCK.search(name) or _KEEP_FP.search(name.rsplit(".", 1)[-1]) or _KEEP_FP.search(name):
        return None
    for pattern, role in _GENERIC_ROLES:
        if re.search(pattern, name):
            return role
    return "other"


def block_index(name: str) -> int:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else -1


def block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The numbered transformer blocks of ``model`` (``transformer_blocks.3``, ``blocks.0``, ...), in order."""
    return [(name, mod) for name, mod in model.named_modules()
            if name and (m := _BLOCK.search(name + ".")) and m.end() == len(name) + 1]


def select_layers(model: nn.Module, config: QuantConfig | None = None) -> dict[str, LayerInfo]:
    """The Linears of ``model`` to quantize, by the architecture's policy, then include/exclude."""
    policy = policy_for(model)
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or ()  # diffusers' rule: never quantized
    chosen: dict[str, LayerInfo] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, QuantModule):
            continue
        if any(m in name.split(".") for m in keep_fp32):
            continue
        role = policy.role(name) if policy else _generic_role(name)
        if config is not None and config.include and any(re.search(p, name) for p in config.include):
            role = role or "other"
        if role is None or (config is not None and not config.selects(name)):
            continue
        chosen[name] = LayerInfo(name, role, block_index(name), mod.in_features, mod.out_features)
    if not chosen:
        raise ValueError(f"no quantizable Linear layers found in {type(model).__name__} "
                         f"(policy {policy.name if policy else 'generic'}; check include/exclude)")
    return chosen


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
