"""The only code that touches files: safetensors read/write, validation, format versioning.

Folder format (a diffusers model folder, DESIGN.md §3)::

    config.json                           the model's diffusers config + "quantization_config"
    diffusion_pytorch_model.safetensors   quantized layers' buffers + the kept full-precision tensors

``quantization_config`` = ``{"quant_method": "ditq", "format_version": 3, "method": ..., "recipe":
QuantConfig, "layers": {module name: layer spec}, "config_groups"/"ignore": the same in
compressed-tensors' vocabulary, "method_state": what a method must keep (seeds, genomes)}``.
``layers`` is authoritative: a model is rebuilt from it and the tensors alone.

Versions: the rule is to bump ``format_version`` when a file this version writes may hold something
an older reader would misread or cannot build. 2 added the ``split_planes`` layer (ViDiT-Q-MP's
W8 as two 4-bit planes); format-1 files still load unchanged (their ``timestep_switch`` layers derive
any lower-bit view once at load). 3 added ``weight_full_range`` to the layer scheme.

Integer ranges per version (``q`` the stored value, b the weight bits; asymmetric weights are
``[0, 2^b - 1]`` in every version, stored offset to signed):
- 1 and 2: symmetric weights are ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (int4 [-7, 7], int8 [-127, 127]);
  their schemes have no ``weight_full_range`` and a file of these versions that records one is refused.
- 3: the same, unless a layer's scheme records ``"weight_full_range": true`` (symmetric, b < 8): then
  ``[-2^(b-1), 2^(b-1) - 1]`` (int4 [-8, 7]). ditq writes it for symmetric 4-bit weights by default.
On load a symmetric 4- or 8-bit weight holding -2^(b-1) without that flag is refused (as is a -8 in
a ``split_planes`` high plane, [-7, 7] in every version).

Single-file format: the same tensors in one ``.safetensors`` whose header metadata holds
``ditq.quantization_config`` and ``ditq.model_config`` as JSON strings.

Writes go to a temporary name in the target folder and are renamed, so an interrupted or failed save
leaves the previous file (or nothing) in place; temporary files of killed saves are removed by the next
save into that folder. Saved files get the usual permissions (0666 less the umask). Never unpickles.

Integrity: every weights file ditq saves carries ``ditq.content_sha256`` in its header metadata, a
SHA-256 over the tensors (names, dtypes, shapes, bytes) and the other metadata entries; a folder's
``quantization_config.weights_sha256`` repeats it, so a folder whose config.json and weights come
from different saves (a save killed between the two renames) is refused instead of loading wrong.
Both are checked when present; files written before they existed (same format_version 1) load
without them.

Loader limits (a file from the Hub must not hang, exhaust memory or fail with an unexplained error):
JSON is size- and depth-bounded before parsing; counts in the model config are bounded by what the
file holds; the model is built on the meta device and every shape it implies is checked against the
tensor index in the file header before anything is allocated; values are checked against the format's
rules (``QuantModule.check_state``). Every failure is a :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import distributed as dist
from .layers import FP16_MAX, LAYER_TYPES, QuantModule

FORMAT_VERSION = 3
FULL_RANGE_VERSION = 3  # the first version whose layer schemes may record weight_full_range
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"


CONTENT_HASH_KEY = "ditq.content_sha256"
WEIGHTS_HASH_KEY = "weights_sha256"
MAX_JSON_BYTES = 64 << 20   # config.json / header JSON; real ones are kilobytes
MAX_JSON_DEPTH = 64         # real configs nest 5 deep; Python's parser recurses per level
MAX_CONFIG_INT = 1 << 24    # no dimension, size or count of a real DiT config comes near
MAX_BUFFER_BYTES = 256 << 20  # computed (non-persistent) buffers beyond the file's own size
STALE_TEMP_SECONDS = 24 * 3600


class CheckpointError(ValueError):
    """A quantized checkpoint is missing, truncated, tampered with or of an unknown format."""


class HubError(OSError):
    """The Hub could not be asked (offline, no network) or answered no (repo or revision not found)."""


# -- low level -------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temp_files(folder: Path) -> None:
    """Delete temporary files ``.{name}.{pid}.*.tmp`` left by killed saves: those whose process is gone
    (a save still running in another process keeps its file) or older than a day (pid reused)."""
    for tmp in Path(folder).glob(".*.tmp"):
        m = re.fullmatch(r"\..+\.(\d+)\.[^.]+\.tmp", tmp.name)
        if m is None:
            continue
        try:
            old = time.time() - tmp.stat().st_mtime > STALE_TEMP_SECONDS
            if old or not _process_alive(int(m.group(1))):
                tmp.unlink()
        except OSError:
            pass  # gone meanwhile, or not ours to delete


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise OSError(f"cannot write {path}: folder {folder} is not writable ({e.strerror})") from e
    os.close(fd)
    remove_stale_temp_files(folder)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a saved model is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable(path) -> None:
    """Raise OSError now if ``save_quantized(model, path)`` could not write there (run before a long
    quantization); creates nothing."""
    path = Path(path)
    if path.suffix != ".safetensors" and path.exists() and not path.is_dir():
        raise OSError(f"cannot save to {path}: it exists and is not a folder")
    target = path.parent if path.suffix == ".safetensors" else path
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OSError(f"cannot write {path}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ditq-write-check.", dir=existing)
    except OSError as e:
        raise OSError(f"cannot write {path}: folder {existing} is not writable ({e.strerror})") from e
    os.close(fd)
    os.unlink(probe)


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


def content_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over the tensors (sorted names, dtypes, shapes, bytes) and the metadata entries other
    than the hash itself: what ``ditq.content_sha256`` records."""
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != CONTENT_HASH_KEY):
        h.update(json.dumps([key, metadata[key]]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def layers_sha256(model, names) -> str:
    """SHA-256 of the named submodules' own parameters: the weights a resumable work file (a vq4dit
    state, a search's scores, an option bank) was made from, so it is never resumed for others."""
    return content_hash({f"{n}.{k}": t for n in names for k, t in model.get_submodule(n).named_parameters(recurse=False)},
                        {})


def save_hashed(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str]) -> str:
    """``atomic_save_file`` with the content hash added to the header; returns the hash."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    digest = content_hash(tensors, metadata)
    atomic_save_file(tensors, path, {**metadata, CONTENT_HASH_KEY: digest})
    return digest


def _safetensors_errors():
    from safetensors import SafetensorError

    return (SafetensorError, OSError, RuntimeError, ValueError, OverflowError)


def _read(path, take) -> tuple[dict[str, str], Any]:
    """``(header metadata, take(open file))`` with every failure a CheckpointError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, take(f)
    except _safetensors_errors() as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def read_header(path) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """``({tensor name: (shape, dtype name)}, metadata)`` from a safetensors header, reading no data
    (safetensors bounds the header and checks every tensor lies inside the file)."""
    def index(f):
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}

    meta, found = _read(path, index)
    return found, meta


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the header metadata; the content hash is checked if the header has one."""
    meta, tensors = _read(path, lambda f: {k: f.get_tensor(k) for k in f.keys()})
    if CONTENT_HASH_KEY in meta and content_hash(tensors, meta) != meta[CONTENT_HASH_KEY]:
        raise CheckpointError(f"{path}: content hash mismatch: the file was altered or corrupted after it was "
                              f"saved ({CONTENT_HASH_KEY} in its header no longer matches its tensors)")
    return tensors, meta


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, walked without recursion."""
    deepest, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level:  # breadth first, one level at a time
        deepest += 1
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, (dict, list))]
    return deepest


