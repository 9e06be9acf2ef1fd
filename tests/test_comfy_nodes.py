"""The node pack against the ComfyUI stand-in (tests/comfy_standin): schemas, the adapter's model
handling, numbers against the FP model and the Python API, files, LoRA contract, workflows."""
from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STANDIN = Path(__file__).parent / "comfy_standin"
ROOT = Path(__file__).resolve().parents[1]
STANDIN_MODULES = ("comfy", "comfy_api", "folder_paths")
TITLES = {"DitqCalibrateDiT": "Calibrate DiT (ditq)", "DitqQuantizeDiT": "Quantize DiT (ditq)",
          "DitqLoadQuantizedDiT": "Load Quantized DiT (ditq)", "DitqSaveQuantizedDiT": "Save Quantized DiT (ditq)"}


def run_like_comfyui(cls):
    """The node class as ComfyUI's executor runs it: every execute under torch.inference_mode
    (execution.py), where enable_grad does nothing and tensors made inside cannot be saved for backward."""

    class UnderInferenceMode(cls):
        @classmethod
        def execute(cls_, **kwargs):
            with torch.inference_mode():
                return super().execute(**kwargs)

    return UnderInferenceMode


def _drop_modules():
    for name in list(sys.modules):
        if name.split(".")[0] in STANDIN_MODULES or name.startswith("ditq.nodes"):
            del sys.modules[name]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """The stand-in on sys.path, models_dir in a temp folder, the pack's extension loaded."""
    _drop_modules()
    sys.path.insert(0, str(STANDIN))
    import folder_paths

    folder_paths.models_dir = str(tmp_path_factory.mktemp("models"))
    folder_paths.folder_names_and_paths["diffusion_models"] = (
        [str(Path(folder_paths.models_dir) / "diffusion_models")], {".safetensors"})
    import ditq

    ext = asyncio.run(ditq.comfy_entrypoint())
    asyncio.run(ext.on_load())
    nodes = {cls.GET_SCHEMA().node_id: run_like_comfyui(cls) for cls in asyncio.run(ext.get_node_list())}
    import comfy as comfy_pkg
    import comfy.model_management
    import comfy.sample
    import comfy.utils

    yield type("Env", (), {"nodes": nodes, "fp": folder_paths, "mm": comfy_pkg.model_management,
                           "sample": comfy_pkg.sample, "utils": comfy_pkg.utils})
    sys.path.remove(str(STANDIN))
    _drop_modules()


def make_patcher(seed=0, depth=2, hidden=64):
    import comfy.model_management as mm
    from comfy.model_patcher import ModelPatcher
    from comfy.supported_models import PixArtSigma

    torch.manual_seed(seed)
    cfg = PixArtSigma({"image_model": "pixart_sigma", "hidden_size": hidden, "num_heads": 4, "depth": depth,
                       "patch_size": 2, "in_channels": 4, "caption_channels": 32})
    with torch.inference_mode():  # ComfyUI's loader nodes build models under it: inference-tensor weights
        base = cfg.get_model({})
        for name, p in base.diffusion_model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "table" in name or name.endswith("bias") else p.shape[-1] ** -0.5))
    return ModelPatcher(base, mm.get_torch_device(), mm.unet_offload_device())


COND = {"positive": [[torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(1)), {}]],
        "negative": [[torch.zeros(1, 6, 32), {}]], "latent_image": {"samples": torch.zeros(1, 4, 8, 8)}}
SAMPLING = dict(seed=3, steps=3, cfg=3.0, sampler_name="euler", scheduler="normal")


def sample(comfy, patcher):
    lat = COND["latent_image"]["samples"]
    noise = comfy.sample.prepare_noise(lat, SAMPLING["seed"])
    with torch.inference_mode():  # as ComfyUI's KSampler node runs
        return comfy.sample.sample(patcher, noise, SAMPLING["steps"], SAMPLING["cfg"], "euler", "normal",
                                   COND["positive"], COND["negative"], lat)


def calibrate(comfy, patcher, **kw):
    node = comfy.nodes["DitqCalibrateDiT"]
    args = dict(model=patcher, **COND, **SAMPLING, preset="rtn-w8a8", load_calibration="(run calibration)",
                save_as="")
    args.update(kw)
    return node.execute(**args).args


def rel(a, b):
    return float((a - b).norm() / b.norm())


# -- pack surface ---------------------------------------------------------------------------------
def test_import_ditq_does_not_import_comfyui():
    code = ("import sys, ditq; ditq.QuantConfig; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths') "
            "or m.startswith('ditq.nodes')]; assert not bad, bad; "
            "assert not hasattr(ditq, 'NODE_CLASS_MAPPINGS')")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT.parent)


