"""LoRA on quantized models as a full-precision branch (issue 17), measured on the built-in PixArt.

    PYTHONPATH=<dir holding ditq> python3 bench/lora_branches.py [--rank 4] [--size 0.15]

Run from outside the repository root (its ``kernels/`` folder would shadow the ``kernels`` package
transformers probes for). Writes ``bench/results/lora_branches.md`` (device, date, commit, command).

A random rank-``r`` LoRA on every block Linear (attention q/k/v/out, both attentions, and the MLP) is
injected with PEFT (``ditq.lora_config``: ditq layers get ditq's PEFT layer, FP Linears PEFT's own)
into the FP and each quantized transformer. LoRA effect = relative L2 change of the sampled latents
the LoRA causes, at strengths 0.1 and 1. Then two stacked adapters (1.0 and -0.5), one removed, all
removed, and PEFT's disable/enable/delete, each checked bit for bit where it must restore an output.
Last, the per-step cost of the branches: one transformer forward (CFG batch) without LoRA, with one
and with two adapters, PEFT's unmerged path and merged into the layers' own branches.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROMPTS = ["a red fox in snow", "a city at night", "a bowl of fruit on a wooden table", "a lighthouse at dawn"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
KINDS = ["rtn-w8a8-dynamic", "rtn-w4a8", "rtn-w4a16", "rtn-fp8", "kmeans-c4", "switch-w4/w8"]


# -- models --------------------------------------------------------------------------------------
def codebook_transformer(fp):
    """Block Linears as 4-bit per-channel k-means codebooks (Qua²SeDiMo's K-Means-C), built directly."""
    from ditq.quant_core.layers import CodebookLinear
    from ditq.quant_core.models import select_layers, set_submodule
    from ditq.quant_core.methods.qua2sedimo.options import kmeans_codebook

    model = copy.deepcopy(fp)
    for name in select_layers(model):
        lin = model.get_submodule(name)
        idx, book = kmeans_codebook(lin.weight.detach(), 4, per_channel=True)
        set_submodule(model, name, CodebookLinear.from_assignment(lin, idx, book, 4, name=name))
    return model


def switch_transformer(fp):
    """rtn-w8a8-dynamic with every layer a timestep switch: a 4-bit view of the weights for t >= 500,
    the 8 stored bits after (late 4-bit steps barely move this model's output)."""
    from ditq import QuantConfig, quantize
    from ditq.quant_core.layers import QuantLinear
    from ditq.quant_core.models import set_submodule
    from ditq.quant_core.methods.vidit_q.switching import TimestepSwitchLinear, track_timesteps

    model = copy.deepcopy(fp)
    quantize(model, QuantConfig.preset("rtn-w8a8-dynamic"), progress=False)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            set_submodule(model, name, TimestepSwitchLinear([mod], [500.0], [(0, 4), (0, 8)]))
    track_timesteps(model)
    return model


def quantized(fp, kind):
    from ditq import QuantConfig, quantize

    if kind == "kmeans-c4":
        return codebook_transformer(fp)
    if kind == "switch-w4/w8":
        return switch_transformer(fp)
    model = copy.deepcopy(fp)
    quantize(model, QuantConfig.preset(kind), progress=False)
    return model


# -- LoRA through PEFT ---------------------------------------------------------------------------
def random_lora(fp, rank: int, size: float, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (A [r, K], B [N, r])}`` for the targeted block Linears of ``fp``; ``size`` sets B."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in fp.named_modules():
        if name.startswith("transformer_blocks.") and isinstance(mod, torch.nn.Linear) and \
                any(name.endswith("." + t) for t in TARGETS):
            out[name] = (torch.randn(rank, mod.in_features, generator=g) * mod.in_features ** -0.5,
                         torch.randn(mod.out_features, rank, generator=g) * size)
    return out


def merged_fp(fp, stack: list[tuple[dict, float]]):
    """A copy of ``fp`` with ``(factors, strength)`` LoRAs merged into its float weights."""
    model = copy.deepcopy(fp)
    with torch.no_grad():
        for factors, strength in stack:
            for name, (a, b) in factors.items():
                model.get_submodule(name).weight += strength * b @ a
    return model


def add_adapter(transformer, factors, adapter: str, strength: float) -> None:
    """Inject ``factors`` as PEFT adapter ``adapter`` (alpha = rank) at ``strength``."""
    from peft import inject_adapter_in_model
    from peft.functional import set_adapter

    from ditq import lora_config

    rank = next(iter(factors.values()))[0].shape[0]
    inject_adapter_in_model(lora_config(r=rank, lora_alpha=rank, target_modules=TARGETS), transformer,
                            adapter_name=adapter)
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = transformer.get_submodule(name)
            layer.lora_A[adapter].weight.copy_(a)
            layer.lora_B[adapter].weight.copy_(b)
            layer.set_scale(adapter, strength)
    set_adapter(transformer, list(lora_layers(transformer)[0].lora_A.keys()))


def lora_layers(transformer):
    from peft.tuners.lora import LoraLayer

    return [m for m in transformer.modules() if isinstance(m, LoraLayer)]


def set_enabled(transformer, enabled: bool) -> None:
    for layer in lora_layers(transformer):
        layer.enable_adapters(enabled)


def delete_adapter(transformer, adapter: str) -> None:
    from peft.functional import delete_adapter as peft_delete

    peft_delete(transformer, adapter_name=adapter, prefix="lora_")


def merge(transformer, merged: bool) -> None:
    for layer in lora_layers(transformer):
        layer.merge() if merged else layer.unmerge()


# -- measuring -----------------------------------------------------------------------------------
def sample(pipe, transformer, steps: int) -> torch.Tensor:
    from ditq.quant_core.sampling import PIXART_CALL

    pipe.transformer = transformer
    with torch.no_grad():
        return pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="latent",
                    **{**PIXART_CALL, "num_inference_steps": steps}).images


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def lora_row(pipe, fp, kind, lora_a, lora_b, steps, fp_ref) -> dict:
    """One quantized transformer: its error, LoRA effects, stacking and the bit-exact restores."""
    q = quantized(fp, kind)
    base = sample(pipe, q, steps)
    row = {"kind": kind, "q_err": rel(base, fp_ref["base"])}
    add_adapter(q, lora_a, "a", 0.1)
    weak = sample(pipe, q, steps)
    row["eff_0.1"], row["vs_fp_0.1"] = rel(weak, base), rel(weak, fp_ref["a0.1"])
    for layer in lora_layers(q):
        layer.set_scale("a", 1.0)
    with_a = sample(pipe, q, steps)
    row["eff_1.0"], row["vs_fp_1.0"] = rel(with_a, base), rel(with_a, fp_ref["a1.0"])
    set_enabled(q, False)
    row["disable_exact"] = torch.equal(sample(pipe, q, steps), base)
    set_enabled(q, True)
    row["enable_exact"] = torch.equal(sample(pipe, q, steps), with_a)
    add_adapter(q, lora_b, "b", -0.5)
    stacked = sample(pipe, q, steps)
    row["eff_stack"], row["vs_fp_stack"] = rel(stacked, base), rel(stacked, fp_ref["ab"])
    # the same quantization applied to the FP model with the LoRAs merged: the error any quantized
    # model of FP+LoRA has, branch or not (activation ranges move with the LoRA)
    requantized = quantized(merged_fp(fp, [(lora_a, 1.0), (lora_b, -0.5)]), kind)
    row["requantized_stack"] = rel(sample(pipe, requantized, steps), fp_ref["ab"])
    merge(q, True)
    row["merged_as_branch"] = rel(sample(pipe, q, steps), stacked)
    merge(q, False)
    delete_adapter(q, "b")
    row["remove_one_exact"] = torch.equal(sample(pipe, q, steps), with_a)
    delete_adapter(q, "a")
    row["remove_all_exact"] = torch.equal(sample(pipe, q, steps), base)
    return row


