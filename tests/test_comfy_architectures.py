"""Layer-policy tables for ComfyUI's own DiT classes (Wan, Flux, SD3/3.5 MMDiT, HunyuanDiT),
checked against the module lists the real classes build (tests/fixtures/comfy_modules.json, written
by tests/comfy_module_lists.py from a ComfyUI checkout; test_comfyui_real.py checks it is current).
CI has no ComfyUI, so each model is rebuilt here as a tree of Linears with the real names under a
class of the real name and bases."""
import json
import re
from pathlib import Path

import pytest
from torch import nn

from ditq.quant_core.models import FP, policy_for, select_layers

MODULES = json.loads((Path(__file__).parent / "fixtures" / "comfy_modules.json").read_text())

# Counted from the ComfyUI block structure (see comfy_module_lists.py for the sizes).
EXPECTED_ROLES = {
    "wan-t2v": {"self_attn": 8, "cross_attn": 8, "ffn": 4},  # 2 blocks
    "wan-i2v": {"self_attn": 8, "cross_attn": 12, "ffn": 4},  # + k_img, v_img
    "flux": {"joint_attn": 4 + 2, "ffn": 4 + 2},  # 1 double block (img+txt), 2 single blocks
    "sd3.5-mmdit": {"joint_attn": 4 + 1 + 2, "self_attn": 2, "ffn": 4 + 2},  # last context block pre-only
    "hunyuandit": {"self_attn": 8, "cross_attn": 12, "ffn": 8, "skip": 1},  # 4 blocks, skip in the last
}


def stand_in(family: str, extra: tuple[str, ...] = ()) -> nn.Module:
    """A module of the real class name and bases holding a Linear at every real Linear name."""
    mro = MODULES[family]["mro"]
    cls = nn.Module
    for name in reversed(mro[: mro.index("Module")]):
        cls = type(name, (cls,), {})
    model = cls()
    for name in (*MODULES[family]["linears"], *extra):
        parent = model
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(2, 2))
    return model


@pytest.mark.parametrize("family", list(EXPECTED_ROLES))
def test_comfy_policy_table_matches_module_list(family):
    model = stand_in(family)
    policy = policy_for(model)
    assert policy is not None and policy.name.startswith("comfy-"), family
    layers = select_layers(model)
    roles = {}
    for info in layers.values():
        roles[info.role] = roles.get(info.role, 0) + 1
    assert roles == EXPECTED_ROLES[family]
    linears = MODULES[family]["linears"]
    kept_in_blocks = [n for n in linears if "blocks." in n and n not in layers]
    assert all(policy.role(n) == FP for n in kept_in_blocks), kept_in_blocks  # modulation only (none in Wan)
    assert all("blocks." in n for n in layers)  # embedders, heads, final layers stay FP
    for pattern, _ in policy.rows:
        names = [n for f, m in MODULES.items() if policy_for(stand_in(f)) is policy for n in m["linears"]]
        assert any(re.fullmatch(pattern, n) for n in names), f"row {pattern!r} names no layer"


def test_flux_single_block_linears_are_quantized():
    layers = select_layers(stand_in("flux"))
    assert layers["single_blocks.1.linear2"].role == "ffn" and layers["single_blocks.1.linear1"].role == "joint_attn"
    assert "single_blocks.1.modulation.lin" not in layers and "final_layer.linear" not in layers


def test_subclass_with_new_block_linear_fails_loudly():
    # A Wan variant (e.g. a future VaceWanModel-like subclass) that adds a Linear inside a block:
    # it finds WanModel's table through its bases, and the unnamed Linear is an error, not FP.
    model = stand_in("wan-t2v", extra=("blocks.1.audio_proj",))
    Sub = type("WanModelWithAudio", (type(model),), {})
    model.__class__ = Sub
    assert policy_for(model).name == "comfy-wan"
    with pytest.raises(ValueError, match=r"blocks\.1\.audio_proj.*comfy-wan"):
        select_layers(model)