def test_schemas(comfy):
    assert set(comfy.nodes) == set(TITLES)
    for node_id, cls in comfy.nodes.items():
        s = cls.GET_SCHEMA()
        assert s.display_name == TITLES[node_id] and s.category == "ditq"
        for inp in s.inputs:
            assert inp.options.get("tooltip"), f"{node_id}.{inp.id} lacks a tooltip"
    calib = comfy.nodes["DitqCalibrateDiT"].GET_SCHEMA()
    assert [o.io_type for o in calib.outputs] == ["DITQ_CALIBRATION", "IMAGE"]
    quant = comfy.nodes["DitqQuantizeDiT"].GET_SCHEMA()
    assert [i.id for i in quant.inputs if i.optional] == ["calibration"]
    assert comfy.nodes["DitqSaveQuantizedDiT"].GET_SCHEMA().is_output_node
    assert comfy.fp.folder_names_and_paths["ditq"][1] == {".safetensors"}


# -- calibration ----------------------------------------------------------------------------------
def test_calibrate_records_true_maxima_progress_and_heat_map(comfy):
    patcher = make_patcher()
    seen: dict[str, torch.Tensor] = {}
    lin = patcher.model.diffusion_model.blocks[1].mlp.fc2
    h = lin.register_forward_pre_hook(lambda m, a: seen.__setitem__(
        "amax", torch.maximum(seen.get("amax", torch.zeros(a[0].shape[-1], dtype=torch.float64)),
                              a[0].double().abs().reshape(-1, a[0].shape[-1]).amax(0))))
    calib, image = calibrate(comfy, patcher)
    h.remove()
    amax = calib.get("blocks.1.mlp.fc2", "act_absmax")
    assert amax.shape == (SAMPLING["steps"], 256) and len(calib.layers) == 14
    torch.testing.assert_close(amax.amax(0).double(), seen["amax"], rtol=1e-6, atol=0)
    # the bar moves after every recorded layer (Cancel is seen within a step) and ends full
    bar = comfy.utils.BARS[-1]
    assert bar.current == bar.total == SAMPLING["steps"] * 14
    assert image.shape == (1, 14 * 8, SAMPLING["steps"] * 8, 3) and 0 <= image.min() and image.max() <= 1
    assert not patcher.model.diffusion_model._forward_pre_hooks and not lin._forward_pre_hooks


def test_calibration_save_reload_and_mismatch(comfy):
    patcher = make_patcher()
    calib, _ = calibrate(comfy, patcher, save_as="cal_a")
    files = comfy.fp.get_filename_list("ditq_calibration")
    assert files == ["cal_a.safetensors"]
    again, _ = calibrate(comfy, patcher, load_calibration="cal_a.safetensors")
    torch.testing.assert_close(again.get("blocks.0.attn.qkv", "act_absmax"), calib.get("blocks.0.attn.qkv", "act_absmax"))
    with pytest.raises(ValueError, match="does not fit.*blocks.2"):
        calibrate(comfy, make_patcher(depth=3), load_calibration="cal_a.safetensors")


def test_calibrate_is_interruptible(comfy):
    patcher = make_patcher()
    comfy.mm.interrupt_current_processing(True)
    with pytest.raises(comfy.mm.InterruptProcessingException):
        calibrate(comfy, patcher)
    dm = patcher.model.diffusion_model
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in dm.modules())


# -- quantize -------------------------------------------------------------------------------------
def test_quantize_is_fresh_true_size_and_matches_python_api(comfy):
    from ditq import QuantConfig, quantize

    patcher = make_patcher()
    before = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    fp_out = sample(comfy, patcher)
    qp, report = comfy.nodes["DitqQuantizeDiT"].execute(model=patcher, preset="rtn-w8a8-dynamic",
                                                        weight_bits="preset").args
    dm = patcher.model.diffusion_model
    assert type(dm.blocks[0].attn.qkv) is torch.nn.Linear
    assert all(torch.equal(before[k], v) for k, v in dm.state_dict().items()), "input model was mutated"
    assert qp is not patcher and qp.model is not patcher.model
    sd = qp.model.state_dict()
    assert qp.model_size() == sum(t.nbytes for t in sd.values()) < 0.6 * patcher.model_size()
    assert sd["diffusion_model.blocks.0.attn.qkv.weight"].dtype == torch.int8
    assert "14 layers" in report
    q_out = sample(comfy, qp)
    # same numbers as the Python API on a copy of the module
    ref = copy.deepcopy(patcher)
    ref.model = copy.deepcopy(patcher.model)
    quantize(ref.model.diffusion_model, QuantConfig.preset("rtn-w8a8-dynamic"), progress=False)
    torch.testing.assert_close(q_out, sample(comfy, ref), rtol=0, atol=0)
    assert 0 < rel(q_out, fp_out) < 0.02
    assert comfy.utils.BARS[-1].current == comfy.utils.BARS[-1].total == 14


