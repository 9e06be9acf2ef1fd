"""VQ4DiT building blocks against float64 references and known answers: k-means, the stored codebook
layer, the calibration-only soft layer, the codebook clamp, and model-input recording."""
from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def km():
    from ditq.quant_core.passes import kmeans

    return kmeans


def _blobs(seed=0, per=50, d=3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]])[:, :d]
    pts = torch.cat([c + 0.1 * torch.randn(per, d, generator=g) for c in centres])
    return centres, pts


def test_kmeans_recovers_separated_clusters(km):
    centres, pts = _blobs()
    for init in km.INITS:
        res = km.kmeans(pts, 4, iters=50, seed=1, init=init)
        found = res.centroids[res.centroids[:, 0].argsort(descending=False)]
        # every true centre has a centroid within the noise level, and the labels split the blobs
        dist = torch.cdist(centres.double(), res.centroids.double()).min(dim=1).values
        assert dist.max() < 0.1, (init, found)
        assert res.assignments.reshape(4, 50).unique(dim=1).shape[1] == 1


def test_kmeans_batched_matches_separate_runs_and_is_deterministic(km):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 200, 2, generator=g)
    batched = km.kmeans(x, 8, iters=30, seed=5)
    again = km.kmeans(x, 8, iters=30, seed=5)
    assert torch.equal(batched.centroids, again.centroids)
    # a fixed point of Lloyd's algorithm: each centroid is the float64 mean of its points
    for b in range(3):
        for j in range(8):
            members = x[b][batched.assignments[b] == j].double()
            if len(members):
                torch.testing.assert_close(batched.centroids[b, j].double(), members.mean(0), atol=1e-5, rtol=0)
        ref = torch.cdist(x[b].double(), batched.centroids[b].double()).argmin(1)
        assert torch.equal(ref, batched.assignments[b])


def test_nearest_matches_float64_bruteforce(km):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 500, 4, generator=g), torch.randn(1, 32, 4, generator=g)
    d2, idx = km.nearest(x, c, 3)
    ref = torch.cdist(x[0].double(), c[0].double()).pow(2)
    rv, ri = ref.topk(3, largest=False)
    assert torch.equal(idx[0], ri)
    torch.testing.assert_close(d2[0].double(), rv, atol=1e-4, rtol=1e-4)


def test_kmeans_rejects_bad_input(km):
    with pytest.raises(ValueError, match="k=9"):
        km.kmeans(torch.randn(8, 2), 9)
    with pytest.raises(ValueError, match="init"):
        km.kmeans(torch.randn(8, 2), 2, init="nope")
    with pytest.raises(ValueError, match="NaN"):
        km.kmeans(torch.full((8, 2), float("nan")), 2)


def test_codebook_clamp_bit_goes_down():
    from ditq.quant_core.methods.vq4dit.method import clamp_codebook_size

    assert clamp_codebook_size(256, 16384) == 256          # 256x256 layer, d=4
    assert clamp_codebook_size(256, 512) == 128            # at most one codeword per 4 sub-vectors
    assert clamp_codebook_size(64, 100) == 16              # floor to a power of two: 25 -> 16
    assert clamp_codebook_size(256, 3) == 2                # never below 1-bit indices