def fp_reference(pipe, fp, lora_a, lora_b, steps) -> dict:
    model = copy.deepcopy(fp)
    ref = {"base": sample(pipe, model, steps)}
    add_adapter(model, lora_a, "a", 0.1)
    ref["a0.1"] = sample(pipe, model, steps)
    for layer in lora_layers(model):
        layer.set_scale("a", 1.0)
    ref["a1.0"] = sample(pipe, model, steps)
    add_adapter(model, lora_b, "b", -0.5)
    ref["ab"] = sample(pipe, model, steps)
    ref["eff_0.1"], ref["eff_1.0"] = rel(ref["a0.1"], ref["base"]), rel(ref["a1.0"], ref["base"])
    ref["eff_stack"] = rel(ref["ab"], ref["base"])
    return ref


def step_cost(fp, lora_a, lora_b, kind: str, repeats: int) -> dict[str, float]:
    """Median ms of one transformer forward (the CFG batch of the 4 prompts) by LoRA setup."""
    q = quantized(fp, kind)
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(8, 4, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(8, 80, 64, generator=g),
                  timestep=torch.full((8,), 500), added_cond_kwargs={"resolution": None, "aspect_ratio": None})

    def timed() -> float:
        times = []
        with torch.no_grad():
            for _ in range(repeats):
                t0 = time.perf_counter()
                q(**inputs)
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2] * 1e3

    out = {"no LoRA": timed()}
    add_adapter(q, lora_a, "a", 1.0)
    out["1 adapter (PEFT)"] = timed()
    merge(q, True)
    out["1 adapter (merged as branch)"] = timed()
    merge(q, False)
    add_adapter(q, lora_b, "b", 1.0)
    out["2 adapters (PEFT)"] = timed()
    merge(q, True)
    out["2 adapters (merged as branches)"] = timed()
    return out


