"""One notion of "a ditq-quantized model" across entry paths, seen through diffusers: bare
``ditq.quantize`` + diffusers' own save/load, quantize-on-load (``DitqConfig`` and
``PipelineQuantizationConfig``), dtype rules, counts, dequantize, fusion, keep-in-fp32, and the
errors for missing paths and an offline Hub. diffusers' own test classes run in tests/upstream_diffusers."""
from __future__ import annotations

import pytest
import torch

STEPS = 2
PROMPT = "a red fox in snow"


def forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([500]),
                     encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def sample(pipe, call_kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **call_kwargs).images


@pytest.fixture(scope="module")
def call_kwargs(builtin):
    return dict(builtin.PIXART_CALL, num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def every_statistic(tiny_pipe, calib_kwargs):
    """Calibration with what every quick preset needs (4 steps: ViDiT-Q-MP splits them in 4 ranges)."""
    from ditq import QuantConfig, calibrate
    from ditq.quant_core.methods import get_method

    needs = sorted({n for p in QuantConfig.presets(quick_only=True)
                    for n in get_method(QuantConfig.preset(p).method).needs(QuantConfig.preset(p))})
    kw = {**calib_kwargs, "num_inference_steps": 4}
    return calibrate(tiny_pipe, [PROMPT], needs=needs, **kw)


def quick_presets():
    from ditq import QuantConfig

    return QuantConfig.presets(quick_only=True)


@pytest.mark.parametrize("preset", quick_presets())
def test_bare_quantize_then_diffusers_save_reloads_identically(preset, tiny_pipe, fresh, every_statistic, tmp_path):
    """The silent-corruption sequence of issue 16, for every preset: ditq.quantize, then diffusers'
    own save_pretrained / from_pretrained."""
    from ditq import QuantConfig, QuantLinear, quantize
    from diffusers import PixArtTransformer2DModel

    model = fresh(tiny_pipe.transformer)
    quantize(model, QuantConfig.preset(preset), every_statistic, progress=False)
    model.save_pretrained(tmp_path)
    reloaded = PixArtTransformer2DModel.from_pretrained(tmp_path)
    assert reloaded.is_quantized and reloaded.config.quantization_config.quant_method == "ditq"
    assert any(isinstance(m, QuantLinear) for m in reloaded.modules())
    assert torch.equal(forward(model), forward(reloaded))


def test_pipeline_save_of_bare_quantized_transformer(tiny_pipe, fresh, call_kwargs, tmp_path):
    """The stock pipeline's save_pretrained, and the stock loader after ``import ditq``."""
    from ditq import QuantConfig, quantize
    from diffusers import PixArtAlphaPipeline

    pipe = fresh(tiny_pipe)
    quantize(pipe.transformer, QuantConfig.preset("rtn-w8a8-dynamic"), progress=False)
    expected = sample(pipe, call_kwargs)
    pipe.save_pretrained(tmp_path)
    reloaded = PixArtAlphaPipeline.from_pretrained(tmp_path)
    assert (expected == sample(reloaded, call_kwargs)).all()
    for p in (pipe, reloaded):  # the same dtype rule fresh and reloaded: diffusers' rule for quantized models
        with pytest.raises(ValueError, match="Casting a quantized model to a new `dtype` is unsupported"):
            p.transformer.to(torch.float16)


def test_marks_counts_and_fusion(tiny_pipe, fresh):
    from ditq import QuantConfig, quantize
    from ditq.quant_core.serialization import quantized_layers

    model = fresh(tiny_pipe.transformer)
    fp_params, fp_bytes = model.num_parameters(), model.get_memory_footprint()
    quantize(model, QuantConfig.preset("rtn-w4a16"), progress=False)
    assert model.config._pre_quantization_dtype == torch.float32 and model.hf_quantizer.is_serializable
    assert model.num_parameters() == fp_params  # packed weights are buffers; still the model's weights
    packed = sum(b.numel() * b.element_size() for m in quantized_layers(model).values() for b in m.buffers())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model.get_memory_footprint(return_buffers=False) == params + packed
    assert model.get_memory_footprint() < fp_bytes / 3 and packed > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="to_q .*ditq-quantized and cannot be fused; the model is unchanged"):
        model.fuse_qkv_projections()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_dequantize_gives_linears_with_the_dequantized_weights(tiny_pipe, fresh, tmp_path):
    from ditq import QuantConfig, quantize
    from ditq.quant_core.serialization import quantized_layers
    from diffusers import PixArtTransformer2DModel

    model = fresh(tiny_pipe.transformer)
    quantize(model, QuantConfig.preset("rtn-w4a16"), progress=False)  # weight-only: same product after dequant
    weights = {n: m.effective_weight() for n, m in quantized_layers(model).items()}
    expected = forward(model)
    model.dequantize()
    for name, w in weights.items():
        layer = model.get_submodule(name)
        assert type(layer) is torch.nn.Linear and torch.equal(layer.weight, w)
    assert not model.is_quantized and "quantization_config" not in model.config
    assert torch.allclose(forward(model), expected, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)  # an ordinary full-precision checkpoint now
    assert type(PixArtTransformer2DModel.from_pretrained(tmp_path).transformer_blocks[0].ff.net[2]) is torch.nn.Linear


