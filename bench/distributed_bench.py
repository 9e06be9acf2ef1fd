"""Wall time of calibration + quantization with 1 and N processes (torch.distributed, torchrun).

Each run is ``torchrun --nproc_per_node n`` of this script in worker mode: load the model, calibrate
(``--prompts`` prompts x ``--steps`` steps, the statistics the preset needs), quantize with the
preset (default q-dit-w4a8: GPTQ per layer), save; rank 0 records the times of each phase and checks
the checkpoint is bit-identical to the one-process one. gloo on CPUs, NCCL with one GPU per rank.

    python bench/distributed_bench.py                      # built-in PixArt, CPU, 1 and 2 processes
    python bench/distributed_bench.py --nprocs 1 2 4 8     # one machine with 8 GPUs
    python bench/distributed_bench.py --model PixArt-alpha/PixArt-XL-2-512x512 --prompts 16 --steps 20

Writes ``<out>/distributed_bench.{json,md}`` (default bench/results/): wall seconds per phase and the
CPU seconds of the busiest rank (the wall time on uncontended cores). Set ``--threads`` so that
nprocs x threads fits the cores: every run uses the same number of threads per process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    import torch

    from ditq import QuantConfig, calibrate, quantize, save_quantized
    from ditq.demo import load_pipeline
    from ditq.evaluation.prompts import load_prompts
    from ditq.quant_core import distributed as dist
    from ditq.quant_core.methods import calibration_needs
    from ditq.quant_core.serialization import atomic_write_text

    dist.init_from_env()
    torch.set_num_threads(args.threads)
    pipe, call = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dist.device())
    cfg = QuantConfig.preset(args.preset)
    extra = {k: v for k, v in call.items() if k != "num_inference_steps"}
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    calib = calibrate(pipe, load_prompts("calibration")[:args.prompts], num_inference_steps=args.steps,
                      needs=calibration_needs(cfg), progress=False, **extra)
    c1 = time.process_time()
    dist.barrier()
    t1 = time.perf_counter()
    quantize(pipe.transformer, cfg, calib, progress=False)
    c2 = time.process_time()
    dist.barrier()
    t2 = time.perf_counter()
    save_quantized(pipe.transformer, args.checkpoint)
    # CPU seconds of the busiest rank: what the wall time would be on cores no one else uses
    cpu = dist.gather_objects((c1 - c0, c2 - c1))
    atomic_write_text(json.dumps({"calibrate_s": t1 - t0, "quantize_s": t2 - t1, "total_s": t2 - t0,
                                  "busiest_rank_cpu_s": max(a for a, _ in cpu) + max(b for _, b in cpu),
                                  "device": str(dist.device())}), args.result)


def launch(nproc: int, args, folder: Path) -> dict:
    result, checkpoint = folder / f"np{nproc}.json", folder / f"np{nproc}.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker",
           "--preset", args.preset, "--prompts", str(args.prompts), "--steps", str(args.steps),
           "--threads", str(args.threads), "--result", str(result), "--checkpoint", str(checkpoint)]
    if args.model:
        cmd += ["--model", args.model]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=folder, env=env)
    row = json.loads(result.read_text())
    row.update(nprocs=nproc, process_wall_s=time.perf_counter() - start)
    return row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def identical(a: Path, b: Path) -> bool:
    from ditq.quant_core.serialization import read_safetensors
    import torch

    (ta, ma), (tb, mb) = read_safetensors(a), read_safetensors(b)
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="diffusers PixArt folder or Hub id (default: the built-in tiny PixArt)")
    p.add_argument("--preset", default="q-dit-w4a8")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1, help="runs per process count; the fastest is kept")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--note", default="", help="free text stored with the figures (machine load...)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nprocs:
            runs = [launch(n, args, Path(tmp)) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["total_s"])
            best["identical_to_1_process"] = identical(Path(tmp) / f"np{args.nprocs[0]}.safetensors",
                                                       Path(tmp) / f"np{n}.safetensors")
            rows.append(best)
            print(json.dumps(best), flush=True)
    base = rows[0]["total_s"]
    for r in rows:
        r["speedup"] = base / r["total_s"]
        r["cpu_speedup"] = rows[0]["busiest_rank_cpu_s"] / r["busiest_rank_cpu_s"]
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host_cpus": os.cpu_count(), "platform": platform.platform(), "model": args.model or "built-in tiny PixArt",
            "preset": args.preset, "prompts": args.prompts, "steps": args.steps, "threads_per_process": args.threads,
            "repeats": args.repeats, "note": args.note, "command": shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# calibration + quantization with torch.distributed ({meta['model']}, {args.preset})", "",
             f"{args.prompts} prompts x {args.steps} steps, {args.threads} thread(s) per process, "
             f"best of {args.repeats}; {meta['date']}; {meta['command']}", ""]
    if args.note:
        lines += [f"Note: {args.note}", ""]
    lines += ["| processes | device | calibrate s | quantize s | total s | speedup | busiest rank CPU s | CPU speedup "
              "| process wall s | identical |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['nprocs']} | {r['device']} | {r['calibrate_s']:.2f} | {r['quantize_s']:.2f} | {r['total_s']:.2f} | "
              f"{r['speedup']:.2f}x | {r['busiest_rank_cpu_s']:.2f} | {r['cpu_speedup']:.2f}x | {r['process_wall_s']:.1f} "
              f"| {r['identical_to_1_process']} |" for r in rows]
    lines += ["", "total = calibrate + quantize wall seconds (model loading, process start and saving excluded; "
              "process wall s includes them). Busiest rank CPU s: the larger per-phase process CPU time over "
              "the ranks, summed over the phases: the wall time to expect on cores no other job uses."]
    (out / "distributed_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
