"""Run by test_diffusers_hub.py in a fresh process with HF_HUB_OFFLINE=1 and a populated cache:
``python diffusers_offline_probe.py OUT_DIR CALL_KWARGS_JSON PROMPT REPO...``.

Checks that ``import ditq`` imports neither torch nor diffusers, that plain
``PixArtTransformer2DModel.from_pretrained(repo, subfolder="transformer")`` then loads quantized layers,
and saves each repo's ``QuantizedPixArtPipeline`` output as ``OUT_DIR/<org>--<name>.npy``."""
import json
import sys

import ditq

assert "torch" not in sys.modules and "diffusers" not in sys.modules, "import ditq must stay lazy"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import PixArtTransformer2DModel  # noqa: E402
from huggingface_hub import constants  # noqa: E402

assert constants.HF_HUB_OFFLINE
out_dir, call_kwargs, prompt, repos = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4:]
transformer = PixArtTransformer2DModel.from_pretrained(repos[0], subfolder="transformer")
layer = transformer.transformer_blocks[0].attn1.to_q
assert isinstance(layer, ditq.QuantLinear) and layer.weight.dtype == torch.int8, type(layer)
for repo in repos:
    pipe = ditq.QuantizedPixArtPipeline.from_pretrained(repo)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np", **call_kwargs).images
    np.save(f"{out_dir}/{repo.replace('/', '--')}.npy", images)
