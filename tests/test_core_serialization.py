"""Save/load: exact reproduction from the file alone (fresh process), strict validation, atomic writes."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ditq import CheckpointError, QuantConfig, load_quantized, quantize, save_quantized
from ditq.quant_core.layers import QuantLinear
from ditq.quant_core.serialization import WEIGHTS_NAME


@pytest.fixture(scope="module")
def quantized_w4(tiny_pipe):
    import copy

    transformer = copy.deepcopy(tiny_pipe.transformer)
    quantize(transformer, QuantConfig.preset("rtn-w4a8"), progress=False)
    return transformer


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor([500, 500]),
                encoder_hidden_states=torch.randn(2, 7, 64, generator=g),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def test_folder_round_trip_in_fresh_process(tmp_path, quantized_w4):
    save_quantized(quantized_w4, tmp_path / "q")
    with torch.no_grad():
        expected = quantized_w4(**_inputs(), return_dict=False)[0]
    from safetensors.torch import save_file

    save_file({"expected": expected.contiguous()}, str(tmp_path / "expected.safetensors"))
    script = textwrap.dedent(f"""
        import torch, sys
        from safetensors.torch import load_file
        from ditq import load_quantized
        from ditq.quant_core.layers import QuantLinear
        m = load_quantized({str(tmp_path / "q")!r})
        assert sum(isinstance(x, QuantLinear) for x in m.modules()) == 40
        g = torch.Generator().manual_seed(0)
        inp = dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor([500, 500]),
                   encoder_hidden_states=torch.randn(2, 7, 64, generator=g),
                   added_cond_kwargs={{"resolution": None, "aspect_ratio": None}})
        with torch.no_grad():
            out = m(**inp, return_dict=False)[0]
        exp = load_file({str(tmp_path / "expected.safetensors")!r})["expected"]
        sys.exit(0 if torch.equal(out, exp) else 3)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]


def test_single_file_round_trip_and_dtype(tmp_path, quantized_w4):
    path = save_quantized(quantized_w4, tmp_path / "q.safetensors")
    m = load_quantized(path, torch_dtype=torch.bfloat16)
    layer = m.transformer_blocks[0].attn1.to_q
    assert isinstance(layer, QuantLinear) and layer.weight.dtype == torch.uint8
    assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert m.proj_out.weight.dtype == torch.bfloat16
    src = quantized_w4.transformer_blocks[0].attn1.to_q
    assert torch.equal(layer.weight, src.weight) and torch.equal(layer.weight_scale, src.weight_scale)


def test_loaded_model_holds_no_float_block_weights(tmp_path, quantized_w4):
    save_quantized(quantized_w4, tmp_path / "q")
    m = load_quantized(tmp_path / "q")
    for name, t in m.state_dict().items():
        if name.startswith("transformer_blocks") and t.dim() == 2 and t.numel() >= 256 * 256 // 2:
            assert not t.is_floating_point() or t.dtype == torch.float8_e4m3fn, name
    assert all(p.device.type == "cpu" for p in m.state_dict().values())


def test_truncated_file(tmp_path, quantized_w4):
    save_quantized(quantized_w4, tmp_path / "q")
    f = tmp_path / "q" / WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME}.*truncated or corrupt"):
        load_quantized(tmp_path / "q")


def _resave(folder, edit):
    """Rewrite a saved folder's weights through ``edit(tensors)`` as a consistent save would (hash in
    the header and in config.json), so the checks after the hashes are what must catch the edit."""
    from ditq.quant_core.serialization import WEIGHTS_HASH_KEY, read_safetensors, save_hashed

    f = folder / WEIGHTS_NAME
    tensors, meta = read_safetensors(f)
    tensors = {k: v.clone() for k, v in tensors.items()}
    edit(tensors)
    digest = save_hashed(tensors, f, {k: v for k, v in meta.items() if not k.startswith("ditq.content")})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"][WEIGHTS_HASH_KEY] = digest
    (folder / "config.json").write_text(json.dumps(cfg))


def test_wrong_shape_names_the_tensor(tmp_path, quantized_w4):
    save_quantized(quantized_w4, tmp_path / "q")
    key = "transformer_blocks.1.ff.net.2.weight_scale"
    _resave(tmp_path / "q", lambda sd: sd.update({key: sd[key][:-1].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape \(255, 1\), expected \(256, 1\)"):
        load_quantized(tmp_path / "q")


def test_missing_and_unexpected_tensors(tmp_path, quantized_w4):
    save_quantized(quantized_w4, tmp_path / "q")
    _resave(tmp_path / "q", lambda sd: sd.pop("transformer_blocks.0.attn1.to_k.weight"))
    with pytest.raises(CheckpointError, match="missing tensor.*attn1.to_k.weight"):
        load_quantized(tmp_path / "q")


def test_unknown_format_version_and_layer_type(tmp_path, quantized_w4):
    save_quantized(quantized_w4, tmp_path / "q")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["format_version"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown ditq format_version 99"):
        load_quantized(tmp_path / "q")
    cfg["quantization_config"]["format_version"] = 1
    cfg["quantization_config"]["layers"]["transformer_blocks.0.attn1.to_q"]["layer_type"] = "mystery"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'transformer_blocks.0.attn1.to_q' has unknown layer_type 'mystery'"):
        load_quantized(tmp_path / "q")


def test_int4_full_range_recorded_in_format_3_and_refused_in_older_versions(tmp_path, tiny_pipe):
    import copy

    from ditq.kernels.reference import unpack_weight

    transformer = copy.deepcopy(tiny_pipe.transformer)
    with torch.no_grad():  # Gaussian weights, like trained ones, use -8; the uniform init hardly does
        for m in transformer.transformer_blocks.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, m.weight.std().item())
    quantize(transformer, QuantConfig.preset("rtn-w4a8"), progress=False)
    save_quantized(transformer, tmp_path / "q")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    qcfg = cfg["quantization_config"]
    assert qcfg["format_version"] == 3
    assert all(spec["scheme"]["weight_full_range"] is True for spec in qcfg["layers"].values())
    loaded = load_quantized(tmp_path / "q")
    layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert all(unpack_weight(m.weight, 4, m.in_features).min() == -8 for m in layers)
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs(), return_dict=False)[0], transformer(**_inputs(), return_dict=False)[0])
    qcfg["format_version"] = 2  # a version that means [-7, 7] cannot say otherwise
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"layer 'transformer_blocks\.\d\.[\w.]+' records weight_full_range, "
                                              "which format_version 2 does not have"):
        load_quantized(tmp_path / "q")


