"""Inspect a Transformers checkpoint directory without loading its weights, and copy it.

Weight files are streamed (never read into Python memory as a whole) and hashed in
the same pass that copies them, so the weights manifest costs no second read. Files are
copied and hashed in worker threads, a few at a time (``hashlib`` and file I/O release
the GIL): :func:`start_copy_checkpoint` returns at once with a :class:`PendingManifest`,
so the caller can do other work while the weights are hashed. A copy that fails or is
abandoned removes its partial file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_tfx_plugin.errors import CheckpointError, UnsafeWeightsError

_logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SKIPPED_NAMES = {".git", ".cache", "__pycache__", ".gitattributes"}
# sha256 ran at ~1.45 GB/s here reading 1 MiB at a time, ~1.3 GB/s with 8 MiB reads.
_CHUNK_SIZE = 1 << 20
# Past 4, parallel hashing only competes for the page cache and the disk.
_MAX_HASH_THREADS = 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class WeightEntry:
    """One weight file of a saved model: relative path, size in bytes and sha256."""

    path: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightEntry:
        return cls(path=str(data["path"]), size=int(data["size"]), sha256=str(data["sha256"]))


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """What a checkpoint directory holds, read from its small files only."""

    path: Path
    config: dict[str, Any]
    files: tuple[str, ...]
    weight_files: tuple[str, ...]
    pickle_weight_files: tuple[str, ...]

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else None

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def has_tokenizer(self) -> bool:
        return any(name in self.files for name in TOKENIZER_FILES)


def is_weight_file(name: str) -> bool:
    """Whether a file name is a weight file (safetensors or pickle-based)."""
    return name.endswith(SAFETENSORS_SUFFIX) or name.endswith(PICKLE_WEIGHT_SUFFIXES)


def inspect_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Read a checkpoint's config and file list without touching its weights.

    Args:
        path: a directory written by ``save_pretrained``.

    Returns:
        The checkpoint's description.

    Raises:
        CheckpointError: the directory does not exist, has no ``config.json``, has no
            weights, or a shard named in a ``*.index.json`` file is missing.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            f"Checkpoint directory '{root}' does not exist or is not a directory."
        )
    config_path = root / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"'{root}' has no config.json, so it is not a Transformers checkpoint. Pass the "
            "directory that `model.save_pretrained(...)` wrote."
        )
    config = _read_json(config_path)
    files = tuple(sorted(_list_files(root)))
    weights = tuple(f for f in files if f.endswith(SAFETENSORS_SUFFIX))
    pickles = tuple(f for f in files if f.endswith(PICKLE_WEIGHT_SUFFIXES))
    _check_shards_present(root, files)
    if not weights and not pickles:
        raise CheckpointError(
            f"'{root}' has a config.json but no weight files (*.safetensors). Save the model "
            "with `model.save_pretrained(directory)` before logging the directory."
        )
    return CheckpointInfo(
        path=root, config=config, files=files, weight_files=weights, pickle_weight_files=pickles
    )


def copy_checkpoint(
    info: CheckpointInfo,
    destination: Path,
    *,
    hardlink: bool = False,
    convert_pickle_weights: bool = False,
) -> list[WeightEntry]:
    """Copy a checkpoint's files into ``destination`` and return its weights manifest.

    Args:
        info: the inspected checkpoint.
        destination: the directory to fill (created if missing).
        hardlink: hard-link weight files instead of copying them where the file system
            allows. Only safe for a directory that is deleted afterwards (MLflow's
            temporary save directory): a later in-place write to the source would
            otherwise change the saved model too.
        convert_pickle_weights: convert ``*.bin`` weights to safetensors (loaded with
            ``torch.load(weights_only=True)``) instead of refusing them.

    Returns:
        One entry per weight file written, with its size and sha256.

    Raises:
        UnsafeWeightsError: the checkpoint holds pickle-based weights and no safetensors,
            and ``convert_pickle_weights`` is False.
    """
    with start_copy_checkpoint(
        info, destination, hardlink=hardlink, convert_pickle_weights=convert_pickle_weights
    ) as pending:
        return pending.result()


def start_copy_checkpoint(
    info: CheckpointInfo,
    destination: Path,
    *,
    hardlink: bool = False,
    convert_pickle_weights: bool = False,
    store_weights: StoreJob | None = None,
) -> PendingManifest:
    """:func:`copy_checkpoint`, returning while the weight files are still copied and hashed.

    The small files are copied (and pickle weights converted) before it returns. Use the
    result as a context manager: leaving it waits for the worker threads.

    Args:
        store_weights: stores the safetensors files, given as paths relative to
            ``info.path``, somewhere else (an artifact store) instead of ``destination``.
            It runs in a worker thread while other threads hash the files where they are,
            so the store's copy and the hash read the page cache side by side.

    Raises:
        UnsafeWeightsError: as :func:`copy_checkpoint`.
    """
    if info.pickle_weight_files and not info.weight_files and not convert_pickle_weights:
        raise UnsafeWeightsError(
            f"'{info.path}' stores its weights as pickle files "
            f"({', '.join(info.pickle_weight_files)}), which can run arbitrary code when "
            "loaded. Re-save the model with `save_pretrained` (safetensors), or pass "
            "`convert_pickle_weights=True` to convert them to safetensors while logging."
        )
    # Pickle files are never copied: safetensors beside them win, or they are converted.
    skipped = set(info.pickle_weight_files)
    destination.mkdir(parents=True, exist_ok=True)
    jobs: list[Job] = []
    for name in info.files:
        if name in skipped:
            continue
        src, dst = info.path / name, destination / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not name.endswith(SAFETENSORS_SUFFIX):
            shutil.copyfile(src, dst)
        elif store_weights is not None:
            jobs.append(_hash_job(src, name))
        else:
            jobs.append(_weight_copy_job(src, dst, name, hardlink=hardlink))
    converted = []
    if info.pickle_weight_files and not info.weight_files:
        converted = _convert_pickle_weights(info, destination)
    stored = info.weight_files
    if store_weights is None or not stored:
        return PendingManifest(jobs, ready=converted)
    return PendingManifest(jobs, ready=converted, also=[lambda stop: store_weights(stored, stop)])


Job = Callable[[threading.Event], WeightEntry]
"""Writes and/or hashes one weight file; gives up (:class:`CopyAbandoned`) once the event
is set."""

StoreJob = Callable[[Sequence[str], threading.Event], None]
"""Stores the named files elsewhere; should give up once the event is set."""


class CopyAbandoned(Exception):
    """A worker gave up on its file because the :class:`PendingManifest` was closed."""


class PendingManifest:
    """Weight files being copied and hashed in worker threads, at most four at a time.

    :meth:`result` waits for them (and for the ``also`` jobs, each in a thread of its own)
    and returns the manifest in the order the jobs were given (after the ``ready``
    entries). Leaving the ``with`` block (or :meth:`close`) stops the jobs still running
    at their next chunk, cancels those not started, and waits for the threads, so none
    outlives the directory it writes; a file left half copied is removed.
    """

    def __init__(
        self,
        jobs: Sequence[Job] = (),
        *,
        ready: Sequence[WeightEntry] = (),
        also: Sequence[Callable[[threading.Event], None]] = (),
    ) -> None:
        self._ready = list(ready)
        self._stop = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._futures: list[Future[WeightEntry]] = []
        self._also: list[Future[None]] = []
        if jobs or also:
            self._executor = ThreadPoolExecutor(
                max_workers=file_threads(len(jobs)) + len(also), thread_name_prefix="tfx-hash"
            )
            self._also = [self._executor.submit(job, self._stop) for job in also]
            self._futures = [self._executor.submit(job, self._stop) for job in jobs]

    def result(self) -> list[WeightEntry]:
        """The manifest, once every file is written and hashed; re-raises the first error
        of any job as soon as it happens."""
        futures: list[Future[Any]] = [*self._also, *self._futures]
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future.done() and future.exception() is not None:
                future.result()
        return [*self._ready, *(future.result() for future in self._futures)]

    def close(self) -> None:
        """Stop the jobs (a no-op once :meth:`result` returned) and wait for the threads."""
        self._stop.set()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PendingManifest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def file_threads(files: int) -> int:
    """Threads to copy, hash or upload ``files`` files with: one per file, at most 4 and
    the CPUs this process may run on."""
    return max(1, min(_MAX_HASH_THREADS, _usable_cpus(), files))


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # a container or taskset may allow fewer CPUs
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def hash_files(directory: Path, names: Sequence[str]) -> list[WeightEntry]:
    """Size and sha256 of each named file under ``directory``, hashed in parallel threads.

    Returns:
        One entry per name, in the order given.
    """
    with start_hash_files(directory, names) as pending:
        return pending.result()


def start_hash_files(directory: Path, names: Sequence[str]) -> PendingManifest:
    """:func:`hash_files`, returning while the files are still being hashed."""
    return PendingManifest([_hash_job(directory / name, name) for name in names])


def hash_weight_files(directory: Path) -> list[WeightEntry]:
    """Build the weights manifest of a directory that is already written."""
    with start_hash_weight_files(directory) as pending:
        return pending.result()


def start_hash_weight_files(directory: Path) -> PendingManifest:
    """:func:`hash_weight_files`, returning while the files are still being hashed."""
    return start_hash_files(directory, list_weight_files(directory))


def list_weight_files(directory: Path) -> list[str]:
    """The weight files under ``directory``, as sorted relative paths."""
    return sorted(name for name in _list_files(directory) if is_weight_file(name))


def sha256_of(path: Path, stop: threading.Event | None = None) -> str:
    """The sha256 hex digest of a file, read in chunks; :class:`CopyAbandoned` once
    ``stop`` is set."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK_SIZE)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            if stop is not None and stop.is_set():
                raise CopyAbandoned(str(path))
            digest.update(view[:n])
    return digest.hexdigest()


