"""A tiny, self-contained Hugging Face Hub-protocol server for offline tests.

Why this exists
---------------
``ditq``'s diffusers integration has to ``push_to_hub`` and ``from_pretrained("org/repo")`` through the
*real* ``huggingface_hub`` client (2.4.0).  The test machines have no network, so this module implements
just enough of the Hub's HTTP API, with the standard library only (``http.server`` + ``threading``),
for the unmodified client to create repos, upload (inline and LFS), list and download files, and resolve
old revisions.  Everything lives in a temporary directory and disappears with the server.

Fixture API (import it from a conftest; this module does not import pytest)
--------------------------------------------------------------------------
``hub_server(tmp_path=None, *, patch_client=False, **options) -> ContextManager[HubServer]``
    Starts a server on ``127.0.0.1:<ephemeral port>`` in daemon threads and stops it on exit.  Blobs go
    to ``tmp_path / "hub_server_store"`` (or a private temp dir, deleted on exit).  With
    ``patch_client=True`` this process's ``huggingface_hub`` (+ transformers / diffusers) is pointed at
    the server for the duration, with its cache in ``server.root / "hf_home"`` (see
    ``patch_hf_hub_endpoint``).  Options, forwarded to ``HubServer``: ``max_lifetime_s`` (default 600:
    the server also stops by itself after that long), ``lfs_threshold`` (bytes, default 10 MiB),
    ``namespace`` (default ``"test-user"``: owner of repos created without an organisation),
    ``require_auth_for_writes`` (default False; True answers 401 to writes without a Bearer token).

``HubServer`` (also usable directly: ``with HubServer(root) as server:`` or ``.start()`` / ``.stop()``)
    ``.url``: the Hub origin, to use as ``HF_ENDPOINT``.  ``.cdn_url``: a second origin serving LFS
    objects, like the real Hub's CDN.  ``.root``: storage dir.  ``.running``.
    ``.requests``: snapshot list of ``RequestRecord`` (``method``, ``path`` (decoded), ``raw_path``,
    ``query``, ``origin`` ("hub"/"cdn"), ``headers`` (lower-case names), ``status``, ``time``);
    ``.clear_requests()``.  ``.unhandled``: requests that matched no route -- assert it is empty to
    catch client features this server lacks.
    ``.client_env(hf_home=None, *, offline=False, token=None) -> dict``: env vars for a *fresh
    subprocess* (HF_ENDPOINT, HF_HUB_DISABLE_XET, HF_HUB_DISABLE_TELEMETRY, HF_HOME, ...).
    Server-side helpers (no HTTP): ``.create_repo(repo_id, repo_type="model", private=False)``,
    ``.list_files(repo_id, revision="main")``, ``.read_file(repo_id, path, revision="main")``,
    ``.is_lfs(repo_id, path, revision="main")``, ``.commits(repo_id, revision="main")`` (newest first).

``patch_hf_hub_endpoint(url, *, hf_home=None, disable_xet=True)``
    Context manager pointing this process's client at ``url`` (see the import-time constants below),
    restoring everything on exit.

Typical conftest (``tests/`` is on ``sys.path`` under pytest's default rootdir-based import mode)::

    from hub_server import hub_server

    @pytest.fixture
    def hub(tmp_path):
        with hub_server(tmp_path, patch_client=True) as server:
            yield server

    def test_roundtrip(hub, tmp_path):
        pipe.push_to_hub("org/tiny", token="x")       # in-process: works thanks to patch_client=True
        env = {**os.environ, **hub.client_env(tmp_path / "hf_home")}
        subprocess.run([sys.executable, "-c", "..."], env=env, check=True)  # fresh process

Environment variables and their ordering constraints (huggingface_hub 2.4.0)
----------------------------------------------------------------------------
* ``HF_ENDPOINT`` is read ONCE, when ``huggingface_hub.constants`` is imported, and copied into several
  import-time values: ``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``,
  ``constants.HF_URL_HOSTS``, ``utils._http._HUB_ORIGINS`` (which hosts may receive the auth header
  and whose redirects are followed) and the module-level ``HfApi()`` behind the free functions
  ``create_repo`` / ``upload_folder`` / ``model_info`` ... that diffusers uses.  diffusers copies it
  once more into ``diffusers.utils.constants.HUGGINGFACE_CO_RESOLVE_ENDPOINT`` (error messages only)
  and transformers caches an ``HfApi`` in ``transformers.utils.hub._hf_api`` on first use.  Setting
  ``os.environ["HF_ENDPOINT"]`` after ``import huggingface_hub`` (or after importing diffusers /
  transformers, which import it) has NO effect (``test_endpoint_constant_is_frozen_at_import``).
  Since the port is ephemeral, a subprocess must get ``HF_ENDPOINT`` in its environment at start,
  and the test process itself needs ``patch_hf_hub_endpoint``.
* ``HF_HUB_DISABLE_XET=1`` is REQUIRED for uploads, also read at import (patchable at run time as
  ``constants.HF_HUB_DISABLE_XET``, which ``is_xet_available()`` reads on each call).  With ``hf_xet``
  installed (1.8.0 here) the 2.4 client does not negotiate: ``_upload_files`` sends every LFS file
  through Xet and ``upload_folder`` switches to the Xet "pipelined" uploader, both starting with
  ``GET /api/models/{repo}/xet-write-token/{rev}``, whatever the server advertises.  This server
  answers that route with a 501 whose message says to set the variable.  Downloads never use Xet
  here because responses carry no ``X-Xet-Hash`` header or ``Link: xet-auth`` and tree entries no
  ``xetHash``.
* ``HF_HOME`` (or ``HF_HUB_CACHE``) picks the cache; also read at import.
* ``HF_HUB_OFFLINE=1`` must likewise be set before the import; it turns every request into
  ``OfflineModeIsEnabled`` and ``snapshot_download`` then serves ``refs/main`` + ``snapshots/<sha>``
  from the cache, checking completeness against the cached tree listing ``trees/<sha>.json``.
  ditq's ``tests/conftest.py`` does ``os.environ.setdefault("HF_HUB_OFFLINE", "1")``, so both
  ``client_env()`` (``"0"`` unless ``offline=True``) and ``patch_hf_hub_endpoint`` (which patches
  ``constants.HF_HUB_OFFLINE``, read by ``is_offline_mode()`` on every call, and diffusers' import-time
  copies) set it explicitly; ``{**os.environ, **client_env(...)}`` is therefore safe.
* ``HF_HUB_DISABLE_TELEMETRY=1`` (set by ``client_env``): without it, building the user agent makes
  the client fetch ``{constants.ENDPOINT}/api/agent-harnesses`` once a process (cached 24 h in
  ``$HF_HOME/.agent_harnesses.json``).  That goes to ``constants.ENDPOINT`` even when every call passes
  ``endpoint=``, i.e. to huggingface.co unless ``HF_ENDPOINT`` is set (a 3 s timeout offline).  This
  server answers the route with an empty registry anyway.

How diffusers ``DiffusionPipeline.from_pretrained("org/repo")`` resolves against this server
-----------------------------------------------------------------------------------------
Checked with diffusers 0.42.1 / transformers 5.23 in a fresh process with ``HF_ENDPOINT`` set before
import (``test_diffusers_pipeline_push_and_from_pretrained``).  Requests, in order:

1. ``GET /api/models/org/repo`` -- ``_resolve_revision`` -> ``HfApi.resolve_revision`` -> ``repo_info``
   gives the sha of ``main``; ``refs/main`` is written to the cache.  The result is a
   ``ResolvedRevision``: a ``str`` whose *value is still "main"*, the sha being in ``.resolved``.
2. ``GET /api/models/org/repo/revision/main`` -- ``model_info`` (so it is not pinned to the sha); only
   ``siblings`` is used, to compute allow/ignore patterns (variants, safetensors vs bin).
3. ``HEAD`` + ``GET /org/repo/resolve/<sha>/model_index.json``.
4. ``snapshot_download`` with the ``ResolvedRevision`` (no ``repo_info`` call):
   ``GET /api/models/org/repo/tree/<sha>?recursive=true&expand=false`` (cached on disk as
   ``trees/<sha>.json``), then one ``HEAD /org/repo/resolve/<sha>/<file>`` per file plus a ``GET`` per
   file not yet cached.  Regular files come straight from ``/resolve`` (200, ``ETag`` = git blob
   sha1).  LFS files get a 302 to ``cdn_url`` carrying ``X-Linked-Etag`` (sha256) and
   ``X-Linked-Size``; the client does not follow it for the HEAD (other origin) and GETs the CDN URL
   without the ``Authorization`` header, exactly as with the real Hub's CDN.
5. transformers components (``T5EncoderModel``, ``ByT5Tokenizer``) load from the snapshot folder: no
   further requests.

``push_to_hub`` (in-process, ``patch_client=True``): ``POST /api/repos/create``, ``HEAD
.../resolve/main/README.md`` (404 -> new model card), ``POST /api/validate-yaml`` (twice), ``POST
.../preupload/main``, ``POST /org/repo.git/info/lfs/objects/batch`` + one ``PUT`` to the CDN and one
``.../objects/verify`` per ``*.safetensors``, then ``POST .../commit/main`` (NDJSON).  Without
``HF_HUB_DISABLE_TELEMETRY`` a process's first request is preceded by ``GET /api/agent-harnesses``.

Gotcha when comparing outputs: freshly constructed modules are in train mode (T5's dropout is 0.1)
while ``from_pretrained`` returns eval-mode modules, so call ``.eval()`` on the reference components.

Protocol notes
--------------
* Repos start with a commit holding the Hub's default ``.gitattributes``, like on the Hub.  Every
  commit gets a new 40-hex sha and old commits stay resolvable by sha; branches are ``main``, those
  made with ``create_branch`` and ``refs/pr/N`` (``create_pr=True``).
* ``preupload`` says ``"lfs"`` for files bigger than ``lfs_threshold``, files matched by an LFS rule
  of the repo's ``.gitattributes`` (``*.safetensors``, ``*.bin``, ...) and files whose first 512
  bytes contain a NUL byte; otherwise ``"regular"`` (content inline, base64, in the NDJSON commit).
  It also returns the current ``oid`` so the client skips unchanged files, as against the Hub.
* Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) which
  ``hf_raise_for_status`` maps to ``RepositoryNotFoundError``, ``RevisionNotFoundError`` and
  ``RemoteEntryNotFoundError`` (a subclass of ``EntryNotFoundError`` and ``HfHubHTTPError``).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import fnmatch
import hashlib
import http.server
import itertools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "HubServer",
    "RequestRecord",
    "hub_server",
    "patch_hf_hub_endpoint",
]

# The real Hub's default .gitattributes (trimmed): these rules decide which files must go through LFS.
DEFAULT_GITATTRIBUTES = """\
*.7z filter=lfs diff=lfs merge=lfs -text
*.arrow filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.bz2 filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.ftz filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.joblib filter=lfs diff=lfs merge=lfs -text
*.lfs.* filter=lfs diff=lfs merge=lfs -text
*.mlmodel filter=lfs diff=lfs merge=lfs -text
*.model filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.ot filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pb filter=lfs diff=lfs merge=lfs -text
*.pickle filter=lfs diff=lfs merge=lfs -text
*.pkl filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.rar filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
saved_model/**/* filter=lfs diff=lfs merge=lfs -text
*.tar.* filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.tflite filter=lfs diff=lfs merge=lfs -text
*.tgz filter=lfs diff=lfs merge=lfs -text
*.wasm filter=lfs diff=lfs merge=lfs -text
*.xz filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
*.zst filter=lfs diff=lfs merge=lfs -text
*tfevents* filter=lfs diff=lfs merge=lfs -text
"""

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Path segments that follow a repo id in /api/{type}s/{repo_id}/... routes.  Used to tell a legacy
# one-segment repo id ("gpt2") from "namespace/name".
_API_ACTIONS = {
    "revision", "tree", "paths-info", "preupload", "commit", "refs", "commits", "branch",
    "xet-write-token", "xet-read-token",
}
_SHA_PREFIX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"


def _git_blob_oid(data: bytes) -> str:
    # Same as git's blob id and as huggingface_hub.utils.sha.git_hash: the client compares it with the
    # preupload "oid" to skip unchanged regular files.
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    # huggingface_hub.utils.parse_datetime expects '%Y-%m-%dT%H:%M:%S.%fZ'.
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _gitattributes_lfs_patterns(text: str) -> list[str]:
    return [
        line.split()[0]
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#") and "filter=lfs" in line.split()[1:]
    ]


def _path_matches(pattern: str, path: str) -> bool:
    # git semantics, approximately: a pattern without "/" matches the basename at any depth.
    if "/" not in pattern:
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    return fnmatch.fnmatchcase(path, pattern.lstrip("/"))


# --------------------------------------------------------------------------------------------------
# Repository state
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One file in one commit.  Content lives in the blob store under its sha256."""

    size: int
    sha256: str
    git_oid: str  # git blob id: of the content for regular files, of the LFS pointer for LFS files
    lfs: bool

    def tree_json(self, path: str) -> dict[str, Any]:
        info: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": self.size, "path": path}
        if self.lfs:
            pointer_size = len(_LFS_POINTER.format(oid=self.sha256, size=self.size))
            info["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": pointer_size}
        return info


