"""The project's fixed prompt lists (copies of the shared calibration/evaluation sets)."""
from __future__ import annotations

from pathlib import Path

_DIR = Path(__file__).resolve().parent.parent / "prompts"


def load_prompts(kind: str = "calibration") -> list[str]:
    """``kind``: "calibration" (64 prompts) or "evaluation" (16 prompts)."""
    path = _DIR / f"{kind}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"prompt list {path} not found (kind must be calibration or evaluation)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
