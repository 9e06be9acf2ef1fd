"""torch.distributed: 2 gloo processes on the CPU (started by torchrun on 127.0.0.1) produce the same
calibration statistics, search results and checkpoints as one process (run here, with one thread like
each rank, so every product rounds the same way); rank 0 alone writes, and an error there reaches the
other rank instead of leaving it waiting."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditq.quant_core.serialization import read_safetensors

WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *command: str, cwd: Path) -> None:
    """``torchrun --nproc_per_node nproc command...`` with one thread per process (so 1 and 2 processes
    compute every product the same way), bounded in time."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *command],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def same_tensors(a: Path, b: Path) -> None:
    ta, ma = read_safetensors(a)
    tb, mb = read_safetensors(b)
    assert ma == mb and sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    out = {n: tmp_path_factory.mktemp(f"np{n}") for n in (1, 2)}
    with one_thread():
        worker.main(out[1])
    torchrun(2, str(WORKER), str(out[2]), cwd=out[2])
    return out


def test_calibration_statistics_equal_single_process(runs):
    from ditq.quant_core.calibration import CalibrationData

    one, two = (CalibrationData.load(runs[n] / "calib.safetensors") for n in (1, 2))
    assert one.layers == two.layers and torch.equal(one.timesteps, two.timesteps)
    for layer in one.layers:
        assert torch.equal(one.get(layer, "act_absmax"), two.get(layer, "act_absmax")), layer  # max: exact
        s1, s2 = one.get(layer, "act_samples"), two.get(layer, "act_samples")
        assert s1.shape[0] == 40 and torch.equal(s1, s2), layer  # same rows, same order
    assert one.inputs.calls == two.inputs.calls and len(one.inputs.calls) == 3 * 3
    for k, t in one.inputs.tensors.items():
        assert torch.equal(t, two.inputs.tensors[k]), k
    one, two = (CalibrationData.load(runs[n] / "calib_one.safetensors") for n in (1, 2))
    assert one.layers == two.layers and torch.equal(one.timesteps, two.timesteps) and len(one.timesteps) == 2
    assert all(torch.equal(one.stats[n][s], two.stats[n][s]) for n in one.layers for s in one.stats[n])


def test_search_split_over_ranks_finds_the_same_genome(runs):
    one, two = (json.loads((runs[n] / "evolution_result.json").read_text()) for n in (1, 2))
    assert {k: one[k] for k in ("best", "loss", "history", "evaluations")} == \
        {k: two[k] for k in ("best", "loss", "history", "evaluations")}
    assert one["per_rank"] == [one["evaluations"]]
    assert sum(two["per_rank"]) == two["evaluations"] and min(two["per_rank"]) > 0  # the work was split
    assert json.loads((runs[1] / "evolution.json").read_text()) == json.loads((runs[2] / "evolution.json").read_text())


def test_error_on_rank_0_reaches_the_other_rank(runs):
    assert json.loads((runs[2] / "failure.json").read_text()) == [
        "OSError: disk full", "RankFailed: main.<locals>.fails_on_rank_0 failed on rank 0: OSError: disk full"]


def test_qua2sedimo_search_gives_the_same_checkpoint(runs):
    one, two = (json.loads((runs[n] / "q2s" / "labels.json").read_text()) for n in (1, 2))
    assert {i: r["quality"] for i, r in one["records"].items()} == {i: r["quality"] for i, r in two["records"].items()}
    same_tensors(runs[1] / "q2s.safetensors", runs[2] / "q2s.safetensors")
    leftovers = [p.name for p in runs[2].rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers


def test_cli_gptq_preset_same_checkpoint_with_two_processes(runs):
    """`ditq quantize` (cli.main) inside the group torchrun started: calibration and GPTQ split."""
    same_tensors(runs[1] / "q_dit.safetensors", runs[2] / "q_dit.safetensors")


def test_calibration_under_accelerate_offload_hooks(tiny_pipe, fresh, calib_kwargs):
    """The large-model path: weights kept off the execution device (here the meta device, with a CPU
    copy) and moved in by accelerate's hooks for each forward record the same statistics."""
    from accelerate import cpu_offload

    from ditq import calibrate

    prompts, needs = ["a red fox in snow"], ("act_absmax", "act_samples")
    plain = calibrate(tiny_pipe, prompts, needs=needs, **calib_kwargs)
    pipe = fresh(tiny_pipe)
    cpu_offload(pipe.transformer, execution_device=torch.device("cpu"))
    assert pipe.transformer.transformer_blocks[0].attn1.to_q.weight.device.type == "meta"
    offloaded = calibrate(pipe, prompts, needs=needs, **calib_kwargs)
    assert offloaded.layers == plain.layers
    for layer in plain.layers:
        for stat in needs:
            assert torch.equal(offloaded.get(layer, stat), plain.get(layer, stat)), (layer, stat)
