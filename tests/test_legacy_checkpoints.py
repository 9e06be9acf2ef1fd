"""Checkpoints written by format version 1 (main at d0b8c42, before the per-method layout) still load
and compute what they computed then: tests/fixtures/make_legacy_v1.py wrote them with the outputs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy_v1"
EXPECTED = load_file(str(FIXTURES / "expected.safetensors"))
PRESETS = sorted(k.removeprefix("output.") for k in EXPECTED if k.startswith("output."))


def test_every_fixture_has_an_expected_output():
    assert PRESETS == sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
    assert len(PRESETS) == 8


@pytest.mark.parametrize("preset", PRESETS)
def test_version_1_checkpoint_reproduces_its_output(preset, monkeypatch):
    from ditq import load_quantized

    monkeypatch.setenv("DITQ_KERNELS", "torch")
    model = load_quantized(FIXTURES / preset)
    inputs = {k.removeprefix("input."): v for k, v in EXPECTED.items() if k.startswith("input.")}
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    expected = EXPECTED[f"output.{preset}"]
    # Same ops on the same CPU: equal up to the summation order of a different thread count.
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
