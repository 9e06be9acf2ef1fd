"""The vendored upstream files are an unedited copy of the pinned commit: fixes go in the adapter."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

VENDOR = Path(__file__).with_name("vendor")


def test_vendored_files_match_the_pinned_commit():
    pinned = json.loads((VENDOR / "PINNED.json").read_text())
    for upstream_path, digest in pinned["files"].items():
        local = VENDOR / "diffusers_tests" / upstream_path.removeprefix("tests/")
        assert hashlib.sha256(local.read_bytes()).hexdigest() == digest, f"{local} differs from {pinned['commit']}"
