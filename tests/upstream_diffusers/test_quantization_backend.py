"""diffusers' quantization-backend test base class (``QuantizationTesterMixin`` and
``QuantizationCompileTesterMixin``, vendored and pinned), run for the "ditq" backend the way
upstream runs it for torchao, quanto, bitsandbytes and GGUF: a backend mixin says how to quantize
a model on load and how to recognise a quantized layer; the tests call upstream's ``_test_*``
helpers. Upstream marks these classes accelerator-only; conftest.py imports them without that mark,
so they run here on the CPU (``torch_device`` is "cpu")."""
from __future__ import annotations

import os

import pytest
import torch
import upstream_adapter as adapter
from diffusers import PixArtTransformer2DModel
from diffusers_tests.models.testing_utils.quantization import QuantizationCompileTesterMixin, QuantizationTesterMixin
from diffusers_tests.testing_utils import torch_device

# Every Linear quantized (the base class expects it of a backend); presets as they ship elsewhere.
EVERY_LINEAR = {"overrides": {"include": [".*"]}}
CONFIGS = {"w8a8": {"preset": "rtn-w8a8-dynamic", **EVERY_LINEAR},
           "w4a16": {"preset": "rtn-w4a16", **EVERY_LINEAR}}
# The upstream check counts quantized layers among the nn.Linear modules; QuantLinear is
# deliberately not one (PEFT's default LoRA layer would merge into its packed integers).
NOT_A_LINEAR = "counts quantized layers among nn.Linear modules; ditq's QuantLinear is deliberately not one"
MEMORY_REDUCTION = {"w8a8": 3.0, "w4a16": 5.0}  # fp32 model: int8 weights ~4x, packed int4 ~8x, less the rest


@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory):
    return adapter.save_tiny_transformer(tmp_path_factory.mktemp("upstream") / "tiny-pixart-transformer")


class DitqConfigMixin:
    """How the ditq backend quantizes a model on load and recognises a quantized layer."""

    model_class = PixArtTransformer2DModel

    @pytest.fixture(autouse=True)
    def _folder(self, fp_folder):
        self.pretrained_model_name_or_path = fp_folder

    def get_dummy_inputs(self):
        return adapter.tiny_transformer_inputs()

    def _create_quantized_model(self, config_kwargs, **extra_kwargs):
        from ditq.pipelines.quantizer import DitqConfig

        kwargs = {"quantization_config": DitqConfig(**config_kwargs), "device_map": str(torch_device), **extra_kwargs}
        return self.model_class.from_pretrained(self.pretrained_model_name_or_path, **kwargs)

    def _verify_if_layer_quantized(self, name, module, config_kwargs):
        from ditq import QuantLinear

        assert isinstance(module, QuantLinear), f"Layer {name} is {type(module).__name__}, expected QuantLinear"
        assert not module.weight.is_floating_point(), f"Layer {name} holds a floating-point weight"


class TestDitqQuantization(DitqConfigMixin, QuantizationTesterMixin):
    sharded_serialization_config = CONFIGS["w8a8"]

    @pytest.mark.parametrize("config", CONFIGS)
    def test_ditq_num_parameters(self, config):
        self._test_quantization_num_parameters(CONFIGS[config])

    @pytest.mark.parametrize("config", CONFIGS)
    def test_ditq_memory_footprint(self, config):
        self._test_quantization_memory_footprint(CONFIGS[config], MEMORY_REDUCTION[config])

    @pytest.mark.parametrize("config", CONFIGS)
    def test_ditq_inference(self, config):
        self._test_quantization_inference(CONFIGS[config])

    def test_ditq_dtype_assignment(self):
        self._test_quantization_dtype_assignment(CONFIGS["w8a8"])

    def test_ditq_lora_inference(self):
        self._test_quantization_lora_inference(CONFIGS["w8a8"])

    @pytest.mark.parametrize("config", CONFIGS)
    def test_ditq_serialization(self, config, tmp_path):
        self._test_quantization_serialization(CONFIGS[config], tmp_path)

    def test_ditq_config_serialization(self):
        self._test_quantization_config_serialization(CONFIGS["w8a8"])

    def test_ditq_original_dtype(self):
        self._test_original_dtype(CONFIGS["w8a8"])

    @pytest.mark.skip(reason=NOT_A_LINEAR)
    def test_ditq_quantized_layers(self):
        self._test_quantized_layers(CONFIGS["w8a8"])

    def test_ditq_keep_modules_in_fp32(self, monkeypatch):
        # PixArt declares no _keep_in_fp32_modules: declare one, as upstream's GGUF test does, and
        # load in bf16 so keeping float32 is not the default
        monkeypatch.setattr(self.model_class, "_keep_in_fp32_modules", ["proj_out"])
        create = self._create_quantized_model
        monkeypatch.setattr(self, "_create_quantized_model",
                            lambda cfg, **kw: create(cfg, torch_dtype=torch.bfloat16, **kw))
        self._test_keep_modules_in_fp32(CONFIGS["w8a8"])

    @pytest.mark.skip(reason=NOT_A_LINEAR)  # exclusion is tested in tests/test_diffusers_backend.py
    def test_ditq_modules_to_not_convert(self):
        self._test_quantization_modules_to_not_convert(CONFIGS["w8a8"], ["transformer_blocks.0", "proj_out"])

    def test_ditq_device_map(self):
        self._test_quantization_device_map(CONFIGS["w8a8"])

    def test_ditq_cpu_device_map(self):
        self._test_quantization_cpu_device_map(CONFIGS["w8a8"])

    @pytest.mark.parametrize("config", CONFIGS)
    def test_ditq_dequantize(self, config):
        self._test_dequantize(CONFIGS[config])

    def test_ditq_training(self):
        self._test_quantization_training(CONFIGS["w4a16"])


class TestDitqCompile(DitqConfigMixin, QuantizationCompileTesterMixin):
    # inductor compiles on the CPU for minutes on 2 cores: outside CI, with DITQ_UPSTREAM_FULL=1
    # (tests/test_diffusers_pipeline.py compiles fullgraph with the eager backend in CI)
    __test__ = os.environ.get("DITQ_UPSTREAM_FULL") == "1"

    def test_ditq_torch_compile(self):
        self._test_torch_compile(CONFIGS["w8a8"])

    def test_ditq_torch_compile_with_group_offload(self):
        self._test_torch_compile_with_group_offload(CONFIGS["w8a8"])
