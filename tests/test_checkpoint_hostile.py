"""Hostile and damaged checkpoints: every one is refused with a CheckpointError naming the file and
the problem, quickly and without large allocations; saves are atomic as a whole, hashed, 0644; a
failed quantize leaves the model as it was; the CLI prints one line."""
import importlib.util
import json
import os
import re
import resource
import time
from pathlib import Path

import pytest
import torch

from ditq import CheckpointError, QuantConfig, load_quantized, quantize, save_quantized
from ditq.quant_core.layers import QuantModule
from ditq.quant_core.serialization import (CONFIG_NAME, CONTENT_HASH_KEY, WEIGHTS_HASH_KEY, WEIGHTS_NAME,
                                           check_writable, read_safetensors, save_hashed)

HERE = Path(__file__).parent
CORPUS = HERE / "fixtures" / "hostile"
_spec = importlib.util.spec_from_file_location("checkpoint_fuzz", HERE / "checkpoint_fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

# what each committed nasty file must be refused for
EXPECTED = {
    "sample_size_16384": r"4096 MiB of computed buffers",
    "attention_head_dim_1M": r"tensor 'scale_shift_table' has shape \(2, 16\), expected \(2, 2097152\)",
    "attention_head_dim_0": r"does not build a PixArtTransformer2DModel: ZeroDivisionError",
    "num_layers_100000": r"'num_layers'\] = 100000, but the file's tensors hold at most 3 repeated blocks",
    "class_ModelMixin": r"model class 'ModelMixin' is not a diffusers model class",
    "deep_nesting_100000": r"ditq.model_config nests deeper than the 64 levels allowed",
    "transposed_scale": r"'transformer_blocks.0.attn1.to_q.weight_scale' has shape \(1, 16\), expected \(16, 1\)",
    "negative_weight_scale": r"'transformer_blocks.0.attn1.to_q': weight scales must be > 0",
    "huge_weight_scale": r"'transformer_blocks.0.attn1.to_q': weight scales above 255.875",
    "rotation_sign_2": r"'transformer_blocks.0.attn1.to_v': rotation_signs must all be \+1 or -1",
    "input_scale_0": r"'transformer_blocks.0.attn1.to_k': input_scale must be finite and > 0",
    "nan_bias": r"tensor 'transformer_blocks.0.attn1.to_q.bias' has NaN/Inf values",
    "flipped_byte": r"content hash mismatch",
}


def _max_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """One good load first, so lazy imports (diffusers' model classes, method modules) are not timed."""
    load_quantized(save_quantized(fuzz.quantized_tiny_model(), tmp_path_factory.mktemp("warm") / "w.safetensors"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_file_refused_fast_and_small(warm, name):
    path = CORPUS / f"{name}.safetensors"
    rss, t0 = _max_rss_mib(), time.perf_counter()
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + EXPECTED[name]):
        load_quantized(path)
    assert time.perf_counter() - t0 < 10.0  # milliseconds when the machine is idle
    assert _max_rss_mib() - rss < 200  # the 16384 and 2^20 configs would have asked for gigabytes


def test_corpus_is_every_committed_file():
    assert {p.stem for p in CORPUS.glob("*.safetensors")} == set(EXPECTED)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return fuzz.Bases(tmp_path_factory.mktemp("bases"))


def _write(tmp_path, files):
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)


def test_a_hundred_thousand_layer_specs_refused_in_proportion(tmp_path, bases):
    def edit(model_cfg, qcfg, rng):
        spec = next(iter(qcfg["layers"].values()))
        qcfg["layers"].update({f"transformer_blocks.{i}.attn1.to_q": spec for i in range(100_000)})

    _write(tmp_path, fuzz._with_configs(bases, fuzz.random.Random(1), edit))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"quantization_config is \d+ bytes, more than the \d+ its tensors warrant"):
        load_quantized(tmp_path / "x.safetensors")
    assert time.perf_counter() - t0 < 10.0

    def edit_few(model_cfg, qcfg, rng):  # within the byte budget, still more layers than tensors
        qcfg["layers"].update({f"transformer_blocks.{i}.attn1.to_q": {"layer_type": "linear"} for i in range(2000)})

    _write(tmp_path, fuzz._with_configs(bases, fuzz.random.Random(1), edit_few))
    with pytest.raises(CheckpointError, match=r"lists 20\d\d layers, but the file holds only \d+ tensors"):
        load_quantized(tmp_path / "x.safetensors")


