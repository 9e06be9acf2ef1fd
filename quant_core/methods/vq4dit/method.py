"""VQ4DiT (Deng et al., AAAI 2025, arXiv 2408.17131): 2–3-bit vector-quantized weights whose codeword
assignments are chosen by zero-data calibration (methods.md §4).

The pass, step by step:

1. Codebooks (§4.2.1): each selected Linear's weight ``[N, K]`` is cut into sub-vectors of ``d``
   consecutive input channels; k-means over them gives one codebook per layer, ``k`` clamped for small
   layers ("And the bit goes down": at most one codeword per 4 sub-vectors).
2. Candidate sets (eq. 5–6): every sub-vector keeps its ``n`` nearest codewords; during calibration it
   is the softmax-weighted average of them (:class:`SoftVQLinear`, fake quantization for calibration
   only, never saved).
3. Zero-data calibration (eq. 8–10): no dataset. The FP teacher's trajectories on random prompts or
   labels and Gaussian latents are recorded (:func:`zero_data_calibration`) and replayed; at each step
   teacher and student receive the teacher's ``x_t``, so errors never accumulate. Loss =
   λ_d · mean over transformer blocks of the block-output MSE + λ_r · ratio regulariser. Sub-vectors
   whose top ratio passes ``freeze_threshold`` freeze on their argmax; a layer with more than
   ``harden_fraction`` frozen is hardened (argmax codes), and only then are its codebook and bias
   fine-tuned. At ``harden_at`` of the steps the remaining layers are hardened so every codebook gets
   fine-tuning time.
4. Storage: each layer becomes a :class:`~ditq.quant_core.layers.CodebookLinear` with one codebook
   (fp16 ``[1, k, d]``) and ``log2(k)``-bit packed indices, so ``log2(k) / d`` bits per weight, plus bias.

Paper formulation by default; the released code's choices are options: ``ratio_init="distance"``
(logits ``log(d_n / d_j)``, the code) vs ``"uniform"`` (paper); ``ratio_loss="quadratic"``
(``n · mean r(1-r)`` over unfrozen sub-vectors, the code) vs ``"abs"`` (eq. 9, ``Σ (1-|2r-1|)`` per
sub-vector); ``candidates=2`` (code) vs 3 (the paper's best).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...calibration import MODEL_INPUTS, calibrate, decode_model_call
from ...sampling import takes_prompts
from ...config import QuantConfig, check_options, register_preset
from ...passes.kmeans import kmeans, nearest
from ...progress import report
from ...layers import CodebookLinear
from ...models import block_modules
from .. import register_method

# weight_bits -> (codebook size k, sub-vector length d): log2(k) / d bits per weight (paper §4.3).
SETTINGS = {2: (256, 4), 3: (64, 2), 4: (256, 2)}


@dataclass(frozen=True)
class VQ4DiTOptions:
    """``QuantConfig.options`` of the vq4dit method (defaults: the paper; see module docstring)."""

    k: int | None = None               # codebook size; None: from weight_bits (SETTINGS)
    d: int | None = None               # sub-vector length; None: from weight_bits
    candidates: int = 3                # n nearest codewords per sub-vector
    ratio_init: str = "uniform"        # "uniform" (paper) | "distance" (code)
    ratio_loss: str = "abs"            # "abs" (paper eq. 9) | "quadratic" (code)
    lambda_d: float = 1.0
    lambda_r: float = 1.0
    steps: int = 600                   # optimizer steps, one per replayed teacher call
    harden_at: float = 0.5             # fraction of steps after which all layers are hardened
    freeze_threshold: float = 0.99     # a sub-vector freezes once its top ratio exceeds this
    harden_fraction: float = 0.99      # a layer hardens once this fraction of sub-vectors is frozen
    lr_ratio: float = 5e-3             # RMSprop lr of the ratio logits (code: 5e-2; with "abs" it overshoots)
    lr_codebook: float = 1e-4          # ... of codebooks and biases (code)
    rmsprop_alpha: float = 0.9
    kmeans_iters: int = 100
    kmeans_init: str = "kmeans++"      # "kmeans++" | "random"
    seed: int = 0
    state_path: str | None = None      # resumable state (safetensors), written atomically
    work_dir: str | None = None        # or: a state named by what it was made from, deleted once complete
    checkpoint_every: int = 50
    time_budget_s: float | None = None  # stop calibrating after this long (state is saved first)

    @classmethod
    def from_config(cls, config: QuantConfig) -> "VQ4DiTOptions":
        check_options(config, {f.name for f in dataclasses.fields(cls)})
        opts = cls(**config.options)
        checks = [
            (opts.ratio_init in ("uniform", "distance"), f"ratio_init {opts.ratio_init!r}: 'uniform' or 'distance'"),
            (opts.ratio_loss in ("abs", "quadratic"), f"ratio_loss {opts.ratio_loss!r}: 'abs' or 'quadratic'"),
            (opts.candidates >= 1, f"candidates={opts.candidates} must be >= 1"),
            (opts.steps >= 0, f"steps={opts.steps} must be >= 0"),
            (0 <= opts.harden_at <= 1, f"harden_at={opts.harden_at} must be in [0, 1]"),
            (opts.checkpoint_every >= 1, f"checkpoint_every={opts.checkpoint_every} must be >= 1"),
            ((opts.k is None) == (opts.d is None), "give both k and d, or neither"),
            (opts.k is None or (2 <= opts.k <= 256 and not opts.k & (opts.k - 1)),
             f"k={opts.k} must be a power of two in 2..256 (packed log2(k)-bit indices)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"vq4dit option {msg}")
        return opts

    def setting(self, weight_bits: int, layer: str) -> tuple[int, int]:
        if self.k is not None:
            return self.k, self.d
        if weight_bits not in SETTINGS:
            raise ValueError(f"layer {layer!r}: vq4dit has settings for weight_bits {sorted(SETTINGS)}, "
                             f"got {weight_bits} (or give options k and d)")
        return SETTINGS[weight_bits]


def clamp_codebook_size(k: int, num_subvectors: int) -> int:
    """"And the bit goes down" (Stock et al. 2020): at most one codeword per 4 sub-vectors, a power
    of two, so small layers do not pay for codewords they cannot use; at least 2 (1-bit indices)."""
    return max(2, min(k, 1 << max(0, (num_subvectors // 4).bit_length() - 1)))


def init_codebook(weight: torch.Tensor, k: int, d: int, *, iters: int, seed: int, init: str,
                  name: str = "") -> torch.Tensor:
    """k-means codebook ``[k', d]`` (k' = the clamped k) of ``weight``'s d-long sub-vectors."""
    n_out, n_in = weight.shape
    if n_in % d:
        raise ValueError(f"layer {name!r}: sub-vector length d={d} does not divide in_features={n_in}")
    sub = weight.detach().float().reshape(-1, d)
    return kmeans(sub, clamp_codebook_size(k, sub.shape[0]), iters=iters, seed=seed, init=init).centroids


