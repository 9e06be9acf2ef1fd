"""VQ4DiT end to end on the built-in models: honest size, file round trip without the FP weights,
exact resume, zero-data calibration on PixArt and on class-conditional DiT."""
from __future__ import annotations

import copy
import json

import pytest
import torch

# Two layers of block 0 keep the calibration tests fast; the size test quantizes every layer.
FEW = [r"transformer_blocks\.0\.attn1\.to_q$", r"transformer_blocks\.0\.ff\.net\.2$"]


@pytest.fixture(scope="module")
def vq():
    from ditq.quant_core.methods.vq4dit import method as vq4dit

    return vq4dit


@pytest.fixture(scope="module")
def trajectory(tiny_pipe, calib_kwargs, vq):
    kw = dict(calib_kwargs, num_inference_steps=3)
    return vq.zero_data_calibration(tiny_pipe, num_samples=1, **kw)


def _cfg(bits=2, **options):
    from ditq import QuantConfig

    include = options.pop("include", [])
    return QuantConfig(method="vq4dit", weight_bits=bits, act_bits=None, include=include,
                       options=dict(kmeans_iters=1, kmeans_init="random", **options))


def test_w2_size_and_file_round_trip(tiny_pipe, trajectory, fresh, tmp_path):
    from ditq import CheckpointError, load_quantized, quantize, save_quantized
    from ditq.quant_core.layers import CodebookLinear

    model = fresh(tiny_pipe.transformer)
    report = quantize(model, _cfg(steps=0), trajectory, progress=False)
    # 8 layers 256x256 and 2 of 256x1024 per block: an 8-bit index per 4 weights (N*K*2/8 bytes)
    # + a 256x4 fp16 codebook
    per_block_fp16 = (8 * 256 * 256 + 2 * 256 * 1024) * 2
    per_block_vq = 8 * (256 * 256 * 2 // 8 + 2048) + 2 * (256 * 1024 * 2 // 8 + 2048)
    assert report.fp16_bytes == 4 * per_block_fp16 and report.quant_bytes == 4 * per_block_vq
    assert report.ratio == pytest.approx(0.134765625) and report.ratio <= 0.15
    assert all(r.format == "codebook8-d4-layer / a16" for r in report.layers)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    layer = loaded.get_submodule("transformer_blocks.1.ff.net.2")
    assert isinstance(layer, CodebookLinear) and set(dict(layer.named_buffers())) == {"indices", "codebook", "bias"}
    call = next(trajectory.model_calls())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**call)[0], model(**call)[0], atol=0, rtol=0)
    # a corrupted index (beyond the codebook) is caught on load, naming the layer
    from safetensors.torch import load_file, save_file

    f = tmp_path / "q" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(f)
    tensors["transformer_blocks.0.attn1.to_q.codebook"] = tensors["transformer_blocks.0.attn1.to_q.codebook"][:, :16]
    save_file(tensors, f)
    cfg_path = tmp_path / "q" / "config.json"  # as a save from before weights hashes, so the shape check speaks
    cfg = json.loads(cfg_path.read_text())
    del cfg["quantization_config"]["weights_sha256"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="to_q"):
        load_quantized(tmp_path / "q")


def test_calibration_resumes_exactly(tiny_pipe, trajectory, fresh, tmp_path, vq):
    from ditq import quantize

    def run(steps, state=None):
        model = fresh(tiny_pipe.transformer)
        quantize(model, _cfg(steps=steps, harden_at=1.0, include=FEW, state_path=state, checkpoint_every=2),
                 trajectory, progress=False)
        return model

    straight = run(4)
    state = tmp_path / "vq4dit-state.safetensors"
    run(2, state)  # "interrupted" after 2 steps; the state holds step 2
    resumed = run(4, state)
    assert resumed.ditq_state["method_state"]["steps_this_run"] == 2
    for name in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.ff.net.2"):
        a, b = straight.get_submodule(name), resumed.get_submodule(name)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.codebook, b.codebook)
    with pytest.raises(Exception, match="other options"):
        quantize(fresh(tiny_pipe.transformer), _cfg(steps=4, include=FEW, state_path=state, candidates=2),
                 trajectory, progress=False)
    # the same architecture with other weights (a fine-tune), or another trajectory: never resumed
    other = fresh(tiny_pipe.transformer)
    with torch.no_grad():
        other.transformer_blocks[0].ff.net[2].weight.mul_(1.01)
    with pytest.raises(Exception, match=f"{state.name}.*weights or calibration"):
        quantize(other, _cfg(steps=4, harden_at=1.0, include=FEW, state_path=state, checkpoint_every=2),
                 trajectory, progress=False)
    moved = copy.copy(trajectory)
    moved.inputs = copy.copy(trajectory.inputs)
    moved.inputs.tensors = {k: v + 1e-3 if v.is_floating_point() else v for k, v in trajectory.inputs.tensors.items()}
    with pytest.raises(Exception, match="weights or calibration"):
        quantize(fresh(tiny_pipe.transformer), _cfg(steps=4, harden_at=1.0, include=FEW, state_path=state,
                                                    checkpoint_every=2), moved, progress=False)


