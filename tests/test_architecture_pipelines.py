"""``calibrate`` driving the real diffusers pipelines of the video and MMDiT families (built tiny):
Latte (spatial and temporal blocks over frames), CogVideoX (joint text+video tokens), Wan (video
frames, CFG halves as two forwards), HunyuanDiT (BERT + T5 text, skip connections), Flux
(guidance-distilled, no CFG), SD3 (MMDiT joint text+image tokens, batched CFG); then the quantized
pipeline samples close to full precision. Plus the statistics' memory bound for long videos (tens of
thousands of token rows per step)."""
import copy

import pytest
import torch

from ditq import QuantConfig, calibrate, quantize
from ditq.evaluation.architectures import PIPELINE_CALLS, tiny_pipeline
from ditq.quant_core.models import select_layers

PROMPTS = ["a red fox in snow", "a boat at sunset"]
STEPS = 3
# Relative error of the final latents allowed for vidit-q-w8a8. HunyuanDiT's blocks have no adaLN
# gates (at random init the others' are ~0.06, nearly the identity), so every block's W8A8 error of
# ~1% reaches each forward, and 3 DDPM steps (epsilon -> x0) amplify it.
TOLERANCE = {"hunyuandit": 0.1}


def _latents(pipe, family):
    gen = torch.Generator().manual_seed(7)
    return pipe(PROMPTS[:1], num_inference_steps=STEPS, generator=gen, output_type="latent",
                **PIPELINE_CALLS[family])[0].float()


@pytest.mark.parametrize("family", list(PIPELINE_CALLS))
def test_calibrate_drives_pipeline_and_vidit_q_follows_fp(family):
    pipe = tiny_pipeline(family)
    model = pipe.transformer
    rows = {}  # token rows each block Linear sees in its first forward

    def count(name):
        def hook(module, args):
            rows.setdefault(name, args[0].reshape(-1, args[0].shape[-1]).shape[0])
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(count(n)) for n in select_layers(model)]
    config = QuantConfig.preset("vidit-q-w8a8")
    calib = calibrate(pipe, PROMPTS, num_inference_steps=STEPS, config=config, progress=False,
                      **PIPELINE_CALLS[family])
    for h in handles:
        h.remove()
    # one statistic row per denoising step, whatever the number of forwards per step
    assert len(calib.timesteps) == STEPS and calib.timesteps[0] > calib.timesteps[-1]
    assert set(calib.layers) == set(select_layers(model))
    assert all(calib.get(n, "act_absmax").shape == (STEPS, model.get_submodule(n).in_features) for n in calib.layers)
    if family == "flux":  # guidance-distilled: one prompt, one batch row, no unconditional half
        assert rows["single_transformer_blocks.0.proj_out"] == 16 + 8  # 4x4 packed latents + 8 text tokens
    if family == "sd3":  # joint attention: image stream and text stream each calibrated
        assert rows["transformer_blocks.0.attn.to_q"] == 2 * 16 and rows["transformer_blocks.0.attn.add_q_proj"] == 2 * (77 + 8)  # CLIP + T5 tokens
    if family == "wan":  # video tokens: frames x patches, CFG halves as separate forwards
        assert rows["blocks.0.attn1.to_q"] == 2 * 16
    if family == "latte":  # spatial blocks see (CFG x frames) images of 4x4 patches, temporal ones the frames
        assert rows["transformer_blocks.0.attn1.to_q"] == 2 * 3 * 16
        assert rows["temporal_transformer_blocks.0.attn1.to_q"] == 2 * 16 * 3
    if family == "cogvideox":  # joint attention over 8 text tokens + 3 latent frames x 4x4 patches
        assert rows["transformer_blocks.0.attn1.to_q"] == 2 * (8 + 3 * 16)
    if family == "hunyuandit":  # cross-attention reads 77 BERT + 256 T5 tokens projected to the width
        assert rows["blocks.0.attn1.to_q"] == 2 * 16 and rows["blocks.0.attn2.to_k"] == 2 * (77 + 256)
    fp = _latents(pipe, family)
    pipe.transformer = copy.deepcopy(model)
    quantize(pipe.transformer, config, calib, progress=False)
    q = _latents(pipe, family)
    rel = ((q - fp).norm() / fp.norm()).item()
    assert 0 < rel < TOLERANCE.get(family, 0.05), rel


