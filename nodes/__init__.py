"""ComfyUI nodes (thin adapters over the quant core)."""