def test_unsupported_bits_in_file(tmp_path, quantized_w4):
    save_quantized(quantized_w4, tmp_path / "q")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["layers"]["transformer_blocks.0.ff.net.2"]["scheme"]["weight_bits"] = 11
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="transformer_blocks.0.ff.net.2.*weight_bits=11 unsupported"):
        load_quantized(tmp_path / "q")


def test_remote_code_class_refused(tmp_path, quantized_w4):
    save_quantized(quantized_w4, tmp_path / "q")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "os.system"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a diffusers model class"):
        load_quantized(tmp_path / "q")


def test_failed_save_writes_nothing_and_keeps_previous(tmp_path, quantized_w4, monkeypatch):
    target = tmp_path / "q"
    save_quantized(quantized_w4, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    import safetensors.torch as st

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(quantized_w4, target)
    with pytest.raises(OSError):
        save_quantized(quantized_w4, tmp_path / "fresh")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # no temp files, old files intact
    assert not (tmp_path / "fresh" / WEIGHTS_NAME).exists()
    assert not [p for p in (tmp_path / "fresh").glob("*")]


def test_unwritable_output_names_the_folder(tmp_path, quantized_w4):
    # a file where the parent folder should be: unwritable even for root, unlike permission bits
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(OSError, match=r"cannot write .*blocker.*is not writable"):
        save_quantized(quantized_w4, tmp_path / "blocker" / "q")
    with pytest.raises(OSError, match="is not writable"):
        save_quantized(quantized_w4, tmp_path / "blocker" / "q.safetensors")


def test_file_exists_where_folder_expected(tmp_path, quantized_w4):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match="exists and is not a folder"):
        save_quantized(quantized_w4, tmp_path / "afile")


def test_quantizing_twice_refused(quantized_w4):
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantized_w4, QuantConfig.preset("rtn-w4a8"), progress=False)


def test_zero_points_are_int8_and_older_float32_files_still_load(tmp_path, tiny_pipe):
    """Asymmetric weights store their zero points as int8 (a quarter of float32's bytes: Q-DiT W4 at
    group 128 is 4.31 bits per weight, not 4.5); files written with float32 zero points load to the
    same outputs."""
    import copy

    from ditq.quant_core.serialization import read_safetensors
    from ditq.quant_core.serialization import CONTENT_HASH_KEY, content_hash
    from safetensors.torch import save_file

    cfg = QuantConfig(weight_bits=4, weight_granularity="group", group_size=32, weight_symmetric=False,
                      act_bits=None)
    model = copy.deepcopy(tiny_pipe.transformer)
    report = quantize(model, cfg, progress=False)
    layer = model.transformer_blocks[0].attn1.to_q
    assert layer.weight_zero_point.dtype == torch.int8
    groups = layer.in_features // 32
    assert layer.weight_nbytes() == layer.out_features * (layer.in_features // 2 + groups * (4 + 1))
    assert report.quant_bytes == sum(m.weight_nbytes() for m in model.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        expected = model(**_inputs(), return_dict=False)[0]
    tensors, meta = read_safetensors(save_quantized(model, tmp_path / "new.safetensors"))
    # the same model as an older file: float32 zero points, no zero_point_dtype in the layer specs
    qcfg = json.loads(meta["ditq.quantization_config"])
    for spec in qcfg["layers"].values():
        assert spec.pop("zero_point_dtype") == "int8"
    old = {k: v.float() if k.endswith("weight_zero_point") else v for k, v in tensors.items()}
    meta = {k: v for k, v in meta.items() if k != CONTENT_HASH_KEY}
    meta["ditq.quantization_config"] = json.dumps(qcfg)
    save_file(old, str(tmp_path / "old.safetensors"), {**meta, CONTENT_HASH_KEY: content_hash(old, meta)})
    for name in ("new", "old"):
        loaded = load_quantized(tmp_path / f"{name}.safetensors")
        zp = loaded.transformer_blocks[0].attn1.to_q.weight_zero_point
        assert zp.dtype == (torch.int8 if name == "new" else torch.float32)
        with torch.no_grad():
            assert torch.equal(loaded(**_inputs(), return_dict=False)[0], expected), name
