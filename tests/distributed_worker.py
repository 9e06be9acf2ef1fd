"""Run by tests/test_distributed.py under ``torchrun`` (2 gloo processes on the CPU) and in the test
process: calibration, an evolutionary search, a small Qua²SeDiMo search and its checkpoint, and
``ditq quantize --preset q-dit-w4a8``, all written to ``argv[1]`` by rank 0, so the test can compare
what one and two processes produce."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(out: Path) -> None:
    from ditq import QuantConfig, calibrate, quantize, save_quantized
    from ditq.cli import main as cli_main
    from ditq.evaluation.builtin import PIXART_CALL, tiny_pixart_pipeline
    from ditq.quant_core import distributed as dist
    from ditq.quant_core.methods.qua2sedimo.method import search
    from ditq.quant_core.passes.evolution import EvolutionSettings, evolutionary_search
    from ditq.quant_core.serialization import atomic_write_text

    dist.init_from_env()
    torch.set_num_threads(1)
    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = {k: v for k, v in PIXART_CALL.items() if k != "num_inference_steps"}

    # three prompts over two ranks: an uneven split; the RowSample limit is below the rows seen
    calib = calibrate(pipe, ["a red fox in snow", "a city at night", "a bowl of fruit"], num_inference_steps=3,
                      needs=("act_absmax", "act_samples", "model_inputs"), progress=False,
                      stat_options={"act_samples": {"limit": 40}}, **call)
    calib.save(out / "calib.safetensors")
    # one prompt: rank 1 runs nothing and must still end with rank 0's statistics
    calibrate(pipe, ["a red fox in snow"], num_inference_steps=2, needs=("act_absmax", "act_samples"),
              progress=False, **call).save(out / "calib_one.safetensors")

    evaluated = []  # genomes this rank evaluated: the work must be split, the result not change

    def fitness(genome):
        evaluated.append(genome)
        return float(sum((g - 3) ** 2 * (i + 1) for i, g in enumerate(genome)))

    result = evolutionary_search([[1, 2, 3, 4, 5]] * 6, fitness, state_path=out / "evolution.json", progress=False,
                                 settings=EvolutionSettings(population=8, top_k=3, mutations=3, crossovers=3,
                                                            generations=3, seed=1))
    counts = dist.gather_objects(len(evaluated))
    atomic_write_text(json.dumps({"best": result.best, "loss": result.best_loss, "history": result.history,
                                  "evaluations": result.evaluations, "per_rank": counts}), out / "evolution_result.json")

    @dist.main_only
    def fails_on_rank_0():
        raise OSError("disk full")

    try:
        fails_on_rank_0()
    except (OSError, dist.RankFailed) as e:
        atomic_write_text(json.dumps(dist.gather_objects(f"{type(e).__name__}: {e}")), out / "failure.json")

    cfg = QuantConfig.preset("qua2sedimo-w3.5")
    cfg.include = [r"transformer_blocks\.0\.attn1\.", r"^proj_out$"]
    cfg.options.update(num_configs=10, folds=2, epochs=4, label_steps=2, label_prompts=["a red fox in snow"],
                       hidden=8, gnn_layers=2, refine_rounds=1, target_bits=3.5)
    searched = search(pipe, cfg, workdir=out / "q2s", progress=False)
    quantize(pipe.transformer, searched.config, progress=False)
    save_quantized(pipe.transformer, out / "q2s.safetensors")

    # the command line inside the running group: a GPTQ preset, calibration and layers split
    assert cli_main(["quantize", "--preset", "q-dit-w4a8", "--calib-prompts", "3", "--steps", "2",
                     "--out", str(out / "q_dit.safetensors")]) == 0


if __name__ == "__main__":
    main(Path(sys.argv[1]))
