"""Deployment records and the model cache on disk.

Layout of the state directory (``$MLFLOW_TFX_STATE_DIR``, default
``~/.mlflow-tfx/deployments``)::

    <name>.json        one record per deployment, replaced atomically (tmp file + os.replace)
    <name>.lock        held for the whole of a create/update/delete of that deployment
    logs/<name>-*.log  server logs (stdout and stderr of the server process)
    models/<key>/      downloaded models, one directory per resolved model

Nothing written here holds a secret: the API key travels to the server by environment only,
and :meth:`DeploymentRecord.to_dict` refuses a config that carries one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from mlflow_tfx_plugin.errors import InvalidInputError, TfxError

STATE_DIR_ENV = "MLFLOW_TFX_STATE_DIR"
"""Environment variable overriding the state directory."""

DEFAULT_STATE_DIR = Path("~/.mlflow-tfx/deployments")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MASKED = "***"


def default_state_dir() -> Path:
    """``$MLFLOW_TFX_STATE_DIR`` if set, else ``~/.mlflow-tfx/deployments``."""
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR).expanduser()


def validate_name(name: Any) -> str:
    """Return ``name`` if it can name a deployment (and a file), else raise.

    Raises:
        InvalidInputError: empty, too long, or characters other than letters, digits, ``._-``.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidInputError(
            f"Invalid deployment name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.",
            param="name",
        )
    return name


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(kw_only=True)
class DeploymentRecord:
    """What ``mlflow deployments create -t tfx`` leaves behind for one deployment.

    ``status`` is what was written ("running"); readers replace it with the live status
    ("running" or "dead") from :func:`mlflow_tfx_plugin.deployments.process.is_running`.
    """

    name: str
    model_uri: str
    resolved_model_uri: str
    local_model_dir: str
    pid: int
    pid_create_time: float
    host: str
    port: int
    url: str
    log_path: str
    config: dict[str, Any] = field(default_factory=dict)
    registered_model_name: str | None = None
    model_version: str | None = None
    model_id: str | None = None
    run_id: str | None = None
    created_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)
    status: str = "running"
    flavor: str = "tfx"

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able data; raises if the config still holds an API key."""
        api_key = self.config.get("api_key")
        if api_key not in (None, _MASKED):
            raise TfxError("Refusing to store a deployment record that contains an API key.")
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeploymentRecord:
        """Build a record, ignoring keys written by other versions of the plugin."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


class DeploymentStore:
    """Deployment records, logs and cached models under one state directory.

    Example:
        >>> store = DeploymentStore(tmp_path)  # doctest: +SKIP
        >>> with store.lock("chat"):
        ...     store.write(record)
        >>> store.read("chat").url
        'http://127.0.0.1:5001'
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_state_dir()

    # --- records --------------------------------------------------------------------------

    def record_path(self, name: str) -> Path:
        return self.root / f"{validate_name(name)}.json"

    def read(self, name: str) -> DeploymentRecord | None:
        """The record of ``name``, or ``None``; never sees a half-written file."""
        try:
            text = self.record_path(name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return DeploymentRecord.from_dict(json.loads(text))
        except (ValueError, TypeError) as err:
            raise TfxError(
                f"Deployment record {self.record_path(name)} is corrupt ({err}); delete the file."
            ) from err

    def records(self) -> list[DeploymentRecord]:
        """Every record, sorted by name."""
        if not self.root.is_dir():
            return []
        found = (self.read(path.stem) for path in sorted(self.root.glob("*.json")))
        return [record for record in found if record is not None]

    def write(self, record: DeploymentRecord) -> None:
        """Replace the record of ``record.name`` atomically, under its lock."""
        data = json.dumps(record.to_dict(), indent=2, sort_keys=True)
        path = self.record_path(record.name)
        with self.lock(record.name):
            _atomic_write(path, data)

    def remove(self, name: str) -> None:
        """Delete the record of ``name`` (no error if there is none)."""
        with self.lock(name):
            self.record_path(name).unlink(missing_ok=True)

    @contextmanager
    def lock(
        self, name: str, *, timeout: float = -1, on_wait: Callable[[], None] | None = None
    ) -> Iterator[None]:
        """Hold the lock of deployment ``name`` (re-entrant in one thread; blocks others).

        Args:
            name: the deployment.
            timeout: seconds to wait; negative waits for ever.
            on_wait: called once if the lock is busy, before waiting for it.

        Raises:
            TfxError: the lock was not acquired within ``timeout`` seconds.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.root / f"{validate_name(name)}.lock", is_singleton=True)
        try:
            try:
                lock.acquire(blocking=False)
            except Timeout:
                if on_wait is not None:
                    on_wait()
                lock.acquire(timeout=timeout)
        except Timeout as err:
            raise TfxError(
                f"Another operation on deployment {name!r} is in progress "
                f"(lock {lock.lock_file}); try again when it has finished."
            ) from err
        try:
            yield
        finally:
            lock.release()

    # --- logs -----------------------------------------------------------------------------

    def new_log_path(self, name: str) -> Path:
        """A fresh log file path for a server of deployment ``name``."""
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return logs / f"{validate_name(name)}-{stamp}-{uuid.uuid4().hex[:6]}.log"

    # --- model cache ----------------------------------------------------------------------

    def cached_model(self, key: str, download: Callable[[Path], Path]) -> tuple[Path, bool]:
        """The cached model directory for ``key``, downloading it first if it is missing.

        ``download(tmp_dir)`` fetches the model somewhere under ``tmp_dir`` and returns its
        directory; that directory is then renamed into place, so a crash mid-download
        leaves no half-filled cache entry. Concurrent callers download once.

        Returns:
            ``(path, downloaded)``: the model directory and whether this call downloaded it.
        """
        if not re.fullmatch(r"[A-Za-z0-9._-]+", key):
            raise TfxError(f"Invalid model cache key {key!r}.")
        cache = self.root / "models"
        cache.mkdir(parents=True, exist_ok=True)
        final = cache / key
        with FileLock(cache / f"{key}.lock", is_singleton=True):
            if final.is_dir():
                return final, False
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache))
            try:
                os.replace(download(tmp), final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final, True


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
