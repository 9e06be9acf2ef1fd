"""Quantized diffusers pipelines: load from the Hub, quantize on load, save and share.

>>> qpipe = QuantizedPixArtPipeline.from_pretrained("PixArt-alpha/PixArt-XL-2-512x512",
...     quantization_config="vidit-q-w8a8", calibration_prompts=prompts)      # quantize on load
>>> qpipe.push_to_hub("me/pixart-w8a8")                                      # with a model card
>>> qpipe = QuantizedPixArtPipeline.from_pretrained("me/pixart-w8a8", torch_dtype=torch.float16)

A quantized pipeline is an instance of a stock pipeline class (``PixArtAlphaPipeline``,
``PixArtSigmaPipeline``, ``DiTPipeline``) extended by :class:`QuantizedPipelineMixin`; its transformer
stays a stock diffusers model whose Linears are ditq layers, loaded through the registered "ditq"
quantizer backend (quantizer.py). Saved repos are stock diffusers repos: model_index.json names the
stock pipeline class, so ``DiffusionPipeline.from_pretrained`` also loads them after ``import ditq``.

Two repo layouts: a full pipeline, or (``transformer_only=True``) just ``transformer/`` plus
``ditq_base_model.json``, a pointer to the full-precision repo that supplies the text encoder, VAE,
tokenizer and scheduler; ``from_pretrained`` resolves the pointer.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from diffusers import DiffusionPipeline, DiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline

from ..quant_core.serialization import (CONFIG_NAME, WEIGHTS_NAME, CheckpointError, atomic_write_text, check_folder,
                                        hub_error, is_repo_id, local_path_missing, read_folder_config)
from . import model_card
from .quantizer import DitqConfig, attach_quantizer, is_ditq_model, register

POINTER_NAME = "ditq_base_model.json"
# The denoisers a pipeline may hold; Wan 2.2 A14B runs ``transformer`` at high noise and its
# low-noise expert ``transformer_2`` below the boundary, and both are quantized.
DENOISERS = ("transformer", "transformer_2")
POINTER_VERSION = 1
_HUB_KEYS = ("revision", "cache_dir", "local_files_only", "token")


def _read_json(source: str, filename: str, **hub) -> dict | None:
    """``filename`` from a local folder or a Hub repo (cache-aware); None if the repo lacks it.
    A missing local path, an unknown repo or revision, and an offline or unreachable Hub each raise
    their own error (serialization.hub_error)."""
    folder = Path(source)
    if folder.is_dir():
        path = folder / filename
        if not path.is_file():
            return None
    elif not is_repo_id(source):
        raise local_path_missing(source)
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError

        given = {k: v for k, v in hub.items() if v is not None}
        try:
            path = Path(hf_hub_download(source, filename, **given))
        except RemoteEntryNotFoundError:  # the repo exists and lacks this file
            return None
        except Exception as e:
            if _known_absent(source, filename, **given):  # offline, and the cache recorded the 404
                return None
            raise hub_error(source, e, revision=hub.get("revision"),
                            local_files_only=bool(hub.get("local_files_only"))) from e
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{source}: {filename} is not valid JSON ({e})") from None


def _known_absent(repo: str, filename: str, **hub) -> bool:
    from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=hub.get("cache_dir"), revision=hub.get("revision"))
    return found is _CACHED_NO_EXIST


def _check_transformer_first(source: str, subfolder: str, hub: dict) -> None:
    """diffusers builds the transformer from its config.json before any quantizer hook runs, so a
    hostile config (attention_head_dim 0, sample_size 16384) would fail or allocate inside diffusers.
    A ditq transformer is checked the way load_quantized checks it, on the meta device, first."""
    folder = Path(source) / subfolder
    if not folder.is_dir():  # a Hub repo: fetch the transformer's files into the cache diffusers reads
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, allow_patterns=[f"{subfolder}/*"],
                                        **{k: v for k, v in hub.items() if v is not None})) / subfolder
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        return  # sharded or not there: diffusers reports it, our hooks validate every tensor
    _, qcfg = read_folder_config(folder)
    if isinstance(qcfg, dict) and qcfg.get("quant_method") == "ditq":
        check_folder(folder)


def _images(output) -> torch.Tensor:
    """``[N, C, H, W]`` from an image pipeline's ``images`` or a video pipeline's ``frames`` (one image
    per frame), as ``output_type="np"`` returns them."""
    pixels = output.images if hasattr(output, "images") else output.frames
    pixels = torch.from_numpy(pixels)
    return pixels.reshape(-1, *pixels.shape[-3:]).permute(0, 3, 1, 2).float()


class QuantizedPipelineMixin:
    """``from_pretrained`` / ``quantize`` / ``save_pretrained`` / ``push_to_hub`` for a diffusers
    pipeline whose transformer ditq quantizes. A family class (``QuantizedPixArtPipeline``) maps the
    stock class named in a repo to its quantized twin in ``_variants``."""

    _variants: dict[str, type] = {}
    pipeline_tag = "text-to-image"
    card_tags: tuple[str, ...] = ()
    transformer_class = "PixArtTransformer2DModel"

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, quantization_config=None,
                        calibration_prompts: Sequence | None = None, calibration_kwargs: dict | None = None,
                        fidelity_prompts: int = 2, base_model: str | None = None, **kwargs):
        """Load a ditq-quantized pipeline (repo id or folder), or with ``quantization_config=`` (a
        ``QuantConfig`` or preset name) load a full-precision one, calibrate on
        ``calibration_prompts`` (class labels for DiT) and quantize it. ``calibration_kwargs`` go to
        the pipeline calls (``num_inference_steps``, ``guidance_scale``, ...); the first
        ``fidelity_prompts`` prompts also measure PSNR/SSIM against full precision for the model
        card. Other keyword arguments are diffusers' (``torch_dtype``, ``revision``, ``cache_dir``,
        ``local_files_only``, ``variant``, ``token``, ...)."""
        register()
        source = str(pretrained_model_name_or_path)
        hub = {k: kwargs.get(k) for k in _HUB_KEYS}
        index = _read_json(source, "model_index.json", **hub)
        pointer = None if index is not None else _read_json(source, POINTER_NAME, **hub)
        if index is None and pointer is None:
            raise FileNotFoundError(f"{source}: neither model_index.json nor {POINTER_NAME} found; not a "
                                    "diffusers pipeline repo or a ditq transformer-only repo")
        try:
            if index is not None:
                target = cls._variant(index.get("_class_name"), source)
                for component in DENOISERS:
                    if (index.get(component) or [None])[0]:  # Wan 2.2 TI2V lists transformer_2 as [null, null]
                        _check_transformer_first(source, component, hub)
                pipe = DiffusionPipeline.from_pretrained.__func__(target, source, **kwargs)
            else:
                target = cls._variant(pointer.get("pipeline_class"), source)
                pipe = target._from_pointer(source, pointer, kwargs)
        except OSError as e:  # diffusers names neither the component nor, for a folder, the subfolder
            raise OSError(f"{source}: {e} A ditq repo holds transformer/config.json and "
                          "transformer/diffusion_pytorch_model.safetensors (or sharded with its .index.json), "
                          f"plus model_index.json and the other components, or {POINTER_NAME}.") from e
        if quantization_config is not None:
            pipe.quantize(quantization_config, calibration_prompts, fidelity_prompts=fidelity_prompts,
                          base_model=base_model or (source if is_repo_id(source) else None),
                          base_revision=kwargs.get("revision"), **(calibration_kwargs or {}))
        elif not is_ditq_model(pipe.transformer):
            raise ValueError(f"{source}: the transformer is not ditq-quantized; to quantize it now pass "
                             "quantization_config=QuantConfig.preset(...) and calibration_prompts=[...]")
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """The quantized twin of an in-memory stock pipeline, sharing its components (then call
        ``.quantize``)."""
        stock = next(c for c in type(pipeline).__mro__ if c.__module__.startswith("diffusers."))
        return DiffusionPipeline.from_pipe.__func__(cls._variant(stock.__name__, type(pipeline).__name__),
                                                    pipeline, **kwargs)

    @classmethod
    def _variant(cls, stock_name: str | None, source: str) -> type:
        if stock_name not in cls._variants:
            raise ValueError(f"{source} holds a {stock_name!r} pipeline; {cls.__name__} loads "
                             f"{', '.join(sorted(cls._variants))}")
        return cls._variants[stock_name]

    @classmethod
    def _from_pointer(cls, source: str, pointer: dict, kwargs: dict):
        """A transformer-only repo: the quantized transformer from ``source``, the rest from the
        full-precision repo it points to."""
        version = pointer.get("format_version")
        if version != POINTER_VERSION or not isinstance(pointer.get("base_model"), str):
            raise CheckpointError(f"{source}: {POINTER_NAME} has format_version {version!r} and base_model "
                                  f"{pointer.get('base_model')!r}; this ditq reads version {POINTER_VERSION} "
                                  "with a base_model repo id (upgrade ditq?)")
        import diffusers

        model_kwargs = {k: kwargs[k] for k in ("torch_dtype", "dtype", *_HUB_KEYS) if k in kwargs}
        quantized = {}
        for component in DENOISERS:
            subfolder = pointer.get(component, "transformer" if component == "transformer" else None)
            if subfolder is None:
                continue
            _check_transformer_first(source, subfolder, {k: kwargs.get(k) for k in _HUB_KEYS})
            quantized[component] = getattr(diffusers, cls.transformer_class).from_pretrained(
                source, subfolder=subfolder, **model_kwargs)
        base_kwargs = {**kwargs, **quantized, "revision": pointer.get("base_revision")}
        return DiffusionPipeline.from_pretrained.__func__(cls, pointer["base_model"], **base_kwargs)

    # -- quantizing ----------------------------------------------------------------------------
    def _condition(self, batch: list) -> dict:
        return {"prompt": batch}

    def _sample(self, prompts: list, seed: int, call_kwargs: dict) -> torch.Tensor:
        kw = {k: v for k, v in call_kwargs.items() if k != "output_type"}
        out = [_images(self(**self._condition([p]), generator=torch.Generator("cpu").manual_seed(seed + i),
                            output_type="np", **kw)) for i, p in enumerate(prompts)]
        return torch.cat(out)

    def quantize(self, config, prompts: Sequence | None = None, *, fidelity_prompts: int = 2, seed: int = 0,
                 base_model: str | None = None, base_revision: str | None = None, progress: bool = True,
                 **call_kwargs):
        """Calibrate (if the method needs statistics or a search) and quantize the transformer in place;
        measure fidelity to full precision on the first ``fidelity_prompts`` prompts. ``call_kwargs``
        go to the pipeline calls, except ``workdir`` (the search's resumable work files, see
        ``ditq.calibrate``). A pipeline with two experts (Wan 2.2 A14B's ``transformer_2``) has both
        calibrated, each on its own steps, and quantized; ``self.ditq_reports`` holds one QuantReport
        per expert. Returns the transformer's QuantReport."""
        from ..quant_core.calibration import calibrate
        from ..quant_core.config import QuantConfig
        from ..quant_core.methods import calibration_needs
        from ..quant_core.metrics import psnr, ssim
        from ..quant_core.quantize import quantize

        if isinstance(config, str):
            config = QuantConfig.preset(config)
        elif not isinstance(config, QuantConfig):
            raise TypeError(f"quantization_config must be a ditq QuantConfig or preset name, got {type(config).__name__}")
        denoisers = self.denoisers()
        if any(is_ditq_model(getattr(self, c)) for c in denoisers):
            raise ValueError("the transformer is already quantized; load the full-precision repo to quantize again")
        prompts = list(prompts or [])
        needs = calibration_needs(config)
        if needs and not prompts:
            raise ValueError(f"{config.name or config.method} needs calibration {list(needs)}: "
                             "pass calibration_prompts=[...]")
        workdir = call_kwargs.pop("workdir", None)
        # each expert is calibrated on the steps it denoises (its own sampling run); a second expert's
        # search work files go to a subfolder of workdir
        calib = {c: calibrate(self, prompts, seed=seed, config=config, progress=progress, component=c,
                              workdir=workdir if c == "transformer" or workdir is None else Path(workdir) / c,
                              **call_kwargs) if needs else None
                 for c in denoisers}
        probe = prompts[:fidelity_prompts]
        reference = self._sample(probe, seed, call_kwargs) if probe else None
        self.ditq_reports = {c: quantize(getattr(self, c), config, calib[c], progress=progress) for c in denoisers}
        fidelity = None
        if probe:
            approx = self._sample(probe, seed, call_kwargs)
            simple = {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str, bool))}
            fidelity = {"psnr_db": round(psnr(reference, approx), 2), "ssim": round(ssim(reference, approx), 4),
                        "prompts": [str(p) for p in probe], "seed": seed, "call_kwargs": simple}
        for c in denoisers:
            attach_quantizer(getattr(self, c), base_model=base_model, base_revision=base_revision, fidelity=fidelity)
        self.ditq_report = self.ditq_reports["transformer"]
        return self.ditq_report

    def denoisers(self) -> list[str]:
        """The pipeline's transformers that ditq quantizes: ``transformer``, and Wan 2.2 A14B's
        low-noise expert ``transformer_2`` where the pipeline has one."""
        return [c for c in DENOISERS if isinstance(getattr(self, c, None), torch.nn.Module)]

    def to(self, *args, **kwargs):
        """diffusers refuses to cast a quantized model to another dtype, but only when it reaches the
        transformer, after casting the components before it; refuse before touching any."""
        dtype = kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
        if dtype is not None and is_ditq_model(self.transformer):
            raise ValueError(f"cannot cast a pipeline with a ditq-quantized transformer to {dtype} (diffusers "
                             "forbids it for quantized models); load it with torch_dtype=... instead. "
                             "No component was changed.")
        return super().to(*args, **kwargs)

    # -- saving --------------------------------------------------------------------------------
    @classmethod
    def stock_class(cls) -> type:
        return next(c for c in cls.__mro__ if c.__module__.startswith("diffusers."))

    def to_json_string(self) -> str:
        """model_index.json names the stock pipeline class, so stock loaders read the repo."""
        d = json.loads(super().to_json_string())
        d["_class_name"] = self.stock_class().__name__
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def ditq_config(self) -> DitqConfig:
        cfg = getattr(self.transformer.config, "quantization_config", None)
        plain = [c for c in self.denoisers() if not is_ditq_model(getattr(self, c))]
        if not isinstance(cfg, DitqConfig) or plain:
            raise ValueError(f"this pipeline's {' and '.join(plain) or 'transformer'} is not ditq-quantized; "
                             "call .quantize(...) first")
        return cfg

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None,
                        max_shard_size=None, push_to_hub: bool = False, *, transformer_only: bool = False,
                        base_model: str | None = None, **kwargs):
        """Write a stock diffusers repo plus README.md (model card). ``transformer_only``: write just
        ``transformer/`` and a pointer to ``base_model`` (default: the repo quantized from).
        ``push_to_hub=True`` uploads the folder to ``repo_id`` (default: the folder name)."""
        if not safe_serialization:
            raise ValueError("ditq saves safetensors only (safe_serialization=False is not supported)")
        cfg = self.ditq_config().to_dict()
        base_model = base_model or cfg.get("base_model")
        folder = Path(save_directory)
        if transformer_only:
            if not base_model:
                raise ValueError("transformer_only=True needs base_model='org/name', the full-precision repo "
                                 "that supplies the text encoder, VAE and scheduler")
            if (folder / "model_index.json").exists():
                raise ValueError(f"{folder} holds a full pipeline (model_index.json); save a transformer-only "
                                 "repo to an empty folder")
            for c in self.denoisers():
                getattr(self, c).save_pretrained(folder / c, variant=variant,
                                                 **({"max_shard_size": max_shard_size} if max_shard_size else {}))
            pointer = {"format_version": POINTER_VERSION, "base_model": base_model,
                       "base_revision": cfg.get("base_revision") if base_model == cfg.get("base_model") else None,
                       "pipeline_class": self.stock_class().__name__, **{c: c for c in self.denoisers()}}
            atomic_write_text(json.dumps(pointer, indent=2) + "\n", folder / POINTER_NAME)
        else:
            super().save_pretrained(folder, variant=variant, max_shard_size=max_shard_size)
        card = model_card.build(self.transformer, cfg, folder, base_model=base_model, pipeline_tag=self.pipeline_tag,
                                tags=self.card_tags, pipeline_class=self.stock_class().__name__,
                                transformer_only=transformer_only)
        atomic_write_text(str(card), folder / "README.md")
        if push_to_hub:
            return self._upload(folder, kwargs.pop("repo_id", folder.name), **kwargs)
        return None

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None, *, transformer_only: bool = False, base_model: str | None = None,
                    **kwargs):
        """Save to a temporary folder (model card included) and upload it as one commit."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization, variant=variant,
                                 transformer_only=transformer_only, base_model=base_model)
            return self._upload(Path(tmp), repo_id, commit_message=commit_message, private=private, token=token,
                                create_pr=create_pr, **kwargs)

    @staticmethod
    def _upload(folder: Path, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                token: str | None = None, create_pr: bool = False, **kwargs):
        import huggingface_hub as hf

        repo_id = hf.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        return hf.upload_folder(repo_id=repo_id, folder_path=folder, token=token, create_pr=create_pr,
                                commit_message=commit_message or "Upload ditq-quantized pipeline", **kwargs)


class QuantizedPixArtPipeline(QuantizedPipelineMixin):
    """PixArt-α / PixArt-Σ with a ditq-quantized transformer. ``from_pretrained`` returns a
    :class:`QuantizedPixArtAlphaPipeline` or :class:`QuantizedPixArtSigmaPipeline`, per the repo."""

    card_tags = ("pixart",)


class QuantizedPixArtAlphaPipeline(QuantizedPixArtPipeline, PixArtAlphaPipeline):
    card_tags = ("pixart", "pixart-alpha")


class QuantizedPixArtSigmaPipeline(QuantizedPixArtPipeline, PixArtSigmaPipeline):
    card_tags = ("pixart", "pixart-sigma")


QuantizedPixArtPipeline._variants = {"PixArtAlphaPipeline": QuantizedPixArtAlphaPipeline,
                                     "PixArtSigmaPipeline": QuantizedPixArtSigmaPipeline}


class QuantizedDiTPipeline(QuantizedPipelineMixin, DiTPipeline):
    """Class-conditional DiT with a ditq-quantized transformer; calibration "prompts" are class ids."""

    # The Hub has no class-conditional task; this is the closest one it lists.
    pipeline_tag = "unconditional-image-generation"
    card_tags = ("dit", "class-conditional")
    transformer_class = "DiTTransformer2DModel"

    def _condition(self, batch: list) -> dict:
        return {"class_labels": batch}


QuantizedDiTPipeline._variants = {"DiTPipeline": QuantizedDiTPipeline}


class QuantizedPipeline(QuantizedPipelineMixin):
    """Any diffusers text-to-image or text-to-video pipeline whose transformer has a ditq layer policy
    (Wan, Flux, SD3, Latte, CogVideoX, HunyuanDiT, PixArt ...): ``from_pretrained`` follows the stock
    pipeline class the repo names and returns its quantized twin (``QuantizedFluxPipeline`` is a
    ``FluxPipeline``). Call it with the pipeline's own arguments; ``calibration_kwargs`` too. A Wan
    2.2 A14B repo has both experts (``transformer``, ``transformer_2``) quantized, saved and loaded.

    >>> pipe = QuantizedPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    ...     quantization_config="vidit-q-w8a8", calibration_prompts=prompts,
    ...     calibration_kwargs=dict(num_frames=33, num_inference_steps=20))
    """

    _twins: dict[str, type] = {}

    @classmethod
    def _variant(cls, stock_name: str | None, source: str) -> type:
        import diffusers

        stock = getattr(diffusers, stock_name or "", None)
        if not (isinstance(stock, type) and issubclass(stock, DiffusionPipeline)):
            raise ValueError(f"{source} names pipeline class {stock_name!r}, which is not a diffusers pipeline")
        if "transformer" not in stock._get_signature_keys(stock)[0]:
            raise ValueError(f"{source}: {stock_name} has no transformer to quantize (ditq quantizes DiTs)")
        if stock_name not in cls._twins:
            cls._twins[stock_name] = type(f"Quantized{stock_name}", (cls, stock), {"__module__": __name__})
        return cls._twins[stock_name]

    @classmethod
    def _from_pointer(cls, source: str, pointer: dict, kwargs: dict):
        transformer = _read_json(source, "transformer/config.json", **{k: kwargs.get(k) for k in _HUB_KEYS})
        twin = type(cls.__name__, (cls,), {"transformer_class": (transformer or {}).get("_class_name")})
        return QuantizedPipelineMixin._from_pointer.__func__(twin, source, pointer, kwargs)
