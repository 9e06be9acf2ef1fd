"""Fitness functions for searches over quantized models: ``fitness(transformer) -> loss`` (lower is
better), measured against the full-precision model on fixed prompts/labels and seeds.

- :class:`OutputFidelity`: relative squared error of the transformer's outputs on model inputs
  captured from FP sampling at random timesteps (Q-DiT's calibration set is such (x_t, t, y) tuples);
  one forward per captured call, the cheap default.
- :class:`SampleFidelity`: relative squared error of the pipeline's final outputs (error accumulated
  over the whole trajectory); a full sampling run per evaluation.
- :class:`FIDFitness`: Fréchet distance between feature statistics of the quantized model's samples
  and a reference (the FP model's samples, or given statistics), with a pluggable feature extractor;
  Inception-v3 features when torch-fidelity and its weights file are installed
  (:func:`inception_features`). This is Q-DiT's fitness; the paper uses the ImageNet reference batch.
"""
from __future__ import annotations

import os
import random
from typing import Callable, Sequence

import torch
from torch import nn

from ..sampling import sample


def _clone(obj):
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


class _Captured(Exception):
    """Raised from the hook once the last wanted step is recorded: the rest of the run is skipped."""


def capture_model_inputs(pipe, conditions: Sequence, call: dict, *, seed: int = 0,
                         steps_per_run: int = 2) -> list[tuple[tuple, dict]]:
    """Record the transformer's call arguments at ``steps_per_run`` random denoising steps of an FP
    sampling run per condition (``call``: the pipeline's keyword arguments, with
    ``num_inference_steps``); seeded, so the same calls every time."""
    steps = call["num_inference_steps"]
    rng = random.Random(seed)
    calls: list[tuple[tuple, dict]] = []
    wanted: set[int] = set()
    step = [0]

    def hook(module, args, kwargs):
        if step[0] in wanted:
            calls.append((_clone(args), _clone(kwargs)))
        step[0] += 1
        if step[0] > max(wanted):
            raise _Captured

    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, condition in enumerate(conditions):
            wanted = set(rng.sample(range(steps), min(steps_per_run, steps)))
            step[0] = 0
            try:
                with torch.no_grad():
                    sample(pipe, condition, seed + i, call)
            except _Captured:
                pass
    finally:
        handle.remove()
    return calls


def _sample_tensor(out) -> torch.Tensor:
    out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
    return torch.as_tensor(out).double()


def relative_error(reference: Sequence[torch.Tensor], approx: Sequence[torch.Tensor]) -> float:
    """``sum ||a - r||^2 / sum ||r||^2`` over paired tensors (SQNR dB = -10 log10 of it)."""
    num = sum((a.double() - r.double()).pow(2).sum().item() for r, a in zip(reference, approx))
    den = sum(r.double().pow(2).sum().item() for r in reference)
    return num / max(den, 1e-300)


class OutputFidelity:
    """Loss = relative squared error of ``model(*call)`` against the FP model on captured calls."""

    def __init__(self, fp_model: nn.Module, calls: list[tuple[tuple, dict]]):
        if not calls:
            raise ValueError("OutputFidelity needs at least one captured model call")
        self.calls = calls
        self.reference = self._outputs(fp_model)

    def _outputs(self, model):
        with torch.no_grad():
            return [_sample_tensor(model(*args, **kwargs)) for args, kwargs in self.calls]

    def __call__(self, model: nn.Module) -> float:
        return relative_error(self.reference, self._outputs(model))


class _PipelineFitness:
    """Samples ``pipe`` (evaluation.sample: final latents and decoded images) with its transformer
    replaced by the model under test; one fixed seed per condition."""

    def __init__(self, pipe, conditions: Sequence, call: dict, *, seed: int = 0):
        self.pipe, self.conditions, self.call, self.seed = pipe, list(conditions), dict(call), seed
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    def samples(self, model: nn.Module | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        fp = self.pipe.transformer
        self.pipe.transformer = model if model is not None else fp
        try:
            with torch.no_grad():
                return [sample(self.pipe, c, self.seed + i, self.call) for i, c in enumerate(self.conditions)]
        finally:
            self.pipe.transformer = fp


class SampleFidelity(_PipelineFitness):
    """Loss = relative squared error of final latents against the FP pipeline's (same seeds)."""

    def __init__(self, pipe, conditions, call, **kwargs):
        super().__init__(pipe, conditions, call, **kwargs)
        self.reference = [lat for lat, _ in self.samples()]

    def __call__(self, model: nn.Module) -> float:
        return relative_error(self.reference, [lat for lat, _ in self.samples(model)])


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """``||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)`` in float64 (C PSD)."""
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    vals, vecs = torch.linalg.eigh(cov1)
    root1 = (vecs * vals.clamp_min(0).sqrt()) @ vecs.t()
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross).item()


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.double().reshape(features.shape[0], -1)
    return f.mean(0), torch.cov(f.t()).reshape(f.shape[1], f.shape[1])


class FIDFitness(_PipelineFitness):
    """Loss = FID between ``features(images)`` (images ``[N, 3, H, W]`` in [0, 1]) of the quantized
    model's samples and ``reference`` statistics ``(mu, cov)`` (default: the FP pipeline's samples
    with the same seeds)."""

    def __init__(self, pipe, conditions, call, features: Callable[[torch.Tensor], torch.Tensor], *,
                 reference: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs):
        super().__init__(pipe, conditions, call, **kwargs)
        self.features = features
        self.reference = reference if reference is not None else self._stats(None)

    def _stats(self, model):
        with torch.no_grad():
            images = torch.cat([img for _, img in self.samples(model)])
            return feature_stats(self.features(images))

    def __call__(self, model: nn.Module) -> float:
        return frechet_distance(*self._stats(model), *self.reference)


def inception_features(weights_path: str | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Inception-v3 pool features (torch-fidelity's FID network) from a local weights file
    (``weights_path`` or ``$DITQ_INCEPTION_WEIGHTS``); None when torch-fidelity or the file is absent."""
    path = weights_path or os.environ.get("DITQ_INCEPTION_WEIGHTS")
    if not path or not os.path.isfile(path):
        return None
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        return None
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path).eval()

    def features(images: torch.Tensor) -> torch.Tensor:
        return net((images.clamp(0, 1) * 255).round().to(torch.uint8))[0]

    return features
