"""Video DiTs and today's image DiTs (Latte, CogVideoX, Wan 2.x, HunyuanDiT, Flux, SD3/3.5), built
tiny from the real diffusers classes: layer-policy tables checked against the module lists, and
quantize -> save -> load in a fresh process reproducing the outputs exactly at the expected size."""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from ditq import QuantConfig, quantize, save_quantized
from ditq.evaluation.architectures import HUB_CONFIGS, TINY_CONFIGS, example_inputs, forward, hub_skeleton, tiny_transformer
from ditq.quant_core.calibration import CalibrationRecorder
from ditq.quant_core.models import FP, _generic_role, policy_for, select_layers

# Roles per architecture, counted from the diffusers block structure (2 blocks unless noted):
# attention = 4 Linears (q, k, v, out), MMDiT joint attention = 8 (+ context q, k, v, out), FFN = 2.
EXPECTED_ROLES = {
    "latte": {"self_attn": 8, "cross_attn": 8, "temporal_attn": 8, "ffn": 8},  # 2 spatial + 2 temporal
    "cogvideox": {"joint_attn": 8, "ffn": 4},
    "wan": {"self_attn": 8, "cross_attn": 8, "ffn": 4},
    "wan-i2v": {"self_attn": 8, "cross_attn": 12, "ffn": 4},  # + add_k/add_v for the image tokens
    "hunyuandit": {"self_attn": 16, "cross_attn": 16, "ffn": 8, "skip": 1},  # 4 blocks, skip in the last
    "flux": {"joint_attn": 8 + 2 * 3, "ffn": 4 + 2 * 2},  # 1 double block, 2 single (q, k, v; mlp, out)
    "sd3": {"joint_attn": 8 + 7, "ffn": 4 + 2},  # the last block is context_pre_only
    "sd3.5": {"joint_attn": 8 + 7, "self_attn": 4, "ffn": 4 + 2},  # dual attention in block 0
}


@pytest.fixture(scope="module")
def models():
    return {family: tiny_transformer(family) for family in TINY_CONFIGS}


def _block_linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "blocks." in n]


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_policy_table_matches_module_list(models, family):
    model = models[family]
    policy = policy_for(model)
    assert policy is not None, f"{type(model).__name__} has no layer policy"
    layers = select_layers(model)
    roles = {}
    for info in layers.values():
        roles[info.role] = roles.get(info.role, 0) + 1
    assert roles == EXPECTED_ROLES[family]
    kept = [n for n in _block_linears(model) if n not in layers]
    assert all(policy.role(n) == FP and "norm" in n for n in kept), kept  # only modulation stays FP
    assert all("blocks." in n for n in layers)  # embedders, final projection: FP
    # every row of the table names something in the family of models of this class
    siblings = [m for m in models.values() if type(m) is type(model)]
    names = [n for m in siblings for n, x in m.named_modules() if isinstance(x, nn.Linear)]
    for pattern, _ in policy.rows:
        assert any(re.fullmatch(pattern, n) for n in names), f"row {pattern!r} names no layer"
    # blocks are numbered across stacks (Flux double then single, Latte spatial then temporal)
    assert sorted({i.block for i in layers.values()}) == list(range(len({i.block for i in layers.values()})))


def test_flux_single_stream_proj_out_is_quantized(models):
    layers = select_layers(models["flux"])
    assert layers["single_transformer_blocks.1.proj_out"].role == "ffn"
    assert layers["single_transformer_blocks.1.proj_out"].block == 2
    assert "proj_out" not in layers and "norm_out.linear" not in layers
    # the generic rule (unknown architectures) agrees: in-block proj_out quantized, final one FP
    assert _generic_role("single_transformer_blocks.1.proj_out") == "other"
    assert _generic_role("proj_out") is None and _generic_role("single_transformer_blocks.1.norm.linear") is None


def test_renamed_block_layer_fails_loudly():
    model = tiny_transformer("wan")
    attn = model.blocks[1].attn1
    attn.to_query = attn.to_q  # a release renaming to_q -> to_query
    del attn.to_q
    with pytest.raises(ValueError, match=r"blocks\.1\.attn1\.to_query.*diffusers-wan"):
        select_layers(model)