def _stat_bytes(calib):
    return {(n, s): calib.get(n, s).numel() * calib.get(n, s).element_size()
            for n in calib.layers for s in ("act_absmax", "act_samples")}


def test_statistics_of_long_video_do_not_grow_with_tokens():
    """Latte at 32 frames of 16x16 patches (8192 tokens, 16384 rows per step with CFG) records
    statistics of exactly the size a 3-frame 4x4-patch video records: [steps, K] maxima and at most
    ``limit`` sampled rows per layer."""
    from ditq.evaluation.architectures import tiny_transformer

    pipe = tiny_pipeline("latte")
    kw = dict(num_inference_steps=1, needs=("act_absmax", "act_samples"), progress=False,
              stat_options={"act_samples": {"limit": 64}})
    short = calibrate(pipe, PROMPTS[:1], **kw, **PIPELINE_CALLS["latte"])
    pipe.transformer = tiny_transformer("latte", video_length=32, sample_size=32)
    rows = []
    hook = pipe.transformer.transformer_blocks[0].attn1.to_q.register_forward_pre_hook(
        lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]).shape[0]) and None)
    long = calibrate(pipe, PROMPTS[:1], **kw, **dict(PIPELINE_CALLS["latte"], video_length=32, height=64, width=64))
    hook.remove()
    assert rows[0] == 2 * 32 * 16 * 16
    assert _stat_bytes(long) == _stat_bytes(short)
    assert all(long.get(n, "act_samples").shape[0] == 64 for n in long.layers)


def test_row_sample_of_long_video_steps_matches_sampling_all_rows():
    """Steps of 30000 rows are cut to the candidates before any copy, with the same sample as keeping
    every row's key (uniform without replacement over all steps)."""
    from ditq.quant_core.calibration import RowSample

    batches = [torch.randn(n, 8, generator=torch.Generator().manual_seed(n)) for n in (30000, 5, 700)]
    s = RowSample(limit=64, seed=3)
    for step, x in enumerate(batches):
        s.update(step, x)
    # reference: draw every row's key with the same generator, keep the 64 largest overall
    gen = torch.Generator().manual_seed(3)
    keys = torch.cat([torch.rand(x.shape[0], generator=gen, dtype=torch.float64) for x in batches])
    want = torch.cat(batches)[keys.topk(64).indices]
    got = s.result()
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))


def test_wan22_experts_calibrated_separately():
    """Wan 2.2 A14B: ``transformer`` denoises the high-noise steps, ``transformer_2`` the rest; each
    expert's calibration holds its own steps only."""
    import diffusers

    from ditq.evaluation.architectures import tiny_transformer

    base = tiny_pipeline("wan")
    pipe = diffusers.WanPipeline(**dict(base.components, transformer_2=tiny_transformer("wan", seed=1)),
                                 boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, progress=False, **PIPELINE_CALLS["wan"])
    high = calibrate(pipe, PROMPTS[:1], **kw)
    low = calibrate(pipe, PROMPTS[:1], component="transformer_2", **kw)
    assert len(high.timesteps) + len(low.timesteps) == 4
    assert high.timesteps.min() >= 500 > low.timesteps.max()
    assert not torch.equal(high.get("blocks.0.attn1.to_q", "act_absmax"), low.get("blocks.0.attn1.to_q", "act_absmax")[:1])
    with pytest.raises(ValueError, match="no denoiser 'transformer_3'"):
        calibrate(pipe, PROMPTS[:1], component="transformer_3", **kw)