def test_quantize_errors_are_clear(comfy):
    node = comfy.nodes["DitqQuantizeDiT"]
    patcher = make_patcher()
    with pytest.raises(ValueError, match="needs calibration.*Calibrate DiT"):
        node.execute(model=patcher, preset="rtn-w8a8", weight_bits="preset")
    lora = patcher.clone()
    lora.patches["diffusion_model.blocks.0.attn.qkv.weight"] = [("diff",)]
    with pytest.raises(ValueError, match="LoRA.*after"):
        node.execute(model=lora, preset="rtn-w8a8-dynamic", weight_bits="preset")
    qp = node.execute(model=patcher, preset="rtn-w8a8-dynamic", weight_bits="preset").args[0]
    with pytest.raises(ValueError, match="already quantized by ditq"):
        node.execute(model=qp, preset="rtn-w8a8-dynamic", weight_bits="preset")


def test_static_preset_uses_the_node_calibration(comfy):
    patcher = make_patcher()
    calib, _ = calibrate(comfy, patcher)
    qp = comfy.nodes["DitqQuantizeDiT"].execute(model=patcher, preset="rtn-w8a8", weight_bits="4",
                                                calibration=calib).args[0]
    layer = qp.model.diffusion_model.blocks[1].mlp.fc2
    expected = calib.get("blocks.1.mlp.fc2", "act_absmax").max() / 127
    torch.testing.assert_close(layer.input_scale, expected.reshape(1))
    assert layer.scheme.weight_bits == 4 and layer.weight.dtype == torch.uint8
    assert rel(sample(comfy, qp), sample(comfy, patcher)) < 0.5


# -- files ----------------------------------------------------------------------------------------
def test_save_load_round_trip_and_validation(comfy):
    from safetensors import safe_open

    save, load = comfy.nodes["DitqSaveQuantizedDiT"], comfy.nodes["DitqLoadQuantizedDiT"]
    qp = comfy.nodes["DitqQuantizeDiT"].execute(model=make_patcher(), preset="rtn-w4a8", weight_bits="preset").args[0]
    path = Path(save.execute(model=qp, filename="tiny_w4", format="ditq", overwrite=False).args[0])
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert "blocks.0.attn.qkv.weight" in f.keys()
    assert json.loads(meta["ditq.model_config"])["comfyui"]["unet_config"]["hidden_size"] == 64
    assert json.loads(meta["ditq.quantization_config"])["method"] == "rtn"
    with pytest.raises(FileExistsError):
        save.execute(model=qp, filename="tiny_w4", format="ditq", overwrite=False)
    assert load.execute(model_name="tiny_w4.safetensors").args[0] is not None
    loaded = load.execute(model_name="tiny_w4.safetensors").args[0]
    assert loaded.model_size() == qp.model_size()
    torch.testing.assert_close(sample(comfy, loaded), sample(comfy, qp), rtol=0, atol=0)
    # a truncated file and a non-ComfyUI ditq file fail with the file named
    from ditq import CheckpointError

    bad = path.with_name("broken.safetensors")
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        load.execute(model_name="broken.safetensors")
    with pytest.raises(ValueError, match="not quantized by ditq"):
        save.execute(model=make_patcher(), filename="fp", format="ditq", overwrite=True)


def test_native_export(comfy):
    from safetensors import safe_open

    from ditq.nodes.comfy_adapter import ComfyAdapterError

    save, quant = comfy.nodes["DitqSaveQuantizedDiT"], comfy.nodes["DitqQuantizeDiT"]
    qp = quant.execute(model=make_patcher(), preset="rtn-w8a8-dynamic", weight_bits="preset").args[0]
    out = save.execute(model=qp, filename="native", format="comfyui-native", overwrite=True)
    path = Path(out.args[0])
    assert path.parent.name == "diffusion_models"
    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        w, s = f.get_tensor("blocks.0.mlp.fc1.weight"), f.get_tensor("blocks.0.mlp.fc1.weight_scale")
        assert f.get_tensor("t_block.1.weight").dtype == torch.float32
    assert layers["blocks.0.mlp.fc1"] == {"format": "int8_tensorwise"} and len(layers) == 14
    layer = qp.model.diffusion_model.blocks[0].mlp.fc1
    assert w.dtype == torch.int8 and s.shape == (256, 1)
    torch.testing.assert_close(w.float() * s, layer.effective_weight(), rtol=0, atol=0)
    fp8 = quant.execute(model=make_patcher(), preset="rtn-fp8", weight_bits="preset").args[0]
    text = save.execute(model=fp8, filename="native_fp8", format="comfyui-native", overwrite=True).ui["text"][0]
    assert "fp8 per-tensor, weight SQNR" in text
    w4 = quant.execute(model=make_patcher(), preset="rtn-w4a8", weight_bits="preset").args[0]
    with pytest.raises(ComfyAdapterError, match="blocks.0.attn.qkv.*int4.*no ComfyUI-native format"):
        save.execute(model=w4, filename="native_w4", format="comfyui-native", overwrite=True)


