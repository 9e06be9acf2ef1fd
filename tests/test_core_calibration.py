"""Calibration: statistics equal a direct computation, bounded memory, hooks always removed."""
import pytest
import torch

from ditq.quant_core.calibration import CalibrationData, CalibrationRecorder, calibrate


def test_absmax_per_step_equals_direct_computation(tiny_pipe, calib_kwargs):
    layer = "transformer_blocks.1.ff.net.2"
    seen = {}
    mod = tiny_pipe.transformer.get_submodule(layer)
    step = {"i": -1}
    h0 = tiny_pipe.transformer.register_forward_pre_hook(lambda m, a: step.__setitem__("i", step["i"] + 1))
    h1 = mod.register_forward_pre_hook(
        lambda m, a: seen.__setitem__(step["i"], a[0].reshape(-1, a[0].shape[-1]).abs().amax(0)))
    try:
        calib = calibrate(tiny_pipe, ["a red fox in snow"], **calib_kwargs)
    finally:
        h0.remove()
        h1.remove()
    stat = calib.get(layer, "act_absmax")
    assert stat.shape == (calib_kwargs["num_inference_steps"], 1024)
    for i, direct in seen.items():
        assert torch.equal(stat[i], direct.float())
    assert calib.timesteps.shape == (calib_kwargs["num_inference_steps"],)
    assert calib.timesteps[0] > calib.timesteps[-1]  # denoising runs from high t to low t


def test_hooks_removed_on_error_and_on_success(tiny_pipe, calib_kwargs):
    model = tiny_pipe.transformer
    before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    def boom(step):
        raise KeyboardInterrupt  # a user interrupt mid-calibration

    rec = CalibrationRecorder(model, ["transformer_blocks.0.attn1.to_q"], on_step=boom)
    with pytest.raises(KeyboardInterrupt), rec:
        tiny_pipe("x", num_inference_steps=2, output_type="latent", use_resolution_binning=False,
                  max_sequence_length=16, clean_caption=False)
    after = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    assert before == after


def test_nan_activations_are_reported_with_layer_name():
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4))
    rec = CalibrationRecorder(model, ["0"])
    with rec, pytest.raises(ValueError, match="layer '0' received NaN/Inf"):
        model(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))


def test_row_sample_bounded_and_uniform():
    from ditq.quant_core.calibration import RowSample

    s = RowSample(limit=64, seed=0)
    for step in range(20):
        s.update(step, torch.full((100, 3), float(step)))
    rows = s.result()
    assert rows.shape == (64, 3)
    steps = rows[:, 0]
    assert steps.min() < 5 and steps.max() > 14  # drawn across all steps, not just the first or last


def test_save_load_round_trip_and_bad_files(tmp_path, tiny_calib):
    path = tmp_path / "calib.safetensors"
    tiny_calib.save(path)
    back = CalibrationData.load(path)
    assert back.layers == tiny_calib.layers and torch.equal(back.timesteps, tiny_calib.timesteps)
    for layer in tiny_calib.layers:
        for stat in ("act_absmax", "act_samples"):
            assert torch.equal(back.get(layer, stat), tiny_calib.get(layer, stat))
    only_max = CalibrationData({layer: {"act_absmax": s["act_absmax"]} for layer, s in back.stats.items()},
                               back.timesteps, back.meta)
    with pytest.raises(KeyError, match="no 'act_samples'"):
        only_max.get(only_max.layers[0], "act_samples")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="calib.safetensors"):
        CalibrationData.load(path)


def test_calibration_on_class_conditional_dit(dit_pipe):
    calib = calibrate(dit_pipe, [1, 3], num_inference_steps=3, progress=False)
    assert len(calib.layers) == 24 and calib.get(calib.layers[0], "act_absmax").shape[0] == 3
