"""diffusers integration on local folders: the "ditq" quantizer backend, QuantizedPixArtPipeline /
QuantizedDiTPipeline save and load, the model card, transformer-only repos, offload and compile.
Hub-protocol tests are in test_diffusers_hub.py."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

STEPS = 2
PROMPT = "a red fox in snow"


@pytest.fixture(scope="module")
def call_kwargs(builtin):
    return dict(builtin.PIXART_CALL, num_inference_steps=STEPS)


def sample(pipe, call_kwargs, prompt=PROMPT):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np", **call_kwargs)
    return torch.from_numpy(out.images)


def rel_l2(a, b):
    from ditq.quant_core.metrics import rel_l2 as metric

    return metric(a.double(), b.double())


@pytest.fixture(scope="module")
def qpipe(fp_dir, call_kwargs):
    """Quantized on load with calibration (static activation scales need it) and fidelity measured."""
    from ditq import QuantizedPixArtPipeline

    pipe = QuantizedPixArtPipeline.from_pretrained(
        fp_dir, quantization_config="rtn-w8a8", calibration_prompts=[PROMPT], fidelity_prompts=1,
        calibration_kwargs=call_kwargs, base_model="org/tiny-pixart")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def q_out(qpipe, call_kwargs):
    return sample(qpipe, call_kwargs)


@pytest.fixture(scope="module")
def q_dir(qpipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "tiny-pixart-w8a8"
    qpipe.save_pretrained(path)
    return path


def test_quantize_on_load_makes_real_quantized_layers(qpipe, fp_dir):
    from ditq import QuantizedPixArtPipeline, QuantLinear
    from diffusers import PixArtAlphaPipeline

    assert isinstance(qpipe, QuantizedPixArtPipeline) and isinstance(qpipe, PixArtAlphaPipeline)
    layer = qpipe.transformer.transformer_blocks[0].attn1.to_q
    assert isinstance(layer, QuantLinear) and layer.weight.dtype == torch.int8
    assert layer.input_scale is not None and layer.input_scale.item() > 0  # calibrated static scale
    fid = qpipe.transformer.config.quantization_config.fidelity
    assert fid["prompts"] == [PROMPT] and 10 < fid["psnr_db"] < 80 and 0 < fid["ssim"] <= 1
    with pytest.raises(ValueError, match="not ditq-quantized"):  # a full-precision repo without a config
        QuantizedPixArtPipeline.from_pretrained(fp_dir)


def test_saved_repo_is_stock_and_reloads_exactly(qpipe, q_dir, q_out, call_kwargs):
    from ditq import QuantizedPixArtPipeline
    from ditq.quant_core.serialization import FORMAT_VERSION
    from diffusers import PixArtAlphaPipeline

    index = json.loads((q_dir / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline"
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    qcfg = json.loads((q_dir / "transformer" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "ditq" and qcfg["format_version"] == FORMAT_VERSION and len(qcfg["layers"]) == 40
    reloaded = QuantizedPixArtPipeline.from_pretrained(q_dir)
    assert type(reloaded).__name__ == "QuantizedPixArtAlphaPipeline"
    assert rel_l2(q_out, sample(reloaded, call_kwargs)) < 1e-6
    # accelerate's offload hooks move every quantized buffer with its module (to "cpu" here, the only
    # device in CI; the hook path is the same for an accelerator)
    reloaded.enable_model_cpu_offload(device="cpu")
    assert rel_l2(q_out, sample(reloaded, call_kwargs)) < 1e-6
    # the stock loader reads the same repo once ditq is imported (backend registered)
    stock = PixArtAlphaPipeline.from_pretrained(q_dir)
    sd, ref = stock.transformer.state_dict(), qpipe.transformer.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_half_precision_load_keeps_scales_fp32(q_dir, qpipe):
    from ditq.quant_core.serialization import quantized_layers
    from diffusers import PixArtTransformer2DModel

    t = PixArtTransformer2DModel.from_pretrained(q_dir, subfolder="transformer", torch_dtype=torch.bfloat16)
    ref = quantized_layers(qpipe.transformer)
    for name, layer in quantized_layers(t).items():
        assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
        assert layer.input_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
        assert torch.equal(layer.weight_scale, ref[name].weight_scale)  # not rounded through bf16
    assert t.pos_embed.proj.weight.dtype == torch.bfloat16


def test_core_and_diffusers_folders_are_interchangeable(qpipe, q_dir, tmp_path):
    from ditq import load_quantized, save_quantized
    from diffusers import PixArtTransformer2DModel

    ref = qpipe.transformer.state_dict()
    from_core = load_quantized(q_dir)  # diffusers-written folder read by the core loader
    assert all(torch.equal(from_core.state_dict()[k], ref[k]) for k in ref)
    save_quantized(qpipe.transformer, tmp_path / "core")  # core-written folder read by stock diffusers
    stock = PixArtTransformer2DModel.from_pretrained(tmp_path / "core")
    assert all(torch.equal(stock.state_dict()[k], ref[k]) for k in ref)


def test_model_card(q_dir, qpipe):
    from huggingface_hub import ModelCard

    card = ModelCard.load(q_dir / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny-pixart" and data["base_model_relation"] == "quantized"
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"ditq", "pixart", "rtn", "w8a8"} <= set(data["tags"])
    info = data["ditq"]
    assert info["method"] == "rtn" and info["preset"] == "rtn-w8a8" and info["bits"] == ["w8a8"]
    layers = [m for m in qpipe.transformer.modules() if hasattr(m, "weight_nbytes")]
    quant = sum(m.weight_nbytes() for m in layers)
    fp16 = sum(2 * m.out_features * m.in_features for m in layers)
    assert info["sizes"]["linear_weight_bytes"] == quant and info["sizes"]["linear_weight_bytes_fp16"] == fp16
    # per-channel int8: one byte per weight plus one fp32 scale per output row
    packed = sum(m.out_features * m.in_features + 4 * m.out_features for m in layers)
    assert info["sizes"]["linear_weight_ratio"] == pytest.approx(packed / fp16, abs=1e-4)
    weights = q_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    assert info["sizes"]["transformer_file_bytes"] == weights.stat().st_size
    assert info["fidelity"]["psnr_db"] == qpipe.transformer.config.quantization_config.fidelity["psnr_db"]
    assert "PSNR" in card.text and "rtn-w8a8" in card.text


def test_transformer_only_repo_resolves_its_pointer(qpipe, fp_dir, q_out, call_kwargs, tmp_path):
    from ditq import QuantizedPixArtPipeline
    from ditq.quant_core.serialization import CheckpointError

    path = tmp_path / "t-only"
    qpipe.save_pretrained(path, transformer_only=True, base_model=str(fp_dir))
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "ditq_base_model.json", "transformer"]
    pointer = json.loads((path / "ditq_base_model.json").read_text())
    assert pointer["pipeline_class"] == "PixArtAlphaPipeline" and pointer["base_model"] == str(fp_dir)
    pipe = QuantizedPixArtPipeline.from_pretrained(path)
    assert rel_l2(q_out, sample(pipe, call_kwargs)) < 1e-6
    (path / "ditq_base_model.json").write_text(json.dumps({**pointer, "format_version": 7}))
    with pytest.raises(CheckpointError, match="format_version 7"):
        QuantizedPixArtPipeline.from_pretrained(path)


def test_missing_weights_file_names_it(q_dir, tmp_path):
    from ditq import QuantizedPixArtPipeline

    broken = tmp_path / "broken"
    shutil.copytree(q_dir, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError, match="A ditq repo holds transformer/config.json") as info:
        QuantizedPixArtPipeline.from_pretrained(broken)
    assert "diffusion_pytorch_model" in str(info.value).split("A ditq repo")[0]  # diffusers named the file


def test_dit_pipeline(dit_pipe, fresh, builtin, tmp_path):
    from ditq import QuantizedDiTPipeline, QuantLinear

    pipe = QuantizedDiTPipeline.from_pipe(fresh(dit_pipe))
    pipe.set_progress_bar_config(disable=True)
    pipe.quantize("rtn-w8a8-dynamic", [3], progress=False, **dict(builtin.DIT_CALL, num_inference_steps=STEPS))
    fid = pipe.transformer.config.quantization_config.fidelity  # sampled FP and quantized, labels as prompts
    assert fid["prompts"] == ["3"] and fid["psnr_db"] > 10
    with pytest.raises(ValueError, match="needs base_model"):  # quantized in memory: no repo to point to
        pipe.save_pretrained(tmp_path / "t-only", transformer_only=True)
    pipe.save_pretrained(tmp_path / "dit")
    assert json.loads((tmp_path / "dit" / "model_index.json").read_text())["_class_name"] == "DiTPipeline"
    reloaded = QuantizedDiTPipeline.from_pretrained(tmp_path / "dit")
    assert isinstance(reloaded.transformer.transformer_blocks[0].ff.net[2], QuantLinear)
    sd, ref = reloaded.transformer.state_dict(), pipe.transformer.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    card = (tmp_path / "dit" / "README.md").read_text()
    assert "pipeline_tag: unconditional-image-generation" in card and "- dit" in card


def test_torch_compile_transformer(q_dir, q_out, call_kwargs):
    from ditq import QuantizedPixArtPipeline

    pipe = QuantizedPixArtPipeline.from_pretrained(q_dir)
    pipe.transformer = torch.compile(pipe.transformer, backend="eager", fullgraph=True)
    assert rel_l2(q_out, sample(pipe, call_kwargs)) < 1e-6