def test_generic_quantized_pipeline_follows_the_repo_class(tmp_path):
    """QuantizedPipeline on a (tiny) Flux repo: quantize on load, save a stock diffusers repo with a
    model card, reload it through the same door: the same quantized transformer, the same samples."""
    import diffusers

    from ditq import QuantizedPipeline

    tiny_pipeline("flux").save_pretrained(tmp_path / "fp")
    call = dict(PIPELINE_CALLS["flux"], num_inference_steps=2)
    pipe = QuantizedPipeline.from_pretrained(tmp_path / "fp", quantization_config="vidit-q-w8a8",
                                             calibration_prompts=PROMPTS, calibration_kwargs=call)
    assert isinstance(pipe, diffusers.FluxPipeline) and type(pipe).__name__ == "QuantizedFluxPipeline"
    pipe.set_progress_bar_config(disable=True)
    want = _latents(pipe, "flux")
    pipe.save_pretrained(tmp_path / "q")
    assert '"_class_name": "FluxPipeline"' in (tmp_path / "q" / "model_index.json").read_text()
    card = (tmp_path / "q" / "README.md").read_text()
    assert "QuantizedPipeline.from_pretrained" in card and "FluxTransformer2DModel.from_pretrained" in card
    back = QuantizedPipeline.from_pretrained(tmp_path / "q")
    back.set_progress_bar_config(disable=True)
    ref = pipe.transformer.state_dict()
    assert back.transformer.state_dict().keys() == ref.keys()
    assert all(torch.equal(back.transformer.state_dict()[k], ref[k]) for k in ref)
    got = _latents(back, "flux")  # the reloaded text encoders differ in the last float bits
    assert ((got - want).norm() / want.norm()).item() < 1e-3
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        QuantizedPipeline._variant("NoSuchPipeline", "repo")


def test_quantized_pipeline_quantizes_both_wan22_experts(tmp_path, monkeypatch):
    """Wan 2.2 A14B through QuantizedPipeline: both experts calibrated on the steps each serves and
    quantized, both written by save_pretrained, and the reload reproduces both exactly."""
    import diffusers

    from ditq import QuantizedPipeline
    from ditq.evaluation.architectures import tiny_transformer
    from ditq.pipelines.quantizer import is_ditq_model
    from ditq.quant_core import calibration

    base = tiny_pipeline("wan")
    diffusers.WanPipeline(**dict(base.components, transformer_2=tiny_transformer("wan", seed=1)),
                          boundary_ratio=0.5).save_pretrained(tmp_path / "fp")
    recorded = {}

    def recording_calibrate(*args, **kwargs):
        data = calibrate(*args, **kwargs)
        recorded[kwargs["component"]] = data.timesteps
        return data

    monkeypatch.setattr(calibration, "calibrate", recording_calibrate)
    call = dict(PIPELINE_CALLS["wan"], num_inference_steps=4)
    pipe = QuantizedPipeline.from_pretrained(tmp_path / "fp", quantization_config="vidit-q-w8a8",
                                             calibration_prompts=PROMPTS[:1], calibration_kwargs=call,
                                             fidelity_prompts=0)
    assert pipe.denoisers() == ["transformer", "transformer_2"]
    assert all(is_ditq_model(getattr(pipe, c)) for c in pipe.denoisers())
    assert len(recorded["transformer"]) + len(recorded["transformer_2"]) == 4  # each expert on its own steps
    assert recorded["transformer"].min() >= 500 > recorded["transformer_2"].max()
    assert set(pipe.ditq_reports) == {"transformer", "transformer_2"}
    assert all(r.ratio < 0.52 for r in pipe.ditq_reports.values())
    pipe.set_progress_bar_config(disable=True)
    want = _latents(pipe, "wan")
    pipe.save_pretrained(tmp_path / "q")
    assert (tmp_path / "q" / "transformer_2" / "diffusion_pytorch_model.safetensors").is_file()
    back = QuantizedPipeline.from_pretrained(tmp_path / "q")
    back.set_progress_bar_config(disable=True)
    for c in ("transformer", "transformer_2"):
        ref, got = getattr(pipe, c).state_dict(), getattr(back, c).state_dict()
        assert is_ditq_model(getattr(back, c)) and got.keys() == ref.keys(), c
        assert all(torch.equal(got[k], ref[k]) for k in ref), c
    got = _latents(back, "wan")  # the reloaded text encoder differs in the last float bits
    assert ((got - want).norm() / want.norm()).item() < 1e-3
    # transformer-only repo: both experts, the rest from the full-precision repo the pointer names
    pipe.save_pretrained(tmp_path / "t", transformer_only=True, base_model=str(tmp_path / "fp"))
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["README.md", "ditq_base_model.json",
                                                                  "transformer", "transformer_2"]
    slim = QuantizedPipeline.from_pretrained(tmp_path / "t")
    for c in ("transformer", "transformer_2"):
        ref, got = getattr(pipe, c).state_dict(), getattr(slim, c).state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), c