def test_dit_zero_data_labels(dit_pipe, fresh, vq):
    from ditq import quantize
    from ditq.evaluation.builtin import DIT_CALL
    from ditq.quant_core.layers import CodebookLinear

    calib = vq.zero_data_calibration(dit_pipe, num_samples=2, num_inference_steps=2, progress=False,
                                     guidance_scale=DIT_CALL["guidance_scale"])
    calls = list(calib.model_calls())
    assert len(calls) == 4 and calls[0]["class_labels"].shape == (2,)  # label + null label (CFG), per step
    assert calls[0]["class_labels"][0] < 10 and calls[0]["class_labels"][1] == 1000
    model = fresh(dit_pipe.transformer)
    quantize(model, _cfg(bits=3, steps=2, include=FEW), calib, progress=False)
    layer = model.get_submodule("transformer_blocks.0.ff.net.2")
    assert isinstance(layer, CodebookLinear) and (layer.bits, layer.dim, layer.per_channel) == (6, 2, False)
    # w3 = 64 codewords of d=2: 6-bit indices packed, 3 bits per weight, + the 64x2 fp16 codebook
    n, k = layer.out_features, layer.in_features
    assert layer.indices.shape == (n, k // 2 * 6 // 8) and layer.weight_nbytes() == n * k * 3 // 8 + 64 * 2 * 2
    with torch.no_grad():
        assert torch.isfinite(model(**calls[0]).sample).all()


def test_clear_errors(tiny_pipe, tiny_calib, fresh):
    from ditq import QuantConfig, quantize

    with pytest.raises(ValueError, match="model_inputs.*which this calibration lacks.*config=cfg"):
        quantize(fresh(tiny_pipe.transformer), _cfg(steps=0), tiny_calib, progress=False)
    with pytest.raises(ValueError, match="needs calibration"):
        quantize(fresh(tiny_pipe.transformer), _cfg(steps=0), None, progress=False)
    with pytest.raises(ValueError, match="weights only"):
        quantize(fresh(tiny_pipe.transformer), QuantConfig(method="vq4dit", weight_bits=2, act_bits=8), tiny_calib,
                 progress=False)


def _block_mse(teacher, student, calib, vq) -> float:
    import torch.nn.functional as F

    losses = []
    with torch.no_grad():
        for call in calib.model_calls():
            with vq._BlockOutputs(teacher) as t:
                teacher(**call)
            with vq._BlockOutputs(student) as s:
                student(**call)
            losses += [F.mse_loss(a, b).item() for a, b in zip(s.outputs, t.outputs)]
    return sum(losses) / len(losses)


def test_calibration_lowers_block_error_below_kmeans(tiny_pipe, trajectory, fresh, vq):
    """The point of VQ4DiT: choosing among candidate codewords on the block loss beats the nearest
    codeword (codebook frozen: lr_codebook=0 isolates the assignments), and codebook fine-tuning
    lowers the error further. Preset ratio settings; a deliberately poor (1-iteration) codebook."""
    from ditq import quantize

    def error(**options):
        model = fresh(tiny_pipe.transformer)
        quantize(model, _cfg(include=FEW, **vq.PRESET_OPTIONS, **options), trajectory, progress=False)
        return _block_mse(tiny_pipe.transformer, model, trajectory, vq)

    nearest = error(steps=0)
    assignments = error(steps=30, harden_at=1.0, lr_codebook=0.0)
    full = error(steps=60, harden_at=0.5)
    assert assignments < 0.95 * nearest
    assert full < assignments


def test_quantize_under_inference_mode(tiny_pipe, trajectory, fresh):
    """ComfyUI executes nodes under torch.inference_mode (its loaded weights and the inputs its sampler
    recorded are inference tensors); the optimisation needs autograd all the same."""
    import copy

    from ditq import quantize

    with torch.inference_mode():
        model = fresh(tiny_pipe.transformer)
        calib = copy.copy(trajectory)
        calib.inputs = copy.copy(trajectory.inputs)
        calib.inputs.tensors = {k: v.clone() for k, v in trajectory.inputs.tensors.items()}
        assert model.pos_embed.proj.weight.is_inference() and next(iter(calib.inputs.tensors.values())).is_inference()
        quantize(model, _cfg(include=FEW, steps=4), calib, progress=False)
    reference = fresh(tiny_pipe.transformer)
    quantize(reference, _cfg(include=FEW, steps=4), trajectory, progress=False)
    # the same optimisation as outside inference mode (not bit for bit: with 2 threads the float
    # sums of the two runs can round differently)
    for name in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.ff.net.2"):
        got, want = model.get_submodule(name), reference.get_submodule(name)
        x = torch.randn(16, want.in_features, generator=torch.Generator().manual_seed(1))
        y, y_ref = got(x), want(x)
        assert float((y - y_ref).norm() / y_ref.norm()) < 1e-3, name
