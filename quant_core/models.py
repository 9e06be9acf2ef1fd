"""Which Linear layers to quantize in each known architecture, and what role each plays.

A policy is a table: module-name regex -> role. Inside the numbered transformer blocks every Linear
must match a row, either a role to quantize or ``"fp"`` (kept in full precision on purpose, e.g. the
adaLN modulation Linears): a block Linear no row names is an error, so a layer renamed by a new
diffusers release fails loudly instead of silently staying in full precision. Outside the blocks
(embedders, timestep MLPs, caption projection, the final projection: tiny, and the papers keep them
FP) unmatched Linears stay FP. Roles feed the mixed-precision methods: ``self_attn`` (spatial or
full spatio-temporal self-attention), ``temporal_attn`` (attention along frames), ``cross_attn``
(text/image conditioning), ``joint_attn`` (MMDiT attention over concatenated text+image tokens),
``ffn``, ``skip`` (HunyuanDiT's long-skip fusion). Adding an architecture means adding a table and
a test that builds it (tests/test_architectures.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .config import QuantConfig


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


FP = "fp"  # role of rows naming block Linears kept in full precision on purpose (modulation)

_ATTN = r"(to_q|to_k|to_v|to_out\.0)"
_JOINT = r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_FF = r"net\.(0\.proj|2)"
POLICIES: dict[str, LayerPolicy] = {
    # diffusers PixArtTransformer2DModel (PixArt-α/Σ): 10 Linears per block.
    "PixArtTransformer2DModel": LayerPolicy("diffusers-pixart", (
        (rf"transformer_blocks\.\d+\.attn1\.{_ATTN}", "self_attn"),
        (rf"transformer_blocks\.\d+\.attn2\.{_ATTN}", "cross_attn"),
        (rf"transformer_blocks\.\d+\.ff\.{_FF}", "ffn"),
    )),
    # diffusers DiTTransformer2DModel (DiT-XL/2): the per-block adaLN-Zero (norm1.linear and its
    # timestep/label embedder) stays FP.
    "DiTTransformer2DModel": LayerPolicy("diffusers-dit", (
        (rf"transformer_blocks\.\d+\.attn1\.{_ATTN}", "self_attn"),
        (rf"transformer_blocks\.\d+\.ff\.{_FF}", "ffn"),
        (r"transformer_blocks\.\d+\.norm1\..*", FP),
    )),
    # ComfyUI's native PixArtMS (original PixArt key names).
    "PixArtMS": LayerPolicy("comfy-pixart", (
        (r"blocks\.\d+\.attn\.(qkv|proj)", "self_attn"),
        (r"blocks\.\d+\.cross_attn\.(q_linear|kv_linear|proj)", "cross_attn"),
        (r"blocks\.\d+\.mlp\.(fc1|fc2)", "ffn"),
    )),
    # Latte: spatial blocks (self + cross attention, PixArt-style) alternate with temporal blocks
    # (attention along the frames of each patch); adaLN-single lives outside the blocks.
    "LatteTransformer3DModel": LayerPolicy("diffusers-latte", (
        (rf"transformer_blocks\.\d+\.attn1\.{_ATTN}", "self_attn"),
        (rf"transformer_blocks\.\d+\.attn2\.{_ATTN}", "cross_attn"),
        (rf"temporal_transformer_blocks\.\d+\.attn1\.{_ATTN}", "temporal_attn"),
        (rf"(temporal_)?transformer_blocks\.\d+\.ff\.{_FF}", "ffn"),
    )),
    # CogVideoX: one attention over text + video tokens concatenated (expert adaLN per stream),
    # a shared FFN; norm1/norm2 carry the per-stream modulation.
    "CogVideoXTransformer3DModel": LayerPolicy("diffusers-cogvideox", (
        (rf"transformer_blocks\.\d+\.attn1\.{_ATTN}", "joint_attn"),
        (rf"transformer_blocks\.\d+\.ff\.{_FF}", "ffn"),
        (r"transformer_blocks\.\d+\.norm[12]\.linear", FP),
    )),
    # Wan 2.1 / 2.2 (T2V, I2V, TI2V): full spatio-temporal self-attention, cross-attention to the
    # text (I2V adds add_k/add_v for the CLIP image tokens), FFN; modulation is a per-block table.
    "WanTransformer3DModel": LayerPolicy("diffusers-wan", (
        (rf"blocks\.\d+\.attn1\.{_ATTN}", "self_attn"),
        (rf"blocks\.\d+\.attn2\.({_ATTN}|add_k_proj|add_v_proj)", "cross_attn"),
        (rf"blocks\.\d+\.ffn\.{_FF}", "ffn"),
    )),
    # HunyuanDiT: PixArt-like blocks plus a long-skip fusion Linear in the second half.
    "HunyuanDiT2DModel": LayerPolicy("diffusers-hunyuandit", (
        (rf"blocks\.\d+\.attn1\.{_ATTN}", "self_attn"),
        (rf"blocks\.\d+\.attn2\.{_ATTN}", "cross_attn"),
        (rf"blocks\.\d+\.ff\.{_FF}", "ffn"),
        (r"blocks\.\d+\.skip_linear", "skip"),
        (r"blocks\.\d+\.norm1\.linear", FP),
    )),
    # Flux: double-stream MMDiT blocks, then single-stream blocks whose proj_out is the main output
    # projection (attention output and MLP down-projection fused), not a final layer.
    "FluxTransformer2DModel": LayerPolicy("diffusers-flux", (
        (rf"transformer_blocks\.\d+\.attn\.{_JOINT}", "joint_attn"),
        (rf"transformer_blocks\.\d+\.ff(_context)?\.{_FF}", "ffn"),
        (r"transformer_blocks\.\d+\.norm1(_context)?\.linear", FP),
        (r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)", "joint_attn"),
        (r"single_transformer_blocks\.\d+\.(proj_mlp|proj_out)", "ffn"),
        (r"single_transformer_blocks\.\d+\.norm\.linear", FP),
    )),
    # SD3 / SD3.5 MMDiT (SD3.5 adds an image-only attn2 in its dual-attention blocks).
    "SD3Transformer2DModel": LayerPolicy("diffusers-sd3", (
        (rf"transformer_blocks\.\d+\.attn\.{_JOINT}", "joint_attn"),
        (rf"transformer_blocks\.\d+\.attn2\.{_ATTN}", "self_attn"),
        (rf"transformer_blocks\.\d+\.ff(_context)?\.{_FF}", "ffn"),
        (r"transformer_blocks\.\d+\.norm1(_context)?\.linear", FP),
    )),
}
POLICIES["PixArt"] = POLICIES["PixArtMS"]

# ComfyUI's own classes for the same families (original checkpoint key names), so Quantize DiT
# works on a MODEL from the stock loaders. Subclasses (VaceWanModel, CameraWanModel, ...) find their
# base's table through the class hierarchy; the Linears they add inside blocks then fail loudly.
POLICIES.update({
    # comfy.ldm.wan.model.WanModel (Wan 2.1 / 2.2, T2V, I2V with k_img/v_img for the CLIP tokens).
    "WanModel": LayerPolicy("comfy-wan", (
        (r"blocks\.\d+\.self_attn\.(q|k|v|o)", "self_attn"),
        (r"blocks\.\d+\.cross_attn\.(q|k|v|o|k_img|v_img)", "cross_attn"),
        (r"blocks\.\d+\.ffn\.(0|2)", "ffn"),
    )),
    # comfy.ldm.flux.model.Flux: double-stream blocks (image and text halves), then single-stream
    # blocks where linear1 fuses q, k, v and the MLP up-projection and linear2 fuses the attention
    # output with the MLP down-projection.
    "Flux": LayerPolicy("comfy-flux", (
        (r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)", "joint_attn"),
        (r"double_blocks\.\d+\.(img|txt)_mlp\.(0|2)", "ffn"),
        (r"double_blocks\.\d+\.(img|txt)_mod\.lin", FP),
        (r"single_blocks\.\d+\.linear1", "joint_attn"),
        (r"single_blocks\.\d+\.linear2", "ffn"),
        (r"single_blocks\.\d+\.modulation\.lin", FP),
    )),
    # comfy.ldm.modules.diffusionmodules.mmdit.MMDiT (SD3 / SD3.5; attn2 is SD3.5's image-only
    # attention in its dual-attention blocks).
    "MMDiT": LayerPolicy("comfy-mmdit", (
        (r"joint_blocks\.\d+\.(context|x)_block\.attn\.(qkv|proj)", "joint_attn"),
        (r"joint_blocks\.\d+\.x_block\.attn2\.(qkv|proj)", "self_attn"),
        (r"joint_blocks\.\d+\.(context|x)_block\.mlp\.(fc1|fc2)", "ffn"),
        (r"joint_blocks\.\d+\.(context|x)_block\.adaLN_modulation\.1", FP),
    )),
    # comfy.ldm.hydit.models.HunYuanDiT.
    "HunYuanDiT": LayerPolicy("comfy-hunyuandit", (
        (r"blocks\.\d+\.attn1\.(Wqkv|out_proj)", "self_attn"),
        (r"blocks\.\d+\.attn2\.(q_proj|kv_proj|out_proj)", "cross_attn"),
        (r"blocks\.\d+\.mlp\.(fc1|fc2)", "ffn"),
        (r"blocks\.\d+\.skip_linear", "skip"),
        (r"blocks\.\d+\.default_modulation\.1", FP),
    )),
})

# Numbered block stacks (diffusers and ComfyUI names). Inside a block, the generic rule quantizes
# every Linear except modulation / embedding / norm ones; outside the blocks nothing.
_BLOCK = re.compile(r"(?:^|\.)(?:transformer_blocks|single_transformer_blocks|temporal_transformer_blocks|"
                    r"blocks|layers|double_blocks|single_blocks|joint_blocks)\.(\d+)\.")
_KEEP_FP = re.compile(r"(adaLN|adaln|ada_norm|norm|emb|t_block|time|modulation|final)", re.I)
_GENERIC_ROLES = ((r"(cross|attn2)", "cross_attn"), (r"(attn|qkv|to_q|to_k|to_v|to_out)", "self_attn"),
                  (r"(mlp|ff|fc)", "ffn"))


# Modules that read their Linears' ``.weight`` instead of calling them (HunyuanDiT's attention pool
# hands q/k/v/c_proj weights to F.multi_head_attention_forward): a quantized layer has no weight, so
# their Linears are never selected, not even by ``include=[".*"]``.
_WEIGHT_READERS = ("HunyuanDiTAttentionPool", "MultiheadAttention")


def policy_for(model: nn.Module) -> LayerPolicy | None:
    """The known policy for ``model``'s class or its nearest known base class (None: use the
    generic rule)."""
    return next((POLICIES[c.__name__] for c in type(model).__mro__ if c.__name__ in POLICIES), None)


def _generic_role(name: str) -> str | None:
    if not _BLOCK.search(name) or _KEEP_FP.search(name.rsplit(".", 1)[-1]) or _KEEP_FP.search(name):
        return None
    for pattern, role in _GENERIC_ROLES:
        if re.search(pattern, name):
            return role
    return "other"


def block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The numbered transformer blocks of ``model`` (``transformer_blocks.3``, ``blocks.0``, ...), in order."""
    return [(name, mod) for name, mod in model.named_modules()
            if name and (m := _BLOCK.search(name + ".")) and m.end() == len(name) + 1]