def test_deep_folder_config_and_wrong_kinds(tmp_path, bases):
    folder = tmp_path / "q"
    _write(tmp_path, {f"q/{WEIGHTS_NAME}": bases.folder_weights, f"q/{CONFIG_NAME}": b"[" * 100_000})
    with pytest.raises(CheckpointError, match=f"{CONFIG_NAME}: JSON nests deeper"):
        load_quantized(folder)
    for key, value, message in [("norm_eps", "x", "is not of the kind"), ("norm_eps", 0.0, "must be > 0"),
                                ("interpolation_scale", 0, "makes buffer 'pos_embed.pos_embed' non-finite")]:
        cfg = json.loads(json.dumps(bases.folder_config))
        cfg[key] = value
        (folder / CONFIG_NAME).write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=message):
            load_quantized(folder)


def test_fuzz_every_case_loads_finite_or_is_refused():
    """Seeded mutations of a tiny checkpoint (DITQ_FUZZ_CASES to run more; the 2,400-case campaign is
    ``python tests/checkpoint_fuzz.py``)."""
    cases = int(os.environ.get("DITQ_FUZZ_CASES", "200"))
    result = fuzz.campaign(cases, seed=int(os.environ.get("DITQ_FUZZ_SEED", "0")))
    assert not result["failures"], result["failures"][:5]
    assert result["outcomes"].get("rejected", 0) > cases // 2 and result["outcomes"].get("ok", 0) > 0
    assert result["slowest_s"] < fuzz.CASE_SECONDS and result["rss_growth_mib"] < 1024, result


# -- integrity: hashes, atomic folder saves, modes, temporary files ---------------------------------
@pytest.fixture(scope="module")
def tiny_quantized():
    return fuzz.quantized_tiny_model()


def test_interrupted_folder_save_is_refused(tmp_path, tiny_quantized):
    save_quantized(tiny_quantized, tmp_path / "a")
    save_quantized(fuzz.quantized_tiny_model(seed=1), tmp_path / "b")
    # a save of b over a killed after the weights' rename, before config.json's
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes((tmp_path / "b" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(CheckpointError, match=r"a: config.json and diffusion_pytorch_model.safetensors come "
                                              r"from different saves"):
        load_quantized(tmp_path / "a")


def test_files_without_hashes_still_load(tmp_path, tiny_quantized):
    """Saves from before the hashes (same format_version) load unchecked, to the same outputs."""
    save_quantized(tiny_quantized, tmp_path / "q")
    tensors, meta = read_safetensors(tmp_path / "q" / WEIGHTS_NAME)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "q" / WEIGHTS_NAME), {k: v for k, v in meta.items() if k != CONTENT_HASH_KEY})
    cfg = json.loads((tmp_path / "q" / CONFIG_NAME).read_text())
    del cfg["quantization_config"][WEIGHTS_HASH_KEY]
    (tmp_path / "q" / CONFIG_NAME).write_text(json.dumps(cfg))
    loaded = load_quantized(tmp_path / "q")
    stored = tiny_quantized.state_dict()
    assert all(torch.equal(t.view(torch.uint8), stored[k].view(torch.uint8)) for k, t in loaded.state_dict().items())
    with torch.no_grad():  # same tensors; 2-thread CPU matmuls may round differently by memory layout
        torch.testing.assert_close(loaded(**fuzz.inputs())[0], tiny_quantized(**fuzz.inputs())[0], atol=1e-6, rtol=0)


def test_header_hash_covers_tensors_and_metadata(tmp_path):
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    digest = save_hashed(t, tmp_path / "x.safetensors", {"k": "v"})
    assert read_safetensors(tmp_path / "x.safetensors")[1][CONTENT_HASH_KEY] == digest
    others = [save_hashed({"a": t["a"].reshape(3, 2)}, tmp_path / "y.safetensors", {"k": "v"}),
              save_hashed({"b": t["a"]}, tmp_path / "y.safetensors", {"k": "v"}),
              save_hashed(t, tmp_path / "y.safetensors", {"k": "w"}),
              save_hashed({"a": t["a"].to(torch.int32).float().add(1e-6)}, tmp_path / "y.safetensors", {"k": "v"})]
    assert digest not in others and len(set(others)) == 4