def _hash_job(path: Path, name: str) -> Job:
    def job(stop: threading.Event) -> WeightEntry:
        return WeightEntry(path=name, size=path.stat().st_size, sha256=sha256_of(path, stop))

    return job


def _weight_copy_job(src: Path, dst: Path, name: str, *, hardlink: bool) -> Job:
    """Link ``src`` now if asked and possible (then only hashing is left); else a job that
    copies and hashes in one pass."""
    if hardlink and _try_hardlink(src, dst):
        return _hash_job(dst, name)
    return lambda stop: _copy_and_hash(src, dst, name, stop)


def _copy_and_hash(src: Path, dst: Path, name: str, stop: threading.Event) -> WeightEntry:
    """Copy ``src`` to ``dst``, hashing what is written; ``dst`` is removed on failure."""
    try:
        return _stream_copy(src, dst, name, stop)
    except BaseException as err:
        dst.unlink(missing_ok=True)
        if isinstance(err, OSError):
            err.add_note(
                f"Copying the weight file '{name}' from '{src.parent}' to '{dst.parent}' "
                "failed (the partial copy was removed). Check that the checkpoint is "
                "complete and readable and that the destination has free space, then save "
                "again."
            )
        raise


def _stream_copy(src: Path, dst: Path, name: str, stop: threading.Event) -> WeightEntry:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK_SIZE)
    view = memoryview(buffer)
    size = 0
    with open(src, "rb", buffering=0) as fin, open(dst, "wb") as fout:
        while n := fin.readinto(buffer):
            if stop.is_set():
                raise CopyAbandoned(name)
            digest.update(view[:n])
            fout.write(view[:n])
            size += n
    return WeightEntry(path=name, size=size, sha256=digest.hexdigest())


