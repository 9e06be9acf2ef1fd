"""Tests for tests/hub_server.py, driven through the real huggingface_hub client.

Downloads run in fresh subprocesses on purpose: HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE are read when
huggingface_hub is imported, so a new process is the only faithful way to check the env-var route
that users (and ditq's own tests) take.  Uploads run in-process through ``patch_client=True``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
import subprocess
import tempfile
import sys
import textwrap
import time
from pathlib import Path

import pytest

# Imported before any server starts so that `patch_hf_hub_endpoint` has modules to patch; this also
# mirrors ditq's test process, where huggingface_hub is already imported (by diffusers) early on.
import huggingface_hub
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


def _load_hub_server():
    # ditq runs pytest with --import-mode=importlib, which does not put tests/ on sys.path: load the
    # sibling file by path, under its plain name, so a conftest importing it the same way (or via
    # `sys.path.insert(0, tests_dir)` + `import hub_server`) shares this very module.
    if "hub_server" not in sys.modules:
        spec = importlib.util.spec_from_file_location("hub_server", Path(__file__).with_name("hub_server.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["hub_server"] = module  # before exec: dataclasses resolve their module through it
        spec.loader.exec_module(module)
    return sys.modules["hub_server"]


_hub = _load_hub_server()
HubServer, hub_server = _hub.HubServer, _hub.hub_server

REPO = "org/name"


@pytest.fixture
def hub(tmp_path):
    # The pattern another conftest can copy: one server per test, torn down by the context manager.
    with hub_server(tmp_path, patch_client=True, max_lifetime_s=300) as server:
        yield server
        # Every request the client made must have hit an implemented route.
        assert server.unhandled == [], [(r.method, r.raw_path) for r in server.unhandled]


def _subprocess_env(server: HubServer, hf_home: Path, **kwargs) -> dict[str, str]:
    # Drop the parent's HF_* settings (including the HF_ENDPOINT set by patch_client) so the child sees
    # exactly what client_env() provides.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(server.client_env(hf_home, **kwargs))
    return env


def _run_python(code: str, env: dict[str, str], timeout: float = 120) -> dict:
    """Run `code` in a fresh interpreter; it must print one JSON object on its last stdout line."""
    proc = subprocess.run(
        # cwd outside the checkout: `python -c` puts the cwd on sys.path, where ditq's kernels/ folder
        # would shadow the `kernels` package transformers probes for
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout,
        cwd=tempfile.gettempdir(),
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _make_safetensors(path: Path, payload_size: int) -> bytes:
    # A valid safetensors file (8-byte header length, JSON header, raw data) built with the stdlib only.
    header = json.dumps({"weight": {"dtype": "U8", "shape": [payload_size], "data_offsets": [0, payload_size]}})
    header_bytes = header.encode().ljust((len(header) + 7) // 8 * 8)  # spec: header padded to 8 bytes
    data = struct.pack("<Q", len(header_bytes)) + header_bytes + os.urandom(payload_size)
    path.write_bytes(data)
    return data


def _make_folder(root: Path) -> dict[str, bytes]:
    root.mkdir()
    (root / "scheduler").mkdir()
    files = {
        # > 10 MiB and *.safetensors: LFS through both rules (size threshold and .gitattributes).
        "model.safetensors": _make_safetensors(root / "model.safetensors", 11 * 1024 * 1024),
        "config.json": b'{"hidden_size": 32, "version": 1}\n',
        "scheduler/scheduler_config.json": b'{"_class_name": "DDIMScheduler"}\n',
        # A README makes create_commit validate its YAML through /api/validate-yaml.
        "README.md": b"---\nlicense: apache-2.0\n---\n# tiny\n",
    }
    for rel, data in files.items():
        if rel != "model.safetensors":
            (root / rel).write_bytes(data)
    return files


def _count(server: HubServer, method: str, path_suffix: str) -> int:
    return sum(1 for r in server.requests if r.method == method and r.path.endswith(path_suffix))


def test_push_then_download_in_fresh_processes(hub: HubServer, tmp_path: Path) -> None:
    files = _make_folder(tmp_path / "folder")
    api = HfApi(endpoint=hub.url, token="x")

    # create_repo twice: the second call exercises the 409 -> exist_ok path.
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    first = api.upload_folder(repo_id=REPO, folder_path=tmp_path / "folder", commit_message="first")
    assert len(first.oid) == 40

    # Upload modes: the big weights went through LFS (batch -> PUT on the CDN origin -> verify), the small
    # text files inline in the NDJSON commit.
    assert hub.is_lfs(REPO, "model.safetensors")
    assert not hub.is_lfs(REPO, "config.json")
    assert _count(hub, "POST", f"/{REPO}.git/info/lfs/objects/batch") == 1
    assert [r.origin for r in hub.requests if r.method == "PUT"] == ["cdn"]
    assert _count(hub, "POST", f"/{REPO}.git/info/lfs/objects/verify") == 1
    assert _count(hub, "POST", f"/api/models/{REPO}/commit/main") == 1
    assert hub.read_file(REPO, "model.safetensors") == files["model.safetensors"]

    # Re-uploading identical content must not create a commit (preupload returns the remote oids).
    api.upload_folder(repo_id=REPO, folder_path=tmp_path / "folder")
    assert _count(hub, "POST", f"/api/models/{REPO}/commit/main") == 1

    # A second commit changes config.json; the first commit must stay resolvable by sha.
    second = api.upload_file(repo_id=REPO, path_or_fileobj=b'{"version": 2}\n', path_in_repo="config.json")
    assert hub.commits(REPO)[:2] == [second.oid, first.oid]
    assert api.model_info(REPO).sha == second.oid
    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *files])

    # Fresh process, env vars only (HF_ENDPOINT read at import): main, an old sha (with an explicit
    # endpoint= for good measure), and a single-file download at that sha.
    hub.clear_requests()
    hf_home = tmp_path / "hf_home"
    result = _run_python(
        f"""
        import json, os
        from huggingface_hub import constants, hf_hub_download, snapshot_download
        assert constants.ENDPOINT == os.environ["HF_ENDPOINT"], constants.ENDPOINT
        main = snapshot_download("{REPO}")
        old = snapshot_download("{REPO}", revision="{first.oid}", endpoint=os.environ["HF_ENDPOINT"])
        old_config = hf_hub_download("{REPO}", "config.json", revision="{first.oid}")
        weights = hf_hub_download("{REPO}", "model.safetensors", revision="main")
        print(json.dumps({{"main": main, "old": old, "old_config": old_config, "weights": weights}}))
        """,
        _subprocess_env(hub, hf_home),
    )
    main, old = Path(result["main"]), Path(result["old"])
    assert main.name == second.oid and old.name == first.oid
    for rel, data in files.items():
        expected = b'{"version": 2}\n' if rel == "config.json" else data
        assert (main / rel).read_bytes() == expected, rel
        assert (old / rel).read_bytes() == data, rel
    assert Path(result["old_config"]).read_bytes() == files["config.json"]
    assert Path(result["weights"]) == main / "model.safetensors"

    # LFS downloads: HEAD on /resolve answers 302 (not followed: other origin), then a GET on the CDN
    # that carries no Authorization header.  The 11 MiB blob is fetched once (both snapshots share it).
    lfs_heads = [r for r in hub.requests if r.method == "HEAD" and r.path.endswith("/model.safetensors")]
    assert lfs_heads and {r.status for r in lfs_heads} == {302}
    cdn_gets = [r for r in hub.requests if r.origin == "cdn"]
    assert len(cdn_gets) == 1 and cdn_gets[0].status == 200
    assert "authorization" not in cdn_gets[0].headers

    # Offline: HF_HUB_OFFLINE=1 before import => no request at all, same cached snapshot folders.
    hub.clear_requests()
    result = _run_python(
        f"""
        import json
        from huggingface_hub import constants, snapshot_download
        assert constants.HF_HUB_OFFLINE
        print(json.dumps({{
            "main": snapshot_download("{REPO}"),
            "old": snapshot_download("{REPO}", revision="{first.oid}"),
        }}))
        """,
        _subprocess_env(hub, hf_home, offline=True),
    )
    assert Path(result["main"]) == main and Path(result["old"]) == old
    assert hub.requests == []


def test_missing_entries_raise_hub_errors(hub: HubServer, tmp_path: Path) -> None:
    hub.create_repo("org/exists")
    cache = tmp_path / "cache"

    with pytest.raises(EntryNotFoundError) as excinfo:
        hf_hub_download("org/exists", "missing.json", cache_dir=cache)
    # In 2.4 the remote flavour is RemoteEntryNotFoundError (an EntryNotFoundError and an HfHubHTTPError).
    assert isinstance(excinfo.value, RemoteEntryNotFoundError)
    assert excinfo.value.response.status_code == 404
    assert "missing.json" in str(excinfo.value)

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/does-not-exist", "config.json", cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/does-not-exist", cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url).model_info("org/does-not-exist")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/exists", ".gitattributes", revision="no-such-branch", cache_dir=cache)

    api = HfApi(endpoint=hub.url)
    assert api.file_exists("org/exists", ".gitattributes")
    assert not api.file_exists("org/exists", "missing.json")


def test_git_like_operations(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token="x")
    api.create_repo("org/ops")
    api.upload_file(repo_id="org/ops", path_or_fileobj=b"a", path_in_repo="dir/a.txt")
    api.upload_file(repo_id="org/ops", path_or_fileobj=b"b", path_in_repo="dir/b.txt")

    # Branches, PRs, refs and history.
    api.create_branch("org/ops", branch="dev")
    api.upload_file(repo_id="org/ops", path_or_fileobj=b"dev", path_in_repo="dev.txt", revision="dev")
    pr = api.upload_file(repo_id="org/ops", path_or_fileobj=b"pr", path_in_repo="pr.txt", create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    refs = api.list_repo_refs("org/ops", include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]
    assert "dev.txt" not in api.list_repo_files("org/ops")
    assert "dev.txt" in api.list_repo_files("org/ops", revision="dev")
    assert "pr.txt" in api.list_repo_files("org/ops", revision="refs/pr/1")
    assert [c.title for c in api.list_repo_commits("org/ops")][:2] == ["Upload dir/b.txt with huggingface_hub"] + [
        "Upload dir/a.txt with huggingface_hub"
    ]

    # Tree listing (non-recursive shows the folder), server-side copy (paths-info), deletions.
    top = {item.path for item in api.list_repo_tree("org/ops")}
    assert top == {".gitattributes", "dir"}
    assert {item.path for item in api.list_repo_tree("org/ops", path_in_repo="dir")} == {"dir/a.txt", "dir/b.txt"}
    from huggingface_hub import CommitOperationCopy, CommitOperationDelete

    api.create_commit(
        "org/ops",
        operations=[CommitOperationCopy("dir/a.txt", "copy.txt"), CommitOperationDelete("dir/b.txt")],
        commit_message="copy and delete",
    )
    assert hub.read_file("org/ops", "copy.txt") == b"a"
    api.delete_folder("dir", repo_id="org/ops")
    assert hub.list_files("org/ops") == [".gitattributes", "copy.txt"]

    # Private repos look missing without a token.
    api.create_repo("org/private", private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info("org/private")
    assert api.model_info("org/private").private


def test_uploads_need_xet_disabled(hub: HubServer, tmp_path: Path) -> None:
    # Documents why client_env() sets HF_HUB_DISABLE_XET=1: with hf_xet importable, huggingface_hub 2.4
    # routes LFS uploads through Xet unconditionally, which this server cannot serve.
    pytest.importorskip("hf_xet")
    hub.create_repo("org/xet")
    env = _subprocess_env(hub, tmp_path / "hf_home")
    del env["HF_HUB_DISABLE_XET"]
    result = _run_python(
        """
        import json
        from huggingface_hub import HfApi
        try:
            HfApi(token="x").upload_file(repo_id="org/xet", path_or_fileobj=b"x" * 100, path_in_repo="w.bin")
            print(json.dumps({"error": None}))
        except Exception as exc:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        """,
        env,
    )
    assert result["error"] is not None and "xet-write-token" in result["message"]
    assert any(r.path.endswith("/xet-write-token/main") and r.status == 501 for r in hub.requests)
    assert hub.list_files("org/xet") == [".gitattributes"]


def test_endpoint_constant_is_frozen_at_import() -> None:
    # Documents the ordering constraint: HF_ENDPOINT set after `import huggingface_hub` is ignored.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    result = _run_python(
        """
        import json, os
        import huggingface_hub
        from huggingface_hub import constants, hf_api
        os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
        print(json.dumps({"constant": constants.ENDPOINT, "api": hf_api.api.endpoint}))
        """,
        env,
    )
    assert result == {"constant": "https://huggingface.co", "api": "https://huggingface.co"}


def test_server_lifetime_is_bounded(tmp_path: Path) -> None:
    server = HubServer(tmp_path / "store", max_lifetime_s=0.3).start()
    port = int(server.url.rsplit(":", 1)[1])
    deadline = time.monotonic() + 5
    while server.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()

    # The context manager stops it too; patch_client points the in-process client (endpoint and cache)
    # at the server and restores everything afterwards.
    constants = huggingface_hub.constants
    before = (constants.ENDPOINT, constants.HF_HUB_CACHE, os.environ.get("HF_ENDPOINT"))
    with hub_server(tmp_path, patch_client=True) as server:
        assert constants.ENDPOINT == os.environ["HF_ENDPOINT"] == server.url
        assert Path(constants.HF_HUB_CACHE).is_relative_to(server.root)
    assert not server.running
    assert (constants.ENDPOINT, constants.HF_HUB_CACHE, os.environ.get("HF_ENDPOINT")) == before


def test_diffusers_pipeline_push_and_from_pretrained(hub: HubServer, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    transformer = diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=32, in_channels=4, cross_attention_dim=16, out_channels=8,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    text_encoder = transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=384, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=1,
            relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False,
        )  # fmt: skip
    )
    # Freshly built modules are in train mode (T5 dropout=0.1) while from_pretrained returns eval-mode
    # modules: without this the reference output would differ from the reloaded one for no Hub reason.
    for module in (transformer, vae, text_encoder):
        module.eval()
    pipe = diffusers.PixArtAlphaPipeline(
        tokenizer=transformers.ByT5Tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=diffusers.DDIMScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    call_kwargs = dict(
        prompt="a squirrel", num_inference_steps=2, guidance_scale=5.0,
        use_resolution_binning=False, output_type="np", height=8, width=8,
    )  # fmt: skip
    expected = pipe(generator=torch.manual_seed(0), **call_kwargs).images

    # In-process push through diffusers' module-level create_repo/upload_folder (patched by the fixture).
    pipe.push_to_hub("org/tiny-pixart", token="x")
    assert hub.is_lfs("org/tiny-pixart", "transformer/diffusion_pytorch_model.safetensors")
    assert "model_index.json" in hub.list_files("org/tiny-pixart")

    hub.clear_requests()
    out_file = tmp_path / "out.npy"
    result = _run_python(
        f"""
        import json
        import numpy as np, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained("org/tiny-pixart")
        pipe.set_progress_bar_config(disable=True)
        np.save({str(out_file)!r}, pipe(generator=torch.manual_seed(0), **{call_kwargs!r}).images)
        print(json.dumps({{"cls": type(pipe).__name__}}))
        """,
        # One intra-op thread: the models are tiny and a busy CI box must not be oversubscribed.
        {**_subprocess_env(hub, tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"},
        timeout=180,
    )
    assert result["cls"] == "PixArtAlphaPipeline"
    np.testing.assert_allclose(np.load(out_file), expected, atol=1e-6)
    # Resolution went through this server: repo info, a tree listing and one HEAD per file.
    assert _count(hub, "GET", "/api/models/org/tiny-pixart") == 1
    assert any("/api/models/org/tiny-pixart/tree/" in r.path for r in hub.requests)
    assert any(r.origin == "cdn" for r in hub.requests)
