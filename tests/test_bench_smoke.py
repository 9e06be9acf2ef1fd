"""The quality bench's smoke mode runs end to end and writes what it promises."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "quality.py"


def test_quality_smoke(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(tmp_path)], capture_output=True,
                         text=True, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "quality_smoke.json").read_text())
    rows = {r["preset"]: r for r in data["results"]["pixart"]}
    assert set(rows) == {"rtn-w8a8", "rtn-w4a8"}
    assert rows["rtn-w8a8"]["weight_ratio_disk"] <= 0.52 and rows["rtn-w4a8"]["weight_ratio_memory"] <= 0.28
    assert rows["rtn-w8a8"]["psnr_db"] > 30 and 0 < rows["rtn-w4a8"]["latent_rel_l2"] < 0.5
    assert {"device", "date", "commit", "command"} <= set(data["meta"])
    assert (tmp_path / "grid_pixart.png").stat().st_size > 0 and "| rtn-w4a8 |" in (tmp_path / "quality_smoke.md").read_text()
