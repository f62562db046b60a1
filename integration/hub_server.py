"""Local test double of the Hugging Face Hub HTTP API (stdlib only), on 127.0.0.1.

`LocalHub` keeps model and dataset repos in memory (small files) or as references to files on
disk (large files, streamed in chunks, never read whole) and serves what ``huggingface_hub``
2.x and ``transformers`` 5.x use to *read* repos, and what the tests and benchmarks exercise:

* ``GET /api/{models|datasets}/{repo_id}[/revision/{rev}]`` (``blobs=true``, ``expand``)
* ``GET /api/.../{repo_id}/tree/{rev}[/{path}]`` (``recursive``, ``expand``; Link-header
  pagination when ``hub.tree_page_size`` is set)
* ``HEAD|GET /[datasets/]{repo_id}/resolve/{rev}/{path}`` (``Range: bytes=...`` -> 206)
* ``GET /api/whoami-v2`` -> 401
* ``/_testhub/...``: the request log and fault rules of a hub in a child process.

Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and a
JSON ``{"error": ...}`` body, which ``huggingface_hub.utils.hf_raise_for_status`` maps to
``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``RemoteEntryNotFoundError``. A missing
file also carries ``X-Repo-Commit`` so ``huggingface_hub`` caches the miss under ``.no_exist/``.
Xet is never advertised, so every download goes through plain HTTP. Faults (`Faults`) delay,
fail, cut or corrupt matching requests.

In-process (the server runs in a daemon thread)::

    hub = LocalHub()
    sha = hub.add_repo_from_dir("org/tiny-gpt2", model_dir)  # or add_repo("org/x", {"a": b".."})
    with hub.serve():
        env = hub.client_env(tmp_path / "hf-cache")  # full environment for a child process
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        assert hub.downloads("org/tiny-gpt2") == ["config.json", ...]

In a child process (to kill it mid-download)::

    with spawn_hub_process({"org/tiny-gpt2": model_dir}) as proc:  # HubProcess
        proc.set_faults({"scope": "api", "status_code": 503, "times": 1})
        ...  # HF_ENDPOINT=proc.endpoint; proc.requests(); proc.kill()

    # or by hand:  python -m integration.hub_server --repo org/name[@branch]=/dir
    #                  [--port 0] [--port-file FILE]
    # prints the port on stdout, writes it to FILE, serves until SIGTERM/SIGINT.

Pointing huggingface_hub / transformers at it: ``huggingface_hub.constants`` reads
``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_HOME``, ``HF_HUB_OFFLINE`` ... once, at import time, so
setting ``os.environ`` later does nothing. Either run the client in a child process with
``env=hub.client_env(cache_dir)`` (`hf_client_env`: endpoint, cache, a private ``HF_HOME``, no
token, telemetry and Xet off), or patch this process with ``patch_hf_client(endpoint,
cache_dir)``, which sets the constants (``ENDPOINT`` *and* ``HUGGINGFACE_CO_URL_TEMPLATE``), the
module-level ``HfApi``'s endpoint and transformers' cached ``HfApi``, and restores them on exit.
Telemetry stays off in both: otherwise a process's first request asks
``{ENDPOINT}/api/agent-harnesses`` for its user agent.

huggingface_hub 2.4 against this server (``test_hub_server.py`` checks each):

* A connection dropped mid-body is retried after 1 s; only whole 10 MiB chunks count as
  progress, so a drop inside the first 10 MiB restarts from byte 0 and a later one resumes
  with ``Range: bytes=<k * 10 MiB>-`` (206).
* Corrupt bytes are NOT detected: plain-HTTP downloads check only the size. Verify the sha256
  yourself (it is the etag of an LFS file).
* HTTP 500 on ``HEAD /resolve`` is retried with backoff (1, 2, 4, 8, 8 s; 7 HEADs), then
  ``LocalEntryNotFoundError``; HTTP 500 on ``GET /resolve`` is not retried (``HfHubHTTPError``);
  ``HfApi.model_info`` does not retry.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

HOST = "127.0.0.1"
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
LFS_THRESHOLD_BYTES = 10 * 1024 * 1024
"""Files larger than this are LFS (and, when given as a Path, streamed from disk at serve time)."""
CHUNK_SIZE = 64 * 1024
_HASH_CHUNK = 1024 * 1024
_REPO_TYPE_BY_PLURAL = {"models": "model", "datasets": "dataset"}
_CONTROL_PREFIX = "/_testhub/"
_SKIPPED_DIRS = (".git", ".cache")
_sleep = threading.Event().wait  # never set: a sleep that ignores monkeypatched time.sleep


# --------------------------------------------------------------------------------------------------
# Content model: blobs, commits, repos
# --------------------------------------------------------------------------------------------------


class SourceChangedError(RuntimeError):
    """A file added by path was modified or removed on disk after it was added to the hub."""


def git_blob_oid(data: bytes) -> str:
    """Git blob sha1 of `data`, i.e. ``sha1(b"blob <len>\\0" + data)``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores instead of an LFS file's content."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def is_lfs_file(path_in_repo: str, size: int) -> bool:
    """Whether the Hub would store this file with LFS (weights suffix or larger than 10 MiB)."""
    return path_in_repo.endswith(LFS_SUFFIXES) or size > LFS_THRESHOLD_BYTES


