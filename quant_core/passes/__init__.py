"""Building blocks that methods compose as passes (llm-compressor style): each is a function over a
layer's weight and its calibration statistics, owned by no single paper.

- ``smoothing``: SmoothQuant-style channel balancing scales (ViDiT-Q's static half).
- ``rotation``: randomised block-Hadamard rotation with stored signs (ViDiT-Q's dynamic half).
- ``gptq``: GPTQ weight rounding with per-group scales (Q-DiT; any method's weight quantizer option).
- ``kmeans``: batched k-means over sub-vectors (VQ4DiT codebooks).
- ``evolution``: resumable evolutionary search over per-layer choices (Q-DiT group sizes).
- ``fitness``: fitness functions over a pipeline, fidelity to FP offline or FID (Q-DiT, Qua²SeDiMo).
"""
