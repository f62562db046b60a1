"""Deployment records and the model cache on disk.

Layout of the state directory (``$MLFLOW_TFX_STATE_DIR``, default
``~/.mlflow-tfx/deployments``)::

    <name>.json        one record per deployment, replaced atomically (tmp file + os.replace)
    <name>.lock        held for the whole of a create/update/delete of that deployment;
                       removed with the deployment
    logs/<name>-*.log  server logs (stdout and stderr of the server process); the newest
                       :data:`KEPT_LOGS` of each name are kept, for post-mortems
    models/<key>/      downloaded models, one directory per resolved model; removed when
                       no deployment uses it any more

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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from mlflow_tfx_plugin.errors import CorruptRecordError, InvalidInputError, TfxError

STATE_DIR_ENV = "MLFLOW_TFX_STATE_DIR"
"""Environment variable overriding the state directory."""

DEFAULT_STATE_DIR = Path("~/.mlflow-tfx/deployments")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MASKED = "***"
#: Server logs kept per deployment name (older ones are removed when a server starts).
KEPT_LOGS = 5


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
    return datetime.now(UTC).isoformat(timespec="seconds")


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
    backend: str = "process"
    ray_address: str | None = None  # backend=ray: the cluster it was deployed to

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
        """The record of ``name``, or ``None``; never sees a half-written file.

        Raises:
            CorruptRecordError: the file is not a record (with what could be read of it).
        """
        path = self.record_path(name)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as err:
            raise _state_error(path, err) from err
        try:
            return DeploymentRecord.from_dict(_record_fields(json.loads(text)))
        except (ValueError, TypeError) as err:
            pid, create_time = _salvage_pid(text)
            raise CorruptRecordError(
                f"Deployment record {path} is corrupt ({err}). `mlflow deployments delete -t "
                f"tfx --name {name}` stops its server (if its pid can be read) and removes it.",
                name=name,
                path=str(path),
                pid=pid,
                pid_create_time=create_time,
            ) from err

    def records(self) -> list[DeploymentRecord | CorruptRecordError]:
        """Every record, sorted by name; a corrupt one as the error reading it gave."""
        if not self.root.is_dir():
            return []
        found: list[DeploymentRecord | CorruptRecordError] = []
        for path in sorted(self.root.glob("*.json")):
            try:
                record = self.read(path.stem)
            except CorruptRecordError as corrupt:
                found.append(corrupt)
                continue
            except InvalidInputError:  # a file whose name is no deployment name: not ours
                continue
            if record is not None:
                found.append(record)
        return found

    def write(self, record: DeploymentRecord) -> None:
        """Replace the record of ``record.name`` atomically, under its lock."""
        data = json.dumps(record.to_dict(), indent=2, sort_keys=True)
        path = self.record_path(record.name)
        with self.lock(record.name):
            try:
                _atomic_write(path, data)
            except OSError as err:
                raise _state_error(path, err) from err

    def remove(self, name: str) -> None:
        """Delete the record of ``name`` and, on release, its lock file."""
        with self.lock(name, remove=True):
            self.record_path(name).unlink(missing_ok=True)

    @contextmanager
    def lock(
        self,
        name: str,
        *,
        timeout: float = -1,
        on_wait: Callable[[], None] | None = None,
        remove: bool = False,
    ) -> Iterator[None]:
        """Hold the lock of deployment ``name`` (re-entrant in one thread; blocks others).

        Args:
            name: the deployment.
            timeout: seconds to wait; negative waits for ever.
            on_wait: called once if the lock is busy, before waiting for it.
            remove: delete the lock file on release when no record of ``name`` is left
                (what ``delete``, or an operation on a name that does not exist, wants).

        Raises:
            TfxError: the lock was not acquired within ``timeout`` seconds, or the state
                directory cannot be written.
        """
        path = self.root / f"{validate_name(name)}.lock"
        with _held(path, timeout=timeout, on_wait=on_wait, name=name) as lock:
            try:
                yield
            finally:
                if remove and not self.record_path(name).exists():
                    lock.remove_on_release()

    # --- logs -----------------------------------------------------------------------------

    def new_log_path(self, name: str) -> Path:
        """A fresh log file path for a server of deployment ``name``; the oldest logs of
        ``name`` beyond :data:`KEPT_LOGS` are removed."""
        logs = self.root / "logs"
        try:
            logs.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _state_error(logs, err) from err
        previous = sorted(logs.glob(f"{validate_name(name)}-*.log"), key=_mtime)
        for old in previous[: max(0, len(previous) - KEPT_LOGS + 1)]:
            old.unlink(missing_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return logs / f"{name}-{stamp}-{uuid.uuid4().hex[:6]}.log"

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
        final = cache / key
        with _held(cache / f"{key}.lock", name=key) as lock:
            lock.remove_on_release()  # the directory itself says whether it is there
            if final.is_dir():
                return final, False
            try:
                tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache))
            except OSError as err:
                raise _state_error(cache, err) from err
            try:
                os.replace(download(tmp), final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final, True

    def remove_cached_model(self, model_dir: str | os.PathLike[str]) -> bool:
        """Delete a downloaded model unless a deployment record still names it.

        A corrupt record might name it too, so nothing is removed while there is one.

        Returns:
            Whether the directory was removed.
        """
        directory = Path(model_dir)
        if directory.parent != self.root / "models" or not directory.is_dir():
            return False  # a local model directory served in place, not a copy of ours
        with _held(directory.with_name(f"{directory.name}.lock"), name=directory.name) as lock:
            lock.remove_on_release()
            for record in self.records():
                if (
                    isinstance(record, CorruptRecordError)
                    or Path(record.local_model_dir) == directory
                ):
                    return False
            shutil.rmtree(directory)
        return True


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


def _record_fields(data: Any) -> dict[str, Any]:
    """The JSON of a record, checked for what every reader relies on."""
    if not isinstance(data, dict):
        raise TypeError(f"a record is a JSON object, not {type(data).__name__}")
    for key, kind in (("pid", int), ("port", int), ("config", dict), ("url", str)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise TypeError(f"'{key}' is {data.get(key)!r}, not a {kind.__name__}")
    return data


def _salvage_pid(text: str) -> tuple[int | None, float | None]:
    """The server pid and its start time from a damaged record, when they can still be read."""
    pid = re.search(r'"pid"\s*:\s*(\d+)', text)
    started = re.search(r'"pid_create_time"\s*:\s*(\d+(?:\.\d+)?)', text)
    return (int(pid[1]) if pid else None), (float(started[1]) if started else None)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _state_error(path: Path, err: OSError) -> TfxError:
    return TfxError(
        f"Cannot write the deployment state at {path}: {err.strerror or err}. Make it "
        "writable (or free space there), or keep the state elsewhere with "
        "MLFLOW_TFX_STATE_DIR=/path or -t tfx:/path."
    )


@contextmanager
def _held(
    path: Path,
    *,
    name: str,
    timeout: float = -1,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[_RemovableLock]:
    """Hold the file lock at ``path`` (re-entrant in one thread)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, is_singleton=True)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            if on_wait is not None:
                on_wait()
            lock.acquire(timeout=timeout)
    except Timeout as err:
        raise TfxError(
            f"Another operation on deployment {name!r} is in progress (lock {path}); try "
            "again when it has finished."
        ) from err
    except OSError as err:
        raise _state_error(path, err) from err
    removable = _RemovableLock(lock, path)
    try:
        yield removable
    finally:
        removable.release()


class _RemovableLock:
    """A held :class:`filelock.FileLock` whose file can be deleted on release.

    filelock re-checks, after locking, that its file was not unlinked while it waited, so
    removing the file under the lock never lets two holders in.
    """

    def __init__(self, lock: FileLock, path: Path) -> None:
        self._lock = lock
        self._path = path
        self._remove = False

    def remove_on_release(self) -> None:
        """Delete the lock file when the outermost holder in this thread releases it."""
        self._remove = True

    def release(self) -> None:
        if self._remove and self._lock.lock_counter == 1:
            self._path.unlink(missing_ok=True)
        self._lock.release()
