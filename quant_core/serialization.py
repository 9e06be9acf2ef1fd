"""The only code that touches files: safetensors read/write, validation, format versioning.

Folder format (a diffusers model folder, DESIGN.md §3)::

    config.json                           the model's diffusers config + "quantization_config"
    diffusion_pytorch_model.safetensors   quantized layers' buffers + the kept full-precision tensors

``quantization_config`` = ``{"quant_method": "ditq", "format_version": 2, "method": ..., "recipe":
QuantConfig, "layers": {module name: layer spec}, "config_groups"/"ignore": the same in
compressed-tensors' vocabulary, "method_state": what a method must keep (seeds, genomes)}``.
``layers`` is authoritative: a model is rebuilt from it and the tensors alone.

Versions: the rule is to bump ``format_version`` when a file this version writes may hold something
an older reader would misread or cannot build. 2 added the ``split_planes`` layer (ViDiT-Q-MP's
W8 as two 4-bit planes); format-1 files still load unchanged (their ``timestep_switch`` layers derive
any lower-bit view once at load).

Single-file format: the same tensors in one ``.safetensors`` whose header metadata holds
``ditq.quantization_config`` and ``ditq.model_config`` as JSON strings.

Writes go to a temporary name in the target folder and are renamed, so an interrupted or failed save
leaves the previous file (or nothing) in place. Never unpickles.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import distributed as dist
from .layers import LAYER_TYPES, QuantModule

FORMAT_VERSION = 2
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A quantized checkpoint is missing, truncated, tampered with or of an unknown format."""


class HubError(OSError):
    """The Hub could not be asked (offline, no network) or answered no (repo or revision not found)."""


# -- low level -------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise OSError(f"cannot write {path}: folder {folder} is not writable ({e.strerror})") from e
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dist.main_only
def atomic_save_file(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


@dist.main_only
def atomic_write_text(text: str, path) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


@dist.main_only
def atomic_write_bytes(data: bytes, path) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    return tensors, meta


# -- describing a quantized model --------------------------------------------------------------
def quantized_layers(model: nn.Module) -> dict[str, QuantModule]:
    """Outermost quantized layers (a layer type may hold quantized sub-layers; its spec covers them)."""
    found: dict[str, QuantModule] = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantModule) and not any(n.startswith(f"{p}.") for p in found):
            found[n] = m
    return found


def _ct_args(scheme: dict) -> tuple[dict, dict | None]:
    """A LayerScheme in compressed-tensors' QuantizationArgs vocabulary (informational)."""
    weights = {"num_bits": scheme["weight_bits"], "type": "float" if scheme["weight_format"] == "fp8" else "int",
               "symmetric": scheme["weight_symmetric"], "strategy": scheme["weight_granularity"],
               "group_size": scheme["group_size"], "dynamic": False}
    mode = scheme["act_mode"]
    if mode is None:
        return weights, None
    acts = {"num_bits": scheme["act_bits"], "type": "float" if mode.endswith("fp8") else "int",
            "symmetric": True, "strategy": {"static_tensor": "tensor", "dynamic_token_group": "group"}.get(mode, "token"),
            "group_size": scheme["group_size"] if mode == "dynamic_token_group" else None,
            "dynamic": mode != "static_tensor"}
    return weights, acts