# -- report --------------------------------------------------------------------------------------
def git_commit() -> str:
    from quality import git_commit as commit  # bench/quality.py

    return commit()


def report(args, ref, rows, cost, wall) -> str:
    lines = [f"# LoRA as a full-precision branch on quantized layers (built-in PixArt-α, {args.steps} steps)", "",
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, commit {git_commit()}, {wall:.0f} s", "",
             f"Command: `python3 bench/lora_branches.py {' '.join(sys.argv[1:])}`", "",
             f"Rank-{args.rank} random LoRA on every block Linear ({', '.join(TARGETS)}), injected with PEFT; "
             f"effect = relative L2 change of the sampled latents the LoRA causes; 'vs FP+LoRA' = relative L2 "
             f"between the quantized and the FP model, both with the LoRA; stack = adapter a at 1.0 plus b at -0.5; "
             f"quantized(FP+stack) = the same quantization applied to the FP model with the stack merged (what "
             f"any quantized model of FP+LoRA reaches).", "",
             "| model | vs FP (no LoRA) | effect @0.1 | (÷ FP) | vs FP+LoRA @0.1 | effect @1.0 | (÷ FP) | "
             "vs FP+LoRA @1.0 | stack effect | stack vs FP | quantized(FP+stack) vs FP | merged-as-branch Δ | "
             "exact: disable / enable / remove one / remove all |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| FP | 0 | {ref['eff_0.1']:.4f} | 1 | 0 | {ref['eff_1.0']:.4f} | 1 | 0 | {ref['eff_stack']:.4f} | 0 | | | |"]
    for r in rows:
        exact = " / ".join("yes" if r[k] else "NO" for k in ("disable_exact", "enable_exact", "remove_one_exact",
                                                             "remove_all_exact"))
        lines.append(f"| {r['kind']} | {r['q_err']:.4f} | {r['eff_0.1']:.4f} | {r['eff_0.1'] / ref['eff_0.1']:.3f} | "
                     f"{r['vs_fp_0.1']:.4f} | {r['eff_1.0']:.4f} | {r['eff_1.0'] / ref['eff_1.0']:.3f} | "
                     f"{r['vs_fp_1.0']:.4f} | {r['eff_stack']:.4f} | {r['vs_fp_stack']:.4f} | "
                     f"{r['requantized_stack']:.4f} | "
                     f"{r['merged_as_branch']:.1e} | {exact} |")
    lines += ["", f"Per-step cost on this CPU ({args.cost_kind}, one transformer forward of the CFG batch of "
              f"{len(PROMPTS)} prompts, median of {args.repeats}):", "", "| LoRA | ms | × no LoRA |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / cost['no LoRA']:.3f} |" for k, v in cost.items()]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--size", type=float, default=0.15, help="scale of the LoRA up factors")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cost-kind", default="rtn-w8a8-dynamic", choices=KINDS)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(HERE / "results" / "lora_branches.md"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    from ditq.evaluation.builtin import tiny_pixart_pipeline

    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    t0 = time.time()
    pipe = tiny_pixart_pipeline(seed=0)
    fp = pipe.transformer
    lora_a, lora_b = (random_lora(fp, args.rank, args.size, seed) for seed in (1, 2))
    ref = fp_reference(pipe, fp, lora_a, lora_b, args.steps)
    rows = []
    for kind in args.kinds:
        rows.append(lora_row(pipe, fp, kind, lora_a, lora_b, args.steps, ref))
        print(rows[-1], flush=True)
    cost = step_cost(fp, lora_a, lora_b, args.cost_kind, args.repeats)
    text = report(args, ref, rows, cost, time.time() - t0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
