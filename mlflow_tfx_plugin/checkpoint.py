"""Inspect a Transformers checkpoint directory without loading its weights, and copy it.

Weight files are streamed (never read into Python memory as a whole) and hashed in
the same pass that copies them, so the weights manifest costs no second read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_tfx_plugin.errors import CheckpointError, UnsafeWeightsError

_logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SKIPPED_NAMES = {".git", ".cache", "__pycache__", ".gitattributes"}
_CHUNK_SIZE = 8 << 20
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
    manifest = []
    for name in info.files:
        if name in skipped:
            continue
        src, dst = info.path / name, destination / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(SAFETENSORS_SUFFIX):
            manifest.append(_copy_weight_file(src, dst, name, hardlink=hardlink))
        else:
            shutil.copyfile(src, dst)
    if info.pickle_weight_files and not info.weight_files:
        manifest.extend(_convert_pickle_weights(info, destination))
    return manifest


def hash_weight_files(directory: Path) -> list[WeightEntry]:
    """Build the weights manifest of a directory that is already written."""
    return [
        WeightEntry(
            path=name, size=(directory / name).stat().st_size, sha256=sha256_of(directory / name)
        )
        for name in sorted(_list_files(directory))
        if is_weight_file(name)
    ]


def sha256_of(path: Path) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK_SIZE)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _copy_weight_file(src: Path, dst: Path, name: str, *, hardlink: bool) -> WeightEntry:
    if hardlink and _try_hardlink(src, dst):
        return WeightEntry(path=name, size=dst.stat().st_size, sha256=sha256_of(dst))
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK_SIZE)
    view = memoryview(buffer)
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while n := fin.readinto(buffer):
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
