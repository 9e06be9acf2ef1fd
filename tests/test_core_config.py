"""QuantConfig: presets, JSON round trip, per-layer schemes, layer policies."""
import pytest

from ditq.quant_core.config import LayerScheme, QuantConfig
from ditq.quant_core.models import select_layers


def test_presets_listed_and_loadable():
    names = QuantConfig.presets()
    assert {"rtn-w8a8", "rtn-w8a8-dynamic", "rtn-w4a8"} <= set(names)
    for name in names:
        cfg = QuantConfig.preset(name)
        assert cfg.name == name
        assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert QuantConfig.preset("rtn-w8a8").act_mode == "static_tensor"
    with pytest.raises(ValueError, match="unknown preset 'nope'; available: .*rtn-w8a8"):
        QuantConfig.preset("nope")


def test_per_layer_overrides_last_match_wins():
    cfg = QuantConfig(weight_bits=8, layers={r"ff\.": {"weight_bits": 4}, r"ff\.net\.2": {"weight_bits": 6}})
    assert cfg.scheme_for("blocks.0.attn1.to_q").weight_bits == 8
    assert cfg.scheme_for("blocks.0.ff.net.0.proj").weight_bits == 4
    assert cfg.scheme_for("blocks.0.ff.net.2").weight_bits == 6
    back = QuantConfig.from_json(cfg.to_json())
    assert back.scheme_for("blocks.0.ff.net.2") == cfg.scheme_for("blocks.0.ff.net.2")


def test_invalid_configs_fail_early_with_names():
    with pytest.raises(ValueError, match="weight_bits=1 unsupported"):
        QuantConfig(weight_bits=1)
    with pytest.raises(ValueError, match=r"layer 'ff': weight_bits=12"):
        QuantConfig(layers={"ff": {"weight_bits": 12}})
    with pytest.raises(ValueError, match="unknown QuantConfig field"):
        QuantConfig.from_dict({"bits": 4})
    with pytest.raises(ValueError, match="group-wise quantization needs group_size"):
        QuantConfig(weight_granularity="group")
    assert QuantConfig(act_bits=None).act_mode is None


def test_pixart_policy_quantizes_block_linears_only(tiny_pipe):
    layers = select_layers(tiny_pipe.transformer)
    assert len(layers) == 4 * 10
    roles = {n: i.role for n, i in layers.items()}
    assert roles["transformer_blocks.0.attn1.to_q"] == "self_attn"
    assert roles["transformer_blocks.2.attn2.to_v"] == "cross_attn"
    assert roles["transformer_blocks.3.ff.net.2"] == "ffn"
    assert not any(n.startswith(("adaln_single", "caption_projection", "proj_out", "pos_embed")) for n in layers)
    only_ff = select_layers(tiny_pipe.transformer, QuantConfig(exclude=[r"attn"]))
    assert set(only_ff) == {n for n in layers if ".ff." in n}


def test_generic_policy_keeps_modulation_and_embedders():
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.qkv = nn.Linear(8, 24)
            self.mlp = nn.Module()
            self.mlp.fc1 = nn.Linear(8, 32)
            self.adaLN_modulation = nn.Linear(8, 48)

    class TinyDiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.t_embedder = nn.Linear(8, 8)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.final_layer = nn.Linear(8, 4)

    layers = select_layers(TinyDiT())
    assert set(layers) == {"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"}
    assert layers["blocks.1.mlp.fc1"].role == "ffn" and layers["blocks.1.mlp.fc1"].block == 1


def test_dit_policy(dit_pipe):
    layers = select_layers(dit_pipe.transformer)
    assert len(layers) == 4 * 6 and not any("norm" in n for n in layers)


def test_layer_scheme_names():
    assert LayerScheme(weight_bits=4, weight_granularity="group", group_size=64).name == "int4-g64 / a8-token"
    assert LayerScheme(act_bits=None, act_mode=None).name == "int8 / a16"


def test_full_range_default_is_symmetric_int4_only_and_resolved_after_overrides():
    cfg = QuantConfig(weight_bits=4, layers={r"ff\.net\.2": {"weight_bits": 8}, "proj_out": {"weight_symmetric": False},
                                             "to_k": {"weight_full_range": False}})
    assert cfg.weight_full_range is None and cfg.default_scheme().weight_full_range is True
    assert cfg.scheme_for("blocks.0.attn1.to_q").weight_full_range is True
    assert cfg.scheme_for("blocks.0.ff.net.2").weight_full_range is False  # overridden to 8 bits: narrow
    assert cfg.scheme_for("proj_out").weight_full_range is False  # asymmetric: all 16 levels already
    assert cfg.scheme_for("blocks.0.attn1.to_k").weight_full_range is False  # asked for
    for name in ("rtn-w8a8-dynamic", "rtn-w3a16", "q-dit-w4a8", "rtn-fp8"):
        assert QuantConfig.preset(name).default_scheme().weight_full_range is False, name
    for name in ("rtn-w4a8", "rtn-w4a16"):
        assert QuantConfig.preset(name).default_scheme().weight_full_range is True, name
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert LayerScheme(weight_bits=4, weight_full_range=True).name == "int4-full / a8-token"
    # a scheme without the field (format <= 2) means the narrow range
    assert LayerScheme.from_dict({"weight_bits": 4}).weight_full_range is False


@pytest.mark.parametrize("fields, message", [
    ({"weight_bits": 8}, "fewer than 8 bits"),
    ({"weight_bits": 4, "weight_symmetric": False}, "symmetric integer"),
    ({"weight_format": "fp8", "act_mode": "dynamic_token_fp8"}, "symmetric integer"),
    ({"weight_bits": 4, "weight_full_range": 1}, "must be true or false"),
])
def test_full_range_refused_where_it_has_no_meaning(fields, message):
    with pytest.raises(ValueError, match=message):
        LayerScheme(**{"weight_full_range": True, **fields}).validate("blocks.0.ff")