# -- LoRA: branches through ComfyUI's own patch life cycle --------------------------------------
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
                 "mlp.fc1", "mlp.fc2")


def lora_file(patcher, seed, rank=4, size=0.15):
    """A kohya-style LoRA (lora_unet_* keys, alpha = rank) on every block Linear of ``patcher``; at
    ``size`` 0.15 it changes the FP sample by 4 % at strength 0.1 and 39 % at 1, as the rank-4 LoRA
    measured in a real ComfyUI on the tiny PixArt-Sigma does (issue 17)."""
    g = torch.Generator().manual_seed(seed)
    dm, sd = patcher.model.diffusion_model, {}
    for b in range(len(dm.blocks)):
        for lin in BLOCK_LINEARS:
            layer = dm.get_submodule(f"blocks.{b}.{lin}")
            key = f"lora_unet_blocks_{b}_{lin.replace('.', '_')}"
            sd[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=g) * size
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=g) * layer.in_features ** -0.5
            sd[f"{key}.alpha"] = torch.tensor(float(rank))
    return sd


def with_lora(patcher, lora, strength):
    """What LoraLoaderModelOnly does with a loaded file."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0)[0]


def codebook_patcher(fp):
    """fp's block Linears as 4-bit per-channel k-means codebooks (Qua²SeDiMo's K-Means-C)."""
    from ditq.nodes.comfy_adapter import _new_patcher
    from ditq.quant_core.layers import CodebookLinear
    from ditq.quant_core.models import set_submodule
    from ditq.quant_core.methods.qua2sedimo.options import kmeans_codebook

    base = copy.deepcopy(fp.model)
    for name, mod in list(base.diffusion_model.named_modules()):
        if name.startswith("blocks.") and isinstance(mod, torch.nn.Linear):
            idx, book = kmeans_codebook(mod.weight.detach(), 4, per_channel=True)
            set_submodule(base.diffusion_model, name, CodebookLinear.from_assignment(mod, idx, book, 4, name=name))
    return _new_patcher(base, like=fp)


def switch_patcher(fp):
    """rtn-w8a8-dynamic, with blocks.0.mlp.fc1 a timestep switch (8 bits early, 4 late)."""
    from ditq import QuantConfig, quantize
    from ditq.nodes.comfy_adapter import _new_patcher
    from ditq.quant_core.methods.vidit_q.switching import TimestepSwitchLinear, track_timesteps

    base = copy.deepcopy(fp.model)
    quantize(base.diffusion_model, QuantConfig.preset("rtn-w8a8-dynamic"), progress=False)
    fc1 = base.diffusion_model.blocks[0].mlp.fc1
    base.diffusion_model.blocks[0].mlp.fc1 = TimestepSwitchLinear([fc1], [500.0], [(0, 8), (0, 4)])
    track_timesteps(base.diffusion_model)
    return _new_patcher(base, like=fp)


def quantized_patcher(comfy, fp, kind):
    if kind == "codebook":
        return codebook_patcher(fp)
    if kind == "switch":
        return switch_patcher(fp)
    return comfy.nodes["DitqQuantizeDiT"].execute(model=fp, preset=kind, weight_bits="preset").args[0]


def packed_state(patcher):
    return {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


# How much further (FP+LoRA) vs (quantized+LoRA) may be than FP vs quantized. The branch itself is
# exact (test_lora.py); what remains is quantization noise on the trajectory the LoRA moved: fp8
# activations measure 1.18x at strength 1 on this random stand-in model, the others <= 1.08x.
LORA_ERROR_GROWTH = {"rtn-fp8": 1.25}


@pytest.mark.parametrize("kind", ["rtn-w8a8-dynamic", "rtn-w4a8", "rtn-fp8", "codebook", "switch"])
def test_lora_on_quantized_model_behaves_as_on_fp(comfy, kind):
    """Stock LoRA loading on a ditq MODEL: branches, not re-encoded weights. The LoRA's effect is
    within 10 % of the FP model's at strengths 0.1 and 1, two stacked LoRAs and removing one behave
    as on FP, and removing all gives the quantized model back bit for bit."""
    fp = make_patcher(depth=2)
    qp = quantized_patcher(comfy, fp, kind)
    lora_a, lora_b = lora_file(fp, seed=10), lora_file(fp, seed=11)
    packed = packed_state(qp)
    fp_out, q_out = sample(comfy, fp), sample(comfy, qp)
    q_err = rel(q_out, fp_out)
    for strength in (0.1, 1.0):
        fp_l = sample(comfy, with_lora(fp, lora_a, strength))
        q_l = sample(comfy, with_lora(qp, lora_a, strength))
        fp_effect, q_effect = rel(fp_l, fp_out), rel(q_l, q_out)
        assert abs(q_effect - fp_effect) <= 0.1 * fp_effect, (strength, fp_effect, q_effect)
        assert rel(q_l, fp_l) <= LORA_ERROR_GROWTH.get(kind, 1.1) * q_err, (strength, rel(q_l, fp_l), q_err)
    one = with_lora(qp, lora_a, 1.0)
    two = with_lora(one, lora_b, -0.5)
    fp_two = sample(comfy, with_lora(with_lora(fp, lora_a, 1.0), lora_b, -0.5))
    q_two = sample(comfy, two)
    assert rel(q_two, fp_two) <= LORA_ERROR_GROWTH.get(kind, 1.1) * q_err
    assert abs(rel(q_two, q_out) - rel(fp_two, fp_out)) <= 0.1 * rel(fp_two, fp_out)
    dm = qp.model.diffusion_model
    for b in range(2):
        for lin in BLOCK_LINEARS:
            assert list(dm.get_submodule(f"blocks.{b}.{lin}").lora_branches) == ["comfy:0", "comfy:1"], lin
    layer = dm.blocks[1].mlp.fc2
    assert sum(b.down.nbytes + b.up.nbytes for b in layer.lora_branches.values()) == 2 * 4 * (256 + 64) * 4
    q_one = sample(comfy, one)
    torch.testing.assert_close(q_one, sample(comfy, with_lora(qp, lora_a, 1.0)), rtol=0, atol=0)
    assert list(layer.lora_branches) == ["comfy:0"]
    assert torch.equal(sample(comfy, qp), q_out), "removing every LoRA must restore the quantized model"
    assert not layer.lora_branches
    after = packed_state(qp)
    assert all(torch.equal(packed[k], after[k]) for k in packed), "a LoRA must not touch the packed weights"


def test_lora_under_lowvram_and_partial_unload(comfy):
    """Offloaded (lowvram) layers carry the LoRA as branches too, never LowVramPatch weight functions,
    and a partial unload does not add the patch a second time."""
    fp = make_patcher()
    qp = quantized_patcher(comfy, fp, "rtn-w4a8")
    lq = with_lora(qp, lora_file(fp, seed=10), 1.0)
    full = sample(comfy, lq)
    comfy.mm.LOWVRAM_BUDGET = 1
    try:
        low = sample(comfy, with_lora(qp, lora_file(fp, seed=10), 1.0))
    finally:
        comfy.mm.LOWVRAM_BUDGET = None
    assert qp.model.model_lowvram
    torch.testing.assert_close(low, full, rtol=0, atol=0)
    sample(comfy, lq)
    lq.partially_unload(torch.device("cpu"), memory_to_free=1 << 40)
    layer = qp.model.diffusion_model.blocks[0].attn.qkv
    assert layer.weight_function == [] and list(layer.lora_branches) == ["comfy:0"]
    x = torch.randn(3, 64)
    without = layer.lora_branches.pop("comfy:0")
    y_q = layer(x)
    layer.lora_branches["comfy:0"] = without
    y = layer(x)
    delta = (x @ without.down) @ without.up * without.scale
    torch.testing.assert_close(y - y_q, delta, rtol=1e-4, atol=1e-5)


def test_non_lora_patch_is_exact_and_never_requantizes(comfy):
    """A full-difference patch (not low rank) runs as a dense change on the dequantized weight;
    the stored weight stays as it was and ComfyUI's merge entry point refuses to re-round."""
    from ditq.nodes.comfy_adapter import ComfyAdapterError

    fp = make_patcher()
    qp = quantized_patcher(comfy, fp, "rtn-w4a8")
    layer = qp.model.diffusion_model.blocks[0].mlp.fc1
    x = torch.randn(5, 64)
    base_y = layer(x)
    diff = torch.randn(256, 64) * 0.01
    patched = qp.clone()
    patched.add_patches({"diffusion_model.blocks.0.mlp.fc1.weight": ("diff", (diff,))}, 0.5)
    sample(comfy, patched)
    torch.testing.assert_close(layer(x), base_y + 0.5 * x @ diff.T, rtol=1e-4, atol=1e-5)
    sample(comfy, qp)
    assert torch.equal(layer(x), base_y) and layer.weight_function == []
    with pytest.raises(ComfyAdapterError, match="re-round"):
        layer.set_weight(layer.convert_weight(layer.weight))
    assert torch.equal(layer.set_weight(diff, return_weight=True), diff)


