"""Adapter that runs the vendored upstream diffusers tests (vendor/diffusers_tests, a pinned copy;
see README.md) offline on the CPU against ditq-quantized transformers.

The vendored files are imported as the package ``diffusers_tests`` (upstream's ``tests/``) and are
never collected themselves: the test modules here subclass their classes. What upstream fetches
from the Hub or imports from files not vendored is supplied here, without editing the copies:

* ``hf-internal-testing/tiny-random-t5``: an offline T5 encoder config (d_model 32, what the
  PixArt fast tests' ``caption_channels=32`` needs) and a byte-level tokenizer;
* the IP-adapter / Flux helper modules that ``test_pipelines_common`` imports but PixArt never uses:
  stubs that fail loudly if called;
* the quantization test classes are marked ``require_accelerator`` upstream (the backends they
  were written for need a GPU); ditq runs on the CPU, so they are imported with that decorator
  neutralised (``torch_device`` is "cpu"). Pipeline tests keep it.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

collect_ignore = ["vendor"]

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE / "vendor"), str(HERE)]  # diffusers_tests and upstream_adapter


def _not_vendored(name: str):
    def stub(*args, **kwargs):
        raise NotImplementedError(f"{name} lives in an upstream test module that is not vendored (unused by PixArt)")

    return stub


for _module, _names in {
    "diffusers_tests.models.transformers": (),
    "diffusers_tests.models.transformers.test_models_transformer_flux": ("create_flux_ip_adapter_state_dict",),
    "diffusers_tests.models.unets": (),
    "diffusers_tests.models.unets.test_models_unet_2d_condition": ("create_ip_adapter_faceid_state_dict",
                                                                   "create_ip_adapter_state_dict"),
}.items():
    _stub = types.ModuleType(_module)
    _stub.__path__ = []  # a package, so its stub children import
    for _name in _names:
        setattr(_stub, _name, _not_vendored(_name))
    sys.modules.setdefault(_module, _stub)


def _import_quantization_tests_without_accelerator_marks() -> None:
    import diffusers_tests.testing_utils as upstream_utils

    require_accelerator = upstream_utils.require_accelerator
    upstream_utils.require_accelerator = lambda test: test
    try:
        import diffusers_tests.models.testing_utils.quantization  # noqa: F401  (decorated now, once)
    finally:
        upstream_utils.require_accelerator = require_accelerator


_import_quantization_tests_without_accelerator_marks()
