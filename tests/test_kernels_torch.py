"""Kernel dispatch, the codebook reference, torch.compile of the quantized forward, and the CPU-safe parts
of the GPU benchmarks. None of this needs Triton."""
import importlib.util
from pathlib import Path

import pytest
import torch

from ditq.kernels import dispatch
from ditq.kernels import reference as ref
from ditq.quant_core.config import LayerScheme
from ditq.quant_core.layers import QuantLinear

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dispatch_backends(monkeypatch):
    monkeypatch.setenv("DITQ_KERNELS", "torch")
    assert dispatch.op("int_gemm", torch.device("cpu")) is ref.int_gemm
    monkeypatch.setenv("DITQ_KERNELS", "auto")  # CPU tensors never need Triton
    assert dispatch.op("codebook_linear", torch.device("cpu")) is ref.codebook_linear
    monkeypatch.setenv("DITQ_KERNELS", "cuda")
    with pytest.raises(ValueError, match="DITQ_KERNELS"):
        dispatch.op("int_gemm", torch.device("cpu"))


def test_codebook_linear_reference_known_answer():
    """3-bit indices packed by hand (one little-endian bit stream per row, index 2 straddles bytes
    0 and 1) into one codebook of 8 two-long entries ``[i, i/2 - 1]``."""
    from ditq import kernels

    codebook = torch.tensor([[[i, i / 2 - 1] for i in range(8)]], dtype=torch.float16)
    # row 0: u = 5, 3, 6 -> 5 + 3*8 + 6*64 = 413 = 0x19D; row 1: u = 0, 7, 1 -> 56 + 64 = 120
    idx = torch.tensor([[0x9D, 0x01, 0], [120, 0, 0]], dtype=torch.uint8)
    x = torch.tensor([[1.0, 1.0, 2.0, 2.0, 3.0, -1.0]])
    w = torch.tensor([[5.0, 1.5, 3.0, 0.5, 6.0, 2.0], [0.0, -1.0, 7.0, 2.5, 1.0, -0.5]])
    bias = torch.tensor([0.25, -0.5])
    y = ref.codebook_linear(x, idx, codebook, bias, bits=3, in_features=6)
    assert torch.equal(y, x @ w.t() + bias) and torch.equal(y, torch.tensor([[29.75, 21.0]]))
    with pytest.raises(ValueError, match="in_features=18"):  # 9 indices would need 6 bytes per row
        kernels.codebook_linear(x.repeat(1, 3), indices=idx, codebook=codebook, bits=3, in_features=18)
    with pytest.raises(ValueError, match="4-bit"):
        kernels.codebook_linear(x, indices=idx, codebook=codebook, bits=4, in_features=6)


@pytest.mark.parametrize("scheme", [
    LayerScheme(),
    LayerScheme(act_mode="static_tensor"),
    LayerScheme(weight_bits=4, weight_granularity="group", group_size=32, weight_symmetric=False,
                act_mode="dynamic_token_group"),
    LayerScheme(weight_format="fp8", act_mode="dynamic_token_fp8"),
    LayerScheme(weight_bits=4, act_mode=None, act_bits=None),
], ids=lambda s: s.name)
def test_quant_linear_compiles_to_one_graph(scheme, monkeypatch):
    """The quantized forward traces without graph breaks (fullgraph) and computes what eager does."""
    monkeypatch.setenv("DITQ_KERNELS", "torch")
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 80)
    layer = QuantLinear.from_linear(lin, scheme, name="l", input_scale=0.05, smooth_scale=torch.rand(96) + 0.5,
                                    rotation_signs=torch.ones(96, dtype=torch.int8), rotation_block=32)
    x = torch.randn(3, 13, 96)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def test_bench_gemm_cpu_parts():
    bench = load_bench("bench_gemm")
    args = bench.parse_args(["--m", "4096", "--kn", "1152", "4608"])
    assert bench.shapes(args) == [(4096, 1152, 1152), (4096, 1152, 4608), (4096, 4608, 1152),
                                  (4096, 4608, 4608)]
    assert len(bench.shapes(bench.parse_args([]))) == 12
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            bench.main(["--m", "1024"])


def test_bench_e2e_builds_and_quantizes_a_small_pixart(monkeypatch):
    monkeypatch.setenv("DITQ_KERNELS", "torch")
    bench = load_bench("bench_e2e")
    args = bench.parse_args(["--config", "tiny", "--px", "64"])
    assert args.formats == ["bf16", "w8a8", "w4a8", "fp8"] and args.batch == 2
    outs = {}
    for fmt in ("bf16", "w4a8"):
        model = bench.quantize_transformer(bench.build_transformer("tiny", 64, "cpu", torch.float32), fmt)
        inputs = bench.make_inputs(model, args.batch, 64, "cpu", torch.float32)
        with torch.inference_mode():
            outs[fmt] = model(**inputs)[0]
        assert outs[fmt].shape == (2, 8, 8, 8)
        if fmt != "bf16":
            assert any(isinstance(m, QuantLinear) for m in model.modules())
    # the quantized output tracks the float one (same seeded weights)
    assert torch.isfinite(outs["w4a8"]).all()
    assert (outs["w4a8"] - outs["bf16"]).norm() < 0.5 * outs["bf16"].norm()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            bench.main(["--config", "tiny"])
