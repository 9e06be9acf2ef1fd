"""Q-DiT (Chen et al., CVPR 2025; methods.md §3): group quantization along input channels with a
group size per layer, dynamic per-token x group activations, GPTQ weights.

- Weights and activations of a Linear share its group size ``g`` (one scale per (row, group) on both
  sides), so the integer GEMM accumulates each group exactly (kernels ``int_gemm``).
- Weights: min-max RTN, MSE-clipped RTN, or GPTQ (default, 1 % damping, block 128) with scales
  refreshed every ``g`` columns of each layer's own ``g``; on calibration inputs sampled across
  timesteps (calibration statistic ``act_samples``). Symmetric or asymmetric (``weight_symmetric``;
  the presets use asymmetric weights like the released final runs). Activations are symmetric: the
  kernels' activation op has no zero point.
- Group sizes: uniform ``group_size`` unless ``options["group_sizes"]`` (layer -> g) holds a genome,
  usually found by :func:`search_group_sizes` (evolutionary search under a mean-group-size budget).
  The genome is stored in the checkpoint (``method_state``) and in each layer's scheme.

Options: ``weight_quantizer`` ("gptq" | "minmax" | "mse"), ``gptq_damp``, ``gptq_block_size``,
``group_sizes``, ``group_budget`` (default 128), ``candidates`` (search space before the divisibility
filter, default the paper's {32, 64, 128, 192, 288} plus 256), ``search`` (summary of the search run).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed as dist
from ... import quantizers as qz
from ...config import LayerScheme, QuantConfig, check_options, register_preset
from ...passes.gptq import gptq_weights
from ...layers import QuantLinear
from ...models import LayerInfo, select_layers, set_submodule
from ...quantizers import mse_clip_scale
from ...serialization import layers_sha256
from ...passes.evolution import EvolutionSettings, SearchResult, evolutionary_search
from .. import register_method

WEIGHT_QUANTIZERS = ("gptq", "minmax", "mse")
DEFAULT_CANDIDATES = (32, 64, 128, 192, 256, 288)
OPTIONS = {"weight_quantizer": "gptq", "gptq_damp": 0.01, "gptq_block_size": 128, "group_sizes": None,
           "group_budget": 128, "candidates": DEFAULT_CANDIDATES, "search": None}


def options(config: QuantConfig) -> dict:
    check_options(config, OPTIONS)
    opts = {**OPTIONS, **config.options}
    if opts["weight_quantizer"] not in WEIGHT_QUANTIZERS:
        raise ValueError(f"q-dit: weight_quantizer {opts['weight_quantizer']!r}; expected one of {WEIGHT_QUANTIZERS}")
    return opts


def candidates_for(in_features: int, candidates: Sequence[int]) -> list[int]:
    """The search space of one layer: the candidates that divide its input width."""
    return sorted(g for g in set(candidates) if 0 < g <= in_features and in_features % g == 0)


def layer_scheme(config: QuantConfig, info: LayerInfo, group_size: int) -> LayerScheme:
    """The config's scheme for ``info`` made group-wise with ``group_size`` on both sides."""
    base = config.scheme_for(info.name, info.in_features)
    if base.act_mode not in (None, "dynamic_token", "dynamic_token_group") or base.weight_format != "int":
        raise ValueError(f"q-dit: layer {info.name!r} asks for {base.name}; Q-DiT uses integer group-wise "
                         f"weights with dynamic per-token x group activations (or none)")
    act = None if base.act_mode is None else "dynamic_token_group"
    return dataclasses.replace(base, weight_granularity="group", group_size=group_size,
                               act_mode=act).validate(info.name, info.in_features)


def genome_for(layers: dict[str, LayerInfo], config: QuantConfig) -> dict[str, int]:
    """Group size per layer: ``options["group_sizes"]`` where given, else the uniform ``group_size``."""
    given = options(config)["group_sizes"] or {}
    stray = set(given) - set(layers)
    if stray:
        raise ValueError(f"q-dit: group_sizes names layer(s) not being quantized: {sorted(stray)[:3]}")
    if not config.group_size and set(given) != set(layers):
        raise ValueError("q-dit: set group_size (the uniform default) or give group_sizes for every layer")
    return {name: int(given.get(name, config.group_size)) for name in layers}


