"""The Hub path through the real huggingface_hub client: push to a Hub-protocol server on 127.0.0.1
(tests/hub_server.py), pull into a cache, then load by repo id in a fresh process with
HF_HUB_OFFLINE=1 set before import; bad repo content gives clear errors."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = 2
PROMPT = "a red fox in snow"
FULL, TONLY, BASE = "org/tiny-pixart-q", "org/tiny-pixart-q-transformer", "org/tiny-pixart"


def _hub_server_module():
    # tests/ is not a package and conftest.py is shared, so load the server module by path
    spec = importlib.util.spec_from_file_location("hub_server", Path(__file__).with_name("hub_server.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("hub_server", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    # patch_client points this process's client at the server and turns conftest's offline mode off
    with _hub_server_module().hub_server(tmp_path_factory.mktemp("hub"), patch_client=True) as server:
        yield server
    assert not server.unhandled, server.unhandled


@pytest.fixture(scope="module")
def call_kwargs(builtin):
    return dict(builtin.PIXART_CALL, num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def preset():
    from ditq import QuantConfig

    return "vidit-q-w8a8" if "vidit-q-w8a8" in QuantConfig.presets() else "rtn-w8a8-dynamic"


@pytest.fixture(scope="module")
def qpipe(tiny_pipe, preset, call_kwargs):
    import copy

    from ditq import QuantizedPixArtPipeline

    pipe = QuantizedPixArtPipeline.from_pipe(copy.deepcopy(tiny_pipe))
    pipe.set_progress_bar_config(disable=True)
    pipe.quantize(preset, [PROMPT], fidelity_prompts=0, progress=False, **call_kwargs)
    return pipe


@pytest.fixture(scope="module")
def published(hub, tiny_pipe, qpipe):
    tiny_pipe.push_to_hub(BASE)  # the full-precision base, with stock diffusers
    qpipe.push_to_hub(FULL, base_model=BASE)
    qpipe.push_to_hub(TONLY, transformer_only=True, base_model=BASE)
    return hub


def test_push_pull_then_offline_load_by_repo_id(published, qpipe, call_kwargs, tmp_path):
    """Acceptance: pushed, then loaded by repo id in a fresh offline process, the pipeline
    reproduces the in-memory quantized output; plain PixArtTransformer2DModel.from_pretrained loads
    the quantized layers once ditq is imported."""
    from ditq import QuantizedPixArtPipeline

    hub = published
    assert {"model_index.json", "README.md", "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors"} <= set(hub.list_files(FULL))
    assert hub.list_files(TONLY) == [".gitattributes", "README.md", "ditq_base_model.json",
                                     "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"]
    card = hub.read_file(FULL, "README.md").decode()
    assert f"base_model: {BASE}" in card and "base_model_relation: quantized" in card
    assert json.loads(hub.read_file(FULL, "model_index.json"))["_class_name"] == "PixArtAlphaPipeline"

    hf_home = tmp_path / "hf_home"
    for repo in (FULL, TONLY):  # pull through the online client, filling the cache
        pipe = QuantizedPixArtPipeline.from_pretrained(repo, cache_dir=hf_home / "hub")
        assert type(pipe).__name__ == "QuantizedPixArtAlphaPipeline"
    del pipe

    qpipe.set_progress_bar_config(disable=True)
    expected = qpipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **call_kwargs).images
    script = Path(__file__).with_name("diffusers_offline_probe.py")
    import ditq

    pythonpath = os.pathsep.join(filter(None, [str(Path(ditq.__file__).parent.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **hub.client_env(hf_home, offline=True), "PYTHONPATH": pythonpath}
    run = subprocess.run([sys.executable, str(script), str(tmp_path), json.dumps(call_kwargs), PROMPT, FULL, TONLY],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    import numpy as np

    from ditq.quant_core.metrics import rel_l2

    for repo in (FULL, TONLY):
        got = np.load(tmp_path / f"{repo.replace('/', '--')}.npy")
        assert rel_l2(torch.from_numpy(expected).double(), torch.from_numpy(got).double()) < 1e-4, repo


def _corrupt(folder: Path, case: str) -> str:
    from ditq.quant_core.serialization import atomic_save_file, read_safetensors

    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    if case == "missing file":
        weights.unlink()
        return r"diffusion_pytorch_model.*A ditq repo holds"  # diffusers names the file, ditq the layout
    if case == "unknown format version":
        cfg_path = folder / "transformer" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"]["format_version"] = 99
        cfg_path.write_text(json.dumps(cfg))
        return "unknown ditq format_version 99"
    tensors, meta = read_safetensors(weights)
    key = "transformer_blocks.1.attn2.to_k.weight"
    tensors[key] = tensors[key][:-1].clone()
    atomic_save_file(tensors, weights, meta)
    return r"'transformer_blocks\.1\.attn2\.to_k\.weight' has shape \(255, 256\), expected \(256, 256\)"


@pytest.mark.parametrize("case", ["missing file", "unknown format version", "tampered shape"])
def test_bad_repo_content_gives_a_clear_error(published, qpipe, case, tmp_path):
    import huggingface_hub as hf

    from ditq import QuantizedPixArtPipeline

    folder = tmp_path / "repo"
    qpipe.save_pretrained(folder, transformer_only=True, base_model=BASE)
    message = _corrupt(folder, case)
    repo = "org/bad-" + case.replace(" ", "-")
    hf.create_repo(repo, exist_ok=True)
    hf.upload_folder(repo_id=repo, folder_path=folder)
    with pytest.raises((OSError, ValueError), match=message):
        QuantizedPixArtPipeline.from_pretrained(repo, cache_dir=tmp_path / "cache")


def test_unknown_repo_and_revision_each_say_so(published, tmp_path):
    from ditq import QuantizedPixArtPipeline, load_quantized
    from ditq.quant_core.serialization import HubError

    for load in (QuantizedPixArtPipeline.from_pretrained, load_quantized):
        with pytest.raises(HubError, match="org/no-such-repo: repo not found on the Hub"):
            load("org/no-such-repo", cache_dir=tmp_path)
        with pytest.raises(HubError, match=f"{FULL}: revision 'no-such-branch' not found on the Hub"):
            load(FULL, revision="no-such-branch", cache_dir=tmp_path)
