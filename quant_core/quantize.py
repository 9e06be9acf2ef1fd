"""``quantize(model, config, calibration)``: run a method pass in place and report per layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import STATISTICS, CalibrationData
from .config import QuantConfig
from .layers import QuantModule
from .metrics import sqnr
from .methods import get_method
from .models import LayerInfo, select_layers, set_submodule
from .progress import ProgressHook, reporting, report
from .serialization import mark_quantized


@dataclass
class LayerReport:
    name: str
    role: str
    format: str
    fp16_bytes: int
    quant_bytes: int
    weight_sqnr_db: float


@dataclass
class QuantReport:
    """Per-layer results of a quantize() call; bytes count the weight matrix only (packed values,
    scales, zero points, codebooks) against the same weight in fp16."""

    method: str
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def fp16_bytes(self) -> int:
        return sum(r.fp16_bytes for r in self.layers)

    @property
    def quant_bytes(self) -> int:
        return sum(r.quant_bytes for r in self.layers)

    @property
    def ratio(self) -> float:
        return self.quant_bytes / self.fp16_bytes

    @property
    def mean_sqnr_db(self) -> float:
        return sum(r.weight_sqnr_db for r in self.layers) / len(self.layers)

    def __str__(self) -> str:
        width = max(len(r.name) for r in self.layers)
        lines = [f"{'layer':<{width}}  {'role':<10} {'format':<24} {'fp16 B':>10} {'quant B':>10} {'SQNR dB':>8}"]
        for r in self.layers:
            lines.append(f"{r.name:<{width}}  {r.role:<10} {r.format:<24} {r.fp16_bytes:>10} "
                         f"{r.quant_bytes:>10} {r.weight_sqnr_db:>8.2f}")
        lines.append(f"{len(self.layers)} layers, {self.method}: {self.quant_bytes} / {self.fp16_bytes} bytes "
                     f"= {self.ratio:.3f}x fp16, mean weight SQNR {self.mean_sqnr_db:.2f} dB")
        return "\n".join(lines)


class QuantizationContext:
    """What a method pass sees: the model, the chosen layers, the recipe, the statistics, and the
    one way to install a quantized layer (``replace``), which also fills the report."""

    def __init__(self, model: nn.Module, layers: dict[str, LayerInfo], config: QuantConfig,
                 calibration: CalibrationData | None, progress: bool, on_layer=None):
        self.model, self.layers, self.config, self.calibration = model, layers, config, calibration
        self.progress, self.on_layer = progress, on_layer
        self.report = QuantReport(config.method)
        self.method_state: dict = {}

    def linear(self, name: str) -> nn.Linear:
        return self.model.get_submodule(name)

    def iter_layers(self, desc: str):
        from tqdm.auto import tqdm

        items = list(self.layers.items())
        for i, item in enumerate(tqdm(items, desc=desc, disable=not self.progress, leave=False)):
            report(desc, i, len(items))
            yield item
            if self.on_layer is not None:  # GUIs: progress and a chance to interrupt between layers
                self.on_layer(i + 1, len(items), item[0])

    def replace(self, name: str, module: QuantModule) -> None:
        original = self.linear(name).weight.detach()
        module.layer_name = name
        with torch.no_grad():
            err = sqnr(original, module.effective_weight())
        self.report.layers.append(LayerReport(
            name, self.layers[name].role, module.format_name(), original.numel() * 2, module.weight_nbytes(), err))
        set_submodule(self.model, name, module)


# Where nn.Module keeps forward hooks: methods and quantized layer types install some on the root.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def quantize(model: nn.Module, config: QuantConfig, calibration: CalibrationData | None = None, *,
             progress: bool = True, on_layer=None, on_progress: ProgressHook | None = None) -> QuantReport:
    """Quantize ``model``'s layers in place per ``config``; returns the per-layer report.

    >>> calib = calibrate(pipe, prompts)
    >>> report = quantize(pipe.transformer, QuantConfig.preset("rtn-w8a8"), calib)
    >>> print(report)

    ``on_layer(done, total, name)`` is called after each layer of each pass; ``on_progress(stage, done,
    total)`` also from inside long loops (GPTQ columns, k-means iterations, optimisation steps), so a
    GUI can show progress and stop the work by raising from either. All or nothing: if the method
    fails or is interrupted, every replaced layer and the model's hooks are put back, so ``model`` is
    as it was and can be quantized again (resumable methods keep their work files).
    """
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already quantized; quantize a fresh full-precision model")
    method = get_method(config.method)
    needs = method.needs(config)
    lacking = list(needs) if calibration is None else calibration.missing(needs, config.method)
    if lacking:
        raise ValueError(f"method {config.method!r} ({config.name or 'custom config'}) needs calibration "
                         f"{lacking}{'' if calibration is None else ', which this calibration lacks'}: run "
                         f"calib = ditq.calibrate(pipe, prompts, config=cfg) with this config first")
    ctx = QuantizationContext(model, select_layers(model, config), config, calibration, progress, on_layer)
    if calibration is not None and any(n in STATISTICS for n in needs):  # per-layer statistics
        missing = [n for n in ctx.layers if n not in calibration.stats]
        if missing:
            raise ValueError(f"calibration has no statistics for layer(s) {missing[:3]}: it was recorded "
                             f"on a different model or layer selection")
    originals = {name: model.get_submodule(name) for name in ctx.layers}
    hooks = {attr: dict(getattr(model, attr)) for attr in _HOOK_DICTS}
    try:
        with torch.no_grad(), reporting(on_progress):
            method.apply(ctx)
    except BaseException:
        for name, module in originals.items():
            set_submodule(model, name, module)
        for attr, saved in hooks.items():
            getattr(model, attr).clear()
            getattr(model, attr).update(saved)
        raise
    mark_quantized(model, {"method": config.method, "recipe": _recipe(config), "method_state": ctx.method_state})
    return ctx.report


# Options that say where work files go on this machine, not how the model was quantized: kept out of
# the recipe a saved model carries (and shares).
LOCAL_OPTIONS = ("state_path", "work_dir")


def _recipe(config: QuantConfig) -> dict:
    recipe = config.to_dict()
    recipe["options"] = {k: v for k, v in recipe.get("options", {}).items() if k not in LOCAL_OPTIONS}
    return recipe