def test_qua2sedimo_search_refuses_the_second_expert_and_says_how():
    """Qua²SeDiMo's search labels candidate quantizations of ``pipe.transformer``; asked to search Wan
    2.2's ``transformer_2`` it stops before sampling and names the workaround (the experts share layer
    names, so the high-noise expert's assignment applies to the low-noise one)."""
    import diffusers

    from ditq.evaluation.architectures import tiny_transformer

    base = tiny_pipeline("wan")
    pipe = diffusers.WanPipeline(**dict(base.components, transformer_2=tiny_transformer("wan", seed=1)),
                                 boundary_ratio=0.5)
    config = QuantConfig.preset("qua2sedimo-w3.5", small=True)
    with pytest.raises(ValueError, match=r"cannot search 'transformer_2'.*options=\{'assignment'"):
        calibrate(pipe, PROMPTS[:1], config=config, component="transformer_2", progress=False, **PIPELINE_CALLS["wan"])
    assert set(select_layers(pipe.transformer)) == set(select_layers(pipe.transformer_2))


# Each method on a video and an MMDiT pipeline at CI cost (slow presets at their small settings,
# Qua²SeDiMo's search smaller still); bench/video_quality.py --architectures runs every preset on all
# six. Bounds: latents rel. error vs FP (measured x ~2) and block-Linear bytes vs fp16.
METHOD_CASES = {
    ("latte", "vidit-q-w4a8-mp"): (0.05, 0.32),
    ("wan", "q-dit-w4a8"): (0.05, 0.29),
    ("cogvideox", "vq4dit-w3"): (0.05, 0.2),
    ("sd3", "qua2sedimo-w3.5"): (0.15, 0.23),
    ("wan", "qua2sedimo-w3.5"): (0.15, 0.23),  # its labels sample decoded videos
}
TINY_SEARCH = dict(num_configs=4, folds=2, epochs=5, hidden=8, gnn_layers=2, methods=["uaq"], label_steps=1)


@pytest.mark.parametrize("family,preset", list(METHOD_CASES))
def test_method_runs_on_pipeline(family, preset):
    pipe = tiny_pipeline(family)
    model = pipe.transformer
    config = QuantConfig.preset(preset, small=preset not in QuantConfig.presets(quick_only=True),
                                options=TINY_SEARCH if preset.startswith("qua2sedimo") else None)
    calib = calibrate(pipe, PROMPTS, num_inference_steps=STEPS, config=config, progress=False, **PIPELINE_CALLS[family])
    fp = _latents(pipe, family)
    pipe.transformer = copy.deepcopy(model)
    report = quantize(pipe.transformer, config, calib, progress=False)
    rel = ((_latents(pipe, family) - fp).norm() / fp.norm()).item()
    max_rel, max_ratio = METHOD_CASES[family, preset]
    assert 0 < rel < max_rel and report.ratio < max_ratio, (rel, report.ratio)