def test_quantized_save_ignores_patches_and_stand_ins(comfy):
    """Saving a MODEL while a LoRA clone is patched in writes the bare quantized model; codebook
    layers' empty weight stand-ins stay out of the file."""
    save, load = comfy.nodes["DitqSaveQuantizedDiT"], comfy.nodes["DitqLoadQuantizedDiT"]
    fp = make_patcher()
    qp = codebook_patcher(fp)
    assert qp.model.diffusion_model.blocks[0].attn.qkv.weight.numel() == 0
    q_out = sample(comfy, qp)
    sample(comfy, with_lora(qp, lora_file(fp, seed=10), 1.0))
    save.execute(model=qp, filename="cb_lora", format="ditq", overwrite=True)
    loaded = load.execute(model_name="cb_lora.safetensors").args[0]
    torch.testing.assert_close(sample(comfy, loaded), q_out, rtol=0, atol=0)


# -- workflows ------------------------------------------------------------------------------------
STOCK = {"UNETLoader", "CLIPLoader", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAELoader",
         "VAEDecode", "SaveImage", "PreviewImage", "LoraLoaderModelOnly", "EmptyHunyuanLatentVideo",
         "SaveAnimatedWEBP", "DualCLIPLoader", "FluxGuidance", "ConditioningZeroOut", "EmptySD3LatentImage"}