def _calibrate_on_inputs(model, family, needs):
    """Per-layer statistics from forwards on two seeded input batches (no pipeline needed)."""
    rec = CalibrationRecorder(model, list(select_layers(model)), needs)
    with rec, torch.no_grad():
        for seed in (1, 2):
            rec.new_run()
            forward(model, example_inputs(family, seed))
    return rec.result()


PRESETS = {"vidit-q-w8a8": 0.52, "rtn-w4a8": 0.28}  # block-Linear bytes vs fp16, at most


def test_quantize_save_load_fresh_process_exact(tmp_path, models):
    import copy

    from safetensors.torch import save_file

    expected = {}
    for family, fp_model in models.items():
        for preset, max_ratio in PRESETS.items():
            model = copy.deepcopy(fp_model)
            config = QuantConfig.preset(preset)
            calib = _calibrate_on_inputs(model, family, ("act_absmax", "act_samples")) if preset.startswith("vidit") else None
            report = quantize(model, config, calib, progress=False)
            assert report.ratio <= max_ratio, (family, preset, report.ratio)
            out = forward(model, example_inputs(family))
            assert torch.isfinite(out).all()
            assert (out - forward(fp_model, example_inputs(family))).norm() < 0.5 * out.norm(), (family, preset)
            save_quantized(model, tmp_path / f"{family}-{preset}")
            expected[f"{family}/{preset}"] = out.contiguous()
    save_file(expected, str(tmp_path / "expected.safetensors"))
    script = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import load_file
        from ditq import load_quantized
        from ditq.evaluation.architectures import example_inputs, forward
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        bad = []
        for key, want in expected.items():
            family, preset = key.split("/")
            model = load_quantized({str(tmp_path)!r} + f"/{{family}}-{{preset}}")
            if not torch.equal(forward(model, example_inputs(family)), want):
                bad.append(key)
        print("mismatch:", bad)
        sys.exit(1 if bad else 0)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-500:] + res.stderr[-2000:]


@pytest.mark.parametrize("repo", sorted(HUB_CONFIGS))
def test_policy_and_group_sizes_at_released_size(repo):
    """The released checkpoints' shapes (meta-device skeletons): every block Linear is named by the
    table, and Q-DiT's default group size 128 divides every quantized width (K of 5120, 13824 in
    Wan 14B; 3072, 12288, 15360 in Flux; 1408, 2816, 5632 in HunyuanDiT ...)."""
    model = hub_skeleton(repo)
    layers = select_layers(model)
    assert {i.role for i in layers.values()} >= {"ffn"} and len(layers) > 200
    widths = {i.in_features for i in layers.values()}
    assert all(k % QuantConfig.preset("q-dit-w4a8").group_size == 0 for k in widths), sorted(widths)


def test_vq4dit_block_loss_sees_both_mmdit_streams():
    """VQ4DiT's per-block loss covers the image and the text stream of Flux's blocks, not just the
    first tensor each block returns."""
    from ditq.quant_core.methods.vq4dit.method import _BlockOutputs

    model = tiny_transformer("flux")
    with _BlockOutputs(model) as blocks:
        forward(model, example_inputs("flux"))
    tokens = sorted({o.shape[1] for o in blocks.outputs})
    assert len(blocks.outputs) == 2 * len(blocks.blocks) and tokens == [8, 64]  # text, image


def test_unfused_lora_is_named_as_such():
    model = tiny_transformer("wan")
    model.blocks[0].attn1.to_q.lora_A = nn.ModuleDict({"default": nn.Linear(128, 4)})  # PEFT's layout
    with pytest.raises(ValueError, match=r"unfused LoRA.*blocks\.0\.attn1\.to_q\.lora_A\.default.*fuse_lora"):
        select_layers(model)


def test_linears_read_by_weight_are_never_selected(models):
    """HunyuanDiT's attention pool passes its q/k/v/c_proj weights to F.multi_head_attention_forward;
    even a config that includes every Linear (Qua²SeDiMo's presets) leaves them full precision."""
    model = models["hunyuandit"]
    pool = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".pooler." in n]
    layers = select_layers(model, QuantConfig.preset("qua2sedimo-w3.5"))
    assert len(pool) == 4 and not set(pool) & set(layers)
    assert "time_extra_emb.timestep_embedder.linear_1" in layers  # the rest of include=[".*"] still holds