def test_save_refused_when_layers_changed_after_quantizing(tiny_pipe, fresh, tmp_path):
    from ditq import QuantConfig, quantize

    model = fresh(tiny_pipe.transformer)
    quantize(model, QuantConfig.preset("rtn-w8a8-dynamic"), progress=False)
    model.transformer_blocks[0].ff.net[2] = torch.nn.Linear(1024, 256)  # swapped back behind ditq's back
    with pytest.raises(ValueError, match="no longer matches the model .*transformer_blocks.0.ff.net.2"):
        model.save_pretrained(tmp_path)


def test_pickle_save_is_refused(tiny_pipe, fresh, tmp_path):
    from ditq import QuantConfig, quantize

    model = fresh(tiny_pipe.transformer)
    quantize(model, QuantConfig.preset("rtn-w8a8-dynamic"), progress=False)
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert not list(tmp_path.glob("*.bin"))


def test_quantize_on_load_equals_bare_quantize(fp_dir, tiny_pipe, fresh, tmp_path):
    from ditq import QuantConfig, quantize
    from ditq.pipelines.quantizer import DitqConfig
    from diffusers import PixArtTransformer2DModel

    loaded = PixArtTransformer2DModel.from_pretrained(fp_dir, subfolder="transformer",
                                                      quantization_config=DitqConfig(preset="rtn-w4a8"))
    bare = fresh(tiny_pipe.transformer)
    quantize(bare, QuantConfig.preset("rtn-w4a8"), progress=False)
    sd, ref = loaded.state_dict(), bare.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    loaded.save_pretrained(tmp_path)  # writes the full description, not the request
    assert PixArtTransformer2DModel.from_pretrained(tmp_path).config.quantization_config.layers.keys() == \
        loaded.config.quantization_config.layers.keys()


def test_quantize_on_load_keeps_excluded_and_fp32_modules(fp_dir, monkeypatch):
    from ditq import QuantLinear
    from ditq.pipelines.quantizer import DitqConfig
    from diffusers import PixArtTransformer2DModel

    monkeypatch.setattr(PixArtTransformer2DModel, "_keep_in_fp32_modules", ["ff"])
    model = PixArtTransformer2DModel.from_pretrained(
        fp_dir, subfolder="transformer", torch_dtype=torch.bfloat16,
        quantization_config=DitqConfig(preset="rtn-w8a8-dynamic", modules_to_not_convert=["attn2"]))
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(k is torch.nn.Linear for n, k in kinds.items() if ".attn2." in n or ".ff." in n)
    assert all(k is QuantLinear for n, k in kinds.items() if ".attn1." in n)
    assert model.transformer_blocks[0].ff.net[2].weight.dtype == torch.float32
    assert model.transformer_blocks[0].attn2.to_q.weight.dtype == torch.bfloat16


