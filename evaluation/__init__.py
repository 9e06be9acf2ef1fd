"""Helpers for the demo, the benches and the tests, outside the quantization core: the built-in small
models (``builtin``), preset comparisons with byte counts and picture grids (``compare``) and the
project's prompt lists (``prompts``). Nothing under ``quant_core`` imports this package."""
