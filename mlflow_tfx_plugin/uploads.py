"""Store local files into an MLflow artifact location, a few files at a time.

Each file goes up through ``log_artifacts`` of a staging directory that holds only a link
to it (the fast path of a local store), in worker threads; a failure names its file, and
:func:`delete_uploads` takes back what a failed job stored.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlflow_tfx_plugin.checkpoint import CopyAbandoned, file_threads

_logger = logging.getLogger(__name__)

Upload = tuple[str, str]
"""(file relative to the source directory, artifact directory to store it in; "" for the
root)."""


def upload_files(
    repository: Any,
    directory: Path,
    uploads: Sequence[Upload],
    *,
    failure_note: str,
    stop: threading.Event | None = None,
) -> None:
    """Store each (file, artifact dir), a few in parallel threads; returns when all are
    stored.

    On a failure the uploads not started are dropped, the running ones finish, and the
    first failure is raised with a note naming its file, then ``failure_note``. Once
    ``stop`` is set, uploads not yet started raise :class:`CopyAbandoned` instead.
    """
    with (
        tempfile.TemporaryDirectory(prefix="tfx-upload-") as staging,
        ThreadPoolExecutor(
            max_workers=file_threads(len(uploads)), thread_name_prefix="tfx-upload"
        ) as pool,
    ):
        futures = [
            (file, pool.submit(_upload_one, repository, directory / file, target, staging, i, stop))
            for i, (file, target) in enumerate(uploads)
        ]
        for file, future in futures:
            try:
                future.result()
            except BaseException as err:
                pool.shutdown(wait=True, cancel_futures=True)
                if isinstance(err, Exception) and not isinstance(err, CopyAbandoned):
                    err.add_note(
                        f"Uploading '{file}' into the model's artifact location failed. "
                        f"{failure_note}"
                    )
                raise


def delete_uploads(repository: Any, artifacts: Sequence[str], *, why: str) -> None:
    """Delete stored artifacts (files or directories) again, warning about any that stay:
    the failure that made them unwanted matters more than the leftover."""
    for artifact in artifacts:
        try:
            repository.delete_artifacts(artifact)
        except Exception as err:
            _logger.warning("Could not delete the upload '%s' (%s); %s", artifact, err, why)


def uploaded_artifact(file: str, target: str) -> str:
    """The artifact path an :data:`Upload` is stored under."""
    name = Path(file).name
    return f"{target}/{name}" if target else name


def _upload_one(
    repository: Any,
    path: Path,
    target: str,
    staging: str,
    index: int,
    stop: threading.Event | None,
) -> None:
    """``log_artifacts`` of a directory holding only a link to ``path``: the same upload as
    ``log_artifact(path)``, 4x faster into a local store, which copies a directory's files
    in the kernel (~0.27 s/GB here) but streams a single file through Python (~1 s/GB)."""
    if stop is not None and stop.is_set():
        raise CopyAbandoned(str(path))
    directory = Path(staging, str(index))
    directory.mkdir()
    try:
        (directory / path.name).symlink_to(path.resolve())
    except OSError:  # no symlinks here (Windows without the privilege): the plain upload
        repository.log_artifact(str(path), artifact_path=target or None)
        return
    repository.log_artifacts(str(directory), artifact_path=target or None)