@dataclasses.dataclass
class _Commit:
    oid: str
    parent: str | None
    files: dict[str, _Entry]
    title: str
    message: str
    date: str


@dataclasses.dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    refs: dict[str, str] = dataclasses.field(default_factory=dict)  # branch name -> commit oid
    commits: dict[str, _Commit] = dataclasses.field(default_factory=dict)
    pr_count: int = 0

    @property
    def url_path(self) -> str:
        return _URL_PREFIX[self.repo_type] + self.repo_id


class HubError(Exception):
    """An HTTP error in the shape huggingface_hub's ``hf_raise_for_status`` understands."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclasses.dataclass
class RequestRecord:
    """One request seen by the server, for assertions in tests."""

    method: str
    path: str  # percent-decoded path, without the query string
    raw_path: str  # as sent, still percent-encoded
    query: dict[str, list[str]]
    origin: str  # "hub" or "cdn"
    headers: dict[str, str]  # request headers, names lower-cased
    status: int | None = None
    time: float = 0.0


@dataclasses.dataclass
class _Request:
    method: str
    raw_path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    read_body: Callable[[], bytes]
    iter_body: Callable[[], Iterator[bytes]]

    def json(self) -> Any:
        body = self.read_body()
        try:
            return json.loads(body or b"{}")
        except ValueError as exc:
            raise HubError(400, f"Request body is not valid JSON: {exc}") from None

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    @property
    def authenticated(self) -> bool:
        return self.headers.get("authorization", "").lower().startswith("bearer ")


@dataclasses.dataclass
class _Response:
    status: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None  # streamed instead of `body` (blob downloads)
    file_range: tuple[int, int] | None = None  # inclusive byte range of `file` to send (206 responses)
    content_type: str = "application/json"


def _json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status=status, headers=headers or {}, body=json.dumps(data).encode())


class _HubState:
    """All repos plus the content-addressed blob store.

    Requests are served concurrently (the client uploads and downloads with thread pools), so routes
    hold ``lock`` while they read or change repos.  Blob writes need no lock: they are atomic renames
    of content-addressed files.
    """

    def __init__(self, root: Path, *, lfs_threshold: int, namespace: str, require_auth_for_writes: bool):
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.lfs_threshold = lfs_threshold
        self.namespace = namespace
        self.require_auth_for_writes = require_auth_for_writes
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], _Repo] = {}
        self._commit_counter = itertools.count()

    # ---- blobs --------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha256):
            tmp = self.tmp / uuid.uuid4().hex
            tmp.write_bytes(data)
            os.replace(tmp, self.blob_path(sha256))  # atomic: concurrent readers never see half a blob
        return sha256

    def put_stream(self, chunks: Iterator[bytes], expected_sha256: str) -> int:
        """Store an LFS upload streamed from the socket, checking it hashes to what was announced."""
        tmp = self.tmp / uuid.uuid4().hex
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            if digest.hexdigest() != expected_sha256:
                raise HubError(400, f"Uploaded content has sha256 {digest.hexdigest()}, expected {expected_sha256}")
            os.replace(tmp, self.blob_path(expected_sha256))
        finally:
            tmp.unlink(missing_ok=True)
        return size

    def entry_for(self, data: bytes, lfs: bool) -> _Entry:
        sha256 = self.put_bytes(data)
        return self.entry_for_blob(sha256, len(data), lfs, data)

    def entry_for_blob(self, sha256: str, size: int, lfs: bool, data: bytes | None = None) -> _Entry:
        if lfs:
            git_oid = _git_blob_oid(_LFS_POINTER.format(oid=sha256, size=size).encode())
        else:
            git_oid = _git_blob_oid(data if data is not None else self.blob_path(sha256).read_bytes())
        return _Entry(size=size, sha256=sha256, git_oid=git_oid, lfs=lfs)

    # ---- repos & revisions --------------------------------------------------------------------

    def get_repo(self, repo_type: str, repo_id: str, req: _Request | None = None) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        # Like the Hub, a private repo without credentials looks exactly like a missing one.
        if repo is None or (repo.private and req is not None and not req.authenticated):
            raise HubError(404, f"Repository not found: {repo_type}s/{repo_id}", code="RepoNotFound")
        return repo

    def check_write(self, req: _Request) -> None:
        if self.require_auth_for_writes and not req.authenticated:
            raise HubError(401, "Invalid credentials in Authorization header")

    def resolve(self, repo: _Repo, revision: str | None) -> _Commit:
        revision = revision or "main"
        if revision in repo.refs:
            return repo.commits[repo.refs[revision]]
        if revision.startswith("refs/heads/") and revision[len("refs/heads/"):] in repo.refs:
            return repo.commits[repo.refs[revision[len("refs/heads/"):]]]
        if revision in repo.commits:
            return repo.commits[revision]
        if _SHA_PREFIX_RE.match(revision):  # abbreviated sha, if unambiguous
            matches = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return repo.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def new_commit(self, repo: _Repo, branch: str, files: dict[str, _Entry], title: str, message: str) -> _Commit:
        parent = repo.refs.get(branch)
        # A fresh 40-hex id per commit; the counter keeps it unique even for identical content and time.
        seed = f"{repo.repo_type}/{repo.repo_id}\0{parent}\0{title}\0{time.time_ns()}\0{next(self._commit_counter)}"
        seed += "".join(f"\0{p}:{e.git_oid}" for p, e in sorted(files.items()))
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = _Commit(oid=oid, parent=parent, files=dict(files), title=title, message=message, date=_now_iso())
        repo.commits[oid] = commit
        repo.refs[branch] = oid
        return commit

    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> tuple[_Repo, bool]:
        with self.lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                return self.repos[key], False
            repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now_iso())
            # The Hub creates every repo with an initial commit holding its default .gitattributes: it is
            # what makes "*.safetensors" LFS files and gives `repo_info(...).sha` a value from the start.
            entry = self.entry_for(DEFAULT_GITATTRIBUTES.encode(), lfs=False)
            self.new_commit(repo, "main", {".gitattributes": entry}, "initial commit", "")
            self.repos[key] = repo
            return repo, True

    def upload_mode(self, commit: _Commit, path: str, size: int, sample: bytes) -> str:
        if size > self.lfs_threshold:
            return "lfs"
        attributes = commit.files.get(".gitattributes")
        if attributes is not None:
            text = self.blob_path(attributes.sha256).read_text(errors="replace")
            if any(_path_matches(p, path) for p in _gitattributes_lfs_patterns(text)):
                return "lfs"
        # The Hub refuses binary content in plain git; a NUL byte in the sample is git's binary heuristic.
        return "lfs" if b"\0" in sample else "regular"


# --------------------------------------------------------------------------------------------------
# Route handlers (pure functions of state + request -> response)
# --------------------------------------------------------------------------------------------------


class _Routes:
    def __init__(self, hub: HubServer):
        self.hub = hub
        self.state = hub._state

    # ---- /api/repos, misc ---------------------------------------------------------------------

    def create_repo(self, req: _Request) -> _Response:
        self.state.check_write(req)
        payload = req.json()
        name = payload.get("name")
        if not name:
            raise HubError(400, "Missing repo name")
        organization = payload.get("organization") or self.state.namespace
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Unsupported repo type {repo_type!r}")
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        repo_id = f"{organization}/{name}"
        repo, created = self.state.create_repo(repo_type, repo_id, private=private)
        url = f"{self.hub.url}/{repo.url_path}"
        if not created:
            # create_repo(exist_ok=True) relies on exactly this 409.
            return _json_response({"error": f"You already created this {repo_type} repo", "url": url}, status=409)
        return _json_response({"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self, req: _Request) -> _Response:
        self.state.check_write(req)
        payload = req.json()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.state.namespace}/{payload.get('name')}"
        with self.state.lock:
            self.state.get_repo(repo_type, repo_id, req)
            del self.state.repos[(repo_type, repo_id)]
        return _json_response({})

    def validate_yaml(self, req: _Request) -> _Response:
        req.read_body()
        return _json_response({"errors": [], "warnings": []})

    def whoami(self, req: _Request) -> _Response:
        if not req.authenticated:
            raise HubError(401, "Invalid credentials in Authorization header")
        return _json_response(
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.state.namespace,
                "fullname": "Test User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def agent_harnesses(self, req: _Request) -> _Response:
        # Fetched by build_hf_headers() when telemetry is on; an empty registry disables agent detection.
        return _json_response({"standardEnvVars": [], "harnesses": {}})

    # ---- /api/{type}s/{repo_id}/... ----------------------------------------------------------

    def api_repo(self, req: _Request, type_plural: str, rest: str) -> _Response:
        repo_type = _REPO_TYPES[type_plural]
        parts = rest.split("/")
        if len(parts) >= 2 and parts[1] not in _API_ACTIONS:
            repo_id, tail = f"{unquote(parts[0])}/{unquote(parts[1])}", parts[2:]
        else:
            repo_id, tail = unquote(parts[0]), parts[1:]
        action = tail[0] if tail else ""
        # Revisions are sent quoted with safe="" ("refs%2Fpr%2F1"), so they are one raw segment.
        arg = unquote(tail[1]) if len(tail) > 1 else None
        with self.state.lock:
            if action == "" and req.method == "GET":
                return self.repo_info(req, repo_type, repo_id, None)
            if action == "revision" and req.method == "GET":
                return self.repo_info(req, repo_type, repo_id, unquote("/".join(tail[1:])))
            if action == "tree" and req.method == "GET":
                return self.tree(req, repo_type, repo_id, arg, unquote("/".join(tail[2:])))
            if action == "paths-info" and req.method == "POST":
                return self.paths_info(req, repo_type, repo_id, arg)
            if action == "preupload" and req.method == "POST":
                return self.preupload(req, repo_type, repo_id, arg)
            if action == "commit" and req.method == "POST":
                return self.commit(req, repo_type, repo_id, arg)
            if action == "refs" and req.method == "GET":
                return self.refs(req, repo_type, repo_id)
            if action == "commits" and req.method == "GET":
                return self.list_commits(req, repo_type, repo_id, arg)
            if action == "branch" and req.method in ("POST", "DELETE"):
                return self.branch(req, repo_type, repo_id, unquote("/".join(tail[1:])))
            if action in ("xet-write-token", "xet-read-token"):
                raise HubError(
                    501,
                    "This test Hub does not implement Xet storage. The client only uses Xet for uploads when"
                    " the 'hf_xet' package is importable: set HF_HUB_DISABLE_XET=1 before importing"
                    " huggingface_hub (or use hub_server.patch_hf_hub_endpoint in-process).",
                )
        raise _unhandled(req)

    def repo_info(self, req: _Request, repo_type: str, repo_id: str, revision: str | None) -> _Response:
        repo = self.state.get_repo(repo_type, repo_id, req)
        commit = self.state.resolve(repo, revision)
        with_blobs = req.param("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    info = entry.tree_json(path)["lfs"]
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": info["pointerSize"]}
            siblings.append(sibling)
        author = repo_id.split("/")[0] if "/" in repo_id else None
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": author,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        elif repo_type == "space":
            info["sdk"] = "static"
        return _json_response(info)

    def _tree_items(self, commit: _Commit, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = prefix.strip("/")
        base = f"{prefix}/" if prefix else ""
        files: list[dict[str, Any]] = []
        folders: dict[str, list[str]] = {}
        for path, entry in commit.files.items():
            if not path.startswith(base):
                continue
            rel = path[len(base):]
            if "/" in rel and not recursive:
                child = base + rel.split("/", 1)[0]
                folders.setdefault(child, []).append(entry.git_oid)
                continue
            files.append(entry.tree_json(path))
            if recursive:  # every ancestor folder below `prefix` is listed too, like the Hub does
                parts = rel.split("/")[:-1]
                for depth in range(1, len(parts) + 1):
                    folders.setdefault(base + "/".join(parts[:depth]), []).append(entry.git_oid)
        if prefix and not files and not folders:
            headers = {"X-Repo-Commit": commit.oid}
            raise HubError(404, f"Entry not found: {prefix}", code="EntryNotFound", headers=headers)
        items = files + [
            {"type": "directory", "oid": hashlib.sha1("".join(sorted(oids)).encode()).hexdigest(), "size": 0, "path": p}
            for p, oids in folders.items()
        ]
        return sorted(items, key=lambda item: item["path"])

    def tree(self, req: _Request, repo_type: str, repo_id: str, revision: str | None, path: str) -> _Response:
        repo = self.state.get_repo(repo_type, repo_id, req)
        commit = self.state.resolve(repo, revision)
        recursive = (req.param("recursive") or "").lower() in ("1", "true")
        # No pagination (the client follows a `Link: rel="next"` header only if present).
        return _json_response(self._tree_items(commit, path, recursive))

    def paths_info(self, req: _Request, repo_type: str, repo_id: str, revision: str | None) -> _Response:
        repo = self.state.get_repo(repo_type, repo_id, req)
        commit = self.state.resolve(repo, revision)
        body = req.read_body().decode()
        if req.headers.get("content-type", "").startswith("application/json"):
            paths = json.loads(body or "{}").get("paths", [])
        else:  # the client sends form data: paths=a&paths=b&expand=False
            paths = parse_qs(body).get("paths", [])
        result = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                result.append(commit.files[path].tree_json(path))
            elif any(p.startswith(path + "/") for p in commit.files):
                oid = hashlib.sha1(path.encode()).hexdigest()
                result.append({"type": "directory", "oid": oid, "size": 0, "path": path})
        return _json_response(result)

    def refs(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self.state.get_repo(repo_type, repo_id, req)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in repo.refs.items()
            if not name.startswith("refs/pr/")
        ]
        data: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if req.param("include_prs"):
            data["pullRequests"] = [
                {"name": name, "ref": name, "targetCommit": oid}
                for name, oid in repo.refs.items()
                if name.startswith("refs/pr/")
            ]
        return _json_response(data)

    def list_commits(self, req: _Request, repo_type: str, repo_id: str, revision: str | None) -> _Response:
        repo = self.state.get_repo(repo_type, repo_id, req)
        commit: _Commit | None = self.state.resolve(repo, revision)
        items = []
        while commit is not None:
            items.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": self.state.namespace}],
                    "date": commit.date,
                }
            )
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return _json_response(items)

    def branch(self, req: _Request, repo_type: str, repo_id: str, branch: str) -> _Response:
        self.state.check_write(req)
        repo = self.state.get_repo(repo_type, repo_id, req)
        if req.method == "DELETE":
            if branch not in repo.refs or branch == "main":
                raise HubError(404 if branch not in repo.refs else 403, f"Cannot delete branch {branch}")
            del repo.refs[branch]
            return _json_response({})
        payload = req.json()
        if branch in repo.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self.state.resolve(repo, payload.get("startingPoint"))
        repo.refs[branch] = start.oid
        return _json_response({})

    # ---- uploads ------------------------------------------------------------------------------

    def preupload(self, req: _Request, repo_type: str, repo_id: str, revision: str | None) -> _Response:
        self.state.check_write(req)
        repo = self.state.get_repo(repo_type, repo_id, req)
        head = self.state.resolve(repo, revision)
        payload = req.json()
        ignore_patterns = [
            line.strip()
            for line in (payload.get("gitIgnore") or "").splitlines()
            if line.strip() and not line.startswith("#")
        ]
        files = []
        for item in payload.get("files", []):
            path = item["path"]
            sample = base64.b64decode(item.get("sample") or "")
            mode = self.state.upload_mode(head, path, int(item.get("size", 0)), sample)
            existing = head.files.get(path)
            # "oid" lets the client drop unchanged files: sha256 for LFS files, git blob id otherwise
            # (matches CommitOperationAdd._local_oid).
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.git_oid
            should_ignore = any(_path_matches(p, path) for p in ignore_patterns)
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": should_ignore, "oid": oid})
        return _json_response({"files": files, "commitOid": head.oid})

    def commit(self, req: _Request, repo_type: str, repo_id: str, revision: str | None) -> _Response:
        self.state.check_write(req)
        repo = self.state.get_repo(repo_type, repo_id, req)
        create_pr = req.param("create_pr") in ("1", "true", "True")
        try:
            lines = [json.loads(line) for line in req.read_body().splitlines() if line.strip()]
        except ValueError as exc:
            raise HubError(400, f"Commit payload is not valid NDJSON: {exc}") from None
        header = next((item["value"] for item in lines if item.get("key") == "header"), {})
        parent_commit = header.get("parentCommit")
        # Validate everything before touching refs, so a bad request leaves the repo untouched.
        branch = (revision or "main").removeprefix("refs/heads/")
        if branch not in repo.refs:
            # Commits go to branches only: an unknown branch (or a bare sha) is a RevisionNotFound, as on the Hub.
            raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
        head = repo.commits[repo.refs[branch]]
        if parent_commit is not None and parent_commit != head.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for item in lines:
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                continue
            path = value.get("path", "").strip("/")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
                files[path] = self.state.entry_for(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                oid = value["oid"]
                size = value.get("size")
                if not self.state.has_blob(oid, size):
                    raise HubError(
                        400,
                        f"Your push was rejected because an LFS pointer pointed to a file that does not exist: {path}"
                        f" (sha256 {oid}). Upload it through the LFS batch API first.",
                    )
                files[path] = self.state.entry_for_blob(oid, self.state.blob_path(oid).stat().st_size, lfs=True)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                removed = [p for p in files if p.startswith(path + "/")]
                if not removed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                for p in removed:
                    del files[p]
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        if create_pr:  # the commit lands on a new refs/pr/N branch forked from the target's head
            repo.pr_count += 1
            branch = f"refs/pr/{repo.pr_count}"
            repo.refs[branch] = head.oid
        title, description = header.get("summary") or "", header.get("description") or ""
        commit = self.state.new_commit(repo, branch, files, title, description)
        data: dict[str, Any] = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.hub.url}/{repo.url_path}/commit/{commit.oid}",
            "commitMessage": commit.title,
            "hookOutput": "",
            "pullRequestUrl": None,
        }
        if create_pr:
            data["pullRequestUrl"] = f"{self.hub.url}/{repo.url_path}/discussions/{repo.pr_count}"
        return _json_response(data)

    def lfs(self, req: _Request, type_prefix: str | None, raw_repo: str, op: str) -> _Response:
        repo_type = _REPO_TYPES[type_prefix] if type_prefix else "model"
        repo_id = unquote(raw_repo)
        payload = req.json()
        with self.state.lock:
            repo = self.state.get_repo(repo_type, repo_id, req)
            if op == "verify":
                if not self.state.has_blob(payload.get("oid", ""), payload.get("size")):
                    raise HubError(404, f"LFS object {payload.get('oid')} was not uploaded")
                return _json_response({"message": "Everything is fine"})
            self.state.check_write(req)
            if payload.get("operation") != "upload":
                raise HubError(422, "This test Hub only implements the LFS 'upload' operation")
            objects = []
            for obj in payload.get("objects", []):
                oid, size = obj["oid"], obj["size"]
                if self.state.has_blob(oid, size):
                    objects.append({"oid": oid, "size": size})  # no "actions" => the client skips the upload
                    continue
                objects.append(
                    {
                        "oid": oid,
                        "size": size,
                        "authenticated": True,
                        "actions": {
                            # Uploads go to the "CDN" origin, like the Hub's pre-signed S3 URLs; basic transfer only.
                            "upload": {"href": f"{self.hub.cdn_url}/lfs-upload/{oid}?size={size}", "expires_in": 3600},
                            "verify": {
                                "href": f"{self.hub.url}/{repo.url_path}.git/info/lfs/objects/verify",
                                "expires_in": 3600,
                            },
                        },
                    }
                )
        return _json_response({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_upload(self, req: _Request, oid: str) -> _Response:
        size = self.state.put_stream(req.iter_body(), oid)
        expected = req.param("size")
        if expected is not None and int(expected) != size:
            raise HubError(400, f"Uploaded {size} bytes for {oid}, announced {expected}")
        return _Response(status=200, headers={"ETag": f'"{oid}"'}, content_type="text/plain")

    # ---- downloads ----------------------------------------------------------------------------

    def resolve_file(
        self, req: _Request, type_prefix: str | None, raw_repo: str, raw_rev: str, raw_path: str
    ) -> _Response:
        repo_type = _REPO_TYPES[type_prefix] if type_prefix else "model"
        repo_id, revision, path = unquote(raw_repo), unquote(raw_rev), unquote(raw_path)
        with self.state.lock:
            repo = self.state.get_repo(repo_type, repo_id, req)
            commit = self.state.resolve(repo, revision)
            entry = commit.files.get(path)
        # X-Repo-Commit on the 404 lets the client cache the file's absence under .no_exist/<sha>/.
        headers = {"X-Repo-Commit": commit.oid}
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", code="EntryNotFound", headers=headers)
        if entry.lfs:
            # Like the Hub: 302 to another origin, with the file's metadata on the redirect itself.  The
            # client does not follow cross-origin redirects for HEAD and drops the Authorization header for
            # the GET; X-Linked-Size is needed because Content-Length here is the redirect's.
            location = f"{self.hub.cdn_url}/lfs-objects/{entry.sha256}?filename={quote(path.rsplit('/', 1)[-1])}"
            headers.update(
                {
                    "Location": location,
                    "ETag": f'"{entry.git_oid}"',
                    "X-Linked-Etag": f'"{entry.sha256}"',
                    "X-Linked-Size": str(entry.size),
                }
            )
            return _Response(status=302, headers=headers, content_type="text/plain")
        headers["ETag"] = f'"{entry.git_oid}"'
        return _file_response(req, self.state.blob_path(entry.sha256), headers)

    def lfs_object(self, req: _Request, oid: str) -> _Response:
        path = self.state.blob_path(oid)
        if not path.is_file():
            raise HubError(404, f"No such LFS object {oid}")
        headers = {"ETag": f'"{oid}"'}
        filename = req.param("filename")
        if filename:
            headers["Content-Disposition"] = f'inline; filename="{filename}"'
        return _file_response(req, path, headers)


def _file_response(req: _Request, path: Path, headers: dict[str, str]) -> _Response:
    headers = {**headers, "Accept-Ranges": "bytes"}
    size = path.stat().st_size
    range_header = req.headers.get("range")
    # The client resumes interrupted downloads with "Range: bytes=N-": serve single ranges faithfully.
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip()) if range_header else None
    if match and (match.group(1) or match.group(2)):
        if match.group(1):
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
        else:  # suffix range: last N bytes
            start, end = max(size - int(match.group(2)), 0), size - 1
        if start >= size or start > end:
            headers["Content-Range"] = f"bytes */{size}"
            return _Response(status=416, headers=headers, content_type="text/plain")
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return _Response(
            status=206, headers=headers, file=path, file_range=(start, end), content_type="application/octet-stream"
        )
    return _Response(status=200, headers=headers, file=path, content_type="application/octet-stream")


def _unhandled(req: _Request) -> HubError:
    return HubError(404, f"hub_server: unsupported route {req.method} {req.raw_path}", code="UnhandledRoute")


# --------------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------------


class _ThreadingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # handler threads never keep the test process alive
    allow_reuse_address = True

    def __init__(self, hub: HubServer, origin: str):
        self.hub = hub
        self.origin = origin
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request_thread(self, request, client_address):  # type: ignore[override]
        # Track live keep-alive connections so stop() can cut them instead of leaving threads in recv().
        with self.sockets_lock:
            self.open_sockets.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.sockets_lock:
                self.open_sockets.discard(request)

    def close_open_connections(self) -> None:
        with self.sockets_lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive like the real Hub: the client's connection pool reuses sockets.  This requires
    # every response to carry Content-Length and every request body to be read completely.
    protocol_version = "HTTP/1.1"
    server_version = "hub-server-for-tests/1.0"
    timeout = 60  # idle keep-alive connections are dropped after this
    server: _ThreadingServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean: requests are recorded in HubServer.requests instead

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # ---- body reading (Content-Length or chunked: httpx streams file uploads chunked) -----------

    def _iter_body(self) -> Iterator[bytes]:
        if self._body_started:
            return
        self._body_started = True
        yield from self._iter_body_raw()
        self._body_complete = True

    def _iter_body_raw(self) -> Iterator[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        raise ConnectionError("client closed the connection mid-body")
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline(65537)  # CRLF closing the chunk
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    raise ConnectionError("client closed the connection mid-body")
                remaining -= len(chunk)
                yield chunk

    def _read_body(self) -> bytes:
        if self._body_cache is None:
            self._body_cache = b"".join(self._iter_body())
        return self._body_cache

    # ---- dispatch -----------------------------------------------------------------------------

    def _handle(self) -> None:
        self._body_started = self._body_complete = False
        self._body_cache: bytes | None = None
        hub = self.server.hub
        split = urlsplit(self.path)
        req = _Request(
            method=self.command,
            raw_path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            read_body=self._read_body,
            iter_body=self._iter_body,
        )
        record = RequestRecord(
            method=self.command,
            path=unquote(split.path),
            raw_path=split.path,
            query=req.query,
            origin=self.server.origin,
            headers=dict(req.headers),
            time=time.time(),
        )
        try:
            response = hub._dispatch(self.server.origin, req)
        except HubError as exc:
            response = _error_response(exc)
            if exc.code == "UnhandledRoute":
                hub._record_unhandled(record)
        except Exception as exc:  # a server bug: report it to the client (500) and keep serving
            traceback.print_exc(file=sys.stderr)
            response = _error_response(HubError(500, f"hub_server internal error: {exc!r}"))
        try:
            # Drain what the route did not read, or the next request on this keep-alive socket is garbage.
            for _ in self._iter_body():
                pass
        except (ConnectionError, ValueError):
            self.close_connection = True
        if not self._body_complete:  # a route gave up halfway through the body: the stream is out of sync
            self.close_connection = True
        record.status = response.status
        hub._record(record)
        self._write(response)

    def _write(self, response: _Response) -> None:
        if response.file is not None:
            start, end = response.file_range or (0, response.file.stat().st_size - 1)
            length = max(end - start + 1, 0)
        else:
            length = len(response.body)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(length))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if response.file is None:
            self.wfile.write(response.body)
            return
        with open(response.file, "rb") as f:
            f.seek(start)
            remaining = length
            while remaining:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


def _error_response(exc: HubError) -> _Response:
    headers = dict(exc.headers)
    if exc.code and exc.code != "UnhandledRoute":
        headers["X-Error-Code"] = exc.code
    # Header values must be latin-1 and single-line.
    headers["X-Error-Message"] = exc.message.replace("\n", " ").encode("latin-1", "replace").decode("latin-1")
    return _json_response({"error": exc.message}, status=exc.status, headers=headers)


# --------------------------------------------------------------------------------------------------
# Public server object
# --------------------------------------------------------------------------------------------------

# "[datasets/|spaces/]namespace/name" (or a legacy one-segment model id) at the start of git-style URLs.
_REPO_PREFIX = r"^/(?:(?P<type_prefix>datasets|spaces)/)?(?P<raw_repo>[^/]+(?:/[^/]+)?)"
_HUB_ROUTES: list[tuple[frozenset[str], re.Pattern[str], str]] = [
    (frozenset({"POST"}), re.compile(r"^/api/repos/create$"), "create_repo"),
    (frozenset({"DELETE"}), re.compile(r"^/api/repos/delete$"), "delete_repo"),
    (frozenset({"POST"}), re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    (frozenset({"GET"}), re.compile(r"^/api/whoami-v2$"), "whoami"),
    (frozenset({"GET"}), re.compile(r"^/api/agent-harnesses$"), "agent_harnesses"),
    (
        frozenset({"GET", "POST", "DELETE"}),
        re.compile(r"^/api/(?P<type_plural>models|datasets|spaces)/(?P<rest>.+)$"),
        "api_repo",
    ),
    (frozenset({"POST"}), re.compile(_REPO_PREFIX + r"\.git/info/lfs/objects/(?P<op>batch|verify)$"), "lfs"),
    (
        frozenset({"GET", "HEAD"}),
        re.compile(_REPO_PREFIX + r"/resolve/(?P<raw_rev>[^/]+)/(?P<raw_path>.+)$"),
        "resolve_file",
    ),
]
_CDN_ROUTES: list[tuple[frozenset[str], re.Pattern[str], str]] = [
    (frozenset({"PUT"}), re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), "lfs_upload"),
    (frozenset({"GET", "HEAD"}), re.compile(r"^/lfs-objects/(?P<oid>[0-9a-f]{64})$"), "lfs_object"),
]


class HubServer:
    """A Hub-protocol server on two loopback origins: ``url`` (API, git, /resolve) and ``cdn_url`` (LFS).

    Use ``hub_server(...)`` or ``with HubServer(...) as server:``.  Thread-safe; all state is in memory
    except file contents, which are stored under ``root/blobs`` by sha256.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        max_lifetime_s: float = 600.0,
        lfs_threshold: int = 10 * 1024 * 1024,
        namespace: str = "test-user",
        require_auth_for_writes: bool = False,
    ):
        self._owns_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="hub_server_"))
        self.max_lifetime_s = max_lifetime_s
        self._state = _HubState(
            self.root,
            lfs_threshold=lfs_threshold,
            namespace=namespace,
            require_auth_for_writes=require_auth_for_writes,
        )
        self._routes = _Routes(self)
        self._requests: list[RequestRecord] = []
        self._unhandled: list[RequestRecord] = []
        self._log_lock = threading.Lock()
        self._servers: list[_ThreadingServer] = []
        self._threads: list[threading.Thread] = []
        self._timer: threading.Timer | None = None
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        self.url = ""
        self.cdn_url = ""

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> HubServer:
        if self._servers:
            raise RuntimeError("HubServer already started")
        for origin in ("hub", "cdn"):
            server = _ThreadingServer(self, origin)
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"hub_server-{origin}", daemon=True
            )
            self._servers.append(server)
            self._threads.append(thread)
            thread.start()
        hub, cdn = self._servers
        # Two ports = two origins: the client treats the CDN like the real Hub's (no auth, redirect not followed).
        self.url = f"http://127.0.0.1:{hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{cdn.server_address[1]}"
        # Bounded lifetime: a test that forgets to stop the server (or hangs) does not leak it forever.
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the ports (idempotent; also called by the lifetime timer).

        Holding the lock for the whole shutdown makes a concurrent caller (test teardown racing the
        timer) wait until the ports are really closed instead of returning early.
        """
        with self._stop_lock:
            if self._stopped.is_set():
                return
            if self._timer is not None and self._timer is not threading.current_thread():
                self._timer.cancel()
            for server in self._servers:
                server.shutdown()  # waits for serve_forever to return
                server.close_open_connections()
                server.server_close()
            for thread in self._threads:
                thread.join(timeout=5)
            if self._owns_root:
                shutil.rmtree(self.root, ignore_errors=True)
            self._stopped.set()  # only now: `running` must not turn False while the ports still accept

    @property
    def running(self) -> bool:
        return bool(self._servers) and not self._stopped.is_set()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # ---- request log --------------------------------------------------------------------------

    def _record(self, record: RequestRecord) -> None:
        with self._log_lock:
            self._requests.append(record)

    def _record_unhandled(self, record: RequestRecord) -> None:
        with self._log_lock:
            self._unhandled.append(record)

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of all requests served so far, oldest first."""
        with self._log_lock:
            return list(self._requests)

    @property
    def unhandled(self) -> list[RequestRecord]:
        """Requests that matched no route (the client used a feature this server lacks)."""
        with self._log_lock:
            return list(self._unhandled)

    def clear_requests(self) -> None:
        with self._log_lock:
            self._requests.clear()
            self._unhandled.clear()

    def _dispatch(self, origin: str, req: _Request) -> _Response:
        for methods, pattern, name in _HUB_ROUTES if origin == "hub" else _CDN_ROUTES:
            match = pattern.match(req.raw_path)
            if match and req.method in methods:
                return getattr(self._routes, name)(req, **match.groupdict())
        raise _unhandled(req)

    # ---- helpers for tests --------------------------------------------------------------------

    def client_env(
        self, hf_home: str | os.PathLike[str] | None = None, *, offline: bool = False, token: str | None = None
    ) -> dict[str, str]:
        """Environment for a fresh subprocess using this server.  Merge it into ``os.environ``: these
        variables are read when huggingface_hub is imported, so they only work in a new process."""
        env = {
            "HF_ENDPOINT": self.url,
            "HF_HUB_DISABLE_XET": "1",  # mandatory for uploads, see module docstring
            "HF_HUB_DISABLE_TELEMETRY": "1",  # no /api/agent-harnesses lookup
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            # Generous timeouts: a loaded CI box must not turn a slow local answer into a "connection error"
            # (which the client silently converts into a cache fallback).
            "HF_HUB_ETAG_TIMEOUT": "30",
            "HF_HUB_DOWNLOAD_TIMEOUT": "30",
            # Explicit either way: a parent that exported HF_HUB_OFFLINE=1 (ditq's conftest does) must not
            # leak it into an "online" child ("0" also wins over TRANSFORMERS_OFFLINE).
            "HF_HUB_OFFLINE": "1" if offline else "0",
        }
        if hf_home is not None:
            env["HF_HOME"] = os.fspath(hf_home)
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> None:
        """Create a repo directly (no HTTP), e.g. to seed a test."""
        self._state.create_repo(repo_type, repo_id, private=private)

    def _commit(self, repo_id: str, revision: str, repo_type: str) -> _Commit:
        with self._state.lock:
            return self._state.resolve(self._state.get_repo(repo_type, repo_id), revision)

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        return sorted(self._commit(repo_id, revision, repo_type).files)

    def read_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        entry = self._commit(repo_id, revision, repo_type).files[path]
        return self._state.blob_path(entry.sha256).read_bytes()

    def is_lfs(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bool:
        return self._commit(repo_id, revision, repo_type).files[path].lfs

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Commit shas reachable from ``revision``, newest first (the last one is the initial commit)."""
        with self._state.lock:
            repo = self._state.get_repo(repo_type, repo_id)
            commit: _Commit | None = self._state.resolve(repo, revision)
            oids = []
            while commit is not None:
                oids.append(commit.oid)
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return oids


@contextlib.contextmanager
def hub_server(
    tmp_path: str | os.PathLike[str] | None = None, *, patch_client: bool = False, **options: Any
) -> Iterator[HubServer]:
    """Run a ``HubServer`` for the duration of the ``with`` block.

    ``tmp_path``: where blobs are stored (``tmp_path/hub_server_store``); a private temp dir if None.
    ``patch_client``: also re-point this process's client at the server (``patch_hf_hub_endpoint``), with
    its cache in ``server.root / "hf_home"``.
    ``options``: forwarded to ``HubServer`` (max_lifetime_s, lfs_threshold, namespace, require_auth_for_writes).
    """
    root = Path(tmp_path) / "hub_server_store" if tmp_path is not None else None
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    with HubServer(root, **options) as server:
        if patch_client:
            with patch_hf_hub_endpoint(server.url, hf_home=server.root / "hf_home"):
                yield server
        else:
            yield server


@contextlib.contextmanager
def patch_hf_hub_endpoint(
    url: str, *, hf_home: str | os.PathLike[str] | None = None, disable_xet: bool = True, offline: bool = False
) -> Iterator[None]:
    """Point this process's huggingface_hub (and diffusers/transformers) at ``url``; undo on exit.

    Needed because HF_ENDPOINT is frozen into several module attributes at import time (see module
    docstring) and an ephemeral port is only known once the server runs.  ``hf_home``, if given, also
    moves the client's cache, token and registry files there, so in-process calls neither read nor
    pollute the user's real ``~/.cache/huggingface``.  Offline mode is forced to ``offline`` (default
    off): a conftest that sets ``HF_HUB_OFFLINE=1`` for the rest of the suite would otherwise turn every
    call into ``OfflineModeIsEnabled``.  The matching variables are set in ``os.environ`` as well, for
    libraries imported inside the block and for subprocesses started from it.
    """
    # Import first, with the caller's environment: patching then restoring attributes is exact, whereas
    # a first import inside the block would freeze the test values into the constants for good.
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    url = url.rstrip("/")
    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    env = {"HF_ENDPOINT": url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1" if offline else "0"}
    if disable_xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    if hf_home is not None:
        env["HF_HOME"] = os.fspath(hf_home)
    saved_env = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        patch(constants, "ENDPOINT", url)
        patch(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        patch(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {urlsplit(url).hostname})
        # No /api/agent-harnesses lookup (it would be cached in HF_HOME for 24 h).
        patch(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        # is_offline_mode() (used by huggingface_hub and transformers) reads this on every call.
        patch(constants, "HF_HUB_OFFLINE", offline)
        if disable_xet:
            patch(constants, "HF_HUB_DISABLE_XET", True)  # is_xet_available() reads it on every call
        # Hosts allowed to receive the token and whose redirects HEAD follows.
        patch(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(url)})
        # The module-level HfApi() behind create_repo/upload_folder/model_info/... (used by diffusers).
        patch(hf_api.api, "endpoint", url)
        if hf_home is not None:
            home = os.fspath(hf_home)
            paths = {
                "HF_HOME": home,
                "HF_HUB_CACHE": os.path.join(home, "hub"),
                "HUGGINGFACE_HUB_CACHE": os.path.join(home, "hub"),
                "HF_ASSETS_CACHE": os.path.join(home, "assets"),
                "HUGGINGFACE_ASSETS_CACHE": os.path.join(home, "assets"),
                "HF_XET_CACHE": os.path.join(home, "xet"),
                "HF_TOKEN_PATH": os.path.join(home, "token"),
                "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
                "AGENT_HARNESSES_PATH": os.path.join(home, ".agent_harnesses.json"),
            }
            for name, value in paths.items():
                if hasattr(constants, name):
                    patch(constants, name, value)
        hub_module = sys.modules.get("transformers.utils.hub")
        if hub_module is not None and hasattr(hub_module, "_hf_api"):
            # transformers builds its HfApi lazily from constants.ENDPOINT: drop it so it is rebuilt with the
            # patched value, and put the original back on exit.
            patch(hub_module, "_hf_api", None)
        for name, module in list(sys.modules.items()):
            if not name.startswith("diffusers") or module is None:
                continue
            # diffusers copies HF_ENDPOINT into HUGGINGFACE_CO_RESOLVE_ENDPOINT (error messages only) and
            # HF_HUB_OFFLINE into a few modules (user agent, LoRA and kernel loading) at import time.
            if hasattr(module, "HUGGINGFACE_CO_RESOLVE_ENDPOINT"):
                patch(module, "HUGGINGFACE_CO_RESOLVE_ENDPOINT", url)
            if isinstance(getattr(module, "HF_HUB_OFFLINE", None), bool):
                patch(module, "HF_HUB_OFFLINE", offline)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
