"""diffusers / Hugging Face Hub integration."""