@dataclass(frozen=True)
class Blob:
    """One file version: hashes plus its content (in memory, or a path streamed from disk)."""

    size: int
    sha256: str
    content_oid: str  # git blob sha1 of the content itself
    is_lfs: bool
    data: bytes | None = field(default=None, repr=False)
    source: Path | None = None
    source_mtime_ns: int | None = None

    @property
    def git_oid(self) -> str:
        """What git stores for this file: the content's blob sha1, or the LFS pointer's."""
        if self.is_lfs:
            return git_blob_oid(lfs_pointer(self.sha256, self.size))
        return self.content_oid

    @property
    def etag(self) -> str:
        """Hub ETag: sha256 for LFS files, git blob sha1 otherwise (unquoted)."""
        return self.sha256 if self.is_lfs else self.content_oid

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    def open(self) -> BinaryIO:
        """Open the content for reading; raises SourceChangedError if the file on disk changed."""
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.source is not None
        try:
            stat = self.source.stat()
        except OSError as err:
            raise SourceChangedError(f"{self.source} vanished: {err}") from err
        if stat.st_size != self.size or stat.st_mtime_ns != self.source_mtime_ns:
            raise SourceChangedError(f"{self.source} changed on disk after it was added")
        return self.source.open("rb")


def _hash_stream(stream: BinaryIO, size: int) -> tuple[str, str]:
    """Return (git blob sha1, sha256) of `size` bytes read incrementally from `stream`."""
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    sha256 = hashlib.sha256()
    read = 0
    while chunk := stream.read(_HASH_CHUNK):
        sha1.update(chunk)
        sha256.update(chunk)
        read += len(chunk)
    if read != size:
        raise SourceChangedError(f"expected {size} bytes, read {read}")
    return sha1.hexdigest(), sha256.hexdigest()


def make_blob(path_in_repo: str, content: Path | str | bytes) -> Blob:
    """Hash `content` once. Files up to 10 MiB are kept in memory; larger ones stay on disk."""
    if isinstance(content, bytes):
        oid, sha256 = _hash_stream(io.BytesIO(content), len(content))
        return Blob(
            len(content), sha256, oid, is_lfs_file(path_in_repo, len(content)), data=content
        )
    path = Path(content).resolve()
    stat = path.stat()
    if stat.st_size <= LFS_THRESHOLD_BYTES:
        return make_blob(path_in_repo, path.read_bytes())
    with path.open("rb") as stream:
        oid, sha256 = _hash_stream(stream, stat.st_size)
    return Blob(stat.st_size, sha256, oid, True, source=path, source_mtime_ns=stat.st_mtime_ns)


