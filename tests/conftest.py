"""Shared fixtures: the built-in models, built once per session. Tests that change a model take a
deep copy (``fresh``) so the session copies stay full precision."""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def builtin():
    from ditq.evaluation import builtin

    return builtin


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipe(builtin):
    return _quiet(builtin.tiny_pixart_pipeline())


@pytest.fixture(scope="session")
def fp_dir(tiny_pipe, tmp_path_factory):
    """The tiny PixArt-α pipeline saved by stock diffusers: a full-precision repo folder."""
    path = tmp_path_factory.mktemp("fp") / "tiny-pixart"
    tiny_pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def stress_pipe(builtin):
    return _quiet(builtin.stress_pixart_pipeline())


@pytest.fixture(scope="session")
def dit_pipe(builtin):
    return _quiet(builtin.tiny_dit_pipeline())


@pytest.fixture(scope="session")
def calib_kwargs(builtin):
    """Keyword arguments for calibrate() on the tiny PixArt (fewer steps than sampling, for speed)."""
    kw = {k: v for k, v in builtin.PIXART_CALL.items() if k != "num_inference_steps"}
    return dict(num_inference_steps=6, progress=False, **kw)


@pytest.fixture(scope="session")
def tiny_calib(tiny_pipe, calib_kwargs):
    from ditq import calibrate

    return calibrate(tiny_pipe, ["a red fox in snow", "a city at night"], needs=("act_absmax", "act_samples"),
                     **calib_kwargs)


@pytest.fixture
def fresh():
    """``fresh(pipe)``: a deep copy to quantize without touching the session fixture."""
    return copy.deepcopy


def generate(pipe, prompt="a red fox in snow", seed=0, output_type="pt", steps=6):
    """Run the tiny PixArt pipeline deterministically (shared by tests via ``from conftest import``
    is not possible under importlib mode, so tests use the ``run_pipe`` fixture)."""
    from ditq.evaluation.builtin import PIXART_CALL

    kw = dict(PIXART_CALL, num_inference_steps=steps)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type=output_type, **kw).images


@pytest.fixture(scope="session")
def run_pipe():
    return generate