def check_budget(genome: dict[str, int], budget: float | None) -> None:
    mean = sum(genome.values()) / len(genome)
    if budget is not None and mean < budget:
        raise ValueError(f"q-dit: mean group size {mean:.1f} is below the budget group_budget={budget}")


@register_method("q-dit")
class QDiT:
    def needs(self, config: QuantConfig) -> tuple[str, ...]:
        return ("act_samples",) if options(config)["weight_quantizer"] == "gptq" else ()

    def apply(self, ctx) -> None:
        opts = options(ctx.config)
        genome = genome_for(ctx.layers, ctx.config)
        check_budget(genome, opts["group_budget"])
        schemes = {name: layer_scheme(ctx.config, info, genome[name]) for name, info in ctx.layers.items()}

        def weights(name: str):
            """(q, scale, zero) of one layer: under torch.distributed each layer is computed on one rank."""
            linear, scheme = ctx.linear(name), schemes[name]
            if opts["weight_quantizer"] == "gptq":
                return gptq_weights(linear, scheme, ctx.calibration.get(name, "act_samples"), name=name,
                                    damp=opts["gptq_damp"], block_size=opts["gptq_block_size"])
            w = linear.weight.detach().float()
            if opts["weight_quantizer"] == "mse":
                full = scheme.weight_full_range
                scale, zero = mse_clip_scale(w, scheme.weight_bits, symmetric=scheme.weight_symmetric,
                                             groups=w.shape[1] // genome[name], full_range=full)
                return qz.quantize(w, scale, zero, scheme.weight_bits, scheme.weight_symmetric, full), scale, zero
            return qz.quantize_weight(w, scheme.weight_bits, symmetric=scheme.weight_symmetric,
                                      group_size=scheme.group_size, full_range=scheme.weight_full_range,
                                      name=f"{name}.weight")

        def cost(name: str) -> int:  # GPTQ walks K columns of N rows and factors a K x K Hessian
            return ctx.layers[name].in_features * (ctx.layers[name].in_features + ctx.layers[name].out_features)

        computed = dist.map_balanced(weights, list(ctx.layers), cost=cost)
        for (name, _), (_, (q, scale, zero)) in zip(ctx.iter_layers("q-dit"), computed):
            linear = ctx.linear(name)
            q, scale, zero = (None if t is None else t.to(linear.weight.device) for t in (q, scale, zero))
            ctx.replace(name, QuantLinear.from_quantized(linear, schemes[name], q, scale, zero, name=name))
        ctx.method_state.update(genome=genome, group_budget=opts["group_budget"],
                                mean_group_size=sum(genome.values()) / len(genome),
                                weight_quantizer=opts["weight_quantizer"], search=opts["search"])


class SimulatedGroupLinear(nn.Module):
    """Search-time stand-in (fake quantization, analysis only): the RTN group-quantized weight and
    per-token x group activation quantization, simulated in float32 (the integer path gives the
    same values up to float rounding, at a fraction of the CPU time)."""

    def __init__(self, linear: nn.Linear, scheme: LayerScheme):
        super().__init__()
        self.scheme = scheme
        self.weight = qz.fake_quantize(linear.weight.detach().float(), scheme.weight_bits,
                                       symmetric=scheme.weight_symmetric, group_size=scheme.group_size,
                                       full_range=scheme.weight_full_range)
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        if self.scheme.act_mode is not None:
            q, scale = qz.quantize_per_token(x2, self.scheme.act_bits, group_size=self.scheme.group_size)
            x2 = qz.dequantize(q, scale)
        return F.linear(x2, self.weight, self.bias).to(x.dtype).reshape(*x.shape[:-1], -1)


def default_fitness(pipe, conditions: Sequence, call: dict, *, seed: int = 0,
                    steps_per_run: int = 2) -> Callable[[nn.Module], float]:
    """FID against the FP model's samples when Inception weights are installed
    (:func:`fitness.inception_features`), otherwise output fidelity to the FP transformer on
    inputs captured at random timesteps of FP sampling over ``conditions``."""
    from ...passes.fitness import FIDFitness, OutputFidelity, capture_model_inputs, inception_features

    features = inception_features()
    if features is not None:
        return FIDFitness(pipe, conditions, call, features, seed=seed)
    calls = capture_model_inputs(pipe, conditions, call, seed=seed, steps_per_run=steps_per_run)
    return OutputFidelity(pipe.transformer, calls)


def search_group_sizes(pipe, config: QuantConfig, conditions: Sequence, *, num_inference_steps: int = 10,
                       settings: EvolutionSettings | None = None,
                       fitness: Callable[[nn.Module], float] | None = None, seed: int = 0, state_path=None,
                       progress: bool = True, **pipe_kwargs) -> tuple[QuantConfig, SearchResult]:
    """Evolutionary search of per-layer group sizes (methods.md §3.2c) for ``pipe.transformer``.

    One gene per quantized Linear, its candidates the ``candidates`` option dividing the layer's
    input width; genomes must keep the mean group size >= ``group_budget``; the first population is
    seeded with the uniform ``group_size`` genome. Each genome is scored by ``fitness(transformer)``
    (default :func:`default_fitness` on ``conditions``, prompts or class labels) with search-time
    RTN layers (:class:`SimulatedGroupLinear`), as the released search does. Returns the config with
    the best genome in ``options["group_sizes"]`` (pass it to ``quantize``) and the search result.

    >>> cfg, result = search_group_sizes(pipe, QuantConfig.preset("q-dit-w4a8"), [0, 1, 2, 3],
    ...                                  settings=SMALL_SEARCH, guidance_scale=4.0)
    >>> report = quantize(pipe.transformer, cfg, calibrate(pipe, [0, 1, 2, 3], needs=("act_samples",)))
    """
    opts = options(config)
    model = pipe.transformer
    layers = select_layers(model, config)
    names = list(layers)
    choices = [candidates_for(info.in_features, opts["candidates"]) for info in layers.values()]
    for name, cs in zip(names, choices):
        if not cs:
            raise ValueError(f"q-dit search: no candidate group size divides the input width of {name!r} "
                             f"({layers[name].in_features}); candidates {list(opts['candidates'])}")
    budget = opts["group_budget"]
    seeds = [[config.group_size] * len(names)] if config.group_size else []
    default = fitness is None
    if default:
        fitness = default_fitness(pipe, conditions, dict(pipe_kwargs, num_inference_steps=num_inference_steps),
                                  seed=seed)
    originals = {name: model.get_submodule(name) for name in names}
    simulated: dict[tuple[str, int], SimulatedGroupLinear] = {}

    def evaluate(genome: tuple[int, ...]) -> float:
        for name, g in zip(names, genome):
            if (name, g) not in simulated:
                simulated[name, g] = SimulatedGroupLinear(originals[name], layer_scheme(config, layers[name], g))
            set_submodule(model, name, simulated[name, g])
        try:
            with torch.no_grad():
                return fitness(model)
        finally:
            for name in names:
                set_submodule(model, name, originals[name])

    # what the scores depend on, so a saved search is resumed only for the same (no memory addresses:
    # objects count by their type); hashed only when there is a state to resume
    plain = (int, float, str, bool, type(None))
    context = None if state_path is None else {
        "weights_sha256": layers_sha256(model, names), "conditions": [str(c) for c in conditions],
        "pipe_kwargs": {k: v if isinstance(v, plain) else type(v).__qualname__ for k, v in pipe_kwargs.items()},
        "steps": num_inference_steps, "seed": seed,
        "fitness": "default" if default else getattr(fitness, "__qualname__", type(fitness).__qualname__)}
    result = evolutionary_search(choices, evaluate, constraint=lambda g: sum(g) / len(g) >= budget,
                                 seeds=seeds, settings=settings, state_path=state_path, progress=progress,
                                 context=context)
    summary = {"loss": result.best_loss, "generations": result.generations, "evaluations": result.evaluations,
               "finished": result.finished, "history": result.history}
    searched = dataclasses.replace(config, options={**config.options, "group_sizes": dict(zip(names, result.best)),
                                                    "search": summary})
    return searched, result


# A search setting that finishes in a few minutes on a CPU for the built-in models (docs/q-dit.md).
SMALL_SEARCH = EvolutionSettings(population=12, top_k=4, mutations=4, crossovers=4, generations=4)


def _preset(bits: int) -> Callable[[], QuantConfig]:
    return lambda: QuantConfig(method="q-dit", weight_bits=bits, act_bits=8, weight_granularity="group",
                               group_size=128, weight_symmetric=False, act_mode="dynamic_token_group",
                               options={"weight_quantizer": "gptq"})


register_preset("q-dit-w4a8", _preset(4))
register_preset("q-dit-w6a8", _preset(6))