def _iso(moment: datetime) -> str:
    """Hub date format, e.g. ``2024-01-02T03:04:05.678Z``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    files: Mapping[str, Blob]
    message: str
    date: datetime

    def directories(self) -> set[str]:
        """Every directory (posix path, no trailing slash) that contains at least one file."""
        dirs: set[str] = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return dirs

    def tree_oid(self, directory: str) -> str:
        """A stable fake git tree oid for `directory`, derived from the blobs below it."""
        prefix = directory + "/"
        listing = sorted((p, b.git_oid) for p, b in self.files.items() if p.startswith(prefix))
        return hashlib.sha1(json.dumps(listing).encode()).hexdigest()


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    created: datetime
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    pipeline_tag: str | None = None

    @property
    def default_branch(self) -> str:
        return "main" if "main" in self.branches or not self.branches else next(iter(self.branches))

    def resolve(self, revision: str | None) -> Commit | None:
        """Resolve a branch (``refs/pr/1`` too), a sha or a unique sha prefix (>= 7 chars)."""
        rev = revision or self.default_branch
        sha = self.branches.get(rev)
        if sha is None and rev in self.commits:
            sha = rev
        if sha is None and len(rev) >= 7 and re.fullmatch(r"[0-9a-f]+", rev):
            matches = [s for s in self.commits if s.startswith(rev)]
            sha = matches[0] if len(matches) == 1 else None
        return self.commits.get(sha) if sha else None

    def last_commit_touching(self, commit: Commit, path: str, is_dir: bool) -> Commit:
        """The most recent ancestor-or-self of `commit` in which `path` last changed."""

        def key(c: Commit) -> str | None:
            if is_dir:
                return c.tree_oid(path) if path in c.directories() else None
            blob = c.files.get(path)
            return blob.git_oid if blob else None

        current = commit
        while current.parent is not None and key(self.commits[current.parent]) == key(commit):
            current = self.commits[current.parent]
        return current


# --------------------------------------------------------------------------------------------------
# Faults and request log
# --------------------------------------------------------------------------------------------------


@dataclass
class Faults:
    """One fault-injection rule, mutable at runtime (``hub.faults.status_code = 500``).

    A rule matches a request when the method is in `methods`, the route is in `scope`
    ("resolve": file downloads/HEADs, "api": everything else, "any") and `path_glob` matches the
    target (``fnmatch``: the file path in the repo for resolve, the URL path for API routes; ``*``
    also matches ``/``). A matching rule fires for at most `times` requests (None = unlimited);
    `fired` counts them. Effects: `delay_s` (sleep before answering), `status_code` (answer with
    that status and a JSON error, no X-Error-Code), `drop_after_bytes` (send that many body bytes,
    then close the connection; fires only when the body is longer), `corrupt` (flip the middle
    byte of the file while headers keep the true ETag; fires only when the served range covers
    it), `chunk_delay_s` (sleep between body chunks).
    """

    path_glob: str = "*"
    methods: tuple[str, ...] = ("GET", "HEAD")
    scope: str = "resolve"
    status_code: int | None = None
    drop_after_bytes: int | None = None
    corrupt: bool = False
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    times: int | None = None
    fired: int = 0

    def reset(self) -> None:
        """Back to an inactive rule (all defaults, `fired` = 0)."""
        for f in fields(self):
            setattr(self, f.name, f.default)

    def update(self, **changes: Any) -> Faults:
        """Set several fields at once (lists are turned into tuples); returns self."""
        names = {f.name for f in fields(self)}
        for key, value in changes.items():
            if key not in names:
                raise TypeError(f"unknown fault field {key!r}")
            setattr(self, key, tuple(value) if isinstance(value, list) else value)
        return self

    @property
    def has_effect(self) -> bool:
        return bool(
            self.status_code is not None
            or self.drop_after_bytes is not None
            or self.corrupt
            or self.delay_s
            or self.chunk_delay_s
        )

    def matches(self, method: str, route: str, target: str) -> bool:
        in_scope = self.scope == "any" or (self.scope == "resolve") == (route == "resolve")
        return (
            self.has_effect
            and in_scope
            and method in self.methods
            and fnmatch.fnmatchcase(target, self.path_glob)
        )


@dataclass(frozen=True)
class RequestRecord:
    """One served request (control-plane requests are not recorded)."""

    method: str
    path: str  # decoded URL path, no query
    query: str
    status: int
    route: str  # "resolve", "repo_info", "tree", "whoami" or "unknown"
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None  # file path in the repo (resolve) or tree path
    range: str | None = None
    bytes_sent: int = 0
    dropped: bool = False
    faults: tuple[str, ...] = ()


@dataclass
class _Exchange:
    """Mutable per-request state, frozen into a RequestRecord at the end."""

    route: str = "unknown"
    status: int = 0
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None
    bytes_sent: int = 0
    dropped: bool = False
    faults: list[str] = field(default_factory=list)


class _FaultSession:
    """The fault rule as one request sees it: its `times` budget is spent once per request."""

    def __init__(self, lock: threading.Lock, rule: Faults | None, exchange: _Exchange) -> None:
        self._lock = lock
        self._rule = rule  # None when the rule does not match this request
        self._claimed = False
        self._exchange = exchange

    def take(
        self, wanted: Callable[[Faults], bool], label: Callable[[Faults], str]
    ) -> Faults | None:
        """The rule, claimed and logged as `label(rule)`, if it has budget and `wanted` holds."""
        rule = self._rule
        if rule is None or not wanted(rule) or not self._claim(rule):
            return None
        self._exchange.faults.append(label(rule))
        return rule

    def _claim(self, rule: Faults) -> bool:
        if self._claimed:
            return True
        with self._lock:
            if rule.times is not None and rule.fired >= rule.times:
                return False
            rule.fired += 1
        self._claimed = True
        return True


# --------------------------------------------------------------------------------------------------
# The hub
# --------------------------------------------------------------------------------------------------


class LocalHub:
    """In-memory Hub with an HTTP front end on 127.0.0.1 (see module docstring)."""

    def __init__(self, *, port: int = 0) -> None:
        self.tree_page_size: int | None = None  # entries per /tree page; None: one page
        self.requests: list[RequestRecord] = []
        self._faults = Faults()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.Lock()
        # requests being answered: a client can see its response before the server logs it
        self._in_flight = 0
        self._settled = threading.Condition(self._lock)
        self._commit_counter = 0
        self._port = port
        self._server: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- content -----------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, Path | str | bytes],
        *,
        branch: str = "main",
        message: str | None = None,
        repo_type: str = "model",
        keep_existing: bool = False,
        pipeline_tag: str | None = None,
    ) -> str:
        """Commit `files` (the full tree, or merged onto the branch head if `keep_existing`) to
        `branch` of `repo_id` (created if needed) and return the new 40-hex commit sha. Previous
        commits stay resolvable by sha. Files given as paths over 10 MiB must not change on disk
        afterwards (they are streamed from there; a change makes the server answer 500).
        """
        blobs = {_check_repo_path(p): make_blob(p, content) for p, content in files.items()}
        with self._lock:
            repo = self._get_or_create_repo(repo_id, repo_type)
            repo.pipeline_tag = pipeline_tag or repo.pipeline_tag
            parent = repo.branches.get(branch) or repo.branches.get(repo.default_branch)
            if keep_existing and parent:
                blobs = {**repo.commits[parent].files, **blobs}
            self._commit_counter += 1
            sha = _commit_sha(repo, parent, branch, blobs, self._commit_counter)
            now = datetime.now(UTC)
            text = message or f"Commit {self._commit_counter} to {branch}"
            repo.commits[sha] = Commit(sha, parent, dict(sorted(blobs.items())), text, now)
            repo.branches[branch] = sha
            return sha

    def add_repo_from_dir(self, repo_id: str, directory: str | Path, **kwargs: Any) -> str:
        """`add_repo` with every file under `directory` (skipping ``.git/`` and ``.cache/``)."""
        return self.add_repo(repo_id, collect_dir_files(Path(directory)), **kwargs)

    def create_branch(self, repo_id: str, branch: str, revision: str = "main") -> str:
        """Point `branch` (e.g. ``refs/pr/1``) of a model repo at `revision`; returns the sha."""
        with self._lock:
            repo = self._repo_or_raise(repo_id)
            repo.branches[branch] = self._commit_or_raise(repo, revision).sha
            return repo.branches[branch]

    def head(self, repo_id: str, revision: str = "main") -> str:
        """Commit sha that `revision` of a model repo currently resolves to."""
        with self._lock:
            return self._commit_or_raise(self._repo_or_raise(repo_id), revision).sha

    def file_blob(self, repo_id: str, path: str, revision: str = "main") -> Blob:
        """The Blob (size, sha256, etag, git oid, LFS flag) of `path` at `revision`."""
        with self._lock:
            commit = self._commit_or_raise(self._repo_or_raise(repo_id), revision)
        return commit.files[path]

    def get_repo(self, repo_type: str, repo_id: str) -> Repo | None:
        with self._lock:
            return self._repos.get((repo_type, repo_id))

    def _get_or_create_repo(self, repo_id: str, repo_type: str) -> Repo:
        if repo_type not in _REPO_TYPE_BY_PLURAL.values():
            raise ValueError(f"unsupported repo_type {repo_type!r}")
        key = (repo_type, repo_id)
        if key not in self._repos:
            self._repos[key] = Repo(repo_id, repo_type, datetime.now(UTC))
        return self._repos[key]

    def _repo_or_raise(self, repo_id: str) -> Repo:
        repo = self._repos.get(("model", repo_id))
        if repo is None:
            raise KeyError(f"no model repo {repo_id!r}")
        return repo

    @staticmethod
    def _commit_or_raise(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise KeyError(f"{repo.repo_id} has no revision {revision!r}")
        return commit

    # ---- faults --------------------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        """The fault rule; mutate its fields directly or use `set_faults`."""
        return self._faults

    def set_faults(self, **changes: Any) -> Faults:
        """Reset the rule (including `fired`), then apply `changes`."""
        self._faults.reset()
        return self._faults.update(**changes)

    def clear_faults(self) -> None:
        self._faults.reset()

    def _fault_session(self, method: str, exchange: _Exchange, target: str) -> _FaultSession:
        rule = self._faults if self._faults.matches(method, exchange.route, target) else None
        return _FaultSession(self._lock, rule, exchange)

    # ---- request log ---------------------------------------------------------------------------

    def _begin(self) -> None:
        with self._lock:
            self._in_flight += 1

    def _log(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)
            self._in_flight -= 1
            self._settled.notify_all()

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def find_requests(
        self,
        *,
        method: str | None = None,
        route: str | None = None,
        repo_id: str | None = None,
        filename: str | None = None,
    ) -> list[RequestRecord]:
        """Recorded requests filtered by the given fields (`filename` is an fnmatch glob),
        once every request being answered has been logged (5 s at most)."""
        with self._settled:
            self._settled.wait_for(lambda: self._in_flight == 0, timeout=5)
            records = list(self.requests)
        return [
            r
            for r in records
            if (method is None or r.method == method)
            and (route is None or r.route == route)
            and (repo_id is None or r.repo_id == repo_id)
            and (filename is None or fnmatch.fnmatchcase(r.filename or "", filename))
        ]

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """Files whose body was served (GET /resolve answered 200/206), in request order."""
        records = self.find_requests(method="GET", route="resolve", repo_id=repo_id)
        return [r.filename for r in records if r.status in (200, 206) and r.filename]

    # ---- server lifecycle ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LocalHub is not running; call start() or use serve()")
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` (only while running)."""
        return f"http://{HOST}:{self.port}"

    def start(self) -> LocalHub:
        """Bind 127.0.0.1 (port 0 = a free port) and serve from a daemon thread."""
        if self._server is not None:
            raise RuntimeError("LocalHub already running")
        self._server = _HubHTTPServer((HOST, self._port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"LocalHub:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close every open connection and release the port. Idempotent."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.close_all_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @contextlib.contextmanager
    def serve(self) -> Iterator[LocalHub]:
        """``with hub.serve(): ...`` -- start, yield the hub, always stop."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def client_env(
        self,
        cache_dir: str | Path,
        *,
        home: str | Path | None = None,
        base: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Environment for a child process that should talk to this hub (see `hf_client_env`)."""
        return hf_client_env(self.endpoint, cache_dir, home=home, base=base)


def _check_repo_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid path in repo: {path!r}")
    return path


def _commit_sha(
    repo: Repo, parent: str | None, branch: str, blobs: Mapping[str, Blob], n: int
) -> str:
    listing = sorted((path, blob.git_oid) for path, blob in blobs.items())
    payload = [repo.repo_type, repo.repo_id, parent, branch, n, listing]
    return hashlib.sha1(json.dumps(payload).encode()).hexdigest()


def collect_dir_files(directory: Path) -> dict[str, Path]:
    """Posix relative path -> file under `directory` (symlinks followed; .git/.cache skipped)."""
    if not directory.is_dir():
        raise NotADirectoryError(directory)
    files: dict[str, Path] = {}
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        for name in sorted(names):
            path = Path(root, name)
            files[path.relative_to(directory).as_posix()] = path
    return files


# --------------------------------------------------------------------------------------------------
# HTTP server
# --------------------------------------------------------------------------------------------------


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: LocalHub) -> None:
        super().__init__(address, _HubHandler)
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._connections_lock:
            (self._connections.add if alive else self._connections.discard)(conn)

    def close_all_connections(self) -> None:
        with self._connections_lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _HttpError(Exception):
    """Answer with a JSON error (raised from route handlers)."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] = ()
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, dict(headers)


class _RangeNotSatisfiable(Exception):
    pass


_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) for a single ``bytes=`` range, None to serve the whole file.

    Raises _RangeNotSatisfiable for a start past the end. Malformed or multi-range headers are
    ignored (whole file), as RFC 9110 allows.
    """
    match = _RANGE_RE.fullmatch(header or "")
    if match is None or size == 0:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        if int(last) == 0:
            raise _RangeNotSatisfiable
        return max(0, size - int(last)), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        raise _RangeNotSatisfiable
    return start, end


@dataclass(frozen=True)
class _Route:
    name: str
    methods: frozenset[str]
    pattern: re.Pattern[str]
    handler: str


_REPO_RE = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_API_RE = rf"^/api/(?P<kind>models|datasets)/{_REPO_RE}"


def _route(name: str, methods: str, pattern: str, handler: str) -> _Route:
    return _Route(name, frozenset(methods.split()), re.compile(pattern), handler)


ROUTES: tuple[_Route, ...] = (
    _route("whoami", "GET", r"^/api/whoami(?:-v2)?$", "_route_whoami"),
    _route("repo_info", "GET", _API_RE + r"/revision/(?P<rev>[^/]+)$", "_route_repo_info"),
    _route("tree", "GET", _API_RE + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", "_route_tree"),
    _route("repo_info", "GET", _API_RE + r"$", "_route_repo_info"),
    _route(
        "resolve",
        "GET HEAD",
        r"^/(?:(?P<kind>datasets)/)?" + _REPO_RE + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$",
        "_route_resolve",
    ),
)

CONTROL_ROUTES: dict[tuple[str, str], str] = {
    ("GET", "requests"): "_control_get_requests",
    ("POST", "faults"): "_control_set_faults",
}


def match_route(method: str, path: str) -> tuple[_Route, dict[str, str]] | None:
    """First route whose method and pattern match the raw (still percent-encoded) URL path."""
    for route in ROUTES:
        match = route.pattern.match(path)
        if match and method in route.methods:
            return route, {k: v for k, v in match.groupdict().items() if v is not None}
    return None


class _HubHandler(BaseHTTPRequestHandler):
    """One method per route; `_dispatch` does matching, logging, faults and error mapping."""

    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    server: _HubHTTPServer
    _LFS_TYPE: ClassVar[str] = "application/octet-stream"
    _TEXT_TYPE: ClassVar[str] = "text/plain; charset=utf-8"

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, alive=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, alive=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence stderr access logs; everything is in `hub.requests`."""

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_GET

    # ---- dispatch ------------------------------------------------------------------------------

    @property
    def hub(self) -> LocalHub:
        return self.server.hub

    def _dispatch(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        self._query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        self._body = self._read_body()
        self._x = _Exchange()
        if split.path.startswith(_CONTROL_PREFIX):
            self._guarded(lambda: self._dispatch_control(split.path[len(_CONTROL_PREFIX) :]))
            return
        self.hub._begin()
        try:
            self._guarded(lambda: self._dispatch_api(split.path))
        finally:
            self.hub._log(self._record(split))

    def _guarded(self, action: Callable[[], None]) -> None:
        """Run `action`, mapping exceptions to HTTP errors or to a closed connection."""
        try:
            action()
        except (_HttpError, SourceChangedError) as err:
            if self._x.status:  # headers already sent: the only honest signal left is a cut body
                self._drop_connection()
            elif isinstance(err, _HttpError):
                self._send_error(err.status, err.message, err.code, err.headers)
            else:
                self._send_error(500, str(err))
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self._x.dropped = True
            self.close_connection = True

    def _dispatch_api(self, raw_path: str) -> None:
        found = match_route(self.command, raw_path)
        if found is None:
            raise _HttpError(404, f"Not Found: {self.command} {urllib.parse.unquote(raw_path)}")
        route, groups = found
        self._note_request(route, groups)
        is_file = route.name == "resolve"
        target = (self._x.filename or "") if is_file else _unquote(raw_path)
        self._faults = self.hub._fault_session(self.command, self._x, target)
        self._apply_request_faults(self._faults)
        args = self._resolve_repo_args(groups) if "repo" in groups else {}
        getattr(self, route.handler)(**args)

    def _note_request(self, route: _Route, groups: Mapping[str, str]) -> None:
        """Record route, repo, revision and path for the request log (before any fault fires)."""
        self._x.route = route.name
        self._x.repo_id = _unquote(groups["repo"]) if "repo" in groups else None
        self._x.revision = _unquote(groups["rev"]) if "rev" in groups else None
        self._x.filename = _unquote(groups.get("path", "")).strip("/") or None

    def _apply_request_faults(self, faults: _FaultSession) -> None:
        delay = faults.take(lambda r: r.delay_s > 0, lambda r: f"delay:{r.delay_s}")
        if delay is not None:
            _sleep(delay.delay_s)
        failing = faults.take(
            lambda r: r.status_code is not None, lambda r: f"status:{r.status_code}"
        )
        if failing is not None and failing.status_code is not None:
            raise _HttpError(failing.status_code, f"Injected fault: HTTP {failing.status_code}")

    def _resolve_repo_args(self, groups: dict[str, str]) -> dict[str, Any]:
        """Look up repo (and commit when the route has a revision) or raise the Hub's 404s."""
        repo_type = _REPO_TYPE_BY_PLURAL.get(groups.get("kind", "models"), "model")
        repo = self.hub.get_repo(repo_type, _unquote(groups["repo"]))
        if repo is None:
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        args: dict[str, Any] = {"repo": repo}
        if "path" in groups:
            args["path"] = self._x.filename or ""
        revision = self._x.revision
        commit = repo.resolve(revision)
        if commit is None:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        args["commit"] = commit
        return args

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _record(self, split: urllib.parse.SplitResult) -> RequestRecord:
        x = self._x
        return RequestRecord(
            method=self.command,
            path=_unquote(split.path),
            query=split.query,
            status=x.status,
            route=x.route,
            repo_id=x.repo_id,
            revision=x.revision,
            filename=x.filename,
            range=self.headers.get("Range"),
            bytes_sent=x.bytes_sent,
            dropped=x.dropped,
            faults=tuple(x.faults),
        )

    # ---- responses -----------------------------------------------------------------------------

    def _send_headers(self, status: int, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self._x.status = status

    def _send_bytes(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self._send_headers(status, {**headers, "Content-Length": str(len(body))})
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            self._x.bytes_sent += len(body)

    def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] = ()) -> None:
        body = json.dumps(payload).encode()
        self._send_bytes(status, body, {"Content-Type": "application/json", **dict(headers)})

    def _send_error(
        self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] = ()
    ) -> None:
        extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
        self._send_json(status, {"error": message}, {**extra, **dict(headers)})

    # ---- API routes ----------------------------------------------------------------------------

    def _route_whoami(self) -> None:
        message = "Invalid credentials in Authorization header"
        self._send_error(401, message)

    def _route_repo_info(self, repo: Repo, commit: Commit) -> None:
        blobs = _truthy(self._query.get("blobs", [""])[-1])
        expand = self._query.get("expand", []) + self._query.get("expand[]", [])
        self._send_json(200, repo_info_payload(repo, commit, blobs=blobs, expand=expand))

    def _route_tree(self, repo: Repo, commit: Commit, path: str = "") -> None:
        recursive = _truthy(self._query.get("recursive", [""])[-1])
        expand = _truthy(self._query.get("expand", [""])[-1])
        if path and path not in commit.directories():
            raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound")
        entries = tree_payload(repo, commit, path, recursive=recursive, expand=expand)
        page, next_cursor = self._paginate(entries)
        headers = (
            {"Link": f'<{self._next_page_url(next_cursor)}>; rel="next"'} if next_cursor else {}
        )
        self._send_json(200, page, headers)

    def _paginate(self, entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int | None]:
        size = self.hub.tree_page_size
        if not size:
            return entries, None
        start = int(self._query.get("cursor", ["0"])[-1] or 0)
        end = start + size
        return entries[start:end], end if end < len(entries) else None

    def _next_page_url(self, cursor: int) -> str:
        split = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in self._query.items()} | {"cursor": str(cursor)}
        return f"http://{HOST}:{self.server.server_address[1]}{split.path}?{urllib.parse.urlencode(query)}"

    def _route_resolve(self, repo: Repo, commit: Commit, path: str) -> None:
        blob = commit.files.get(path)
        if blob is None:
            raise _HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        try:
            byte_range = parse_range(self.headers.get("Range"), blob.size)
        except _RangeNotSatisfiable:
            headers = {"Content-Range": f"bytes */{blob.size}", "X-Repo-Commit": commit.sha}
            raise _HttpError(416, "Range Not Satisfiable", headers=headers) from None
        start, end = byte_range or (0, blob.size - 1)
        headers = self._file_headers(commit, path, blob)
        headers["Content-Length"] = str(end - start + 1)
        if byte_range is not None:
            headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        if self.command == "GET":  # open before answering: a changed source must still 500
            with blob.open() as stream:
                self._send_headers(206 if byte_range else 200, headers)
                self._stream_body(stream, blob, start, end - start + 1)
        else:
            self._send_headers(206 if byte_range else 200, headers)

    def _file_headers(self, commit: Commit, path: str, blob: Blob) -> dict[str, str]:
        headers = {
            "Content-Type": self._LFS_TYPE if blob.is_lfs else self._TEXT_TYPE,
            "Accept-Ranges": "bytes",
            "ETag": f'"{blob.etag}"',
            "X-Repo-Commit": commit.sha,
        }
        if blob.is_lfs:
            name = path.rsplit("/", 1)[-1]
            quoted = urllib.parse.quote(name)
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(blob.size)
            headers["Content-Disposition"] = (
                f"inline; filename*=UTF-8''{quoted}; filename=\"{name}\";"
            )
        return headers

    # ---- body streaming with faults --------------------------------------------------------------

    def _stream_body(self, stream: BinaryIO, blob: Blob, start: int, length: int) -> None:
        drop_at = self._planned_drop(length)
        flip_at = self._planned_corruption(blob, start, length)
        slow = self._faults.take(lambda r: r.chunk_delay_s > 0, lambda r: f"slow:{r.chunk_delay_s}")
        stream.seek(start)
        sent = 0
        while sent < length:
            if drop_at is not None and sent >= drop_at:
                self._drop_connection()
                return
            limit = length - sent if drop_at is None else drop_at - sent
            chunk = stream.read(min(CHUNK_SIZE, limit))
            if not chunk:
                raise SourceChangedError(f"content ended after {start + sent} bytes")
            self.wfile.write(_flip_byte(chunk, flip_at - sent) if flip_at is not None else chunk)
            sent += len(chunk)
            self._x.bytes_sent = sent
            if slow is not None:
                _sleep(slow.chunk_delay_s)

    def _planned_drop(self, length: int) -> int | None:
        """Relative offset at which to cut the body, if a drop fault fires for this response."""
        rule = self._faults.take(
            lambda r: r.drop_after_bytes is not None and r.drop_after_bytes < length,
            lambda r: f"drop:{r.drop_after_bytes}",
        )
        return rule.drop_after_bytes if rule is not None else None

    def _planned_corruption(self, blob: Blob, start: int, length: int) -> int | None:
        """Relative offset of the byte to flip, if a corrupt fault fires for this response."""
        middle = blob.size // 2
        rule = self._faults.take(
            lambda r: r.corrupt and start <= middle < start + length,
            lambda r: f"corrupt:{middle}",
        )
        return middle - start if rule is not None else None

    def _drop_connection(self) -> None:
        self._x.dropped = True
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    # ---- control plane (/_testhub/...) ---------------------------------------------------------

    def _dispatch_control(self, name: str) -> None:
        handler = CONTROL_ROUTES.get((self.command, name))
        if handler is None:
            raise _HttpError(404, f"unknown control route {self.command} {name}")
        getattr(self, handler)()

    def _control_get_requests(self) -> None:
        records = [asdict(r) for r in self.hub.find_requests()]
        self._send_json(200, records)

    def _control_set_faults(self) -> None:
        try:
            self.hub.set_faults(**json.loads(self._body or b"{}"))
        except TypeError as err:
            raise _HttpError(400, str(err)) from err
        self._send_json(200, {"ok": True})


