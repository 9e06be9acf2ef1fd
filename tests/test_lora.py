"""LoRA as a full-precision branch on quantized layers: exact against float64 on the raw input for
every layer type, bit-exact removal, memory and dtype, torch.compile, and PEFT's machinery (inject,
switch, disable, merge-as-branch, delete) on the built-in PixArt against the FP model's behaviour."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from ditq.quant_core.config import LayerScheme
from ditq.quant_core.layers import CodebookLinear, QuantLinear, branches_lifted
from ditq.quant_core.methods.vidit_q.switching import TimestepSwitchLinear

K, N = 96, 80


def make_linear(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N)
    lin.weight.data = torch.randn(N, K) * 0.05
    return lin.to(dtype)


def smoothed_rotated_w8a8(lin):
    """ViDiT-Q-style: the layer computes on (x / s) rotated; the branch must see plain x."""
    return QuantLinear.from_linear(lin, LayerScheme(weight_bits=8, act_bits=8), name="smoothed",
                                   smooth_scale=torch.rand(K) + 0.5, rotation_signs=torch.ones(K, dtype=torch.int8),
                                   rotation_block=32)


LAYERS = {
    "w8a8-smoothed-rotated": smoothed_rotated_w8a8,
    "w4a8-group-asym": lambda lin: QuantLinear.from_linear(lin, LayerScheme(
        weight_bits=4, weight_granularity="group", group_size=32, weight_symmetric=False, act_bits=8,
        act_mode="dynamic_token_group"), name="w4"),
    "fp8": lambda lin: QuantLinear.from_linear(lin, LayerScheme(weight_format="fp8", act_mode="dynamic_token_fp8"),
                                               name="fp8"),
    "codebook": lambda lin: CodebookLinear.from_assignment(
        lin, torch.randint(0, 16, (N, K // 2), generator=torch.Generator().manual_seed(0)),
        torch.randn(1, 16, 2, generator=torch.Generator().manual_seed(1)) * 0.05, 4, name="cb"),
    "timestep-switch": lambda lin: TimestepSwitchLinear(
        [QuantLinear.from_linear(lin, LayerScheme(weight_bits=8, act_bits=8), name="sw")], [500.0], [(0, 8), (0, 4)]),
}


def factors(rank, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, rank, generator=g).to(dtype), torch.randn(rank, N, generator=g).to(dtype) * 0.1


@pytest.mark.parametrize("kind", LAYERS)
def test_branches_add_exactly_on_the_raw_input_and_remove_bit_exactly(kind):
    layer = LAYERS[kind](make_linear())
    x = torch.randn(2, 7, K)
    y0 = layer(x)
    (a1, b1), (a2, b2) = factors(4, 1), factors(2, 2)
    layer.add_branch("one", a1, b1, 0.7)
    layer.add_branch("two", a2, b2, -1.3)
    expected = 0.7 * (x.double() @ a1.double()) @ b1.double() - 1.3 * (x.double() @ a2.double()) @ b2.double()
    torch.testing.assert_close((layer(x) - y0).double(), expected, rtol=1e-5, atol=1e-5)
    layer.remove_branch("one")
    only_two = layer(x)
    layer.remove_branch("two")
    assert torch.equal(layer(x), y0), "without branches the output must be the quantized one, bit for bit"
    layer.add_branch("two", a2, b2, -1.3)
    assert torch.equal(layer(x), only_two)


def test_branch_errors_name_the_layer():
    layer = LAYERS["w8a8-smoothed-rotated"](make_linear())
    a, b = factors(4, 1)
    with pytest.raises(ValueError, match=r"'smoothed'.*\[96, r\] @ \[r, 80\]"):
        layer.add_branch("bad", a.T, b)
    layer.add_branch("x", a, b)
    with pytest.raises(ValueError, match="'smoothed'.*already attached"):
        layer.add_branch("x", a, b)
    with pytest.raises(KeyError, match="'smoothed'.*no LoRA branch 'y'.*'x'"):
        layer.remove_branch("y")


def test_branch_costs_its_factors_in_the_compute_dtype_and_stays_out_of_files(tmp_path):
    from ditq import save_quantized

    model = nn.Sequential(QuantLinear.from_linear(make_linear(dtype=torch.bfloat16),
                                                  LayerScheme(weight_bits=4, act_bits=8), name="0"))
    layer = model[0]
    keys = set(model.state_dict())
    a, b = factors(4, 1)
    layer.add_branch("lora", a, b, 1.0, dtype=layer.branch_dtype())
    br = layer.lora_branches["lora"]
    assert br.down.dtype == br.up.dtype == torch.bfloat16 and br.down.nbytes + br.up.nbytes == 4 * (K + N) * 2
    assert set(model.state_dict()) == keys
    model.to(torch.float16)
    assert layer.lora_branches["lora"].up.dtype == torch.float16 and layer.weight.dtype == torch.uint8
    with pytest.raises(ValueError, match="layer '0' carries LoRA branches \\['lora'\\]"):
        save_quantized(model, tmp_path / "m.safetensors")
    with branches_lifted(model):
        assert not layer.lora_branches
        save_quantized(model, tmp_path / "m.safetensors")
    assert list(layer.lora_branches) == ["lora"]


def test_branch_compiles_to_one_graph(monkeypatch):
    monkeypatch.setenv("DITQ_KERNELS", "torch")
    layer = QuantLinear.from_linear(make_linear(), LayerScheme(weight_bits=8, act_bits=8), name="l")
    layer.add_branch("lora", *factors(4, 1), 0.5)
    x = torch.randn(3, 13, K)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


# -- PEFT -------------------------------------------------------------------------------------------
BENCH = Path(__file__).resolve().parents[1] / "bench" / "lora_branches.py"


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.fixture(scope="module")
def bench(peft):
    spec = importlib.util.spec_from_file_location("lora_branches", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.PROMPTS = mod.PROMPTS[:1]
    return mod


def test_peft_wraps_every_ditq_layer_and_refuses_what_it_cannot_keep_exact(peft, builtin):
    from peft import inject_adapter_in_model

    from ditq import QuantConfig, lora_config, quantize
    from ditq.quant_core.peft_lora import QuantLoraLayer

    model = builtin.tiny_pixart_transformer(num_layers=1)
    quantize(model, QuantConfig.preset("rtn-w4a8"), progress=False)
    with pytest.raises(ValueError, match="not supported"):  # PEFT's own refusal without ditq's mapping
        inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["to_q"]), copy.deepcopy(model))
    with pytest.raises(ValueError, match="lora_bias is not supported on quantized layers"):
        inject_adapter_in_model(lora_config(r=4, target_modules=["to_q"], lora_bias=True), copy.deepcopy(model))
    with pytest.raises(ValueError, match="unsupported variant"):
        inject_adapter_in_model(lora_config(r=4, target_modules=["to_q"], use_dora=True), copy.deepcopy(model))
    block = model.transformer_blocks[0]  # layer types with buffers only, no `weight`:
    block.ff.net[2] = CodebookLinear.from_assignment(nn.Linear(1024, 256), torch.randint(0, 16, (256, 1024)),
                                                     torch.randn(1, 16, 1), 4, name="cb")
    block.attn1.to_q = TimestepSwitchLinear([block.attn1.to_q], [500.0], [(0, 4), (0, 3)])
    inject_adapter_in_model(lora_config(r=4, target_modules=["to_q", "ff.net.2"]), model)
    wrapped = [m for m in model.modules() if isinstance(m, QuantLoraLayer)]
    assert len(wrapped) == 3 and all(w.lora_A["default"].weight.dtype == torch.float32 for w in wrapped)


def test_get_peft_model_disable_merge_as_branch_and_unload(peft, builtin):
    from ditq import QuantConfig, lora_config, quantize

    model = builtin.tiny_pixart_transformer(num_layers=1)
    quantize(model, QuantConfig.preset("rtn-w4a8"), progress=False)
    layer = model.transformer_blocks[0].attn1.to_q
    packed = layer.weight.clone()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, 8, 64, generator=g), timestep=torch.tensor([999, 10]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        base = model(**inputs).sample
        pm = peft.get_peft_model(model, lora_config(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "ff.net.2"],
                                                    init_lora_weights=False))
        with_lora = pm(**inputs).sample
        with pm.disable_adapter():
            assert torch.equal(pm(**inputs).sample, base)
        pm.merge_adapter()
        assert list(layer.lora_branches) == ["peft:default"] and torch.equal(layer.weight, packed)
        torch.testing.assert_close(pm(**inputs).sample, with_lora, rtol=1e-5, atol=1e-5)
        merged = pm.merge_and_unload()
        assert type(merged.transformer_blocks[0].attn1.to_q) is QuantLinear
        torch.testing.assert_close(merged(**inputs).sample, with_lora, rtol=1e-5, atol=1e-5)
    assert 0.05 < float((with_lora - base).norm() / base.norm())


STEPS = 2


@pytest.fixture(scope="module")
def lora_setup(bench, tiny_pipe):
    """The pipeline, two random LoRAs and the FP model's outputs with them (computed once)."""
    pipe, fp = copy.copy(tiny_pipe), tiny_pipe.transformer
    lora_a, lora_b = (bench.random_lora(fp, 4, 0.26, seed) for seed in (1, 2))
    return pipe, fp, lora_a, lora_b, bench.fp_reference(pipe, fp, lora_a, lora_b, steps=STEPS)