def test_workflows_are_loadable_ui_json(comfy):
    files = sorted((ROOT / "workflows").glob("*.json"))
    assert len(files) == 5  # PixArt x 3, Wan video, Flux
    # ComfyUI's template browser reads workflows/ too; a second folder would list each twice
    assert not (ROOT / "example_workflows").exists()
    for path in files:
        wf = json.loads(path.read_text())
        assert wf["version"] == 0.4 and wf["last_node_id"] == max(n["id"] for n in wf["nodes"])
        nodes = {n["id"]: n for n in wf["nodes"]}
        for link_id, src_id, src_slot, dst_id, dst_slot, typ in wf["links"]:
            assert nodes[src_id]["outputs"][src_slot]["type"] == typ
            assert link_id in nodes[src_id]["outputs"][src_slot]["links"]
            assert nodes[dst_id]["inputs"][dst_slot]["link"] == link_id
        for n in wf["nodes"]:
            if n["type"] in comfy.nodes:
                schema = comfy.nodes[n["type"]].GET_SCHEMA()
                slots = []  # widget inputs in schema order; control_after_generate adds a value
                for i in schema.inputs:
                    if i.io_type in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                        slots += [i, None] if i.options.get("control_after_generate") else [i]
                assert len(n["widgets_values"]) == len(slots), f"{path.name}: {n['type']} widgets"
                for i, v in zip(slots, n["widgets_values"]):
                    if i is not None and i.io_type == "COMBO" and i.id not in ("load_calibration", "model_name"):
                        assert v in i.options["options"], f"{path.name}: {n['type']}.{i.id}={v!r}"
            else:
                assert n["type"] in STOCK, f"{path.name}: unknown node {n['type']}"


# -- every preset the nodes offer ---------------------------------------------------------------
def preset_options(comfy, node_id):
    return next(i for i in comfy.nodes[node_id].GET_SCHEMA().inputs if i.id == "preset").options["options"]


def test_nodes_offer_every_preset_but_the_searched(comfy):
    from ditq import QuantConfig

    searched = {p for p in QuantConfig.presets() if p.startswith("qua2sedimo")}
    assert searched, "the searched presets exist in Python"
    for node_id in ("DitqCalibrateDiT", "DitqQuantizeDiT"):
        assert set(preset_options(comfy, node_id)) == set(QuantConfig.presets()) - searched


# Fidelity floors of the sampled output (SQNR dB against FP, 2 calibration steps on the stand-in DiT of
# width 128; slow presets at their documented small settings), a few dB under what was measured.
NODE_FLOORS = {"rtn-w8a8": 33, "rtn-w8a8-dynamic": 37, "rtn-w4a8": 15, "rtn-w4a16": 15, "rtn-fp8": 27,
               "rtn-w3a16": 4, "rtn-w2a16": 0, "vidit-q-w8a8": 37, "vidit-q-w6a6": 24, "vidit-q-w4a8-mp": 16,
               "q-dit-w4a8": 27, "q-dit-w6a8": 37, "vq4dit-w2": 0, "vq4dit-w3": 1}