def _vq_layer(seed=0, n=6, k_in=8, d=2, k=8, bias=True):
    """VQ4DiT's stored layer: one codebook ``[1, k, d]``, log2(k)-bit packed indices."""
    from ditq.quant_core.layers import CodebookLinear

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(k, (n, k_in // d), generator=g)
    codebook = torch.randn(1, k, d, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    return CodebookLinear.from_codes(codes, codebook, b, name="t"), codes, codebook[0].half(), b


def test_vq_layer_decodes_and_matches_float64():
    from ditq import kernels

    layer, codes, codebook, bias = _vq_layer()
    w = torch.stack([torch.cat([codebook[i].double() for i in row]) for row in codes])  # [N, K] by hand
    torch.testing.assert_close(layer.effective_weight().double(), w, atol=0, rtol=0)
    x = torch.randn(3, 4, 8)
    ref = x.double() @ w.t() + bias.double()
    torch.testing.assert_close(layer(x).double(), ref, atol=1e-5, rtol=1e-5)
    assert (layer.bits, layer.dim, layer.per_channel) == (3, 2, False)
    assert layer.indices.dtype == torch.uint8 and layer.codebook.dtype == torch.float16
    # 4 three-bit indices per row pad to 8 -> 3 bytes; 8 entries x 2 fp16
    assert layer.weight_nbytes() == 6 * 3 + 8 * 2 * 2
    with pytest.raises(ValueError, match="4-bit"):
        kernels.codebook_linear(x[0], indices=layer.indices, codebook=layer.codebook, bits=4, in_features=8)


def test_vq_layer_keeps_storage_dtypes_and_checks_codes():
    from ditq.quant_core.layers import CodebookLinear

    layer = _vq_layer()[0].to(torch.bfloat16)
    assert layer.codebook.dtype == torch.float16 and layer.indices.dtype == torch.uint8
    assert layer.bias.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="'t'.*outside"):
        CodebookLinear.from_codes(torch.full((2, 2), 7), torch.zeros(1, 4, 2), None, name="t")
    with pytest.raises(ValueError, match="'t'.*5 entries"):
        CodebookLinear.from_codes(torch.zeros(2, 2, dtype=torch.long), torch.zeros(1, 5, 2), None, name="t")
    layer.codebook[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.check_state()
    with pytest.raises(ValueError, match="length 3"):
        CodebookLinear(8, 4, 2, dim=3)


def _soft(ratio_init="uniform", n=3):
    from ditq.quant_core.methods.vq4dit.method import SoftVQLinear

    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(8, 4)
    codebook = torch.randn(16, 2, generator=g)
    return SoftVQLinear.from_linear(lin, codebook, n, ratio_init), lin, codebook


def test_soft_layer_is_softmax_weighted_candidates():
    soft, lin, codebook = _soft()
    sub = lin.weight.detach().double().reshape(-1, 2)
    d = torch.cdist(sub, codebook.double())
    assert torch.equal(soft.candidates, d.topk(3, largest=False).indices)
    with torch.no_grad():
        soft.logits.copy_(torch.randn(soft.logits.shape))
    r = soft.logits.double().softmax(-1)
    w = (r.unsqueeze(-1) * codebook.double()[soft.candidates]).sum(1).reshape(4, 8)
    torch.testing.assert_close(soft.weight().double(), w, atol=1e-6, rtol=1e-6)
    # a frozen sub-vector uses its argmax candidate, and so does every one once hardened
    soft.frozen[0] = True
    top = soft.candidates[0, soft.logits[0].argmax()]
    torch.testing.assert_close(soft.weight().reshape(-1, 2)[0], codebook[top])
    soft.harden()
    hard = codebook[soft.candidates.gather(1, soft.logits.argmax(-1, keepdim=True)).squeeze(1)]
    torch.testing.assert_close(soft.weight(), hard.reshape(4, 8))
    assert soft.codebook.requires_grad and not soft.logits.requires_grad and soft.bias.requires_grad
    vq = soft.to_codebook_linear("t", torch.float32)
    torch.testing.assert_close(vq.effective_weight(), hard.reshape(4, 8).half().float())
    assert (vq.bits, vq.dim) == (4, 2) and vq.weight_nbytes() == 4 * 4 + 16 * 2 * 2  # 4 indices pad to 8: 4 B


def test_soft_layer_ratio_init_and_losses():
    soft, lin, codebook = _soft("distance")
    sub = lin.weight.detach().double().reshape(-1, 2)
    d = torch.cdist(sub, codebook.double()).topk(3, largest=False).values
    torch.testing.assert_close(soft.logits.double(), torch.log(d[:, -1:] / d), atol=1e-5, rtol=1e-5)
    uni, _, _ = _soft("uniform")
    assert torch.equal(uni.logits, torch.zeros_like(uni.logits))
    # uniform ratios 1/3: abs form = 3 * (1 - |2/3 - 1|) = 2; quadratic = 3 * 3 * (1/3)(2/3) = 2
    assert math.isclose(uni.ratio_loss("abs").item(), 2.0, rel_tol=1e-6)
    assert math.isclose(uni.ratio_loss("quadratic").item(), 2.0, rel_tol=1e-6)
    uni.frozen[:] = True  # one-hot ratios cost nothing
    assert uni.ratio_loss("abs").item() == 0 and uni.ratio_loss("quadratic").item() == 0


def test_freezing_and_hardening_thresholds():
    soft, _, _ = _soft()
    with torch.no_grad():
        soft.logits[:5, 0] = 10.0  # top ratio ~0.9999 for 5 of 16 sub-vectors
    soft.update_freezing(0.99, 0.99)
    assert soft.frozen.sum().item() == 5 and not soft.hardened
    with torch.no_grad():
        soft.logits[:, 0] = 10.0
    soft.update_freezing(0.99, 0.99)
    assert bool(soft.hardened)


def test_options_are_validated():
    from ditq import QuantConfig
    from ditq.quant_core.methods.vq4dit.method import VQ4DiTOptions

    with pytest.raises(ValueError, match="unknown option"):
        VQ4DiTOptions.from_config(QuantConfig(method="vq4dit", weight_bits=2, act_bits=None, options={"kk": 1}))
    with pytest.raises(ValueError, match="ratio_init"):
        VQ4DiTOptions.from_config(QuantConfig(method="vq4dit", act_bits=None, options={"ratio_init": "x"}))
    with pytest.raises(ValueError, match="k=100 must be a power of two"):
        VQ4DiTOptions.from_config(QuantConfig(method="vq4dit", act_bits=None, options={"k": 100, "d": 2}))
    opts = VQ4DiTOptions()
    assert opts.setting(2, "l") == (256, 4) and opts.setting(3, "l") == (64, 2)
    with pytest.raises(ValueError, match="weight_bits"):
        opts.setting(5, "l")
    assert {"vq4dit-w2", "vq4dit-w3"} <= set(QuantConfig.presets())


def test_model_inputs_record_dedupe_and_round_trip(tiny_pipe, calib_kwargs, tmp_path):
    from ditq import calibrate
    from ditq.quant_core.calibration import CalibrationData

    kw = dict(calib_kwargs, num_inference_steps=3)
    calib = calibrate(tiny_pipe, ["a cat", "a dog"], needs=("model_inputs",), **kw)
    calls = calib.inputs.calls
    assert len(calls) == 6
    # prompt embeddings are stored once per prompt, x_t and t once per step
    ehs = {c["encoder_hidden_states"]["tensor"] for c in calls}
    assert len(ehs) == 2
    assert len({c["hidden_states"]["tensor"] for c in calls}) == 6
    assert calls[0]["return_dict"] == {"value": False}
    calib.save(tmp_path / "c.safetensors")
    back = CalibrationData.load(tmp_path / "c.safetensors")
    for a, b in zip(calib.model_calls(), back.model_calls()):
        assert a.keys() == b.keys()
        for key in a:
            if torch.is_tensor(a[key]):
                assert torch.equal(a[key], b[key])
            else:
                assert a[key] == b[key]
    # replaying a recorded call reproduces what the pipeline computed from it
    first = next(back.model_calls())
    with torch.no_grad():
        out = tiny_pipe.transformer(**first)[0]
    assert out.shape[0] == first["hidden_states"].shape[0] and torch.isfinite(out).all()
    with pytest.raises(KeyError, match="recorded model inputs"):
        next(CalibrationData({}, torch.zeros(1), {}).model_calls())


def test_model_inputs_keep_tuples_and_lists_of_tensors(tmp_path):
    """HunyuanDiT passes ``image_rotary_emb=(cos, sin)``: recorded, saved, loaded and replayed as a
    tuple of the same tensors (lists stay lists); each tensor deduplicated like a top-level one."""
    from ditq.quant_core.calibration import CalibrationData, ModelInputs

    cos, sin = torch.randn(4, 8), torch.randn(4, 8)
    rec = ModelInputs()
    for step in range(2):
        rec.update((), dict(hidden_states=torch.full((1, 3), float(step)), image_rotary_emb=(cos, sin),
                            pairs=[torch.ones(2), {"mask": torch.zeros(2)}], sizes=(64, 64)))
    assert len(rec.tensors) == 2 + 2 + 2  # two x_t, one cos, one sin, one ones, one mask
    CalibrationData({}, torch.zeros(2), {}, rec).save(tmp_path / "c.safetensors")
    calls = list(CalibrationData.load(tmp_path / "c.safetensors").model_calls())
    emb = calls[1]["image_rotary_emb"]
    assert isinstance(emb, tuple) and torch.equal(emb[0], cos) and torch.equal(emb[1], sin)
    assert isinstance(calls[1]["pairs"], list) and torch.equal(calls[1]["pairs"][1]["mask"], torch.zeros(2))
    assert calls[1]["sizes"] == [64, 64] and torch.equal(calls[1]["hidden_states"], torch.ones(1, 3))