def _flip_byte(chunk: bytes, index: int) -> bytes:
    if not 0 <= index < len(chunk):
        return chunk
    return chunk[:index] + bytes([chunk[index] ^ 0xFF]) + chunk[index + 1 :]


def _unquote(value: str) -> str:
    return urllib.parse.unquote(value)


def _truthy(value: str) -> bool:
    return value.lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------------------
# JSON payloads
# --------------------------------------------------------------------------------------------------


def sibling_payload(path: str, blob: Blob, *, blobs: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"rfilename": path}
    if blobs:
        entry.update(size=blob.size, blobId=blob.git_oid)
        if blob.is_lfs:
            entry["lfs"] = {
                "size": blob.size,
                "sha256": blob.sha256,
                "pointerSize": blob.pointer_size,
            }
    return entry


def repo_info_payload(
    repo: Repo, commit: Commit, *, blobs: bool = False, expand: list[str] | None = None
) -> dict[str, Any]:
    """``/api/models/{id}`` body. With `expand`, only ``_id``, ``id`` and the requested keys."""
    info: dict[str, Any] = {
        "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
        "id": repo.repo_id,
        "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
        "sha": commit.sha,
        "lastModified": _iso(commit.date),
        "createdAt": _iso(repo.created),
        "private": False,
        "disabled": False,
        "gated": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": [sibling_payload(p, b, blobs=blobs) for p, b in commit.files.items()],
        "usedStorage": sum(b.size for b in commit.files.values()),
    }
    if repo.repo_type == "model":
        info["modelId"] = repo.repo_id
        info.update(_model_extras(repo, commit))
    if expand:
        return {k: v for k, v in info.items() if k in ("_id", "id", *expand)}
    return info