def small_presets(monkeypatch):
    """The nodes build presets by name; in tests slow ones take their documented small settings."""
    from ditq import QuantConfig

    original = QuantConfig.preset
    monkeypatch.setattr(QuantConfig, "preset", lambda name, small=False, options=None:
                        original(name, small=True, options=options))


def test_every_offered_preset_calibrates_quantizes_saves_and_reloads(comfy, monkeypatch):
    """Calibrate DiT -> Quantize DiT -> sample -> Save -> Load -> the same output, for every preset the
    nodes offer, with fewer calibration steps (2) than vidit-q-w4a8-mp has timestep ranges (4)."""
    from ditq.quant_core.metrics import sqnr

    small_presets(monkeypatch)
    save, load = comfy.nodes["DitqSaveQuantizedDiT"], comfy.nodes["DitqLoadQuantizedDiT"]
    patcher = make_patcher(hidden=128)       # Q-DiT's groups of 128 divide every layer
    fp_out = sample(comfy, patcher)
    offered = preset_options(comfy, "DitqQuantizeDiT")
    assert set(offered) == set(NODE_FLOORS)
    got = {}
    for preset in offered:
        calib, _ = calibrate(comfy, patcher, preset=preset, steps=2)
        qp = comfy.nodes["DitqQuantizeDiT"].execute(model=patcher, preset=preset, weight_bits="preset",
                                                    calibration=calib).args[0]
        q_out = sample(comfy, qp)
        got[preset] = sqnr(fp_out, q_out)
        name = f"every_{preset}"
        save.execute(model=qp, filename=name, format="ditq", overwrite=True)
        again = load.execute(model_name=f"{name}.safetensors").args[0]
        assert again.model_size() == qp.model_size(), preset
        torch.testing.assert_close(sample(comfy, again), q_out, rtol=0, atol=0, msg=preset)
    low = {p: round(v, 1) for p, v in got.items() if v < NODE_FLOORS[p]}
    assert not low, f"below floor: {low} (all: { {p: round(v, 1) for p, v in got.items()} })"
    # Load lists the checkpoints only, not the calibrations saved under models/ditq/calibration
    calibrate(comfy, patcher, save_as="not_a_checkpoint")
    names = preset_options_of_load(comfy)
    assert f"every_{offered[0]}.safetensors" in names and not any("not_a_checkpoint" in n for n in names)


def preset_options_of_load(comfy):
    return next(i for i in comfy.nodes["DitqLoadQuantizedDiT"].GET_SCHEMA().inputs
                if i.id == "model_name").options["options"]


def test_vq4dit_calibration_skips_sampler_bookkeeping(comfy):
    """ComfyUI passes transformer_options (lists, UUIDs) and control to the diffusion model: not
    recorded; the replayed calls are the model's own inputs and reproduce its output."""
    patcher = make_patcher()
    dm = patcher.model.diffusion_model
    seen = []
    h = dm.register_forward_hook(lambda m, a, out: seen.append(out))
    calib, _ = calibrate(comfy, patcher, preset="vq4dit-w2", steps=2)
    h.remove()
    calls = list(calib.model_calls())
    assert len(calls) == 2 and set(calls[0]) == {"x", "timesteps", "context"}
    with torch.no_grad():
        torch.testing.assert_close(dm(**calls[1]), seen[1], rtol=0, atol=0)


def test_quantize_uses_own_weights_when_an_earlier_lora_stayed_applied(comfy):
    """FP + LoRA prompt leaves patched weights in the shared model (originals in the shared backup);
    Quantize DiT on the plain model must quantize the model's own weights."""
    from safetensors.torch import load_file

    plain = make_patcher()
    clean_path = Path(comfy.nodes["DitqSaveQuantizedDiT"].execute(
        model=comfy.nodes["DitqQuantizeDiT"].execute(model=plain, preset="rtn-w8a8-dynamic",
                                                     weight_bits="preset").args[0],
        filename="lora_clean", format="ditq", overwrite=True).args[0])
    lora = plain.clone()
    dm = plain.model.diffusion_model
    keys = [f"diffusion_model.{n}.weight" for n in ("blocks.0.attn.qkv", "blocks.1.mlp.fc2")]
    lora.add_patches({k: ("diff", (torch.randn_like(plain.model.get_parameter(k)) * 0.05,)) for k in keys})
    lora.patch_model()                       # the LoRA prompt sampled and left its patches applied
    assert not torch.equal(dm.blocks[0].attn.qkv.weight, lora.backup[keys[0]].weight)
    qp = comfy.nodes["DitqQuantizeDiT"].execute(model=plain, preset="rtn-w8a8-dynamic", weight_bits="preset").args[0]
    path = Path(comfy.nodes["DitqSaveQuantizedDiT"].execute(model=qp, filename="lora_after", format="ditq",
                                                            overwrite=True).args[0])
    clean, after = load_file(str(clean_path)), load_file(str(path))
    assert clean.keys() == after.keys()
    differ = [k for k in clean if not torch.equal(clean[k], after[k])]
    assert not differ, f"LoRA left a trace in {differ[:3]}"
    lora.unpatch_model()


