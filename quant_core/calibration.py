"""Calibration: run the full-precision model once and record per-layer, per-timestep statistics.

Memory is bounded by statistics, not activations: each hook folds the layer input into a running
statistic and drops it. Statistics are pluggable (``STATISTICS``); a method names the ones it needs.
The recorder is driver-agnostic: ``calibrate`` drives a diffusers pipeline, the ComfyUI node drives
ComfyUI's sampler, and both produce the same :class:`CalibrationData`.
"""
from __future__ import annotations

import inspect
import json
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from . import distributed as dist
from .sampling import takes_prompts
from .methods import calibration_needs, get_method
from .progress import ProgressHook, report, reporting
from .models import select_layers

FORMAT_VERSION = 1


class Statistic:
    """Folds layer inputs ``[rows, K]`` seen at denoising step ``step`` into a bounded summary."""

    def update(self, step: int, x: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> torch.Tensor:
        raise NotImplementedError

    def start_run(self, run: int) -> None:
        """A new sampling run ``run`` (its index among all runs of the calibration) begins."""

    def merge_ranks(self) -> None:
        """Replace this rank's summary by the summary of all ranks' inputs (torch.distributed)."""
        raise NotImplementedError(f"calibration statistic {type(self).__name__} has no cross-rank merge")


class ChannelAbsMax(Statistic):
    """Per-step, per-input-channel max |x| over all tokens and batch rows: ``[steps, K]``."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []

    def update(self, step, x):
        amax = x.detach().abs().amax(dim=0).float().cpu()
        while len(self.rows) <= step:
            self.rows.append(torch.zeros_like(amax))
        self.rows[step] = torch.maximum(self.rows[step], amax)

    def result(self):
        return torch.stack(self.rows)

    def merge_ranks(self):  # a rank that ran no prompt contributes zeros, neutral for a max of |x|
        shapes = [s for s in dist.gather_objects(self.result().shape if self.rows else None) if s is not None]
        if not shapes:  # the layer never ran on any rank
            return
        mine = torch.zeros(max(s[0] for s in shapes), shapes[0][1])
        if self.rows:
            mine[:len(self.rows)] = self.result()
        self.rows = list(dist.all_reduce(mine, "max"))


class RowSample(Statistic):
    """A uniform random sample of at most ``limit`` input rows over all steps, for methods that need
    real inputs (GPTQ's Hessian, search fitness): ``[<=limit, K]``. Each row draws a random key and
    the rows with the largest keys are kept, which is uniform sampling without replacement. The keys
    of a run depend only on (seed, run index), so runs split across ranks draw the keys one process
    would, and the largest keys of the union of the ranks' samples are the single-process sample."""

    def __init__(self, limit: int = 256, seed: int = 0):
        self.limit, self.seed = limit, seed
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: torch.Tensor | None = None
        self.keys = torch.empty(0, dtype=torch.float64)

    def start_run(self, run):
        self.gen.manual_seed(self.seed * 1_000_003 + run)

    def update(self, step, x):
        keys = torch.rand(x.shape[0], generator=self.gen, dtype=torch.float64)
        if x.shape[0] > self.limit:  # only the new rows with the largest keys can survive: copy just those
            keys, top = keys.topk(self.limit)
            x = x[top.to(x.device)]
        self._keep(keys, x.detach().float().cpu())

    def _keep(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        keep = keys.topk(min(self.limit, keys.numel())).indices  # sorted by key: the same order on any split
        self.rows, self.keys = rows[keep], keys[keep]

    def result(self):
        return self.rows

    def merge_ranks(self):
        parts = [p for p in dist.gather_objects(None if self.rows is None else (self.keys, self.rows))
                 if p is not None]
        self.rows, self.keys = None, torch.empty(0, dtype=torch.float64)
        self._keep(torch.cat([k for k, _ in parts]), torch.cat([r for _, r in parts]))


STATISTICS: dict[str, Callable[[], Statistic]] = {"act_absmax": ChannelAbsMax, "act_samples": RowSample}

# Model-level record: the inputs of every model call (the FP teacher's trajectory), not a per-layer statistic.
MODEL_INPUTS = "model_inputs"
# Not a recording: the method searches its configuration on the pipeline (Method.search) and calibrate
# stores the result in ``meta["search"]``, where the method's pass reads it.
SEARCH = "search"


class ModelInputs:
    """Every call's inputs to the model: ``x_t``, timestep and conditioning, exactly as the sampler
    passed them (CFG halves included), for methods that replay the full-precision trajectory
    (VQ4DiT's zero-data calibration feeds the teacher's ``x_t`` to the student at every step).

    A call is a dict of argument name -> tensor name (or ``{"value": v}`` for JSON values and lists of
    them; nested dicts such as ``added_cond_kwargs`` and tuples or lists holding tensors, such as
    HunyuanDiT's rotary ``(cos, sin)``, keep their structure; ``**kwargs`` are recorded as
    the keywords they are). A tensor equal to the one the previous call passed under the same name is
    stored once, so prompt embeddings cost one copy per run, not per step. Arguments named in ``skip``
    are not recorded (a driver's per-call bookkeeping, e.g. ComfyUI's ``transformer_options``).
    """

    def __init__(self, signature: inspect.Signature | None = None, skip: Sequence[str] = ()):
        self.signature, self.skip = signature, frozenset(skip)
        self.tensors: dict[str, torch.Tensor] = {}
        self.calls: list[dict] = []
        self._last: dict[str, str] = {}

    def _encode(self, key: str, value):
        if torch.is_tensor(value):
            value = value.detach().cpu()
            last = self._last.get(key)
            prev = self.tensors.get(last) if last else None
            if prev is None or prev.shape != value.shape or prev.dtype != value.dtype or not torch.equal(prev, value):
                last = f"t{len(self.tensors)}"
                self.tensors[last] = value.clone()
                self._last[key] = last
            return {"tensor": last}
        if isinstance(value, dict):
            return {"dict": {k: self._encode(f"{key}.{k}", v) for k, v in value.items()}}
        if value is None or isinstance(value, (bool, int, float, str)) or (
                isinstance(value, (list, tuple)) and all(v is None or isinstance(v, (bool, int, float, str))
                                                         for v in value)):
            return {"value": list(value) if isinstance(value, tuple) else value}
        if isinstance(value, (list, tuple)):  # e.g. HunyuanDiT's image_rotary_emb = (cos, sin)
            return {type(value).__name__: [self._encode(f"{key}.{i}", v) for i, v in enumerate(value)]}
        raise TypeError(f"calibration: cannot record model argument {key!r} of type {type(value).__name__}")

    def update(self, args: tuple, kwargs: dict) -> None:
        named = dict(kwargs)
        if args:
            if self.signature is None:
                raise TypeError("calibration: positional model arguments need the model's signature")
            named = {}
            for k, v in self.signature.bind_partial(*args, **kwargs).arguments.items():
                if self.signature.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
                    named.update(v)
                else:
                    named[k] = v
        self.calls.append({k: self._encode(k, v) for k, v in named.items() if k not in self.skip})

    def merged_runs(self, run_starts: dict[int, int]) -> "ModelInputs":
        """The calls of every rank's runs (``run_starts``: run index -> first call here), gathered and
        recorded again in run order, as one process running all runs would have recorded them."""
        bounds = sorted(run_starts.items(), key=lambda kv: kv[1]) + [(None, len(self.calls))]
        mine = {run: [decode_model_call(c, self.tensors) for c in self.calls[start:end]]
                for (run, start), (_, end) in zip(bounds, bounds[1:])}
        merged = ModelInputs(self.signature)
        runs = {run: calls for part in dist.gather_objects(mine) for run, calls in part.items()}
        for run in sorted(runs):
            for kwargs in runs[run]:
                merged.update((), kwargs)
        return merged


def decode_model_call(call: dict, tensors: dict[str, torch.Tensor], device=None) -> dict:
    """Keyword arguments of one recorded call (see :class:`ModelInputs`), tensors moved to ``device``."""
    def decode(entry):
        if "tensor" in entry:
            return tensors[entry["tensor"]].to(device) if device is not None else tensors[entry["tensor"]]
        if "dict" in entry:
            return {k: decode(v) for k, v in entry["dict"].items()}
        if "tuple" in entry:
            return tuple(decode(v) for v in entry["tuple"])
        if "list" in entry:
            return [decode(v) for v in entry["list"]]
        return entry["value"]

    return {k: decode(v) for k, v in call.items()}


class CalibrationData:
    """Statistics per layer: ``data.stats[layer][stat_name] -> Tensor``, plus the timestep values
    of each recorded step and free-form metadata."""

    def __init__(self, stats: dict[str, dict[str, torch.Tensor]], timesteps: torch.Tensor, meta: dict,
                 inputs: ModelInputs | None = None):
        self.stats, self.timesteps, self.meta = stats, timesteps, meta
        self.inputs = inputs

    def model_calls(self, device=None):
        """Yield the keyword arguments of every recorded model call (needs ``model_inputs``)."""
        if self.inputs is None or not self.inputs.calls:
            raise KeyError("calibration has no recorded model inputs; re-run calibrate(pipe, prompts, config=cfg) "
                           "with the config you quantize with")
        for call in self.inputs.calls:
            yield decode_model_call(call, self.inputs.tensors, device)

    @property
    def layers(self) -> list[str]:
        return sorted(self.stats)

    def missing(self, needs: Sequence[str], method: str | None = None) -> list[str]:
        """Which of ``needs`` this data lacks (statistics checked on every layer that has any)."""
        out = []
        for need in needs:
            if need == MODEL_INPUTS:
                lacking = self.inputs is None or not self.inputs.calls
            elif need == SEARCH:
                lacking = not (self.meta.get("search") or {}).get("method") == method
            else:
                lacking = not self.stats or any(need not in d for d in self.stats.values())
            if lacking:
                out.append(need)
        return out

    def get(self, layer: str, stat: str) -> torch.Tensor:
        try:
            return self.stats[layer][stat]
        except KeyError:
            have = sorted(self.stats.get(layer, {}))
            raise KeyError(f"calibration has no {stat!r} for layer {layer!r} (has {have}); re-run "
                           f"calibrate(pipe, prompts, config=cfg) with the config you quantize with") from None

    @dist.main_only
    def save(self, path) -> None:
        from .serialization import atomic_save_file

        tensors = {f"{layer}::{stat}": t.contiguous() for layer, d in self.stats.items() for stat, t in d.items()}
        tensors["__timesteps__"] = self.timesteps.float().contiguous()
        meta = {"ditq_calibration_version": str(FORMAT_VERSION), "meta": json.dumps(self.meta)}
        if self.inputs is not None:
            tensors.update({f"{_INPUTS}::{k}": t.contiguous() for k, t in self.inputs.tensors.items()})
            meta["model_calls"] = json.dumps(self.inputs.calls)
        atomic_save_file(tensors, path, meta)

    @classmethod
    def load(cls, path) -> "CalibrationData":
        from .serialization import CheckpointError, read_safetensors

        tensors, meta = read_safetensors(path)
        if meta.get("ditq_calibration_version") != str(FORMAT_VERSION):
            raise CheckpointError(f"{path}: not a ditq calibration file of version {FORMAT_VERSION} "
                                  f"(header says {meta.get('ditq_calibration_version')!r})")
        if "__timesteps__" not in tensors:
            raise CheckpointError(f"{path}: calibration file lacks '__timesteps__'")
        stats: dict[str, dict[str, torch.Tensor]] = {}
        inputs = None
        if "model_calls" in meta:
            inputs = ModelInputs()
            inputs.calls = json.loads(meta["model_calls"])
        for key, t in tensors.items():
            if key == "__timesteps__":
                continue
            layer, sep, stat = key.rpartition("::")
            if not sep:
                raise CheckpointError(f"{path}: unexpected tensor {key!r} in calibration file")
            if layer == _INPUTS and inputs is not None:
                inputs.tensors[stat] = t
            else:
                stats.setdefault(layer, {})[stat] = t
        if inputs is not None:
            named = {e["tensor"] for call in inputs.calls for e in _tensor_entries(call)}
            if named - set(inputs.tensors):
                raise CheckpointError(f"{path}: model inputs reference missing tensor(s) "
                                      f"{sorted(named - set(inputs.tensors))[:3]}")
        return cls(stats, tensors["__timesteps__"], json.loads(meta.get("meta", "{}")), inputs)


_INPUTS = "__model_inputs__"


def _tensor_entries(call: dict):
    for entry in call.values():
        yield from _tensors_in(entry)


def _tensors_in(entry: dict):
    if "tensor" in entry:
        yield entry
    elif "dict" in entry:
        yield from _tensor_entries(entry["dict"])
    else:
        for item in entry.get("tuple", entry.get("list", ())):
            yield from _tensors_in(item)


def call_timestep(args, kwargs) -> float | None:
    """The diffusion timestep a transformer forward was called with (diffusers passes ``timestep=``;
    one value per batch, so the first is taken), or None when the call carries none."""
    t = kwargs.get("timestep", kwargs.get("timesteps", args[1] if len(args) > 1 else None))
    if t is None:
        return None
    return float(t.flatten()[0]) if torch.is_tensor(t) else float(t)


class CalibrationRecorder:
    """Context manager that hooks ``layers`` of ``model`` and records ``needs`` statistics.

    ``stat_options`` passes keyword arguments to a statistic's constructor, e.g.
    ``{"act_samples": {"limit": 2048}}`` for a larger GPTQ sample. The step index advances on every
    forward of ``model`` (one call = one denoising step, CFG halves batched); call :meth:`new_run`
    before each sampling run. Consecutive calls at the same timestep are one step (pipelines that run
    the CFG halves as two forwards, e.g. Wan). ``on_step`` is called after each step
    (progress bars, interrupt checks: raising from it aborts cleanly); ``on_layer(step, i)`` after
    layer ``i`` of ``layers`` recorded its input, for progress and Cancel within a step that takes
    seconds (a large model on a CPU). Hooks are removed on exit, also when sampling raises.
    ``skip_inputs``: model arguments not to record (see :class:`ModelInputs`).
    """

    def __init__(self, model: nn.Module, layers: Iterable[str], needs: Sequence[str] = ("act_absmax",),
                 on_step: Callable[[int], None] | None = None, stat_options: dict[str, dict] | None = None,
                 skip_inputs: Sequence[str] = (), on_layer: Callable[[int, int], None] | None = None):
        unknown = set(needs) - set(STATISTICS) - {MODEL_INPUTS}
        if unknown:
            raise ValueError(f"unknown calibration statistic(s) {sorted(unknown)}; known: "
                             f"{sorted(STATISTICS) + [MODEL_INPUTS]}")
        self.model, self.layers, self.on_step, self.on_layer = model, list(layers), on_step, on_layer
        self.needs = tuple(n for n in needs if n != MODEL_INPUTS)
        self.inputs = ModelInputs(inspect.signature(model.forward), skip_inputs) if MODEL_INPUTS in needs else None
        opts = dict(stat_options or {})
        stray = set(opts) - set(self.needs)
        if stray:
            raise ValueError(f"stat_options given for statistic(s) {sorted(stray)} not in needs {list(self.needs)}")
        self.stats = {name: {n: STATISTICS[n](**opts.get(n, {})) for n in self.needs} for name in self.layers}
        self.timesteps: list[float] = []
        self.step = -1
        self.run = -1
        self.run_starts: dict[int, int] = {}  # run index -> its first call in self.inputs
        self._last_t: float | None = None
        self._new_step = True
        self._handles: list = []

    def new_run(self, run: int | None = None) -> None:
        """Start sampling run ``run`` (default: the next one); calibrate passes each batch's index."""
        self.step = -1
        self._last_t = None
        self.run = self.run + 1 if run is None else run
        if self.inputs is not None:
            self.run_starts[self.run] = len(self.inputs.calls)
        for stats in self.stats.values():
            for stat in stats.values():
                stat.start_run(self.run)

    def merge_ranks(self) -> None:
        """Merge what every rank of a process group recorded (each ran some of the runs), so every rank
        holds what one process running all runs in index order would have: statistics merged, rank 0's
        timesteps (it ran run 0), and the model inputs of all runs in run order."""
        if not dist.active():
            return
        for name in self.layers:
            for stat in self.stats[name].values():
                stat.merge_ranks()
        self.timesteps = dist.broadcast_object(self.timesteps)
        if self.inputs is not None:
            self.inputs = self.inputs.merged_runs(self.run_starts)

    def _before_model(self, module, args, kwargs):
        t = call_timestep(args, kwargs)
        self._new_step = t is None or t != self._last_t
        self._last_t = t
        self.step += self._new_step
        if self.inputs is not None:
            self.inputs.update(args, kwargs)
        if self.step >= len(self.timesteps):
            self.timesteps.append(float(self.step) if t is None else t)

    def _after_model(self, module, args, output):
        if self.on_step is not None and self._new_step:
            self.on_step(self.step)

    def _hook(self, name, index):
        def record(module, args):
            x = args[0]
            x2 = x.reshape(-1, x.shape[-1])
            if not torch.isfinite(x2).all():
                raise ValueError(f"calibration: layer {name!r} received NaN/Inf activations at step "
                                 f"{self.step}; the full-precision model itself is producing them")
            for stat in self.stats[name].values():
                stat.update(max(self.step, 0), x2)
            if self.on_layer is not None:
                self.on_layer(max(self.step, 0), index)
        return record

    def __enter__(self):
        self._handles.append(self.model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_model))
        for index, name in enumerate(self.layers if self.needs else ()):
            self._handles.append(self.model.get_submodule(name).register_forward_pre_hook(self._hook(name, index)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def result(self, meta: dict | None = None) -> CalibrationData:
        stats = {name: {n: s.result() for n, s in d.items() if s.result() is not None}
                 for name, d in self.stats.items()}
        return CalibrationData(stats, torch.tensor(self.timesteps), dict(meta or {}), self.inputs)


def calibrate(pipe, prompts: Sequence, num_inference_steps: int = 20, seed: int = 0, *,
              config=None, needs: Sequence[str] | None = None, guidance_scale: float | None = None,
              batch_size: int = 1, layers: Iterable[str] | None = None, progress: bool = True,
              stat_options: dict[str, dict] | None = None, component: str = "transformer",
              workdir=None, on_progress: ProgressHook | None = None,
              **pipe_kwargs) -> CalibrationData:
    """Run the full-precision pipeline once over ``prompts`` and record statistics.

    ``prompts`` are strings for text-conditioned pipelines (PixArt) or class labels (ints) for
    ``DiTPipeline``. What is recorded: ``needs`` if given, else what ``config``'s method needs (nothing,
    and no sampling, for a method that quantizes from the weights alone), else per-channel activation
    maxima. ``stat_options`` configures statistics (see :class:`CalibrationRecorder`).
    A method that searches its configuration (Qua²SeDiMo) runs the search here, on ``prompts``, with
    its work files (resumable) in ``workdir``; the result travels in the returned data to ``quantize``.
    ``on_progress(stage, done, total)`` sees every step and search unit (raise from it to stop).
    ``component`` names the denoiser to record: Wan 2.2 A14B runs ``transformer`` at high noise and
    ``transformer_2`` at low noise; calibrate (and quantize) each expert with its own statistics.
    Returns :class:`CalibrationData`; the pipeline is left unchanged.

    >>> calib = calibrate(pipe, ["a red fox in snow"], num_inference_steps=20, seed=0, config=cfg)
    >>> calib.save("calib.safetensors")
    """
    if not prompts:
        raise ValueError("calibrate needs at least one prompt or class label")
    if needs is None:
        needs = calibration_needs(config) if config is not None else ("act_absmax",)
    if SEARCH in needs and config is None:
        raise ValueError("calibrate: needs include 'search', which runs the method's configuration search: "
                         "pass config=QuantConfig.preset(...)")
    model = getattr(pipe, component, None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"calibrate: {type(pipe).__name__} has no denoiser {component!r} "
                         f"(component names the pipeline's transformer to record)")
    meta = {"model": type(model).__name__, "component": component, "num_prompts": len(prompts),
            "num_inference_steps": num_inference_steps,
            "seed": seed, "needs": list(needs), "stat_options": stat_options or {}}
    recorded = tuple(n for n in needs if n != SEARCH)
    with reporting(on_progress):
        if recorded:
            data = _record(pipe, model, prompts, num_inference_steps, seed, recorded, meta, guidance_scale=guidance_scale,
                           batch_size=batch_size, layers=layers, progress=progress, stat_options=stat_options,
                           **pipe_kwargs)
        else:
            data = CalibrationData({}, torch.zeros(0), meta, None)
        if SEARCH in needs:
            if component != "transformer":
                raise ValueError(f"calibrate: {config.method}'s configuration search labels candidate quantizations "
                                 f"of pipe.transformer only, so it cannot search {component!r}; search on "
                                 "'transformer' and quantize the other expert with the found configuration: "
                                 "QuantConfig.preset(name, options={'assignment': calib.meta['search']['assignment']})")
            # the search samples the pipeline as calibration does (a Wan or Flux call, not PixArt's)
            call = dict(pipe_kwargs, **({} if guidance_scale is None else {"guidance_scale": guidance_scale}))
            found = get_method(config.method).search(pipe, config, list(prompts), workdir=workdir, progress=progress,
                                                     call_kwargs=call or None)
            data.meta["search"] = {"method": config.method, **found}
    return data


def _record(pipe, model, prompts, num_inference_steps, seed, needs, meta, *, guidance_scale, batch_size, layers,
            progress, stat_options, **pipe_kwargs) -> CalibrationData:
    """Sample ``prompts`` in batches with the recorder's hooks on ``model`` (the pipeline's denoiser)."""
    from tqdm.auto import tqdm

    layers = list(layers) if layers is not None else list(select_layers(model))
    batches = [list(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    mine = dist.shard(batches)  # under torch.distributed: this rank's batches, seeded as in one process
    bar = tqdm(total=len(mine) * num_inference_steps, desc="calibrate", disable=not progress or not dist.is_main())
    kwargs = dict(pipe_kwargs)
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    text = takes_prompts(pipe)
    if text:
        kwargs.setdefault("output_type", "latent")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    total, done = len(mine) * num_inference_steps, [0]

    def on_step(step):
        bar.update(1)
        done[0] += 1
        report("calibrate", done[0], total)

    rec = CalibrationRecorder(model, layers, needs, on_step=on_step, stat_options=stat_options)
    try:
        with rec, torch.no_grad():
            for i, batch in mine:
                rec.new_run(i)
                gen = torch.Generator("cpu").manual_seed(seed + i)
                if text:
                    pipe(prompt=batch, num_inference_steps=num_inference_steps, generator=gen, **kwargs)
                else:
                    pipe(class_labels=batch, num_inference_steps=num_inference_steps, generator=gen,
                         output_type="np", **kwargs)
    finally:
        bar.close()
    rec.merge_ranks()
    return rec.result(meta)