def _try_hardlink(src: Path, dst: Path) -> bool:
    try:
        if dst.exists():
            dst.unlink()
        os.link(src, dst)
        return True
    except OSError:
        return False


def _convert_pickle_weights(info: CheckpointInfo, destination: Path) -> list[WeightEntry]:
    import torch
    from safetensors.torch import save_file

    state_dict: dict[str, Any] = {}
    for name in info.pickle_weight_files:
        _logger.info("Converting pickle weights '%s' to safetensors.", name)
        state_dict.update(torch.load(info.path / name, map_location="cpu", weights_only=True))
    tied = bool(info.config.get("tie_word_embeddings", True))
    target = destination / "model.safetensors"
    save_file(_unshared(state_dict, drop=tied), str(target), metadata={"format": "pt"})
    return [WeightEntry(path=target.name, size=target.stat().st_size, sha256=sha256_of(target))]


def _unshared(state_dict: dict[str, Any], *, drop: bool) -> dict[str, Any]:
    """The tensors as safetensors can store them: each piece of memory once.

    Tied weights (GPT-2's ``wte`` and ``lm_head``) are one tensor under two names. As
    ``save_pretrained`` does, the first name keeps it and the others are dropped (``drop``:
    the model re-ties them when it loads); when the config does not tie them, the others
    get copies.
    """
    kept: dict[str, Any] = {}
    owners: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, tensor in state_dict.items():
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        if key in owners:
            _logger.info("'%s' shares its memory with '%s'.", name, owners[key])
            if not drop:
                kept[name] = tensor.clone().contiguous()
            continue
        owners[key] = name
        kept[name] = tensor
    storages: dict[int, int] = {}
    for tensor in kept.values():
        pointer = tensor.untyped_storage().data_ptr()
        storages[pointer] = storages.get(pointer, 0) + 1
    # views of one storage that are not the same tensor are stored as copies of their own
    return {
        name: tensor.clone().contiguous()
        if storages[tensor.untyped_storage().data_ptr()] > 1
        else tensor.contiguous()
        for name, tensor in kept.items()
    }


def _check_shards_present(root: Path, files: tuple[str, ...]) -> None:
    for index_name in (f for f in files if f.endswith(".index.json")):
        weight_map = _read_json(root / index_name).get("weight_map", {})
        missing = sorted(set(weight_map.values()) - set(files))
        if missing:
            raise CheckpointError(
                f"'{root}' is missing weight shards listed in {index_name}: {', '.join(missing)}. "
                "Copy the complete checkpoint, or re-save it with `save_pretrained`."
            )


def _list_files(root: Path) -> Iterable[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_NAMES]
        for filename in filenames:
            if filename not in _SKIPPED_NAMES:
                yield os.path.relpath(os.path.join(dirpath, filename), root)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Cannot read '{path}': {err}. Is the checkpoint complete?") from err


def checked_base_model_path(path: str | os.PathLike[str]) -> Path:
    """A local base checkpoint for a PEFT adapter: an existing directory with config.json."""
    base = Path(path).absolute()
    if not (base / "config.json").is_file():
        what = "has no config.json" if base.is_dir() else "does not exist or is not a directory"
        raise CheckpointError(
            f"The base model path '{base}' {what}, so it is not a Transformers checkpoint. "
            "Pass base_model_path= pointing to the base model's checkpoint directory (the one "
            "the PEFT adapter was trained on).",
            param="base_model_path",
        )
    return base