def interrupt_inside(comfy, monkeypatch, module, name):
    """Raise ComfyUI's interrupt flag the first time ``module.name`` runs (deep inside a core loop)."""
    original = getattr(module, name)

    def flagged(*a, **k):
        comfy.mm.interrupt_current_processing(True)
        return original(*a, **k)

    monkeypatch.setattr(module, name, flagged)


@pytest.mark.parametrize("preset, where, inside", [("q-dit-w4a8", "gptq", "gptq"),
                                                   ("vq4dit-w2", "kmeans", "kmeans")])
def test_interrupt_is_honoured_inside_long_loops(comfy, monkeypatch, preset, where, inside):
    import traceback

    from ditq.quant_core.passes import gptq, kmeans

    small_presets(monkeypatch)
    patcher = make_patcher(hidden=128)
    calib, _ = calibrate(comfy, patcher, preset=preset, steps=2)
    module, name = {"gptq": (gptq, "_inverse_hessian_factor"), "kmeans": (kmeans, "_update")}[where]
    interrupt_inside(comfy, monkeypatch, module, name)
    with pytest.raises(comfy.mm.InterruptProcessingException) as info:
        comfy.nodes["DitqQuantizeDiT"].execute(model=patcher, preset=preset, weight_bits="preset", calibration=calib)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert inside in frames, frames          # raised from within the loop, not between layers


def test_cancelled_vq4dit_resumes_where_it_stopped(comfy, monkeypatch):
    """Cancel during vq4dit's optimisation keeps its state in models/ditq/work; queueing the same
    Quantize again resumes from there, ends where an uninterrupted run ends, and removes the state."""
    from ditq.quant_core.methods.vq4dit import method as vq4dit

    small_presets(monkeypatch)
    patcher = make_patcher(hidden=128)
    calib, _ = calibrate(comfy, patcher, preset="vq4dit-w2", steps=2)
    quantize = comfy.nodes["DitqQuantizeDiT"].execute
    args = dict(model=patcher, preset="vq4dit-w2", weight_bits="preset", calibration=calib)
    straight = quantize(**args).args[0]
    work = Path(comfy.fp.models_dir) / "ditq" / "work"
    assert not list(work.glob("*"))                 # a completed optimisation leaves no state behind
    original, ticks = vq4dit.report, []

    def cancel_at_step_5(stage, done, total):  # mid-step: after the student's forward, before its update
        if stage == "vq4dit calibrate":
            ticks.append(done)
        if ticks.count(5) == 3:
            comfy.mm.interrupt_current_processing(True)
        original(stage, done, total)

    monkeypatch.setattr(vq4dit, "report", cancel_at_step_5)
    with pytest.raises(comfy.mm.InterruptProcessingException):
        quantize(**args)
    assert ticks.count(4) == 4                      # progress and Cancel 4 times a step (seconds on a CPU)
    assert len(list(work.glob("vq4dit-*.safetensors"))) == 1
    monkeypatch.setattr(vq4dit, "report", original)
    resumed = quantize(**args).args[0]
    state = resumed.model.diffusion_model.ditq_state
    assert state["method_state"]["steps_this_run"] == 3 and state["method_state"]["steps_done"] == 8
    assert "work_dir" not in state["recipe"]["options"]   # no local path in what a saved file shares
    assert not list(work.glob("*"))
    a, b = packed_state(straight), packed_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_progress_shows_at_once_and_within_layers(comfy, monkeypatch):
    patcher = make_patcher(hidden=128)
    calib, _ = calibrate(comfy, patcher, preset="q-dit-w4a8", steps=2)
    updates = []
    original = comfy.utils.ProgressBar.update_absolute
    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute",
                        lambda self, v, total=None, preview=None: (updates.append(v), original(self, v, total)))
    comfy.nodes["DitqQuantizeDiT"].execute(model=patcher, preset="q-dit-w4a8", weight_bits="preset", calibration=calib)
    assert updates[0] == 0                   # shown before the first layer's work
    assert len(updates) > 2 * 14 + 1         # GPTQ column blocks report inside each of the 14 layers