@pytest.mark.parametrize("kind", ["rtn-w4a8", "kmeans-c4"])  # W8A8 and the other types: the bench
def test_peft_lora_on_builtin_pixart_behaves_as_on_fp(bench, lora_setup, kind):
    """Inject a LoRA with PEFT into the quantized transformer, sample, disable, re-enable, stack a
    second adapter, delete one, delete all: each restore bit-exact, the LoRA's effect as on FP, and
    the quantized model with the LoRA as close to FP+LoRA as the same quantization of FP+LoRA gets."""
    pipe, fp, lora_a, lora_b, ref = lora_setup
    row = bench.lora_row(pipe, fp, kind, lora_a, lora_b, STEPS, ref)
    assert all(row[k] for k in ("disable_exact", "enable_exact", "remove_one_exact", "remove_all_exact")), row
    assert row["merged_as_branch"] < 1e-5
    for key in ("eff_1.0", "eff_stack"):
        assert abs(row[key] / ref[key] - 1) <= 0.1, (key, row[key], ref[key])
    # with quantized activations the LoRA moves activation ranges, so FP+LoRA quantizes worse than FP
    # (any quantized model of it does): bound by the same quantization of the merged FP+LoRA model
    assert row["vs_fp_stack"] <= 1.1 * max(row["q_err"], row["requantized_stack"]), row
    # strength 0.1: the LoRA's change is of the order of the quantization noise; with activation
    # quantization that noise is re-drawn on the moved trajectory and adds to the measured change:
    # |change| ~ sqrt(effect^2 + 2 noise^2) (bench/results/lora_branches.md)
    floor = (ref["eff_0.1"] ** 2 + 2 * row["q_err"] ** 2) ** 0.5
    assert 0.9 * ref["eff_0.1"] <= row["eff_0.1"] <= 1.1 * floor, (row["eff_0.1"], ref["eff_0.1"], floor)
    assert row["vs_fp_0.1"] <= 1.1 * row["q_err"], row