def json_budget(tensor_count: int) -> int:
    """Bytes of config JSON a checkpoint of ``tensor_count`` tensors can warrant: a layer's spec and its
    config_groups entry take ~1 KB and every layer stores at least one tensor; 16 KB each is generous."""
    return min(MAX_JSON_BYTES, (1 << 20) + (16 << 10) * tensor_count)


def parse_json(text: str, source: str, what: str = "JSON", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """``json.loads`` bounded in size and nesting depth. Python's parser recurses per level and raises
    RecursionError past ~1000 levels (a file nested 100,000 deep); shallower nesting is measured after."""
    if len(text) > max_bytes:
        raise CheckpointError(f"{source}: {what} is {len(text)} bytes, more than the {max_bytes} its tensors "
                              "warrant")
    try:
        value = json.loads(text)
    except RecursionError:
        raise CheckpointError(f"{source}: {what} nests deeper than the {MAX_JSON_DEPTH} levels allowed") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: invalid {what} ({e})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{source}: {what} nests {_depth(value)} levels deep, more than the "
                              f"{MAX_JSON_DEPTH} allowed")
    return value


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
        save_hashed(tensors, path, {"ditq.quantization_config": json.dumps(qcfg),
                                    "ditq.model_config": json.dumps(model_cfg, default=str)})
        return path
    if path.exists() and not path.is_dir():
        raise OSError(f"cannot save to {path}: it exists and is not a folder")
    digest = save_hashed(tensors, path / WEIGHTS_NAME, {"format": "pt", "ditq_format_version": str(FORMAT_VERSION)})
    # config.json is renamed into place last and names the weights it belongs to: a save killed
    # between the two renames leaves a pair the loader refuses rather than new weights, old config
    model_cfg["quantization_config"] = {**qcfg, WEIGHTS_HASH_KEY: digest}
    atomic_write_text(json.dumps(model_cfg, indent=2, sort_keys=True, default=str), path / CONFIG_NAME)
    return path