def test_quantize_on_load_of_a_calibrated_preset_points_to_the_calibrated_route(fp_dir):
    from ditq.pipelines.quantizer import DitqConfig
    from diffusers import PixArtTransformer2DModel

    with pytest.raises(ValueError, match=r"needs calibration statistics \['act_absmax'\].*calibration_prompts"):
        PixArtTransformer2DModel.from_pretrained(fp_dir, subfolder="transformer",
                                                 quantization_config=DitqConfig(preset="rtn-w8a8"))
    with pytest.raises(ValueError, match="pass DitqConfig\\(preset=...\\).*rtn-w8a8-dynamic"):
        PixArtTransformer2DModel.from_pretrained(fp_dir, subfolder="transformer", quantization_config=DitqConfig())


def test_pipeline_quantization_config(fp_dir, call_kwargs, tmp_path):
    from ditq import QuantLinear
    from ditq.pipelines.quantizer import DitqConfig
    from diffusers import PipelineQuantizationConfig, PixArtAlphaPipeline

    pqc = PipelineQuantizationConfig(quant_mapping={"transformer": DitqConfig(preset="rtn-w8a8-dynamic")})
    pipe = PixArtAlphaPipeline.from_pretrained(fp_dir, quantization_config=pqc)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn1.to_q, QuantLinear)
    expected = sample(pipe, call_kwargs)
    pipe.save_pretrained(tmp_path)
    assert (sample(PixArtAlphaPipeline.from_pretrained(tmp_path), call_kwargs) == expected).all()


def test_pre_quantized_bf16_load_keeps_fp32_modules(tiny_pipe, fresh, tmp_path, monkeypatch):
    from ditq import QuantConfig, quantize
    from diffusers import PixArtTransformer2DModel

    model = fresh(tiny_pipe.transformer)
    quantize(model, QuantConfig.preset("rtn-w8a8-dynamic"), progress=False)
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(PixArtTransformer2DModel, "_keep_in_fp32_modules", ["proj_out"])
    t = PixArtTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert t.proj_out.weight.dtype == torch.float32 and t.caption_projection.linear_1.weight.dtype == torch.bfloat16
    assert t.config._pre_quantization_dtype == torch.bfloat16


def test_quantized_pipeline_refuses_dtype_cast_before_touching_components(tiny_pipe, fresh):
    from ditq import QuantizedPixArtPipeline

    pipe = QuantizedPixArtPipeline.from_pipe(fresh(tiny_pipe))
    pipe.quantize("rtn-w8a8-dynamic", progress=False)
    with pytest.raises(ValueError, match="No component was changed"):
        pipe.to(torch.float16)
    assert pipe.text_encoder.dtype == torch.float32 and pipe.vae.dtype == torch.float32


def test_missing_local_path_and_offline_hub_errors(tmp_path):
    from ditq import QuantizedPixArtPipeline, load_quantized
    from ditq.quant_core.serialization import HubError

    for source in ("./no-such-dir", str(tmp_path / "gone"), "no-such-dir", str(tmp_path / "x.safetensors")):
        with pytest.raises(FileNotFoundError, match="local path does not exist"):
            load_quantized(source)
    with pytest.raises(FileNotFoundError, match="local path does not exist"):
        QuantizedPixArtPipeline.from_pretrained("./no-such-dir")
    # conftest sets HF_HUB_OFFLINE=1: a repo id that is not cached
    with pytest.raises(HubError, match=r"org/never-cached: offline \(HF_HUB_OFFLINE=1\) and not in the local"):
        QuantizedPixArtPipeline.from_pretrained("org/never-cached", cache_dir=tmp_path)
    with pytest.raises(HubError, match=r"offline \(local_files_only=True\)"):
        load_quantized("org/never-cached", cache_dir=tmp_path, local_files_only=True)


def test_unreachable_hub_is_not_reported_as_offline(monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from ditq.quant_core.serialization import hub_error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cause = LocalEntryNotFoundError("cannot find the requested files in the local cache")
    cause.__cause__ = ConnectionError("Connection refused")
    message = str(hub_error("org/x", cause))
    assert "could not reach the Hub (Connection refused)" in message and "offline" not in message