def quantization_config(model: nn.Module) -> dict[str, Any]:
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layers; run ditq.quantize first")
    specs = {name: mod.spec() for name, mod in layers.items()}
    groups: dict[str, dict] = {}
    for name, spec in specs.items():
        if "scheme" not in spec:
            continue
        key = json.dumps(spec["scheme"], sort_keys=True)
        groups.setdefault(key, {"targets": [], "scheme": spec["scheme"]})["targets"].append(name)
    config_groups = {}
    for i, g in enumerate(groups.values()):
        w, a = _ct_args(g["scheme"])
        config_groups[f"group_{i}"] = {"targets": [f"re:^{re.escape(t)}$" for t in g["targets"]],
                                       "weights": w, "input_activations": a}
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantModule)]
    state = getattr(model, "ditq_state", {})
    return {"quant_method": "ditq", "format_version": FORMAT_VERSION, "method": state.get("method"),
            "recipe": state.get("recipe"), "method_state": state.get("method_state", {}),
            "torch_dtype": str(compute_dtype(model)).removeprefix("torch."),
            "config_groups": config_groups, "ignore": ignore, "layers": specs}


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s full-precision floating tensors outside quantized layers (diffusers'
    ``_pre_quantization_dtype``); float32 if it has none."""
    every = {n for n, m in model.named_modules() if isinstance(m, QuantModule)}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and name.rpartition(".")[0] not in every:
            return t.dtype
    return torch.float32


# Adapters register here what their framework needs a quantized model to carry (the diffusers
# adapter, pipelines/quantizer.py, adds diffusers' own marks); the core never imports them.
MARKERS: list[Callable[[nn.Module], None]] = []


def mark_quantized(model: nn.Module, state: dict[str, Any]) -> None:
    """The one place that makes ``model`` "a ditq-quantized model", for every entry path (quantize,
    the loaders, the ComfyUI nodes): it records ``state`` (method, recipe, method_state) and runs
    the registered ``MARKERS``, so that e.g. a diffusers model gets diffusers' own marks
    (``hf_quantizer``, ``quantization_config``, ``is_quantized``), diffusers' ``save_pretrained``
    writes a checkpoint ``from_pretrained`` reads back, and its dtype rules apply to it."""
    model.ditq_state = state
    for marker in MARKERS:
        marker(model)


def _model_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {"_class_name": type(model).__name__}
    d = dict(cfg)
    d["_class_name"] = type(model).__name__
    d.pop("quantization_config", None)
    return {k: v for k, v in d.items() if not k.startswith("_") or k in ("_class_name", "_diffusers_version")}


@dist.main_only
def save_quantized(model: nn.Module, path, *, model_config: dict[str, Any] | None = None) -> Path:
    """Write a quantized model: a folder (diffusers layout), or one file if ``path`` ends in
    ``.safetensors``. Returns the path written. ``model_config`` replaces the config read from
    ``model.config`` (models without a diffusers config, e.g. ComfyUI's, say how to rebuild them).

    >>> save_quantized(pipe.transformer, "pixart-w8a8")
    """
    path = Path(path)
    with_lora = [n for n, m in model.named_modules() if isinstance(m, QuantModule) and m.lora_branches]
    if with_lora:
        raise ValueError(f"cannot save: layer {with_lora[0]!r} carries LoRA branches "
                         f"{sorted(model.get_submodule(with_lora[0]).lora_branches)}; a ditq file holds the "
                         f"quantized model only. Remove them first (PEFT: unmerge or delete the adapter) "
                         f"and save the adapter on its own")
    qcfg = quantization_config(model)
    tensors = model.state_dict()
    for k, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"cannot save {k}: tensor is on the meta device (model not fully loaded)")
    model_cfg = dict(model_config) if model_config is not None else _model_config(model)
    if path.suffix == ".safetensors":
        atomic_save_file(tensors, path, {"ditq.quantization_config": json.dumps(qcfg),
                                         "ditq.model_config": json.dumps(model_cfg, default=str)})
        return path
    if path.exists() and not path.is_dir():
        raise OSError(f"cannot save to {path}: it exists and is not a folder")
    atomic_save_file(tensors, path / WEIGHTS_NAME, {"format": "pt", "ditq_format_version": str(FORMAT_VERSION)})
    model_cfg["quantization_config"] = qcfg
    atomic_write_text(json.dumps(model_cfg, indent=2, sort_keys=True, default=str), path / CONFIG_NAME)
    return path


# -- loading ---------------------------------------------------------------------------------
def check_quantization_config(qcfg: Any, source: str) -> dict[str, Any]:
    from .methods import load_all

    load_all()  # method modules register the layer types they introduce
    if not isinstance(qcfg, dict):
        raise CheckpointError(f"{source}: no ditq quantization_config found")
    if qcfg.get("quant_method") != "ditq":
        raise CheckpointError(f"{source}: quant_method is {qcfg.get('quant_method')!r}, expected 'ditq'")
    version = qcfg.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{source}: unknown ditq format_version {version!r}; this ditq reads "
                              f"versions 1..{FORMAT_VERSION} (upgrade ditq?)")
    layers = qcfg.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{source}: quantization_config lists no layers")
    for name, spec in layers.items():
        if not isinstance(spec, dict) or spec.get("layer_type") not in LAYER_TYPES:
            raise CheckpointError(f"{source}: layer {name!r} has unknown layer_type "
                                  f"{spec.get('layer_type') if isinstance(spec, dict) else spec!r}; "
                                  f"known: {sorted(LAYER_TYPES)}")
    return qcfg


def prepare_quantized_modules(model: nn.Module, qcfg: dict[str, Any], source: str,
                              dtype: torch.dtype = torch.float32, *, mark: bool = True) -> None:
    """Swap the layers named in ``qcfg`` for empty quantized modules (on the meta device), ready
    for ``load_quantized_state``. Used by load_quantized, the diffusers backend and the nodes.
    ``mark=False`` leaves :func:`mark_quantized` to the caller (diffusers' loader marks the model
    itself once the weights are in)."""
    from .models import set_submodule

    for name, spec in qcfg["layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{source}: layer {name!r} does not exist in {type(model).__name__}") from None
        try:
            mod = LAYER_TYPES[spec["layer_type"]].from_spec(spec, dtype=dtype)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: layer {name!r} has an invalid spec: {e}") from e
        mod.layer_name = name
        set_submodule(model, name, mod)
    for layer_type in {spec["layer_type"] for spec in qcfg["layers"].values()}:
        LAYER_TYPES[layer_type].attach(model)
    state = {"method": qcfg.get("method"), "recipe": qcfg.get("recipe"),
             "method_state": qcfg.get("method_state", {})}
    if mark:
        mark_quantized(model, state)
    else:
        model.ditq_state = state


def stored_dtype(qcfg: dict[str, Any]) -> torch.dtype | None:
    """The dtype of a checkpoint's full-precision tensors (None for files written before ditq recorded it)."""
    dtype = getattr(torch, str(qcfg.get("torch_dtype")), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def load_quantized_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str,
                         torch_dtype: torch.dtype | None = None, keep_fp32: Sequence[str] = ()) -> nn.Module:
    """Validate ``tensors`` against ``model``'s expected keys, shapes and dtypes, then assign them.

    Quantized buffers keep their stored dtype; other floating tensors are cast to ``torch_dtype``,
    except those of modules named in ``keep_fp32`` (diffusers' ``_keep_in_fp32_modules``: a name
    matches as a dotted component, as diffusers matches it), which load as float32.
    """
    expected = model.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    every = {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}  # nested ones too
    fixed = {f"{n}.{b}" for n, m in every.items() for b in m._fixed_dtype}
    loaded = {}
    for key, ref in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if key in fixed:
            if t.dtype != ref.dtype:
                raise CheckpointError(f"{source}: tensor {key!r} has dtype {t.dtype}, expected {ref.dtype}")
        elif t.is_floating_point() and any(m in key.split(".") for m in keep_fp32):
            t = t.to(torch.float32)
        elif t.is_floating_point() and torch_dtype is not None:
            t = t.to(torch_dtype)
        elif t.is_floating_point() != ref.is_floating_point():
            raise CheckpointError(f"{source}: tensor {key!r} has dtype {t.dtype}, expected a {ref.dtype}-like tensor")
        loaded[key] = t.clone()  # own, aligned memory: a view into the file's buffer can change float results
    model.load_state_dict(loaded, strict=True, assign=True)
    for name, mod in every.items():
        scale = getattr(mod, "weight_scale", None)
        if scale is not None and not torch.isfinite(scale).all():
            raise CheckpointError(f"{source}: layer {name!r} has non-finite weight scales")
        try:
            mod.check_state()
        except ValueError as e:
            raise CheckpointError(f"{source}: layer {name!r}: {e}") from None
    return model


def read_single_file(path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Tensors, checked quantization config and model config of a single-file checkpoint."""
    tensors, meta = read_safetensors(path)
    try:
        qcfg = json.loads(meta["ditq.quantization_config"])
        model_cfg = json.loads(meta["ditq.model_config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header lacks a valid ditq quantization config ({e}); "
                              f"not a ditq single-file checkpoint") from None
    return tensors, check_quantization_config(qcfg, str(path)), model_cfg


def _diffusers_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        raise CheckpointError(f"model class {name!r} is not a diffusers model class; ditq never runs remote code")
    return cls


def build_empty_model(model_config: dict[str, Any], source: str) -> nn.Module:
    """Instantiate the model skeleton without allocating its parameters (buffers are real, so
    non-persistent ones such as positional embeddings get their values)."""
    from accelerate import init_empty_weights

    cfg = {k: v for k, v in model_config.items() if k != "quantization_config"}
    cls = _diffusers_class(cfg.get("_class_name", "?"))
    with init_empty_weights():
        return cls.from_config(cfg)


_REPO_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")


def is_repo_id(source: str) -> bool:
    """``org/name`` that is not an existing local path: the Hub is asked."""
    return bool(_REPO_ID.fullmatch(source)) and not Path(source).exists()


def local_path_missing(source: str) -> FileNotFoundError:
    return FileNotFoundError(f"{source}: local path does not exist"
                             + ("" if "/" in source or "\\" in source else " (a Hub repo id reads 'org/name')"))


def hub_error(repo: str, error: Exception, *, revision=None, local_files_only=False) -> Exception:
    """A clear error for a failed Hub request, one per cause; ``error`` itself if it is none of them."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, RevisionNotFoundError):
        return HubError(f"{repo}: revision {revision!r} not found on the Hub (a branch, tag or commit of the repo)")
    if isinstance(error, RepositoryNotFoundError):
        return HubError(f"{repo}: repo not found on the Hub (or private or gated: pass token=...)")
    if isinstance(error, LocalEntryNotFoundError):
        if local_files_only or constants.HF_HUB_OFFLINE:
            why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1"
            return HubError(f"{repo}: offline ({why}) and not in the local Hub cache; download it once online")
        return HubError(f"{repo}: could not reach the Hub ({error.__cause__ or error}) and it is not in the "
                        "local Hub cache; check the network or HF_ENDPOINT")
    return error


def _resolve_folder(path_or_repo: str, *, subfolder: str | None, revision, cache_dir, local_files_only) -> Path:
    p = Path(path_or_repo)
    if not p.exists():
        if p.suffix == ".safetensors" or not is_repo_id(str(path_or_repo)):
            raise local_path_missing(str(path_or_repo))
        from huggingface_hub import snapshot_download

        patterns = [f"{subfolder}/*", "model_index.json"] if subfolder else None
        try:
            p = Path(snapshot_download(str(path_or_repo), revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only, allow_patterns=patterns))
        except Exception as e:
            raise hub_error(str(path_or_repo), e, revision=revision, local_files_only=local_files_only) from e
        if subfolder is None and (p / "transformer" / CONFIG_NAME).is_file():
            subfolder = "transformer"
    elif subfolder is None and not (p / CONFIG_NAME).is_file() and (p / "transformer" / CONFIG_NAME).is_file():
        subfolder = "transformer"
    return p / subfolder if subfolder else p


def load_quantized(path_or_repo, torch_dtype: torch.dtype | None = None, *, subfolder: str | None = None,
                   revision: str | None = None, cache_dir=None, local_files_only: bool = False,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Build a quantized model from a ditq folder, single file, or Hub repo id alone.

    >>> transformer = load_quantized("pixart-w8a8", torch_dtype=torch.float16)
    """
    p = Path(path_or_repo)
    if p.suffix == ".safetensors":
        if not p.exists():
            raise local_path_missing(str(p))
        tensors, qcfg, model_cfg = read_single_file(p)
        source = str(p)
    else:
        folder = _resolve_folder(str(path_or_repo), subfolder=subfolder, revision=revision,
                                 cache_dir=cache_dir, local_files_only=local_files_only)
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.is_file():
            raise CheckpointError(f"{folder}: missing {CONFIG_NAME}")
        try:
            model_cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
        qcfg = model_cfg.get("quantization_config")
        source = str(folder / WEIGHTS_NAME)
        tensors, _ = read_safetensors(folder / WEIGHTS_NAME)
    check_quantization_config(qcfg, source)
    model = build_empty_model(model_cfg, source)
    dtype = torch_dtype or stored_dtype(qcfg)  # None: files from before ditq recorded it keep their dtypes
    prepare_quantized_modules(model, qcfg, source, dtype=dtype or torch.float32, mark=False)
    load_quantized_state(model, tensors, source, dtype, keep_fp32=getattr(model, "_keep_in_fp32_modules", None) or ())
    mark_quantized(model, model.ditq_state)
    return model.to(device).eval()