# -- loading ---------------------------------------------------------------------------------
_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                  "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def check_quantization_config(qcfg: Any, source: str, max_layers: int | None = None) -> dict[str, Any]:
    """Check the format fields and layer list; ``max_layers`` (the file's tensor count: every quantized
    layer stores at least one) bounds the list before anything is built from it."""
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
    if max_layers is not None and len(layers) > max_layers:
        raise CheckpointError(f"{source}: quantization_config lists {len(layers)} layers, but the file holds "
                              f"only {max_layers} tensors")
    for name, spec in layers.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("layer_type"), str) \
                or spec["layer_type"] not in LAYER_TYPES:
            raise CheckpointError(f"{source}: layer {name!r} has unknown layer_type "
                                  f"{spec.get('layer_type') if isinstance(spec, dict) else spec!r}; "
                                  f"known: {sorted(LAYER_TYPES)}")
    if version < FULL_RANGE_VERSION:
        _refuse_full_range_fields(layers, version, source)
    return qcfg


def _refuse_full_range_fields(layers: dict[str, Any], version: int, source: str) -> None:
    """Files older than FULL_RANGE_VERSION mean the symmetric range and cannot say otherwise."""
    for name, spec in layers.items():
        nested = spec.get("variants") if isinstance(spec.get("variants"), list) else []
        for part in (spec, *nested):
            scheme = part.get("scheme") if isinstance(part, dict) else None
            if isinstance(scheme, dict) and "weight_full_range" in scheme:
                raise CheckpointError(f"{source}: layer {name!r} records weight_full_range, which format_version "
                                      f"{version} does not have (it came with version {FULL_RANGE_VERSION})")


def check_model_config(model_cfg: Any, source: str, tensor_names) -> dict[str, Any]:
    """Bound what the stored model config can ask to build, before building it: no integer beyond
    ``MAX_CONFIG_INT``, no non-finite float, and no count of repeated blocks (``*layers``, ``*blocks``,
    ``depth``) above the largest block index the file's tensor names hold."""
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{source}: model_config is a {type(model_cfg).__name__}, expected an object")
    blocks = 1 + max((int(p) for n in tensor_names for p in n.split(".") if p.isdigit() and len(p) < 9), default=0)
    for key, value in model_cfg.items():
        if key == "quantization_config":
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        if len(items) > 4096:
            raise CheckpointError(f"{source}: model_config[{key!r}] has {len(items)} entries")
        for v in items:
            if isinstance(v, bool):
                continue
            if isinstance(v, int) and abs(v) > MAX_CONFIG_INT:
                raise CheckpointError(f"{source}: model_config[{key!r}] = {v} is beyond any real model "
                                      f"(limit {MAX_CONFIG_INT})")
            if isinstance(v, float) and not math.isfinite(v):
                raise CheckpointError(f"{source}: model_config[{key!r}] = {v} is not finite")
        if (re.search(r"(layers|blocks|depth)$", key) and isinstance(value, int) and not isinstance(value, bool)
                and value > blocks):
            raise CheckpointError(f"{source}: model_config[{key!r}] = {value}, but the file's tensors hold at "
                                  f"most {blocks} repeated blocks")
    return model_cfg


