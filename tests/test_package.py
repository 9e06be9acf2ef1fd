"""The package surface: `import ditq` is cheap, lazy, and never touches ComfyUI."""
import subprocess
import sys


def test_import_is_lazy_and_comfy_free(tmp_path):
    code = ("import sys, ditq; heavy = [m for m in ('torch', 'diffusers', 'transformers', 'comfy', "
            "'comfy_api', 'folder_paths') if m in sys.modules]; print(heavy)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_public_api_names_resolve():
    import ditq

    for name in ("QuantConfig", "calibrate", "quantize", "save_quantized", "load_quantized", "CalibrationData"):
        assert callable(getattr(ditq, name))
    try:
        ditq.no_such_thing
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("unknown attribute did not raise")