def _block_of(name: str, blocks: dict[str, int]) -> int:
    m = _BLOCK.search(name)
    return blocks.get(name[:m.end() - 1], -1) if m else -1


def policy_gaps(model: nn.Module, policy: LayerPolicy | None = None) -> list[str]:
    """Linears inside ``model``'s blocks that no row of its policy names (empty: the table is complete)."""
    policy = policy or policy_for(model)
    if policy is None:
        return []
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and _BLOCK.search(name) and policy.role(name) is None]


def select_layers(model: nn.Module, config: QuantConfig | None = None) -> dict[str, LayerInfo]:
    """The Linears of ``model`` to quantize, by the architecture's policy, then include/exclude.

    ``LayerInfo.block`` numbers the blocks of every stack in module order (Flux: the double-stream
    blocks, then the single-stream ones; Latte: spatial, then temporal), so it is unique per block."""
    policy = policy_for(model)
    gaps = policy_gaps(model, policy)
    lora = [g for g in gaps if re.search(r"\.(lora_[AB]|base_layer)(\.|$)", g)]
    if lora:
        raise ValueError(f"{type(model).__name__} carries unfused LoRA adapters ({lora[0]}, ...); fuse them "
                         f"into the full-precision model first (pipe.fuse_lora(); pipe.unload_lora_weights()), "
                         f"then quantize")
    if gaps:
        raise ValueError(f"{type(model).__name__}: block Linear(s) {gaps[:3]} match no row of layer policy "
                         f"{policy.name!r} (renamed by a new release?); add them to "
                         f"ditq.quant_core.models.POLICIES with a role, or {FP!r} to keep them in full precision")
    blocks = {name: i for i, (name, _) in enumerate(block_modules(model))}
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or ()  # diffusers' rule: never quantized
    kinds = {name: type(mod).__name__ for name, mod in model.named_modules()}
    chosen: dict[str, LayerInfo] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or kinds[name.rpartition(".")[0]] in _WEIGHT_READERS:
            continue
        if any(m in name.split(".") for m in keep_fp32):
            continue
        role = policy.role(name) if policy else _generic_role(name)
        role = None if role == FP else role
        if config is not None and config.include and any(re.search(p, name) for p in config.include):
            role = role or "other"
        if role is None or (config is not None and not config.selects(name)):
            continue
        chosen[name] = LayerInfo(name, role, _block_of(name, blocks), mod.in_features, mod.out_features)
    if not chosen:
        raise ValueError(f"no quantizable Linear layers found in {type(model).__name__} "
                         f"(policy {policy.name if policy else 'generic'}; check include/exclude)")
    return chosen


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