def _model_extras(repo: Repo, commit: Commit) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    if repo.pipeline_tag:
        extras["pipeline_tag"] = repo.pipeline_tag
    config_blob = commit.files.get("config.json")
    if config_blob is not None and config_blob.data is not None:
        with contextlib.suppress(ValueError):
            config = json.loads(config_blob.data)
            keys = ("architectures", "model_type")
            extras["config"] = {
                k: config[k] for k in keys if isinstance(config, dict) and k in config
            }
    return extras


def tree_entry(repo: Repo, commit: Commit, path: str, *, expand: bool = False) -> dict[str, Any]:
    """One ``/tree`` or ``/paths-info`` entry for a file or directory."""
    blob = commit.files.get(path)
    if blob is None:
        entry: dict[str, Any] = {"type": "directory", "oid": commit.tree_oid(path), "size": 0}
    else:
        entry = {"type": "file", "oid": blob.git_oid, "size": blob.size}
        if blob.is_lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
    entry["path"] = path
    if expand:
        last = repo.last_commit_touching(commit, path, is_dir=blob is None)
        entry["lastCommit"] = {"id": last.sha, "title": last.message, "date": _iso(last.date)}
    return entry


def tree_payload(
    repo: Repo, commit: Commit, base: str, *, recursive: bool, expand: bool
) -> list[dict[str, Any]]:
    """Entries under `base` ("" = root): direct children, or everything below if `recursive`."""
    prefix = f"{base}/" if base else ""
    paths = [p for p in (*sorted(commit.directories()), *commit.files) if p.startswith(prefix)]
    if not recursive:
        paths = [p for p in paths if "/" not in p[len(prefix) :]]
    return [tree_entry(repo, commit, p, expand=expand) for p in paths]


