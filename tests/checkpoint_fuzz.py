"""Seeded mutation fuzzer for ditq checkpoints: the loader must either build a model whose outputs are
finite or raise CheckpointError, quickly and without large allocations, whatever the file holds.

Used by tests/test_checkpoint_fuzz.py (a few hundred cases in CI) and as the campaign script::

    OMP_NUM_THREADS=1 .venv/bin/python tests/checkpoint_fuzz.py --cases 2400 --seed 0
    .venv/bin/python tests/checkpoint_fuzz.py --write-corpus tests/fixtures/hostile

Bases: a tiny PixArt (2 blocks, width 16) whose blocks mix every stored form (int8, packed asymmetric
int4 groups with a static input scale, smoothing + Hadamard rotation, fp8, codebook), saved as one
file and as a folder. Each case applies one mutation drawn from ``MUTATIONS``: byte flips,
truncations, tensor-index edits in the header, hostile model-config and layer-spec values, deep
nesting, huge layer lists, out-of-rule values (re-hashed, so the value rules are what must catch
them), dropped / renamed tensors and mismatched config.json / weights pairs.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import signal
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

CASE_SECONDS = 10.0  # a case taking longer counts as a hang

HOSTILE_INTS = [0, -1, 1, 3, 7, 16384, 100000, 1 << 20, 1 << 40, -(1 << 31)]
HOSTILE_VALUES = HOSTILE_INTS + [0.5, 1e308, "x", None, [], {}, [1] * 5, True]
BAD_FLOATS = [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e30, -1e30, 1e-45, 7e4]


class CaseTimeout(Exception):
    pass


# -- the base checkpoint ---------------------------------------------------------------------------
def tiny_model(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=16, in_channels=4, out_channels=8, cross_attention_dim=16, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False).eval()


def quantized_tiny_model(seed: int = 0):
    """Every block Linear replaced by a stored form, cycling through the kinds the format has."""
    from ditq.quant_core.config import LayerScheme
    from ditq.quant_core.layers import CodebookLinear, QuantLinear
    from ditq.quant_core.models import set_submodule

    model = tiny_model(seed)
    g = torch.Generator().manual_seed(seed)
    forms = [
        lambda lin, n: QuantLinear.from_linear(lin, LayerScheme(), name=n),
        lambda lin, n: QuantLinear.from_linear(
            lin, LayerScheme(weight_bits=4, weight_granularity="group", group_size=8, weight_symmetric=False,
                             act_mode="static_tensor"), name=n, input_scale=0.05),
        lambda lin, n: QuantLinear.from_linear(
            lin, LayerScheme(), name=n, smooth_scale=torch.rand(lin.in_features, generator=g) + 0.5,
            rotation_signs=(torch.randint(0, 2, (lin.in_features,), generator=g) * 2 - 1).to(torch.int8),
            rotation_block=8),
        lambda lin, n: QuantLinear.from_linear(
            lin, LayerScheme(weight_format="fp8", act_mode="dynamic_token_fp8", act_bits=8), name=n),
        lambda lin, n: CodebookLinear.from_codes(
            torch.randint(0, 4, (lin.out_features, lin.in_features // 2), generator=g),
            torch.randn(1, 4, 2, generator=g).half() * 0.1, lin.bias, name=n),
    ]
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks")]
    for i, name in enumerate(names):
        set_submodule(model, name, forms[i % len(forms)](model.get_submodule(name), name))
    model.ditq_state = {"method": "fuzz", "recipe": None, "method_state": {}}
    return model


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)


class Bases:
    """The saved base checkpoint as bytes, and its parts for mutations that rebuild a file."""

    def __init__(self, workdir: Path):
        from ditq.quant_core.serialization import CONFIG_NAME, WEIGHTS_NAME, read_safetensors, save_quantized

        model = quantized_tiny_model()
        self.single = (save_quantized(model, workdir / "base.safetensors")).read_bytes()
        folder = save_quantized(model, workdir / "base")
        self.folder_weights = (folder / WEIGHTS_NAME).read_bytes()
        self.folder_config = json.loads((folder / CONFIG_NAME).read_text())
        self.tensors, self.meta = read_safetensors(workdir / "base.safetensors")
        self.tensors = {k: v.clone() for k, v in self.tensors.items()}
        other = quantized_tiny_model(seed=1)  # same architecture, different weights: another save
        self.other_config = json.loads((save_quantized(other, workdir / "other") / CONFIG_NAME).read_text())


# -- mutations: each returns {relative path: bytes} describing the case's checkpoint ---------------
def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _single_from(tensors: dict, meta: dict) -> dict:
    from ditq.quant_core.serialization import CONTENT_HASH_KEY, content_hash
    from safetensors.torch import save

    meta = {k: v for k, v in meta.items() if k != CONTENT_HASH_KEY}
    return {"x.safetensors": save(tensors, {**meta, CONTENT_HASH_KEY: content_hash(tensors, meta)})}


def _with_configs(b: Bases, rng: random.Random, edit) -> dict:
    """Edit the (model config, quantization config) pair and re-save a hashed single file."""
    meta = dict(b.meta)
    model_cfg = json.loads(meta["ditq.model_config"])
    qcfg = json.loads(meta["ditq.quantization_config"])
    edit(model_cfg, qcfg, rng)
    meta["ditq.model_config"] = json.dumps(model_cfg)
    meta["ditq.quantization_config"] = json.dumps(qcfg)
    if rng.random() < 0.2:  # unhashed: the hash check alone must refuse it
        data = b.single
        header, body = _split(data)
        header["__metadata__"].update(meta)
        return {"x.safetensors": _join(header, body)}
    return _single_from(b.tensors, meta)


def m_flip_bytes(b, rng):
    data = bytearray(rng.choice([b.single, b.folder_weights]))
    for _ in range(rng.choice([1, 1, 2, 8])):
        data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    return {"x.safetensors": bytes(data)}


def m_truncate(b, rng):
    return {"x.safetensors": b.single[:rng.randrange(len(b.single))]}


def m_header_tensor(b, rng):
    header, body = _split(b.single)
    key = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[key]
    what = rng.choice(["dtype", "shape", "offsets", "drop"])
    if what == "dtype":
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "I8", "U8", "I64", "F8_E4M3", "BOOL", "Q4"])
    elif what == "shape":
        shape = entry["shape"]
        entry["shape"] = rng.choice([shape[::-1], [*shape, 1], [0], [1 << 40], [-1] + shape[1:], []])
    elif what == "offsets":
        a, z = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[z, a], [a, z + 4], [a, 1 << 50], [0, z - a]])
    else:
        del header[key]
    return {"x.safetensors": _join(header, body)}


def _model_cfg_edit(model_cfg, qcfg, rng):
    key = rng.choice(sorted(model_cfg))
    roll = rng.random()
    if roll < 0.15:
        model_cfg["_class_name"] = rng.choice(["ModelMixin", "os.system", "AutoencoderKL", "", 3,
                                               "UNet2DConditionModel", "DiTTransformer2DModel"])
    elif roll < 0.25:
        del model_cfg[key]
    else:
        model_cfg[key] = rng.choice(HOSTILE_VALUES)


def _spec_edit(model_cfg, qcfg, rng):
    layers = qcfg["layers"]
    name = rng.choice(sorted(layers))
    spec = layers[name]
    roll = rng.random()
    if roll < 0.1:
        del layers[name]
    elif roll < 0.2:
        layers[name + ".nope"] = dict(spec)
    elif roll < 0.3:
        spec["layer_type"] = rng.choice(["linear", "codebook", "timestep_switch", "mystery"])
    elif roll < 0.6 and isinstance(spec.get("scheme"), dict):
        spec["scheme"][rng.choice(sorted(spec["scheme"]))] = rng.choice(HOSTILE_VALUES + ["fp8", "group", "int"])
    else:
        spec[rng.choice(sorted(spec))] = rng.choice(HOSTILE_VALUES)


def _qcfg_edit(model_cfg, qcfg, rng):
    roll = rng.random()
    if roll < 0.3:
        qcfg[rng.choice(["format_version", "quant_method", "layers"])] = rng.choice(HOSTILE_VALUES + [2, "ditq"])
    elif roll < 0.5:
        spec = next(iter(qcfg["layers"].values()))
        for i in range(rng.choice([1000, 20000])):  # the corpus test has 100,000
            qcfg["layers"][f"transformer_blocks.{i}.attn1.to_q"] = spec
    else:
        qcfg[rng.choice(["method_state", "recipe", "ignore", "config_groups"])] = rng.choice(HOSTILE_VALUES)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def m_model_config(b, rng):
    return _with_configs(b, rng, _model_cfg_edit)


def m_layer_spec(b, rng):
    return _with_configs(b, rng, _spec_edit)


def m_quant_config(b, rng):
    return _with_configs(b, rng, _qcfg_edit)


def m_deep_json(b, rng):
    meta = dict(b.meta)
    key = rng.choice(["ditq.model_config", "ditq.quantization_config"])
    depth = rng.choice([70, 1000, 100000])
    meta[key] = rng.choice([_deep(depth), '{"a": ' + _deep(depth) + "}", '{"x": "' + "[" * depth + '"}'])
    return _single_from(b.tensors, meta)


def m_values(b, rng):
    tensors = {k: v.clone() for k, v in b.tensors.items()}
    floats = [k for k, v in tensors.items() if v.is_floating_point()]
    key = rng.choice(floats + [k for k in tensors if k.endswith(("rotation_signs", "_scale", "bias"))] * 3)
    t = tensors[key]
    flat = t.reshape(-1)
    idx = rng.randrange(flat.numel()) if flat.numel() else None
    if idx is not None:
        if t.is_floating_point():
            flat[idx] = rng.choice(BAD_FLOATS) if t.dtype != torch.float8_e4m3fn else float("nan")
            if rng.random() < 0.3:
                flat.fill_(flat[idx])
        else:
            flat[idx] = rng.choice([0, 2, -2, 127, -128])
    return _single_from(tensors, b.meta)


def m_tensor_set(b, rng):
    tensors = dict(b.tensors)
    key = rng.choice(sorted(tensors))
    roll = rng.random()
    if roll < 0.3:
        del tensors[key]
    elif roll < 0.5:
        tensors[key + "_x"] = tensors.pop(key)
    elif roll < 0.7:
        tensors[key] = tensors[key].reshape(tensors[key].shape[::-1]).contiguous()  # same numel, other shape
    elif roll < 0.85:
        tensors[key] = tensors[key].to(rng.choice([torch.float16, torch.int8, torch.uint8, torch.float64, torch.int64]))
    else:
        tensors["extra.weight"] = torch.zeros(3)
    return _single_from(tensors, b.meta)


def m_folder(b, rng):
    from ditq.quant_core.serialization import CONFIG_NAME, WEIGHTS_NAME

    cfg = json.loads(json.dumps(b.folder_config))
    weights = b.folder_weights
    roll = rng.random()
    if roll < 0.3:
        cfg = json.loads(json.dumps(b.other_config))  # config.json of another save: interrupted folder save
    elif roll < 0.5:
        _model_cfg_edit(cfg, cfg["quantization_config"], rng)
    elif roll < 0.7:
        _spec_edit(cfg, cfg["quantization_config"], rng)
    text = json.dumps(cfg)
    if roll >= 0.85:
        text = rng.choice([text[:rng.randrange(len(text))], _deep(100000), "\udcff", '{"a": NaN}', "[]"])
    elif roll >= 0.7:
        data = bytearray(weights)
        data[rng.randrange(len(data))] ^= 0x40
        weights = bytes(data)
    return {f"q/{CONFIG_NAME}": text.encode("utf-8", "surrogatepass"), f"q/{WEIGHTS_NAME}": weights}


MUTATIONS = {f.__name__[2:]: f for f in (m_flip_bytes, m_truncate, m_header_tensor, m_model_config, m_layer_spec,
                                         m_quant_config, m_deep_json, m_values, m_tensor_set, m_folder)}


def make_case(b: Bases, seed: int) -> tuple[str, dict]:
    rng = random.Random(seed)
    kind = rng.choice(sorted(MUTATIONS))
    return kind, MUTATIONS[kind](b, rng)


# -- running one case ------------------------------------------------------------------------------
def _alarm(signum, frame):
    raise CaseTimeout()


def run_case(files: dict, workdir: Path) -> tuple[str, str]:
    """Write the case's files and load them: ("ok" | "rejected" | "nonfinite" | "hang" | "error", detail)."""
    from ditq import CheckpointError, load_quantized

    for rel, data in files.items():
        path = workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    target = workdir / ("q" if any(r.startswith("q/") for r in files) else "x.safetensors")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        model = load_quantized(target)
        with torch.no_grad():
            out = model(**inputs())[0]
        return ("ok", "") if torch.isfinite(out).all() else ("nonfinite", "")
    except CheckpointError as e:
        return "rejected", str(e)
    except CaseTimeout:
        return "hang", ""
    except Exception as e:  # noqa: BLE001 - exactly what the fuzzer looks for
        return "error", f"{type(e).__name__}: {e}"[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        for rel in files:
            (workdir / rel).unlink(missing_ok=True)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def campaign(cases: int, seed: int = 0, log=None) -> dict:
    """Run ``cases`` seeded cases; returns counts per outcome, per mutation, the slowest case and the
    peak resident memory growth."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bases = Bases(tmp)
        outcomes, by_kind, failures = Counter(), Counter(), []
        rss0, slowest = max_rss_mib(), (0.0, None)
        for i in range(cases):
            kind, files = make_case(bases, seed * 1_000_003 + i)
            t0 = time.perf_counter()
            outcome, detail = run_case(files, tmp)
            dt = time.perf_counter() - t0
            slowest = max(slowest, (dt, f"case {i} ({kind})"))
            outcomes[outcome] += 1
            by_kind[kind, outcome] += 1
            if outcome in ("nonfinite", "hang", "error"):
                failures.append(f"case {i} ({kind}): {outcome} {detail}")
            if log and outcome in ("nonfinite", "hang", "error"):
                print(failures[-1], file=log, flush=True)
    return {"cases": cases, "outcomes": dict(outcomes), "by_kind": {f"{k}/{o}": n for (k, o), n in sorted(by_kind.items())},
            "failures": failures, "slowest_s": round(slowest[0], 3), "slowest_case": slowest[1],
            "rss_growth_mib": round(max_rss_mib() - rss0, 1)}


# -- the committed corpus: the nastiest cases the audit found ---------------------------------------
def corpus(b: Bases) -> dict[str, dict]:
    def cfg(**changes):
        return lambda m, q, rng: m.update(changes)

    def value(key, v):
        tensors = {k: t.clone() for k, t in b.tensors.items()}
        tensors[key].reshape(-1)[0] = v
        return _single_from(tensors, b.meta)

    rng = random.Random(0)
    header, body = _split(b.single)
    key = next(k for k in header if k.endswith("to_q.weight_scale"))
    header[key]["shape"] = header[key]["shape"][::-1]  # same numel, other shape
    data = bytearray(b.single)
    data[-5] ^= 0x10
    return {
        "sample_size_16384": _with_configs(b, rng, cfg(sample_size=16384)),
        "attention_head_dim_1M": _with_configs(b, rng, cfg(attention_head_dim=1 << 20)),
        "attention_head_dim_0": _with_configs(b, rng, cfg(attention_head_dim=0)),
        "num_layers_100000": _with_configs(b, rng, cfg(num_layers=100000)),
        "class_ModelMixin": _with_configs(b, rng, cfg(_class_name="ModelMixin")),
        "deep_nesting_100000": _single_from(b.tensors, {**b.meta, "ditq.model_config": _deep(100000)}),
        "transposed_scale": {"x.safetensors": _join(header, body)},
        "negative_weight_scale": value("transformer_blocks.0.attn1.to_q.weight_scale", -0.01),
        "huge_weight_scale": value("transformer_blocks.0.attn1.to_q.weight_scale", 1e30),
        "rotation_sign_2": value("transformer_blocks.0.attn1.to_v.rotation_signs", 2),
        "input_scale_0": value("transformer_blocks.0.attn1.to_k.input_scale", 0.0),
        "nan_bias": value("transformer_blocks.0.attn1.to_q.bias", float("nan")),
        "flipped_byte": {"x.safetensors": bytes(data)},
    }


def write_corpus(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, files in corpus(Bases(Path(tmp))).items():
            (folder / f"{name}.safetensors").write_bytes(files["x.safetensors"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=2400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-corpus", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.write_corpus:
        write_corpus(args.write_corpus)
        return 0
    t0 = time.perf_counter()
    result = campaign(args.cases, args.seed, log=sys.stderr)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    bad = sum(result["outcomes"].get(o, 0) for o in ("nonfinite", "hang", "error"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
