#!/usr/bin/env bash
# Every GPU benchmark in one command, sized to finish within 10 minutes on an H100 / H200:
#
#     bash bench/run_gpu.sh
#
# Needs torch with CUDA, triton (and diffusers for the end-to-end part) installed; imports this
# checkout as `ditq` without installing it. Writes bench/results/gemm_<gpu>.md and e2e_<gpu>.md; every
# row also streams to the matching .log, so a step cut off by its time limit still leaves what it
# measured. Limits: GEMM 300 s (PixArt-XL shapes at M 4096 and 8192, autotuning included), end to end
# 270 s (PixArt-XL transformer at 1024 px, bf16 / W8A8 / W4A8 / FP8, eager and compiled).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/bench/results"
pkg=$(mktemp -d)
trap 'rm -rf "$pkg"' EXIT
ln -s "$root" "$pkg/ditq"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
cd "$pkg"  # not the checkout: its kernels/ folder would shadow packages of that name
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower()
                  if torch.cuda.is_available() else 'none')")
[ "$gpu" = none ] && { echo "run_gpu.sh: no CUDA GPU" >&2; exit 1; }

timeout 300 python "$root/bench/bench_gemm.py" --m 4096 8192 --out "$out/gemm_$gpu.md" 2>&1 \
    | tee "$out/gemm_$gpu.log"
timeout 270 python "$root/bench/bench_e2e.py" --px 1024 --iters 5 --out "$out/e2e_$gpu.md" 2>&1 \
    | tee "$out/e2e_$gpu.log"