# --------------------------------------------------------------------------------------------------
# Client-side helpers: environment, in-process patching, subprocess hub
# --------------------------------------------------------------------------------------------------

_CLIENT_ENV_DROP = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
)


def _default_home(cache_dir: str | Path) -> Path:
    cache = Path(cache_dir)
    return cache.with_name(cache.name + "-hf-home")


def hf_client_env(
    endpoint: str,
    cache_dir: str | Path,
    *,
    home: str | Path | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A full environment (copy of `base`, default ``os.environ``) for a child process that must
    use `endpoint` and `cache_dir`, with a private HF_HOME (default: ``<cache_dir>-hf-home``)."""
    env = {
        k: v for k, v in (os.environ if base is None else base).items() if k not in _CLIENT_ENV_DROP
    }
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY", ""), HOST, "localhost"]))
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_CACHE=str(cache_dir),
        HF_HOME=str(home or _default_home(cache_dir)),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY=no_proxy,
        no_proxy=no_proxy,
    )
    return env


def _constant_overrides(endpoint: str, cache_dir: Path, home: Path) -> dict[str, Any]:
    return {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_CACHE": str(cache_dir),
        "HUGGINGFACE_HUB_CACHE": str(cache_dir),
        "HF_HOME": str(home),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": True,
        "HF_HUB_DISABLE_XET": True,
    }


@contextlib.contextmanager
def patch_hf_client(
    endpoint: str, cache_dir: str | Path, *, home: str | Path | None = None
) -> Iterator[None]:
    """Point the already-imported ``huggingface_hub`` (and ``transformers``) of *this* process at
    `endpoint` / `cache_dir`; everything is restored on exit. Imports huggingface_hub lazily."""
    from huggingface_hub import constants, hf_api

    home_path = Path(home) if home else _default_home(cache_dir)
    overrides = _constant_overrides(endpoint, Path(cache_dir), home_path)
    saved = {name: getattr(constants, name) for name in overrides if hasattr(constants, name)}
    saved_api_endpoint = hf_api.api.endpoint
    wanted_env = hf_client_env(endpoint, cache_dir, home=home_path)
    touched = {k for k in wanted_env if os.environ.get(k) != wanted_env[k]}
    touched |= {k for k in _CLIENT_ENV_DROP if k in os.environ}
    saved_env = {k: os.environ.get(k) for k in touched}
    try:
        for name, value in overrides.items():
            setattr(constants, name, value)
        hf_api.api.endpoint = endpoint
        _apply_env({k: wanted_env.get(k) for k in touched})
        _reset_transformers_hf_api()
        yield
    finally:
        for name, value in saved.items():
            setattr(constants, name, value)
        hf_api.api.endpoint = saved_api_endpoint
        _apply_env(saved_env)
        _reset_transformers_hf_api()


def _apply_env(values: Mapping[str, str | None]) -> None:
    """Set (or, for None, remove) environment variables."""
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _reset_transformers_hf_api() -> None:
    """transformers caches one HfApi (endpoint frozen at creation); drop it if loaded."""
    module = sys.modules.get("transformers.utils.hub")
    if module is not None and hasattr(module, "_hf_api"):
        module._hf_api = None


def _control(
    endpoint: str, method: str, name: str, payload: Any = None, timeout: float = 10
) -> Any:
    """Call a ``/_testhub/<name>`` control route (loopback only, proxies disabled)."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(f"{endpoint}{_CONTROL_PREFIX}{name}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


@dataclass
class HubProcess:
    """A LocalHub running in a child process (see `spawn_hub_process`)."""

    proc: subprocess.Popen[bytes]
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client_env(self, cache_dir: str | Path, **kwargs: Any) -> dict[str, str]:
        return hf_client_env(self.endpoint, cache_dir, **kwargs)

    def requests(self) -> list[dict[str, Any]]:
        """The child's request log, as dicts with RequestRecord's fields."""
        return _control(self.endpoint, "GET", "requests")

    def set_faults(self, rule: Mapping[str, Any]) -> None:
        """Replace the child's fault rule (a dict of `Faults` fields)."""
        _control(self.endpoint, "POST", "faults", dict(rule))

    def kill(self) -> None:
        """SIGKILL the child (simulates the Hub vanishing) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (graceful), then SIGKILL after `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def spawn_hub_process(
    repos: Mapping[str, str | Path], *, startup_timeout: float = 30.0
) -> Iterator[HubProcess]:
    """Run ``hub_server.py --repo ID=DIR ...`` in a child process; stopped on exit.

    Keys of `repos` may be ``org/name`` or ``org/name@branch``.
    """
    with tempfile.TemporaryDirectory(prefix="localhub-") as tmp:
        port_file, log_file = Path(tmp, "port"), Path(tmp, "stderr.log")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--port", "0"]
        cmd += ["--port-file", str(port_file)]
        for repo_id, directory in repos.items():
            cmd += ["--repo", f"{repo_id}={directory}"]
        with log_file.open("wb") as stderr:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
        hub = HubProcess(proc, 0)
        try:
            hub.port = _wait_for_port(proc, port_file, log_file, startup_timeout)
            yield hub
        finally:
            hub.stop()


def _wait_for_port(
    proc: subprocess.Popen[bytes], port_file: Path, log_file: Path, timeout: float
) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"hub process exited ({proc.returncode}): {log_file.read_text()}")
        time.sleep(0.02)
    raise TimeoutError(f"hub process did not report its port within {timeout}s")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Local Hugging Face Hub test double")
    parser.add_argument(
        "--repo",
        action="append",
        default=[],
        metavar="ORG/NAME[@BRANCH]=DIR",
        help="serve DIR as a model repo (repeatable)",
    )
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here (atomically)")
    return parser.parse_args(argv)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Serve the given repos until SIGTERM/SIGINT; print the port on stdout."""
    args = _parse_args(argv)
    hub = LocalHub(port=args.port)
    for spec in args.repo:
        repo, _, directory = spec.partition("=")
        repo_id, _, branch = repo.partition("@")
        hub.add_repo_from_dir(repo_id, Path(directory), branch=branch or "main")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with hub.serve():
        if args.port_file:  # file first: a reader of stdout may then rely on the file too
            _write_atomic(args.port_file, f"{hub.port}\n")
        print(hub.port, flush=True)
        while not stop.wait(0.2):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