def _check_index(expected: dict[str, torch.Tensor], index: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 fixed: set[str], source: str) -> None:
    """Names, shapes and dtypes of a checkpoint's tensors against a model's state dict (the model may
    be on the meta device: nothing is allocated)."""
    missing = sorted(set(expected) - set(index))
    unexpected = sorted(set(index) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key, ref in expected.items():
        shape, dtype = index[key]
        if tuple(shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(shape)}, expected {tuple(ref.shape)}")
        if key in fixed:
            if dtype != ref.dtype:
                raise CheckpointError(f"{source}: tensor {key!r} has dtype {dtype}, expected {ref.dtype}")
        elif dtype.is_floating_point != ref.is_floating_point():
            raise CheckpointError(f"{source}: tensor {key!r} has dtype {dtype}, expected a {ref.dtype}-like tensor")


def _fixed_dtype_keys(model: nn.Module) -> set[str]:
    every = {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}  # nested ones too
    return {f"{n}.{b}" for n, m in every.items() for b in m._fixed_dtype}


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
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"{source}: layer {name!r} has an invalid spec: {type(e).__name__}: {e}") from e
        for sub, m in mod.named_modules():  # nested variants keep their names for error messages
            if isinstance(m, QuantModule):
                m.layer_name = f"{name}.{sub}" if sub else name
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
    """Validate ``tensors`` against ``model``'s expected keys, shapes and dtypes, and their values
    against the format's rules, then assign them.

    Quantized buffers keep their stored dtype; other floating tensors are cast to ``torch_dtype``,
    except those of modules named in ``keep_fp32`` (diffusers' ``_keep_in_fp32_modules``: a name
    matches as a dotted component, as diffusers matches it), which load as float32.
    """
    expected = model.state_dict(keep_vars=True)
    fixed = _fixed_dtype_keys(model)
    _check_index(expected, {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, fixed, source)
    stored = {t.dtype for k, t in tensors.items()
              if t.is_floating_point() and k not in fixed and not any(m in k.split(".") for m in keep_fp32)}
    if torch_dtype is None and len(stored) > 1:  # a save holds one compute dtype; mixed ones cannot run
        raise CheckpointError(f"{source}: full-precision tensors mix dtypes {sorted(map(str, stored))}")
    loaded = {}
    for key in expected:
        t = tensors[key]
        if t.is_floating_point() and key not in fixed:
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{source}: tensor {key!r} has NaN/Inf values")
            if t.numel() and t.abs().max() > FP16_MAX:
                raise CheckpointError(f"{source}: tensor {key!r} has values beyond +-{FP16_MAX:g}; a DiT's "
                                      "weights fit float16, the compute dtype it is run in")
            if any(m in key.split(".") for m in keep_fp32):
                t = t.to(torch.float32)
            elif torch_dtype is not None:
                t = t.to(torch_dtype)
        loaded[key] = t.clone()  # own, aligned memory: a view into the file's buffer can change float results
    model.load_state_dict(loaded, strict=True, assign=True)
    for name, mod in model.named_modules():
        if isinstance(mod, QuantModule):
            try:
                mod.check_state()
            except ValueError as e:
                raise CheckpointError(f"{source}: layer {name!r}: {e}") from None
    return model


def read_single_file(path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Tensors, checked quantization config and model config of a single-file checkpoint."""
    index, meta = read_header(path)
    qcfg, model_cfg = _single_file_configs(path, meta, index)
    tensors, _ = read_safetensors(path)
    return tensors, qcfg, model_cfg


def _single_file_configs(path, meta: dict[str, str], index) -> tuple[dict[str, Any], dict[str, Any]]:
    if "ditq.quantization_config" not in meta or "ditq.model_config" not in meta:
        raise CheckpointError(f"{path}: header lacks a ditq quantization config; not a ditq single-file checkpoint")
    budget = json_budget(len(index))
    qcfg = parse_json(meta["ditq.quantization_config"], str(path), "ditq.quantization_config", budget)
    model_cfg = parse_json(meta["ditq.model_config"], str(path), "ditq.model_config", budget)
    check_quantization_config(qcfg, str(path), max_layers=len(index))
    return qcfg, check_model_config(model_cfg, str(path), index)


def _diffusers_class(name: Any, source: str):
    import diffusers

    try:
        cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    except Exception:  # noqa: BLE001 - a lazy diffusers attribute whose import fails is no model class either
        cls = None
    if (cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin)
            or cls is diffusers.ModelMixin):
        raise CheckpointError(f"{source}: model class {name!r} is not a diffusers model class; ditq never runs "
                              "remote code")
    return cls


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    kinds = (int, str, (list, tuple))
    return next((isinstance(value, k) for k in kinds if isinstance(default, k)), True)


def _check_config_types(cfg: dict[str, Any], cls: type, source: str) -> None:
    """Each stored value of a constructor argument must be of its default's kind (a string ``norm_eps``
    would build and then fail in the first forward); arguments defaulting to None take scalars."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    for key, value in cfg.items():
        if key not in params or params[key].default is inspect.Parameter.empty:
            continue
        default = params[key].default
        ok = (value is None or isinstance(value, (bool, int, float, str))) if default is None else \
            _same_kind(value, default)
        if ok and isinstance(default, float) and default > 0 and not value > 0:  # epsilons, scales
            raise CheckpointError(f"{source}: model_config[{key!r}] = {value!r} must be > 0 (default {default!r})")
        if not ok:
            raise CheckpointError(f"{source}: model_config[{key!r}] = {value!r} is not of the kind "
                                  f"{cls.__name__} takes ({type(default).__name__}, like its default {default!r})")


def build_empty_model(model_config: dict[str, Any], source: str, *, meta: bool = False) -> nn.Module:
    """Instantiate the model skeleton without allocating its parameters. With ``meta`` everything is
    on the meta device (shapes only); otherwise buffers are real, so non-persistent ones such as
    positional embeddings get their values. Any failure of the model's constructor on the stored
    config is a CheckpointError."""
    from accelerate import init_empty_weights

    cfg = {k: v for k, v in model_config.items() if k != "quantization_config"}
    cls = _diffusers_class(cfg.get("_class_name", "?"), source)
    _check_config_types(cfg, cls, source)
    try:
        with torch.device("meta") if meta else init_empty_weights():
            return cls.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - the constructor's own errors on a hostile config
        raise CheckpointError(f"{source}: the stored model config does not build a {cls.__name__}: "
                              f"{type(e).__name__}: {e}") from None


def check_computed_buffers(model: nn.Module, source: str) -> None:
    """Buffers the constructor computed from the config (positional tables) must be finite: a config
    value such as ``interpolation_scale = 0`` builds a model whose every output is NaN."""
    stored = {id(t) for t in model.state_dict(keep_vars=True).values()}
    for name, buf in model.named_buffers():
        if id(buf) not in stored and buf.is_floating_point() and not torch.isfinite(buf).all():
            raise CheckpointError(f"{source}: the stored model config makes buffer {name!r} non-finite")


def plan_model(model_cfg: dict[str, Any], qcfg: dict[str, Any], index: dict[str, tuple[tuple[int, ...], str]],
               file_bytes: int, source: str) -> None:
    """Build the model on the meta device and check every shape and dtype it implies against the
    file's tensor index, and the buffers its constructor computes against the file's size, before
    anything is allocated."""
    skeleton = build_empty_model(model_cfg, source, meta=True)
    prepare_quantized_modules(skeleton, qcfg, source)
    dtypes = {}
    for k, (shape, name) in index.items():
        if name not in _HEADER_DTYPES:
            raise CheckpointError(f"{source}: tensor {k!r} has unsupported dtype {name}")
        dtypes[k] = (shape, _HEADER_DTYPES[name])
    expected = skeleton.state_dict(keep_vars=True)
    _check_index(expected, dtypes, _fixed_dtype_keys(skeleton), source)
    stored = {id(t) for t in expected.values()}
    computed = sum(b.numel() * b.element_size() for b in skeleton.buffers() if id(b) not in stored)
    if computed > file_bytes + MAX_BUFFER_BYTES:
        raise CheckpointError(f"{source}: the stored model config implies {computed / 2**20:.0f} MiB of computed "
                              f"buffers (positional tables) for a {file_bytes / 2**20:.0f} MiB file")


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
        weights = source = str(p)
        index, meta = read_header(p)
        qcfg, model_cfg = _single_file_configs(p, meta, index)
        plan_model(model_cfg, qcfg, index, p.stat().st_size, source)
    else:
        folder = _resolve_folder(str(path_or_repo), subfolder=subfolder, revision=revision,
                                 cache_dir=cache_dir, local_files_only=local_files_only)
        weights = source = str(folder / WEIGHTS_NAME)
        model_cfg, qcfg = check_folder(folder)
    tensors, _ = read_safetensors(weights)
    model = build_empty_model(model_cfg, source)
    check_computed_buffers(model, source)
    dtype = torch_dtype or stored_dtype(qcfg)  # None: files from before ditq recorded it keep their dtypes
    prepare_quantized_modules(model, qcfg, source, dtype=dtype or torch.float32, mark=False)
    load_quantized_state(model, tensors, source, dtype, keep_fp32=getattr(model, "_keep_in_fp32_modules", None) or ())
    mark_quantized(model, model.ditq_state)
    return model.to(device).eval()


def check_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything about a ditq folder that can be checked before allocating: header, config bounds,
    the weights hash, and the meta-device plan against the tensor index. Returns (model config,
    quantization config). Loaders that build the model themselves (diffusers) call it first."""
    folder = Path(folder)
    weights = source = str(folder / WEIGHTS_NAME)
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder}: missing {CONFIG_NAME}")
    index, meta = read_header(weights)
    model_cfg, qcfg = read_folder_config(folder, json_budget(len(index)))
    check_quantization_config(qcfg, source, max_layers=len(index))
    check_model_config(model_cfg, str(folder / CONFIG_NAME), index)
    _check_weights_hash(qcfg, meta, folder)
    plan_model(model_cfg, qcfg, index, Path(weights).stat().st_size, source)
    return model_cfg, qcfg


def read_folder_config(folder: Path, max_bytes: int = MAX_JSON_BYTES) -> tuple[dict[str, Any], Any]:
    """A folder's config.json (size- and depth-bounded) and the quantization_config in it."""
    cfg_path = Path(folder) / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: missing {CONFIG_NAME}")
    if cfg_path.stat().st_size > max_bytes:
        raise CheckpointError(f"{cfg_path}: {cfg_path.stat().st_size} bytes, more than the {max_bytes} its "
                              "tensors warrant")
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable ({e})") from None
    model_cfg = parse_json(text, str(cfg_path), max_bytes=max_bytes)
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(model_cfg).__name__}")
    return model_cfg, model_cfg.get("quantization_config")


def _check_weights_hash(qcfg: dict[str, Any], meta: dict[str, str], folder: Path) -> None:
    recorded = qcfg.get(WEIGHTS_HASH_KEY)
    if recorded is not None and recorded != meta.get(CONTENT_HASH_KEY):
        raise CheckpointError(f"{folder}: {CONFIG_NAME} and {WEIGHTS_NAME} come from different saves (a save "
                              f"interrupted between them?): config.json records weights {str(recorded)[:12]}..., "
                              f"the weights file is {str(meta.get(CONTENT_HASH_KEY))[:12]}...")
