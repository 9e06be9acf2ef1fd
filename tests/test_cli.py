"""The command line on the built-in model: quantize, info, and a clear error on a bad file."""
import os
import subprocess
import sys

import pytest


def ditq(*args, cwd):
    # run outside the checkout so its folders never shadow top-level packages
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "ditq", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_quantize_then_info(tmp_path):
    res = ditq("quantize", "--preset", "rtn-w4a8", "--out", str(tmp_path / "q"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "40 layers, rtn" in res.stdout
    info = ditq("info", str(tmp_path / "q"), "--verify", cwd=tmp_path)
    assert info.returncode == 0, info.stderr[-2000:]
    assert "40 quantized layers" in info.stdout and "40 x int4 weights" in info.stdout and "verified" in info.stdout


def test_info_on_bad_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    res = ditq("info", str(bad), cwd=tmp_path)
    assert res.returncode == 2 and "bad.safetensors" in res.stderr


def test_demo_writes_table_and_picture(tmp_path):
    res = ditq("demo", "--presets", "rtn-w8a8-dynamic", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| rtn-w8a8-dynamic | int8 / a8-token | 0.506x | 0.506x |" in res.stdout
    assert (tmp_path / "out" / "side_by_side.png").stat().st_size > 0
    assert "rtn-w8a8-dynamic" in (tmp_path / "out" / "results.md").read_text()