def test_saved_files_are_0644_under_umask_0022_and_stale_temps_go(tmp_path, tiny_quantized):
    old = os.umask(0o022)
    try:
        folder = tmp_path / "q"
        folder.mkdir()
        dead = folder / f".{CONFIG_NAME}.999999999.abcd1234.tmp"  # pid far above pid_max: its save died
        alive = folder / f".{WEIGHTS_NAME}.{os.getpid()}.efgh5678.tmp"  # a save still running
        dead.write_text("x")
        alive.write_text("x")
        save_quantized(tiny_quantized, folder)
        save_quantized(tiny_quantized, tmp_path / "one.safetensors")
    finally:
        os.umask(old)
    for f in (folder / CONFIG_NAME, folder / WEIGHTS_NAME, tmp_path / "one.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert not dead.exists() and alive.exists()


def test_check_writable_before_quantizing(tmp_path):
    check_writable(tmp_path / "new" / "deeper")
    check_writable(tmp_path / "new" / "x.safetensors")
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(OSError, match="blocker is a file"):
        check_writable(tmp_path / "blocker" / "q")
    with pytest.raises(OSError, match="exists and is not a folder"):
        check_writable(tmp_path / "blocker")


# -- value rules (each loads a re-hashed file, so the rule itself must refuse it) -------------------
@pytest.mark.parametrize("key, value, message", [
    ("transformer_blocks.0.attn1.to_q.weight_scale", float("nan"), "non-finite weight scales"),
    ("transformer_blocks.0.attn1.to_q.weight_scale", float("inf"), "non-finite weight scales"),
    ("transformer_blocks.0.attn1.to_q.weight_scale", 0.0, "weight scales must be > 0"),
    ("transformer_blocks.0.attn1.to_k.weight_zero_point", 0.5, "zero points must be integers in"),
    ("transformer_blocks.0.attn1.to_k.weight_zero_point", 9.0, "zero points must be integers in"),
    ("transformer_blocks.0.attn1.to_v.rotation_signs", 0, "rotation_signs must all be"),
    ("transformer_blocks.0.attn1.to_v.smooth_scale", -1.0, "smooth_scale must be finite and > 0"),
    ("transformer_blocks.0.attn1.to_v.smooth_scale", 1e-45, "smooth_scale below 1e-08"),
    ("transformer_blocks.0.attn1.to_k.input_scale", float("nan"), "input_scale must be finite and > 0"),
    ("transformer_blocks.0.attn1.to_out.0.weight", float("nan"), "fp8 weight has NaN"),
    ("transformer_blocks.0.attn2.to_q.codebook", float("inf"), "codebook has NaN/Inf"),
    ("transformer_blocks.0.attn2.to_q.bias", float("inf"), "has NaN/Inf values"),
    ("proj_out.weight", 1e30, "beyond \\+-65504"),
])
def test_values_outside_the_format_rules_are_refused(tmp_path, bases, key, value, message):
    tensors, meta = {k: v.clone() for k, v in bases.tensors.items()}, dict(bases.meta)
    t = tensors[key]
    if key.endswith("weight_zero_point") and value != int(value):
        # int8 zero points cannot hold a fraction; files written before them store float32 ones
        t = tensors[key] = t.float()
        qcfg = json.loads(meta["ditq.quantization_config"])
        qcfg["layers"][key.rsplit(".", 1)[0]]["zero_point_dtype"] = "float32"
        meta["ditq.quantization_config"] = json.dumps(qcfg)
    if t.dtype == torch.float8_e4m3fn:
        t.view(torch.uint8).reshape(-1)[0] = 0x7F  # e4m3fn's NaN
    else:
        t.reshape(-1)[0] = value
    _write(tmp_path, fuzz._single_from(tensors, meta))
    layer = re.escape(key.rsplit(".", 1)[0])
    with pytest.raises(CheckpointError, match=f"x.safetensors: .*({layer}|{re.escape(key)}).*{message}"):
        load_quantized(tmp_path / "x.safetensors")


def test_the_lowest_integer_is_accepted_exactly_where_the_range_has_it(tmp_path):
    """-2^(b-1) (-8, -128) is in the range of symmetric 4-bit layers that record weight_full_range
    (format 3) and asymmetric ones, and in no other symmetric layer nor a split-plane high plane."""
    from ditq.quant_core.config import LayerScheme
    from ditq.quant_core.layers import QuantLinear
    from ditq.quant_core.methods.vidit_q.switching import SplitPlaneLinear
    from ditq.quant_core.models import set_submodule

    model, fp = fuzz.quantized_tiny_model(), fuzz.tiny_model()
    block = "transformer_blocks.0.attn2."
    for name, full in (("to_k", False), ("to_v", True)):
        set_submodule(model, block + name, QuantLinear.from_linear(
            fp.get_submodule(block + name), LayerScheme(weight_bits=4, weight_full_range=full), name=block + name))
    out = fp.get_submodule(block + "to_out.0")
    set_submodule(model, block + "to_out.0", SplitPlaneLinear.from_weight(out, out.weight, [500.0], [8, 4]))
    tensors, meta = read_safetensors(save_quantized(model, tmp_path / "base.safetensors"))
    cases = {  # buffer: refusal, None where -2^(b-1) is allowed
        block + "to_k.weight": "weight holds -8, outside the symmetric range \\+-7",
        block + "to_v.weight": None,
        "transformer_blocks.0.attn1.to_k.weight": None,  # asymmetric int4, stored offset to signed
        "transformer_blocks.0.attn1.to_q.weight": "weight holds -128, outside the symmetric range \\+-127",
        block + "to_out.0.weight_high": "weight_high holds -8",
        block + "to_out.0.weight_low": None,  # the low plane is [-8, 7]
    }
    for key, refusal in cases.items():
        edited = {k: v.clone() for k, v in tensors.items()}
        t = edited[key]
        if t.dtype == torch.int8:
            t[0, 1] = -128
        else:
            t[0, 0] &= 0x0F  # value 1 of row 0 (the high nibble) becomes 0 - 8
        _write(tmp_path, fuzz._single_from(edited, meta))
        if refusal is None:
            loaded = load_quantized(tmp_path / "x.safetensors").get_submodule(key.rsplit(".", 1)[0])
            assert torch.equal(loaded._buffers[key.rsplit(".", 1)[1]], t), key
        else:
            layer = re.escape(key.rsplit(".", 1)[0])
            with pytest.raises(CheckpointError, match=f"x.safetensors: layer '{layer}': {refusal}"):
                load_quantized(tmp_path / "x.safetensors")


def test_loaded_switch_variants_keep_their_names_and_codebook_checks_input(tmp_path):
    from ditq.quant_core.config import LayerScheme
    from ditq.quant_core.layers import QuantLinear, qz
    from ditq.quant_core.models import set_submodule
    from ditq.quant_core.methods.vidit_q.switching import TimestepSwitchLinear

    model = fuzz.quantized_tiny_model()
    name = "transformer_blocks.1.ff.net.2"
    lin = torch.nn.Linear(64, 16)
    set_submodule(model, name, TimestepSwitchLinear([QuantLinear.from_linear(lin, LayerScheme(), name=name)],
                                                    [500.0], [[0, 8], [0, 4]]))
    loaded = load_quantized(save_quantized(model, tmp_path / "s.safetensors"))
    assert loaded.get_submodule(name).variants[0].layer_name == f"{name}.variants.0"
    with pytest.raises(qz.NonFiniteError, match="transformer_blocks.0.attn2.to_q: input activation"):
        loaded.get_submodule("transformer_blocks.0.attn2.to_q")(torch.full((2, 16), float("nan")))


# -- quantize is all or nothing ----------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["rtn-w4a8", "vidit-q-w8a8"])
def test_failed_quantize_leaves_the_model_as_it_was(fresh, tiny_pipe, tiny_calib, preset):
    model = fresh(tiny_pipe.transformer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = len(model._forward_pre_hooks)

    def stop_at_20(done, total, name):
        if done == 20:
            raise KeyboardInterrupt("user pressed stop")

    with pytest.raises(KeyboardInterrupt):
        quantize(model, QuantConfig.preset(preset), tiny_calib, progress=False, on_layer=stop_at_20)
    assert not any(isinstance(m, QuantModule) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert len(model._forward_pre_hooks) == hooks
    report = quantize(model, QuantConfig.preset(preset), tiny_calib, progress=False)  # a retry works
    assert len(report.layers) == 40


# -- the command line --------------------------------------------------------------------------------
def test_cli_errors_are_one_line_unless_debug(tmp_path, capsys):
    from ditq.cli import main

    bad = CORPUS / "num_layers_100000.safetensors"
    assert main(["info", str(bad), "--verify"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {bad}: model_config['num_layers'] = 100000")
    with pytest.raises(CheckpointError, match="num_layers"):
        main(["--debug", "info", str(bad), "--verify"])
    (tmp_path / "blocker").write_text("x")
    t0 = time.perf_counter()
    assert main(["quantize", "--preset", "rtn-w8a8-dynamic", "--out", str(tmp_path / "blocker" / "q")]) == 2
    assert "blocker is a file" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 5  # refused before loading and quantizing the model


def test_pipeline_load_checks_the_transformer_before_diffusers_builds_it(tmp_path, tiny_pipe, fresh):
    from ditq import QuantizedPixArtPipeline

    folder = tmp_path / "pipe"
    tiny_pipe.save_pretrained(folder)
    model = fresh(tiny_pipe.transformer)
    quantize(model, QuantConfig.preset("rtn-w8a8-dynamic"), progress=False)
    save_quantized(model, folder / "transformer")
    cfg = json.loads((folder / "transformer" / CONFIG_NAME).read_text())
    cfg["attention_head_dim"] = 0  # diffusers' own constructor would raise ZeroDivisionError
    (folder / "transformer" / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"transformer/{WEIGHTS_NAME}: the stored model config does not build"):
        QuantizedPixArtPipeline.from_pretrained(folder)
