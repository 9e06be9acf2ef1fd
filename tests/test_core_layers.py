"""QuantLinear: packed storage, exact forward against a float64 reference, dtype/device behaviour."""
import pytest
import torch
from torch import nn

from ditq.quant_core import quantizers as qz
from ditq.quant_core.config import LayerScheme
from ditq.quant_core.layers import QuantLinear


def make_linear(k=96, n=80, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    lin.weight.data = torch.randn(n, k) * 0.05
    return lin


def reference_forward(x, lin, scheme):
    """Independent float64 re-derivation: quantize x and W as the scheme says, multiply exactly."""
    w = lin.weight.double()
    gs = scheme.group_size if scheme.weight_granularity == "group" else None
    q, s, z = qz.quantize_weight(w, scheme.weight_bits, group_size=gs, symmetric=scheme.weight_symmetric)
    w_hat = qz.dequantize(q, s, z, torch.float64)
    if scheme.act_mode == "dynamic_token":
        xq, xs = qz.quantize_per_token(x, scheme.act_bits)
        x_hat = qz.dequantize(xq, xs, dtype=torch.float64)
    elif scheme.act_mode == "dynamic_token_group":
        xq, xs = qz.quantize_per_token(x, scheme.act_bits, group_size=scheme.group_size)
        x_hat = qz.dequantize(xq, xs, dtype=torch.float64)
    else:
        x_hat = x.double()
    return x_hat @ w_hat.t() + lin.bias.double()


SCHEMES = [
    LayerScheme(weight_bits=8, act_bits=8),
    LayerScheme(weight_bits=4, act_bits=8),
    LayerScheme(weight_bits=4, weight_granularity="group", group_size=32, act_bits=8, act_mode="dynamic_token_group"),
    LayerScheme(weight_bits=4, weight_symmetric=False, act_bits=8),
    LayerScheme(weight_bits=3, act_bits=None, act_mode=None),
    LayerScheme(weight_bits=6, act_bits=6),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name + ("-asym" if not s.weight_symmetric else ""))
def test_forward_matches_float64_reference(scheme):
    lin = make_linear()
    layer = QuantLinear.from_linear(lin, scheme, name="blk.fc")
    x = torch.randn(37, 96)
    y = layer(x)
    ref = reference_forward(x, lin, scheme)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
    # and it is close to the float layer, as much as the bits allow
    tol = {8: 0.02, 6: 0.06, 4: 0.2, 3: 0.35}[scheme.weight_bits]
    assert ((y - lin(x)).norm() / lin(x).norm()) < tol


def test_holds_no_float_weight_and_bytes_match_bits():
    lin = make_linear(256, 128)
    for bits, ratio in ((8, 0.5 + 2 / 256), (4, 0.25 + 2 / 256)):
        layer = QuantLinear.from_linear(lin, LayerScheme(weight_bits=bits, act_bits=8))
        floats = [n for n, t in layer.state_dict().items() if t.is_floating_point() and t.numel() >= 128 * 256]
        assert floats == [], "a full-precision weight copy is held"
        assert layer.weight_nbytes() / (lin.weight.numel() * 2) == pytest.approx(ratio)


def test_static_activation_uses_calibrated_scale():
    lin = make_linear()
    scheme = LayerScheme(weight_bits=8, act_bits=8, act_mode="static_tensor")
    with pytest.raises(ValueError, match="calibrated input_scale"):
        QuantLinear.from_linear(lin, scheme, name="x")
    layer = QuantLinear.from_linear(lin, scheme, input_scale=4.0 / 127)
    x = torch.randn(9, 96)
    x[0, 0] = 100.0  # beyond the calibrated range: clipped to 4.0
    xq = torch.round(x / (4.0 / 127)).clamp(-127, 127) * (4.0 / 127)
    w_hat = layer.effective_weight().double()
    assert torch.allclose(layer(x).double(), xq.double() @ w_hat.t() + lin.bias.double(), atol=1e-4)


def test_fp8_layer_close_to_float():
    lin = make_linear()
    layer = QuantLinear.from_linear(lin, LayerScheme(weight_format="fp8", act_bits=8, act_mode="dynamic_token_fp8"))
    assert layer.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(11, 96)
    assert ((layer(x) - lin(x)).norm() / lin(x).norm()) < 0.06


def test_dtype_cast_keeps_packed_weights_and_fp32_scales():
    lin = make_linear()
    for scheme in (LayerScheme(weight_bits=4, act_bits=8),
                   LayerScheme(weight_format="fp8", act_bits=8, act_mode="dynamic_token_fp8")):
        layer = QuantLinear.from_linear(lin, scheme)
        w_before = layer.weight.clone()
        layer = layer.to(torch.bfloat16)
        assert layer.weight.dtype == w_before.dtype and torch.equal(layer.weight.view(torch.uint8),
                                                                    w_before.view(torch.uint8))
        assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
        y = layer(torch.randn(3, 96, dtype=torch.bfloat16))
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        layer.half()
        assert layer.weight_scale.dtype == torch.float32


def test_state_dict_round_trip_and_extra_repr():
    lin = make_linear()
    scheme = LayerScheme(weight_bits=4, act_bits=8)
    a = QuantLinear.from_linear(lin, scheme)
    b = QuantLinear(96, 80, scheme)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 96)
    assert torch.equal(a(x), b(x))
    assert "format=int4 / a8-token" in repr(a) and "in_features=96" in repr(a)


def test_rotation_and_smoothing_preserve_the_product():
    from ditq.kernels.reference import block_hadamard

    lin = make_linear(64, 48)
    smooth = torch.rand(64) + 0.5
    signs = (torch.randint(0, 2, (64,)) * 2 - 1).to(torch.int8)
    w_t = block_hadamard(lin.weight * smooth, signs, 32)
    layer = QuantLinear.from_linear(lin, LayerScheme(weight_bits=8, act_bits=8), weight=w_t,
                                    smooth_scale=smooth, rotation_signs=signs, rotation_block=32)
    x = torch.randn(7, 64)
    assert ((layer(x) - lin(x)).norm() / lin(x).norm()) < 0.02
    assert torch.allclose(layer.effective_weight(), lin.weight, atol=2e-3)


def test_nonfinite_activation_names_the_layer():
    layer = QuantLinear.from_linear(make_linear(), LayerScheme(weight_bits=8, act_bits=8), name="blocks.3.mlp.fc1")
    x = torch.randn(4, 96)
    x[1, 2] = float("nan")
    with pytest.raises(qz.NonFiniteError, match="blocks.3.mlp.fc1"):
        layer(x)


def test_unsupported_scheme_errors_name_the_problem():
    with pytest.raises(ValueError, match="weight_bits=9 unsupported"):
        LayerScheme(weight_bits=9).validate("blocks.0.fc1")
    with pytest.raises(ValueError, match="group_size 50 does not divide in_features 96"):
        QuantLinear(96, 8, LayerScheme(weight_bits=4, weight_granularity="group", group_size=50))
    with pytest.raises(ValueError, match="act_bits=3 unsupported"):
        LayerScheme(act_bits=3).validate()
