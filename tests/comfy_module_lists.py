"""Dump the Linear module names of ComfyUI's own DiT classes (tiny configs, meta device) as JSON.

Run with ComfyUI's python from its checkout: ``cd $COMFYUI_DIR && python <this> > out.json``
(``python <this> --shapes wan-t2v``: that model's state-dict shapes instead).
tests/fixtures/comfy_modules.json is this script's output; test_comfy_architectures.py checks the
layer-policy tables against it in CI, and test_comfyui_real.py checks it is still what the ComfyUI
checkout builds.
"""
import json
import sys

ARGS, sys.argv = sys.argv[1:], sys.argv[:1] + ["--cpu"]  # ComfyUI parses sys.argv on import
sys.path.insert(0, ".")
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.ops  # noqa: E402
import torch  # noqa: E402

OPS = comfy.ops.disable_weight_init


def _wan(model_type, in_dim):
    from comfy.ldm.wan.model import WanModel
    return WanModel(model_type=model_type, patch_size=(1, 2, 2), text_len=512, in_dim=in_dim, dim=256, ffn_dim=512,
                    freq_dim=256, text_dim=4096, out_dim=16, num_heads=2, num_layers=2, window_size=(-1, -1),
                    qk_norm=True, cross_attn_norm=True, eps=1e-6, operations=OPS)


def _flux():
    from comfy.ldm.flux.model import Flux
    return Flux(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=256,
                mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10000,
                qkv_bias=True, guidance_embed=True, patch_size=2, txt_ids_dims=[], operations=OPS)


def _mmdit():
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    return OpenAISignatureMMDITWrapper(
        patch_size=2, in_channels=16, depth=2, num_patches=64 * 64, pos_embed_max_size=64, adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
        x_block_self_attn_layers=[0], operations=OPS)


def _hydit():
    from comfy.ldm.hydit.models import HunYuanDiT
    return HunYuanDiT(depth=4, hidden_size=128, num_heads=2, operations=OPS)


BUILDERS = {"wan-t2v": lambda: _wan("t2v", 16), "wan-i2v": lambda: _wan("i2v", 36), "flux": _flux,
            "sd3.5-mmdit": _mmdit, "hunyuandit": _hydit}

if __name__ == "__main__":
    if ARGS[:1] == ["--shapes"]:  # one family's state-dict shapes, to build a random tiny checkpoint
        with torch.device("meta"):
            model = BUILDERS[ARGS[1]]()
        json.dump({k: list(v.shape) for k, v in model.state_dict().items()}, sys.stdout)
        sys.exit(0)
    out = {}
    with torch.device("meta"):
        for family, build in BUILDERS.items():
            model = build()
            out[family] = {"mro": [c.__name__ for c in type(model).__mro__],
                           "linears": [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]}
    json.dump(out, sys.stdout, indent=1)
    print()
