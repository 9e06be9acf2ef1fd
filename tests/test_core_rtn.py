"""The RTN baseline end to end on the built-in PixArt: runs, sizes as the bits promise, and the
naive static W8A8 failing on the planted-outlier stress model where dynamic per-token holds up."""
import pytest

from ditq import QuantConfig, calibrate, quantize, save_quantized
from ditq.quant_core.metrics import psnr, rel_l2
from ditq.quant_core.serialization import WEIGHTS_NAME


@pytest.mark.parametrize("preset,max_ratio,min_psnr", [
    ("rtn-w8a8", 0.52, 40), ("rtn-w8a8-dynamic", 0.52, 40), ("rtn-w4a8", 0.28, 35)])
def test_presets_end_to_end_with_sizes(tmp_path, tiny_pipe, tiny_calib, run_pipe, fresh, preset, max_ratio, min_psnr):
    from safetensors import safe_open

    pipe = fresh(tiny_pipe)
    report = quantize(pipe.transformer, QuantConfig.preset(preset), tiny_calib, progress=False)
    assert len(report.layers) == 40 and report.ratio <= max_ratio
    fp, q = run_pipe(tiny_pipe), run_pipe(pipe)
    assert psnr(fp, q) > min_psnr
    folder = save_quantized(pipe.transformer, tmp_path / preset)
    names = {r.name for r in report.layers}
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        disk = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                   if k.rpartition(".")[0] in names and not k.endswith(".bias"))
    assert disk / report.fp16_bytes <= max_ratio


def test_report_sqnr_matches_direct_computation(tiny_pipe, fresh):
    from ditq.quant_core.metrics import sqnr

    pipe = fresh(tiny_pipe)
    report = quantize(pipe.transformer, QuantConfig.preset("rtn-w8a8-dynamic"), progress=False)
    row = next(r for r in report.layers if r.name == "transformer_blocks.2.ff.net.2")
    w = tiny_pipe.transformer.get_submodule(row.name).weight
    q = pipe.transformer.get_submodule(row.name)
    assert row.weight_sqnr_db == pytest.approx(sqnr(w, q.effective_weight()))
    assert 40 < row.weight_sqnr_db < 60  # 8-bit per channel: ~6 dB/bit minus the crest factor
    assert "rtn" in str(report) and "0.50" in str(report)


def test_static_needs_calibration():
    from torch import nn

    with pytest.raises(ValueError, match=r"needs calibration \[.act_absmax.\].*config=cfg"):
        quantize(nn.Sequential(), QuantConfig.preset("rtn-w8a8"))


def test_static_w8a8_fails_on_stress_model_dynamic_does_better(stress_pipe, calib_kwargs, run_pipe, fresh):
    calib = calibrate(stress_pipe, ["a red fox in snow", "a city at night"], **calib_kwargs)
    fp = run_pipe(stress_pipe, output_type="latent")
    errs = {}
    for preset in ("rtn-w8a8", "rtn-w8a8-dynamic"):
        pipe = fresh(stress_pipe)
        quantize(pipe.transformer, QuantConfig.preset(preset), calib, progress=False)
        errs[preset] = rel_l2(fp, run_pipe(pipe, output_type="latent"))
    assert errs["rtn-w8a8"] > 0.1  # naive static per-tensor: visible failure
    assert errs["rtn-w8a8-dynamic"] < errs["rtn-w8a8"]


def test_stress_model_preserves_the_function(tiny_pipe, stress_pipe, run_pipe):
    assert rel_l2(run_pipe(tiny_pipe, output_type="latent"), run_pipe(stress_pipe, output_type="latent")) < 1e-4
    amax = lambda p: p.transformer.transformer_blocks[0].attn1.to_q.weight.abs().amax(0)  # noqa: E731
    assert amax(stress_pipe)[3] < amax(tiny_pipe)[3] / 50  # the planted column really was rescaled