class SoftVQLinear(nn.Module):
    """Fake quantization used only during VQ4DiT calibration: each sub-vector is the softmax-weighted
    average of its candidate codewords (eq. 6); frozen sub-vectors use their argmax candidate; once
    hardened, every sub-vector uses its argmax and the codebook (and bias) train instead.

    Parameters: ``codebook`` [k, d], ``logits`` [S, n], ``bias``; buffers ``candidates`` [S, n] (codeword
    indices, closest first), ``frozen`` [S], ``hardened`` (scalar). S = N·K/d sub-vectors, row-major.
    """

    def __init__(self, codebook: torch.Tensor, candidates: torch.Tensor, logits: torch.Tensor,
                 bias: torch.Tensor | None, out_features: int, in_features: int):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.codebook = nn.Parameter(codebook.detach().float().clone())
        self.logits = nn.Parameter(logits.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.register_buffer("candidates", candidates.long().clone())
        self.register_buffer("frozen", torch.zeros(candidates.shape[0], dtype=torch.bool, device=candidates.device))
        self.register_buffer("hardened", torch.zeros((), dtype=torch.bool, device=candidates.device))
        self.set_trainable()

    @classmethod
    def from_linear(cls, linear: nn.Linear, codebook: torch.Tensor, n: int, ratio_init: str) -> "SoftVQLinear":
        n_out, n_in = linear.weight.shape
        sub = linear.weight.detach().float().reshape(1, -1, codebook.shape[1])
        d2, cand = nearest(sub, codebook.unsqueeze(0), min(n, codebook.shape[0]))
        dist = d2[0].sqrt()
        if ratio_init == "distance":  # code: logit_j = log(d_n / d_j), so ratios ∝ 1 / distance
            logits = torch.log(dist[:, -1:].clamp_min(1e-12) / dist.clamp_min(1e-12))
        else:  # paper: uniform ratios 1/n
            logits = torch.zeros_like(dist)
        return cls(codebook, cand[0], logits, linear.bias, n_out, n_in)

    def set_trainable(self) -> None:
        """Logits train until the layer is hardened; then the codebook and bias do."""
        hard = bool(self.hardened)
        self.logits.requires_grad_(not hard)
        self.codebook.requires_grad_(hard)
        if self.bias is not None:
            self.bias.requires_grad_(hard)

    def ratios(self) -> torch.Tensor:
        r = self.logits.softmax(-1)
        onehot = F.one_hot(self.logits.argmax(-1), r.shape[-1]).to(r.dtype)
        return torch.where(self.frozen.unsqueeze(-1), onehot, r)

    def codes(self) -> torch.Tensor:
        """The argmax codeword of every sub-vector, ``[S]``."""
        return self.candidates.gather(1, self.logits.argmax(-1, keepdim=True)).squeeze(1)

    def weight(self) -> torch.Tensor:
        if self.hardened:
            w = self.codebook[self.codes()]
        else:
            w = (self.ratios().unsqueeze(-1) * self.codebook[self.candidates]).sum(1)
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    def ratio_loss(self, form: str) -> torch.Tensor:
        """Pushes ratios to one-hot. "abs" (paper eq. 9): mean over sub-vectors of Σ_j (1-|2r-1|);
        "quadratic" (code): n · mean over unfrozen sub-vectors of Σ_j r(1-r)."""
        if self.hardened:
            return self.logits.new_zeros(())
        r = self.ratios()
        if form == "abs":
            return (1 - (2 * r - 1).abs()).sum(-1).mean()
        live = r[~self.frozen]
        if live.numel() == 0:
            return self.logits.new_zeros(())
        return r.shape[-1] * (live * (1 - live)).sum(-1).mean()

    @torch.no_grad()
    def update_freezing(self, threshold: float, harden_fraction: float) -> None:
        if self.hardened:
            return
        self.frozen |= self.logits.softmax(-1).amax(-1) > threshold
        if self.frozen.float().mean().item() > harden_fraction:
            self.harden()

    def harden(self) -> None:
        self.hardened.fill_(True)
        self.set_trainable()

    def to_codebook_linear(self, name: str, dtype: torch.dtype) -> CodebookLinear:
        """The stored layer: argmax codes as packed log2(k)-bit indices into the one fp16 codebook."""
        codes = self.codes().reshape(self.out_features, -1)
        return CodebookLinear.from_codes(codes, self.codebook.unsqueeze(0), self.bias, name=name, dtype=dtype)


class _BlockOutputs:
    """Forward hooks collecting the output of every transformer block (the unit of VQ4DiT's loss)."""

    def __init__(self, model: nn.Module):
        self.blocks = [m for _, m in block_modules(model)]
        if not self.blocks:
            raise ValueError(f"vq4dit: no numbered transformer blocks found in {type(model).__name__}")
        self.outputs: list[torch.Tensor] = []

    def __enter__(self):
        def keep(module, args, output):
            # MMDiT blocks (Flux, SD3, CogVideoX) return both streams: every tensor is a block output
            streams = output if isinstance(output, tuple) else (output,)
            self.outputs.extend(t for t in streams if torch.is_tensor(t))

        self.handles = [b.register_forward_hook(keep) for b in self.blocks]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


# -- zero-data teacher trajectories --------------------------------------------------------------
_WORDS = (
    ("a", "an old", "a small", "a giant", "a red", "a blue", "a golden", "a wooden", "a glass", "a furry",
     "a shiny", "a broken", "a floating", "a sleeping", "a futuristic", "a painted"),
    ("cat", "dog", "castle", "robot", "tree", "car", "mountain", "bird", "city", "boat", "flower", "dragon",
     "house", "astronaut", "lighthouse", "teapot", "forest", "horse", "bicycle", "portrait of a woman"),
    ("in the snow", "at sunset", "on the moon", "under water", "in a desert", "in the rain", "at night",
     "on a table", "in a field of flowers", "in space", "in a busy street", "by the sea", ""),
    ("", "oil painting", "photograph", "watercolor", "3d render", "pencil sketch", "cinematic lighting",
     "highly detailed", "studio photo", "pixel art"),
)


def random_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` random captions composed from a small built-in vocabulary: conditioning for the teacher
    without a dataset (VQ4DiT is zero-data; its DiT setting draws random class labels)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n):
        parts = [words[int(torch.randint(len(words), (1,), generator=gen))] for words in _WORDS]
        prompts.append(", ".join(p for p in (" ".join(q for q in parts[:3] if q), parts[3]) if p))
    return prompts


def zero_data_calibration(pipe, num_samples: int = 8, num_inference_steps: int = 20, seed: int = 0, *,
                          batch_size: int = 1, progress: bool = True, **pipe_kwargs):
    """Record the full-precision teacher's trajectories for VQ4DiT with no data: random prompts (text
    pipelines, :func:`random_prompts`) or random class labels (``DiTPipeline``), Gaussian latents from
    the pipeline's seeded generator. Returns CalibrationData holding every model call's inputs.

    >>> calib = zero_data_calibration(pipe, num_samples=8, num_inference_steps=20)
    >>> quantize(pipe.transformer, QuantConfig.preset("vq4dit-w2"), calib)
    """
    if takes_prompts(pipe):
        conditions = random_prompts(num_samples, seed)
    else:
        labels = getattr(pipe, "labels", None)
        num_classes = len(labels) if labels else pipe.transformer.config.num_embeds_ada_norm
        gen = torch.Generator().manual_seed(seed)
        conditions = torch.randint(num_classes, (num_samples,), generator=gen).tolist()
    return calibrate(pipe, conditions, num_inference_steps, seed, needs=(MODEL_INPUTS,), batch_size=batch_size,
                     progress=progress, **pipe_kwargs)


# -- calibration ----------------------------------------------------------------------------------
class _Calibration:
    """The optimisation of step 3: teacher = the FP model, student = a copy with SoftVQLinear layers."""

    def __init__(self, ctx, opts: VQ4DiTOptions):
        self.ctx, self.opts = ctx, opts
        self.teacher = ctx.model
        self.device = next(self.teacher.parameters()).device
        self.calls = ctx.calibration.inputs.calls
        # inputs recorded under inference mode (ComfyUI's sampler) cannot be saved for backward
        self.tensors = {k: v.clone() if v.is_inference() else v for k, v in ctx.calibration.inputs.tensors.items()}
        # hashing the weights and calls takes seconds at full size: only for a run with a work file
        self.fingerprint = self._fingerprint() if opts.state_path or opts.work_dir else None
        self.state_path = self._state_path()
        self.step = 0
        saved = self._load_state()
        self.student = self._build_student(saved)
        self.soft: dict[str, SoftVQLinear] = {n: self.student.get_submodule(n) for n in ctx.layers}
        logits = [m.logits for m in self.soft.values()]
        tuned = [p for m in self.soft.values() for p in (m.codebook, m.bias) if p is not None]
        self.params = logits + tuned
        self.optim = torch.optim.RMSprop([{"params": logits, "lr": opts.lr_ratio},
                                          {"params": tuned, "lr": opts.lr_codebook}], alpha=opts.rmsprop_alpha)
        if saved is not None:
            self._load_optimizer(*saved)

    def _fingerprint(self) -> str:
        """What a saved state must match to be resumed: the options, the layers and their bits, and the
        contents of the teacher's layers and of the recorded calls. Without the contents, a state saved
        for another model of the same architecture would resume onto that model's codebooks, silently."""
        from ...serialization import content_hash, layers_sha256

        skip = {"state_path", "work_dir", "checkpoint_every", "time_budget_s", "steps", "harden_at"}
        opts = {k: v for k, v in dataclasses.asdict(self.opts).items() if k not in skip}
        bits = {n: self.ctx.config.scheme_for(n, i.in_features).weight_bits for n, i in self.ctx.layers.items()}
        calls = json.dumps(self.calls, sort_keys=True, default=str)
        return json.dumps({"options": opts, "layers": bits, "weights_sha256": layers_sha256(self.teacher, self.ctx.layers),
                           "calibration_sha256": content_hash(self.tensors, {"calls": calls})}, sort_keys=True)

    def _state_path(self) -> str | None:
        """``state_path``, or in ``work_dir`` a file named by the fingerprint's hash: a GUI re-running
        the same model, calibration and options resumes its interrupted work, and no other work."""
        if self.opts.state_path or not self.opts.work_dir:
            return self.opts.state_path
        digest = hashlib.sha256(self.fingerprint.encode()).hexdigest()[:16]
        return str(Path(self.opts.work_dir) / f"vq4dit-{digest}.safetensors")

    def finish(self, result: dict) -> None:
        """A work_dir state has served its purpose once the optimisation completed (a state_path is
        the caller's, and kept)."""
        if self.opts.work_dir and not self.opts.state_path and not result["stopped_by_time_budget"]:
            Path(self.state_path).unlink(missing_ok=True)

    def _build_student(self, saved) -> nn.Module:
        import copy

        from ...models import set_submodule

        student = copy.deepcopy(self.teacher).requires_grad_(False)
        tensors = saved[0] if saved is not None else None
        for i, (name, info) in enumerate(self.ctx.iter_layers("vq4dit k-means")):
            linear = self.teacher.get_submodule(name)
            if tensors is not None:
                get = lambda key: tensors[f"{name}.{key}"].to(self.device)  # noqa: E731
                bias = get("bias") if linear.bias is not None else None
                soft = SoftVQLinear(get("codebook"), get("candidates"), get("logits"), bias,
                                    info.out_features, info.in_features)
                soft.frozen.copy_(get("frozen"))
                soft.hardened.copy_(get("hardened"))
                soft.set_trainable()
            else:
                k, d = self.opts.setting(self.ctx.config.scheme_for(name, info.in_features).weight_bits, name)
                codebook = init_codebook(linear.weight, k, d, iters=self.opts.kmeans_iters, seed=self.opts.seed + i,
                                         init=self.opts.kmeans_init, name=name)
                soft = SoftVQLinear.from_linear(linear, codebook, self.opts.candidates, self.opts.ratio_init)
            set_submodule(student, name, soft)
        return student

    # -- resumable state ----------------------------------------------------------------------
    def _save_state(self) -> None:
        from ...serialization import atomic_save_file

        if not self.state_path:
            return
        tensors = {f"{n}.{k}": t for n, m in self.soft.items() for k, t in m.state_dict().items()}
        steps = {}
        for i, p in enumerate(self.params):
            st = self.optim.state.get(p)
            if st:
                tensors[f"__optim__.{i}"] = st["square_avg"]
                steps[i] = float(st["step"])
        meta = {"step": self.step, "fingerprint": self.fingerprint, "optim_steps": steps}
        atomic_save_file(tensors, self.state_path, {"ditq_vq4dit_state": json.dumps(meta)})

    def _load_state(self):
        from ...serialization import CheckpointError, read_safetensors

        path = self.state_path
        if not path or not Path(path).exists():
            return None
        tensors, meta = read_safetensors(path)
        try:
            state = json.loads(meta["ditq_vq4dit_state"])
        except (KeyError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: not a vq4dit calibration state") from None
        if state["fingerprint"] != self.fingerprint:
            raise CheckpointError(f"{path}: vq4dit state was saved for other options, layers, weights or "
                                  f"calibration data; delete it or set another state_path")
        self.step = int(state["step"])
        return tensors, state["optim_steps"]

    def _load_optimizer(self, tensors, steps) -> None:
        state = {int(i): {"step": torch.tensor(s), "square_avg": tensors[f"__optim__.{i}"].to(self.device)}
                 for i, s in steps.items()}
        self.optim.load_state_dict({"state": state, "param_groups": self.optim.state_dict()["param_groups"]})

    # -- the loop ------------------------------------------------------------------------------
    def _tick(self) -> None:
        """Progress (and, in a GUI, Cancel) between the passes of a step: on a CPU one step of a
        width-1152 model takes seconds. Every tick comes before the optimizer step, so a Cancel
        leaves the state of the last whole step."""
        report("vq4dit calibrate", self.step, self.opts.steps)

    def _loss(self, kwargs) -> tuple[torch.Tensor, float, float]:
        with torch.no_grad(), _BlockOutputs(self.teacher) as t:
            self.teacher(**kwargs)
        self._tick()
        with _BlockOutputs(self.student) as s:
            self.student(**kwargs)
        self._tick()
        l_d = torch.stack([F.mse_loss(a.float(), b.float()) for a, b in zip(s.outputs, t.outputs)]).mean()
        l_r = torch.stack([m.ratio_loss(self.opts.ratio_loss) for m in self.soft.values()]).mean()
        return self.opts.lambda_d * l_d + self.opts.lambda_r * l_r, l_d.item(), l_r.item()

    def run(self) -> dict:
        from tqdm.auto import tqdm

        o = self.opts
        harden_step = int(o.steps * o.harden_at)
        start, t0, stopped, by_threshold = self.step, time.monotonic(), False, None
        bar = tqdm(total=o.steps, initial=start, desc="vq4dit calibrate", disable=not self.ctx.progress)
        try:
            with torch.enable_grad():
                while self.step < o.steps:
                    self._tick()
                    if self.step >= harden_step:
                        by_threshold = by_threshold if by_threshold is not None else self._hardened()
                        for m in self.soft.values():
                            if not m.hardened:
                                m.harden()
                    kwargs = decode_model_call(self.calls[self.step % len(self.calls)], self.tensors, self.device)
                    loss, l_d, l_r = self._loss(kwargs)
                    self.optim.zero_grad()
                    loss.backward()
                    self._tick()
                    self.optim.step()
                    for m in self.soft.values():
                        m.update_freezing(o.freeze_threshold, o.harden_fraction)
                    self.step += 1
                    bar.update(1)
                    bar.set_postfix(block_mse=f"{l_d:.3g}", ratio=f"{l_r:.3g}", hardened=self._hardened())
                    if self.step % o.checkpoint_every == 0:
                        self._save_state()
                    if o.time_budget_s is not None and time.monotonic() - t0 > o.time_budget_s:
                        stopped = True
                        break
        except BaseException:  # Ctrl-C, a GUI's interrupt raised from on_progress: keep the work done
            self._save_state()
            raise
        finally:
            bar.close()
        self._save_state()
        return {"steps_done": self.step, "steps": o.steps, "steps_this_run": self.step - start,
                "layers_hardened_by_threshold": self._hardened() if by_threshold is None else by_threshold,
                "stopped_by_time_budget": stopped,
                "calibration_s": round(time.monotonic() - t0, 2)}

    def _hardened(self) -> int:
        return sum(bool(m.hardened) for m in self.soft.values())


def check_weight_only(config: QuantConfig) -> None:
    if config.act_bits is not None or any(o.get("act_bits") for o in config.layers.values()):
        raise ValueError("vq4dit quantizes weights only: set act_bits=None (activations stay in the compute dtype)")


@register_method("vq4dit")
class VQ4DiT:
    def needs(self, config: QuantConfig) -> tuple[str, ...]:
        check_weight_only(config)  # before anyone records a trajectory for a config that cannot run
        return (MODEL_INPUTS,)

    def apply(self, ctx) -> None:
        check_weight_only(ctx.config)
        if ctx.calibration.inputs is None or not ctx.calibration.inputs.calls:
            raise ValueError("vq4dit needs the teacher's recorded model inputs: calib = calibrate(pipe, prompts, "
                             "config=cfg) records them")
        opts = VQ4DiTOptions.from_config(ctx.config)
        # ComfyUI runs every node under torch.inference_mode, where enable_grad does nothing: the
        # optimisation leaves it (the student and its codebooks are built outside it too)
        with torch.inference_mode(False):
            cal = _Calibration(ctx, opts)
            result = cal.run()
        ctx.method_state.update(result)
        for name, soft in cal.soft.items():
            soft.harden()
            dtype = ctx.linear(name).weight.dtype
            ctx.replace(name, soft.to_codebook_linear(name, dtype))
        cal.finish(result)


# The presets take the released code's ratio init, regulariser and ratio lr (keeping the paper's n = 3):
# eq. 9 has no gradient while every ratio is below 0.5, so from the paper's uniform (or any n = 3
# distance) init the ratios stay soft for hundreds of steps and hardening then picks worse codewords
# than the nearest; the quadratic form pushes them to one-hot from the start (docs/vq4dit.md table).
PRESET_OPTIONS = {"ratio_init": "distance", "ratio_loss": "quadratic", "lr_ratio": 5e-2}
# Documented small settings (QuantConfig.preset(name, small=True)): seconds on the built-in PixArt, for
# tests and smoke runs; fewer optimisation steps and k-means iterations, random k-means init (k-means++
# draws k centres one after another), so less fidelity than the preset.
SMALL = {"steps": 8, "kmeans_iters": 3, "kmeans_init": "random"}
register_preset("vq4dit-w2", lambda: QuantConfig(method="vq4dit", weight_bits=2, act_bits=None,
                                                 options=dict(PRESET_OPTIONS)), quick=False, small=SMALL)
register_preset("vq4dit-w3", lambda: QuantConfig(method="vq4dit", weight_bits=3, act_bits=None,
                                                 options=dict(PRESET_OPTIONS)), quick=False, small=SMALL)
