"""Q-DiT on the built-in DiT and PixArt: fidelity vs RTN, genome budget, search, checkpoint round trip."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ditq import QuantConfig, calibrate, load_quantized, quantize, save_quantized
from ditq.quant_core.passes.fitness import OutputFidelity, capture_model_inputs
from ditq.kernels import reference as ref
from ditq.quant_core.layers import QuantLinear
from ditq.quant_core.methods.q_dit.method import candidates_for, search_group_sizes
from ditq.quant_core.passes.evolution import EvolutionSettings

STEPS = 4


def _setup(pipe, conds, call):
    """Calibration (GPTQ input rows across timesteps) and an output-fidelity probe on other seeds."""
    call = {k: v for k, v in call.items() if k != "num_inference_steps"}
    calib = calibrate(pipe, conds, num_inference_steps=STEPS, needs=("act_samples",), progress=False,
                      stat_options={"act_samples": {"limit": 512}}, **call)
    calls = capture_model_inputs(pipe, conds[:1], dict(call, num_inference_steps=STEPS), seed=99, steps_per_run=1)
    return calib, OutputFidelity(pipe.transformer, calls), call


def _db(loss):
    return -10 * math.log10(loss)


@pytest.fixture(scope="module")
def dit_setup(dit_pipe, builtin):
    return _setup(dit_pipe, [1, 7], builtin.DIT_CALL)


@pytest.fixture(scope="module")
def pixart_setup(tiny_pipe, builtin):
    return _setup(tiny_pipe, ["a red fox in snow", "a city at night"], builtin.PIXART_CALL)


@pytest.mark.parametrize("which", ["dit", "pixart"])
def test_q_dit_w4a8_beats_rtn_by_3db_and_reloads(which, request, fresh, tmp_path):
    pipe = request.getfixturevalue({"dit": "dit_pipe", "pixart": "tiny_pipe"}[which])
    calib, fidelity, _ = request.getfixturevalue(f"{which}_setup")
    rtn = fresh(pipe.transformer)
    quantize(rtn, QuantConfig.preset("rtn-w4a8"), calib, progress=False)
    qdit = fresh(pipe.transformer)
    report = quantize(qdit, QuantConfig.preset("q-dit-w4a8"), calib, progress=False)
    assert all(r.format == "int4-g128 / a8-token-g128" for r in report.layers)
    db_rtn, db_qdit = _db(fidelity(rtn)), _db(fidelity(qdit))
    assert db_qdit >= db_rtn + 3, (db_rtn, db_qdit)

    save_quantized(qdit, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    genome = loaded.ditq_state["method_state"]["genome"]
    assert genome == {r.name: 128 for r in report.layers}
    args, kwargs = fidelity.calls[0]
    with torch.no_grad():
        assert torch.equal(loaded(*args, **kwargs)[0], qdit(*args, **kwargs)[0])


def test_gptq_uses_each_layers_own_group_size(dit_pipe, dit_setup, fresh):
    """A genome with different group sizes: every layer's scales follow its own gene (the released
    code's GPTQ used block 0's group size everywhere)."""
    calib, fidelity, _ = dit_setup
    model = fresh(dit_pipe.transformer)
    names = [n for n in calib.layers if n.startswith("transformer_blocks.0.")]
    genome = {n: (64 if i % 2 else 256) for i, n in enumerate(names)}
    cfg = QuantConfig(**{**QuantConfig.preset("q-dit-w4a8").to_dict(), "name": None,
                         "exclude": [r"^transformer_blocks\.[1-9]"], "options": {"group_sizes": genome}})
    quantize(model, cfg, calib, progress=False)
    for n, g in genome.items():
        layer = model.get_submodule(n)
        assert isinstance(layer, QuantLinear) and layer.scheme.group_size == g
        assert layer.weight_scale.shape[1] == layer.in_features // g
    with pytest.raises(ValueError, match="below the budget"):
        quantize(fresh(dit_pipe.transformer), QuantConfig(**{**cfg.to_dict(), "options": {
            "group_sizes": {n: 32 for n in names}}}), calib, progress=False)


@pytest.mark.parametrize("weight_quantizer", ["gptq", "mse"])
def test_symmetric_int4_weights_use_the_full_range(weight_quantizer, dit_pipe, dit_setup, fresh):
    """Q-DiT with symmetric 4-bit weights rounds onto [-8, 7] (format 3) by default: the layers record
    it and hold -8; ``weight_full_range=False`` keeps [-7, 7]."""
    calib, _, _ = dit_setup
    base = {**QuantConfig.preset("q-dit-w4a8").to_dict(), "name": None, "weight_symmetric": True,
            "exclude": [r"^transformer_blocks\.[1-9]"], "options": {"weight_quantizer": weight_quantizer}}
    models = {}
    for full in (None, False):
        models[full] = fresh(dit_pipe.transformer)
        quantize(models[full], QuantConfig(**{**base, "weight_full_range": full}), calib, progress=False)
    for full, model in models.items():
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        values = torch.cat([ref.unpack_weight(m.weight, 4, m.in_features).flatten() for m in layers])
        assert all(m.scheme.weight_full_range is (full is None) for m in layers)
        assert values.min() == (-8 if full is None else -7) and values.max() == 7


def test_small_search_respects_budget_and_is_stored(dit_pipe, dit_setup, builtin, fresh, tmp_path):
    calib, fidelity, call = dit_setup
    base = QuantConfig(**{**QuantConfig.preset("q-dit-w4a8").to_dict(), "name": None,
                          "options": {"weight_quantizer": "minmax"}})
    settings = EvolutionSettings(population=4, top_k=2, mutations=1, crossovers=1, generations=2, seed=3)
    pipe = fresh(dit_pipe)
    cfg, result = search_group_sizes(pipe, base, [3], num_inference_steps=STEPS, settings=settings,
                                     progress=False, state_path=tmp_path / "search.json", **call)
    genome = cfg.options["group_sizes"]
    assert sum(genome.values()) / len(genome) >= 128
    for name, g in genome.items():
        assert g in candidates_for(pipe.transformer.get_submodule(name).in_features, cfg.options.get(
            "candidates", (32, 64, 128, 192, 256, 288)))
    scores = {tuple(g): loss for g, loss in json.loads((tmp_path / "search.json").read_text())["scores"]}
    assert result.best_loss == min(scores.values()) <= scores[(128,) * len(genome)]  # seeded with uniform
    assert all(isinstance(m, torch.nn.Linear) for n, m in pipe.transformer.named_modules() if n in genome)
    model = fresh(dit_pipe.transformer)
    quantize(model, cfg, progress=False)
    save_quantized(model, tmp_path / "s.safetensors")
    state = load_quantized(tmp_path / "s.safetensors").ditq_state["method_state"]
    assert state["genome"] == genome and state["search"]["evaluations"] == result.evaluations
    # the same search state, resumed for other weights (a fine-tune), is refused
    other = fresh(dit_pipe)
    with torch.no_grad():
        other.transformer.get_submodule(next(iter(genome))).weight.mul_(1.01)
    with pytest.raises(ValueError, match="search.json: saved for other choices, settings, weights"):
        search_group_sizes(other, base, [3], num_inference_steps=STEPS, settings=settings, progress=False,
                           state_path=tmp_path / "search.json", **call)


def test_q_dit_option_errors(dit_pipe, fresh):
    with pytest.raises(ValueError, match="unknown option"):
        quantize(fresh(dit_pipe.transformer), QuantConfig(method="q-dit", group_size=128, weight_granularity="group",
                                                          options={"gruop_sizes": {}}), progress=False)
    with pytest.raises(ValueError, match="needs calibration"):
        quantize(fresh(dit_pipe.transformer), QuantConfig.preset("q-dit-w6a8"), progress=False)
    assert candidates_for(1152, (32, 64, 128, 192, 256, 288)) == [32, 64, 128, 192, 288]


def test_fid_fitness_with_stand_in_features(dit_pipe, builtin, fresh):
    """The FID hook end to end with a small feature extractor (Inception weights are not offline)."""
    from ditq.quant_core.passes.fitness import FIDFitness

    pool = lambda imgs: torch.nn.functional.adaptive_avg_pool2d(imgs, 2).flatten(1)
    fit = FIDFitness(dit_pipe, list(range(4)), dict(num_inference_steps=2, guidance_scale=4.0), pool)
    assert fit(dit_pipe.transformer) == pytest.approx(0, abs=1e-9)
    noisy = fresh(dit_pipe.transformer)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.2 * p.std() * torch.randn_like(p))
    assert fit(noisy) > 1e-6
