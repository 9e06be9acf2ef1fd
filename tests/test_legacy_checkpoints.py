"""Checkpoints written by format versions 1 (main at d0b8c42, before the per-method layout) and 2
(main at 29f7476, the last whose symmetric int4 is [-7, 7] without saying so) still load and compute
what they computed then: tests/fixtures/make_legacy_v{1,2}.py wrote them with the outputs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPECTED = {v: load_file(str(FIXTURES / f"legacy_v{v}" / "expected.safetensors")) for v in (1, 2)}
CASES = [(v, k.removeprefix("output.")) for v, e in EXPECTED.items() for k in sorted(e) if k.startswith("output.")]


@pytest.mark.parametrize("version, count", [(1, 8), (2, 2)])
def test_every_fixture_has_an_expected_output(version, count):
    presets = sorted(p for v, p in CASES if v == version)
    assert presets == sorted(p.name for p in (FIXTURES / f"legacy_v{version}").iterdir() if p.is_dir())
    assert len(presets) == count


@pytest.mark.parametrize("version, preset", CASES)
def test_old_checkpoint_reproduces_its_output(version, preset, monkeypatch):
    from ditq import load_quantized
    from ditq.quant_core.layers import QuantLinear

    monkeypatch.setenv("DITQ_KERNELS", "torch")
    model = load_quantized(FIXTURES / f"legacy_v{version}" / preset)
    assert not any(m.scheme.weight_full_range for m in model.modules() if isinstance(m, QuantLinear))
    inputs = {k.removeprefix("input."): v for k, v in EXPECTED[version].items() if k.startswith("input.")}
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    expected = EXPECTED[version][f"output.{preset}"]
    # Same ops on the same CPU: equal up to the summation order of a different thread count.
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
