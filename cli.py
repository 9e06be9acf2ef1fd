"""Command line: ``python -m ditq demo | quantize | info``."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.model, args.presets, args.out, args.prompt, args.seed, args.calib_prompts)
    return 0


def _quantize(args) -> int:
    """Under ``torchrun`` (WORLD_SIZE > 1) the ranks join one process group and split calibration
    and per-layer work; every rank ends with the same model and rank 0 alone prints and saves."""
    import torch.distributed

    from .quant_core import distributed as dist

    started = dist.init_from_env()
    try:
        return _quantize_on_this_rank(args)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _quantize_on_this_rank(args) -> int:
    import torch

    from .demo import load_pipeline
    from .quant_core import distributed as dist
    from .quant_core.calibration import calibrate
    from .quant_core.config import QuantConfig
    from .quant_core.methods import calibration_needs
    from .quant_core.quantize import quantize
    from .quant_core.serialization import check_writable, save_quantized

    check_writable(args.out)  # before minutes of calibration and quantization, not after
    cfg = (QuantConfig.from_json(Path(args.config).read_text()) if args.config
           else QuantConfig.preset(args.preset, small=args.small))
    pipe, call = load_pipeline(args.model, getattr(torch, args.dtype))
    pipe.set_progress_bar_config(disable=True)
    if dist.device().type == "cuda":  # NCCL: one GPU per rank
        pipe.to(dist.device())
    needs = calibration_needs(cfg)
    calib = None
    if needs:
        extra = {k: v for k, v in call.items() if k != "num_inference_steps"}
        calib = calibrate(pipe, _calibration_inputs(pipe, args),
                          num_inference_steps=args.steps or call["num_inference_steps"], config=cfg,
                          workdir=args.workdir, progress=dist.is_main(), **extra)
    report = quantize(pipe.transformer, cfg, calib, progress=dist.is_main())
    saved = save_quantized(pipe.transformer, args.out)
    if dist.is_main():
        print(report)
        print(f"saved to {saved}" + (f" (by rank 0 of {dist.world_size()})" if dist.active() else ""))
    return 0


def _calibration_inputs(pipe, args) -> list:
    """The calibration prompts of a text-conditioned pipeline (PixArt); class labels for a
    class-conditional one (DiT): ``--calib-labels``, else ``--calib-prompts`` labels spread over the
    pipeline's classes (ImageNet: 0, 125, 250, ... for 8)."""
    from .evaluation.prompts import load_prompts
    from .quant_core.sampling import takes_prompts

    if takes_prompts(pipe):
        if args.calib_labels:
            raise ValueError("--calib-labels is for class-conditional pipelines (DiT); this pipeline takes "
                             "text prompts: use --calib-prompts N")
        return load_prompts("calibration")[: args.calib_prompts]
    if args.calib_labels:
        return args.calib_labels
    classes = sorted(set(getattr(pipe, "labels", {}).values())) or list(range(pipe.transformer.config.num_embeds_ada_norm))
    return classes[:: max(1, len(classes) // args.calib_prompts)][: args.calib_prompts]


def _info(args) -> int:
    from .quant_core.serialization import check_quantization_config, read_folder_config, read_single_file

    path = Path(args.path)
    if path.suffix == ".safetensors":
        _, qcfg, _ = read_single_file(path)
    else:
        _, qcfg = read_folder_config(path if path.is_dir() else path.parent)
        check_quantization_config(qcfg, str(path))
    layers = qcfg["layers"]
    formats = Counter(_format_of(spec) for spec in layers.values())
    print(f"ditq format v{qcfg['format_version']}, method {qcfg.get('method')}, {len(layers)} quantized layers")
    for fmt, n in sorted(formats.items(), key=str):
        print(f"  {n:4d} x {fmt}")
    ignore = qcfg.get("ignore", [])
    print(f"  kept in full precision: {len(ignore) if isinstance(ignore, list) else '?'} Linear layers")
    if args.verify:
        from .quant_core.serialization import load_quantized

        load_quantized(path)
        print("verified: the model loads from this checkpoint alone")
    return 0


def _format_of(spec: dict) -> str:
    scheme = spec.get("scheme")
    if spec["layer_type"] == "linear" and isinstance(scheme, dict) and isinstance(scheme.get("weight_bits"), int):
        return f"int{scheme['weight_bits']} weights"
    return str(spec["layer_type"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ditq", description="Post-training quantization for diffusion transformers")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="quantize a PixArt with every preset; side-by-side PNG and a table")
    d.add_argument("--model", help="diffusers PixArt folder or Hub repo id (default: the built-in tiny PixArt)")
    d.add_argument("--presets", nargs="+", help="presets to run (default: every quick preset)")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--prompt")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--calib-prompts", type=int, default=4)
    d.set_defaults(fn=_demo)
    q = sub.add_parser("quantize", help="quantize a PixArt or DiT transformer and save it")
    q.add_argument("--model", help="diffusers PixArt or DiT folder, or Hub repo id (default: built-in PixArt)")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset")
    g.add_argument("--config", help="QuantConfig JSON file")
    q.add_argument("--out", required=True, help="output folder, or a .safetensors file")
    q.add_argument("--calib-prompts", type=int, default=8,
                   help="how many calibration prompts (class labels for a class-conditional DiT)")
    q.add_argument("--calib-labels", type=int, nargs="+", help="class labels to calibrate a DiT on")
    q.add_argument("--steps", type=int)
    q.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    q.add_argument("--small", action="store_true",
                   help="the preset's documented small settings (slow presets: seconds, for smoke tests)")
    q.add_argument("--workdir", help="resumable work files of searched presets (qua2sedimo-*)")
    q.set_defaults(fn=_quantize)
    i = sub.add_parser("info", help="describe a quantized checkpoint")
    i.add_argument("path")
    i.add_argument("--verify", action="store_true", help="also load it fully")
    i.set_defaults(fn=_info)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for users; --debug shows the traceback
        if args.debug:
            raise
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
