"""Hugging Face Hub references: repo ids, exact commits, snapshots, sha256 checks.

A reference-only model records a repo id and the exact commit its files came from, never
a moving branch. The commit comes from the local HF cache when the model was loaded from
it (the snapshot the weights were read from) and from the Hub API otherwise; offline,
the cache alone answers. Downloads go through ``huggingface_hub`` (resumable, with a
progress bar) and every weight file is checked against its sha256 before use.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow_tfx_plugin.checkpoint import (
    PICKLE_WEIGHT_SUFFIXES,
    SAFETENSORS_SUFFIX,
    WeightEntry,
)
from mlflow_tfx_plugin.errors import (
    HubError,
    IntegrityError,
    InvalidInputError,
    ModelNotFoundError,
)

_logger = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SNAPSHOT_PATH = re.compile(r"models--(?P<repo>[^/\\]+)[/\\]snapshots[/\\](?P<commit>[0-9a-f]{40})")
WEIGHT_PATTERNS = (f"*{SAFETENSORS_SUFFIX}", "*.safetensors.index.json")
SMALL_FILE_IGNORE = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.gguf",
    "*.h5",
    "*.msgpack",
    "*.onnx",
)
_PROBE_TIMEOUT_S = 5.0
HELP = (
    "Check the repo id and revision, set HF_TOKEN for private repos and HF_ENDPOINT for a "
    "mirror, or persist the weights first with mlflow_tfx_plugin.persist_pretrained_model()."
)


@dataclass(frozen=True)
class HubReference:
    """A repo id pinned to a commit."""

    repo_id: str
    commit: str

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.commit}"


def parse_repo_reference(text: str) -> tuple[str, str | None]:
    """Split ``"org/name"`` or ``"org/name@revision"`` into repo id and revision.

    Raises:
        InvalidInputError: the text is not a valid repo id.
    """
    repo_id, _, revision = text.partition("@")
    if not _REPO_ID.match(repo_id) or repo_id.count("/") > 1 or ".." in repo_id:
        raise InvalidInputError(
            f"'{text}' is neither a local checkpoint directory nor a Hub repo id "
            "('org/name' or 'org/name@revision').",
            param="transformers_model",
        )
    return repo_id, revision or None


def looks_like_repo_id(text: str) -> bool:
    try:
        parse_repo_reference(text)
    except InvalidInputError:
        return False
    return not os.path.exists(text)


def reference_from_cache_path(path: str | os.PathLike[str]) -> HubReference | None:
    """The repo and commit of a directory inside the HF cache (``.../snapshots/<commit>``)."""
    match = _SNAPSHOT_PATH.search(str(Path(path).resolve()))
    if not match:
        return None
    return HubReference(repo_id=match["repo"].replace("--", "/"), commit=match["commit"])


def resolve_reference(
    repo_id: str, revision: str | None = None, *, prefer_cache: bool
) -> HubReference:
    """Pin ``repo_id`` at ``revision`` (default ``main``) to a commit.

    Args:
        repo_id: the Hub repo id.
        revision: a branch, tag or commit; ``None`` means the default branch.
        prefer_cache: ask the local HF cache first (right for a model already loaded
            from it: the cache knows which snapshot was read); else the Hub first.

    Raises:
        HubError: neither the Hub nor the cache knows the revision.
    """
    if revision and _COMMIT.match(revision):
        return HubReference(repo_id, revision)
    lookups = (
        (_commit_from_cache, _commit_from_hub)
        if prefer_cache
        else (_commit_from_hub, _commit_from_cache)
    )
    errors = []
    for lookup in lookups:
        try:
            if commit := lookup(repo_id, revision or "main"):
                return HubReference(repo_id, commit)
        except Exception as err:  # one source failing is fine while the other answers
            errors.append(f"{lookup.__name__.removeprefix('_commit_from_')}: {err}")
    raise HubError(
        f"Cannot resolve '{repo_id}' at revision '{revision or 'main'}' to a commit "
        f"({'; '.join(errors) or 'not in the local HF cache and the Hub is offline'}).",
        fix=HELP,
    )


def download_files(
    reference: HubReference,
    *,
    allow: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
) -> Path:
    """Download (or reuse from the cache) files of a pinned repo; returns the snapshot dir.

    A snapshot the local HF cache holds completely (its cached file listing says so) is
    used without contacting the Hub: a commit's files never change. When the Hub endpoint
    does not answer, the local HF cache is used at once: huggingface_hub would retry the
    connection for about 25 s before falling back to it.
    """
    from huggingface_hub import snapshot_download

    patterns = {
        "allow_patterns": list(allow) if allow else None,
        "ignore_patterns": list(ignore) if ignore else None,
    }
    if cached := _complete_cached_snapshot(reference, patterns):
        return cached
    unreachable = unreachable_endpoint()
    try:
        path = snapshot_download(
            reference.repo_id,
            revision=reference.commit,
            local_files_only=unreachable is not None,
            **patterns,
        )
    except Exception as err:
        reason = f"{unreachable}, and the local HF cache does not hold it" if unreachable else err
        raise HubError(f"Downloading {reference} failed: {reason}.", fix=HELP) from err
    return Path(path)


def _complete_cached_snapshot(
    reference: HubReference, patterns: dict[str, list[str] | None]
) -> Path | None:
    """The cached snapshot if the cache has the commit's file listing and every file in it
    that ``patterns`` select; None otherwise (or with a huggingface_hub too old to tell)."""
    try:
        from huggingface_hub import get_cached_repo_tree, snapshot_download

        get_cached_repo_tree(reference.repo_id, revision=reference.commit)  # raises if unknown
        # With the listing cached, huggingface_hub refuses an incomplete snapshot folder.
        path = snapshot_download(
            reference.repo_id, revision=reference.commit, local_files_only=True, **patterns
        )
    except Exception as err:  # not cached, partly cached, or no get_cached_repo_tree
        _logger.debug("%s is not complete in the local HF cache (%s).", reference, err)
        return None
    return Path(path)


def unreachable_endpoint() -> str | None:
    """Why the Hub endpoint cannot be reached now, or None when it answers (or when offline).

    One request, without huggingface_hub's retries; any HTTP answer counts as reachable.
    """
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=_PROBE_TIMEOUT_S)
    except Exception as err:  # httpx's transport errors: refused, DNS, TLS, timeout
        return f"the Hub endpoint {constants.ENDPOINT} does not answer ({err})"
    return None


def weight_manifest(reference: HubReference) -> list[WeightEntry]:
    """Path, size and sha256 of every weight file of a pinned repo, without downloading.

    From the Hub's LFS metadata when reachable, else from the local cache (LFS blobs are
    stored under their sha256). Empty when neither knows.
    """
    try:
        return _manifest_from_hub(reference)
    except Exception as err:
        _logger.debug(
            "Hub metadata for %s unavailable (%s); using the local cache.", reference, err
        )
        return _manifest_from_cache(reference)


def check_sizes(
    directory: Path, expected: Sequence[WeightEntry], *, reference: HubReference | None = None
) -> None:
    """Every expected file in ``directory`` (the downloaded snapshot) present, of the
    recorded size: checked before any file is hashed or uploaded.

    Raises:
        IntegrityError: naming the first missing or differing file, and how to fetch it
            again from ``reference``.
    """
    for entry in expected:
        path = directory / entry.path
        if not path.is_file():
            raise IntegrityError(
                f"Weight file '{entry.path}' is missing from the download of the snapshot. "
                f"{_refetch_help(entry.path, reference)}"
            )
        if (size := path.stat().st_size) != entry.size:
            raise IntegrityError(
                f"'{entry.path}' has {size} bytes, but {entry.size} were recorded: the download "
                f"is incomplete or the repo was rewritten. {_refetch_help(entry.path, reference)}"
            )


def check_hashes(
    expected: Sequence[WeightEntry],
    found: Sequence[WeightEntry],
    *,
    reference: HubReference | None = None,
) -> None:
    """Each file's sha256 (``found``: hashed, in ``expected``'s order) as recorded.

    Raises:
        IntegrityError: naming the first file that differs, and how to fetch it again.
    """
    for entry, checked in zip(expected, found, strict=True):
        if checked.sha256 != entry.sha256:
            raise IntegrityError(
                f"'{entry.path}' has sha256 {checked.sha256}, but {entry.sha256} was recorded: "
                "the download is corrupt or the repo was rewritten. "
                f"{_refetch_help(entry.path, reference)}"
            )


def _refetch_help(file: str, reference: HubReference | None) -> str:
    repo = reference.repo_id if reference else "<repo_id>"
    revision = f" --revision {reference.commit}" if reference else ""
    return (
        "Nothing was persisted; retry, after removing the cached copy "
        f"(`hf cache rm model/{repo}`) or fetching it again "
        f"(`hf download {repo} {file}{revision} --force-download`)."
    )


def load_error(reference: HubReference, err: Exception) -> ModelNotFoundError:
    """The error for a reference-only model whose weights cannot be fetched."""
    return ModelNotFoundError(f"Cannot load the weights of {reference}: {err}. {HELP}")


def _commit_from_hub(repo_id: str, revision: str) -> str | None:
    from huggingface_hub import HfApi

    return HfApi().model_info(repo_id, revision=revision).sha


def _commit_from_cache(repo_id: str, revision: str) -> str | None:
    repo_dir = _cache_repo_dir(repo_id)
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        return ref.read_text().strip()
    snapshots = sorted(p.name for p in (repo_dir / "snapshots").glob("*") if _COMMIT.match(p.name))
    return snapshots[0] if revision == "main" and len(snapshots) == 1 else None


def _cache_repo_dir(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def _manifest_from_hub(reference: HubReference) -> list[WeightEntry]:
    from huggingface_hub import HfApi

    info = HfApi().model_info(reference.repo_id, revision=reference.commit, files_metadata=True)
    return [
        WeightEntry(path=sibling.rfilename, size=sibling.lfs.size, sha256=sibling.lfs.sha256)
        for sibling in info.siblings or []
        if _is_weight(sibling.rfilename) and sibling.lfs is not None
    ]


def _manifest_from_cache(reference: HubReference) -> list[WeightEntry]:
    snapshot = _cache_repo_dir(reference.repo_id) / "snapshots" / reference.commit
    entries = []
    for link in sorted(snapshot.rglob("*")) if snapshot.is_dir() else []:
        blob = link.resolve()
        if _is_weight(link.name) and re.fullmatch(r"[0-9a-f]{64}", blob.name):
            entries.append(
                WeightEntry(
                    path=str(link.relative_to(snapshot)), size=blob.stat().st_size, sha256=blob.name
                )
            )
    return entries


def _is_weight(name: str) -> bool:
    return name.endswith(SAFETENSORS_SUFFIX) or name.endswith(PICKLE_WEIGHT_SUFFIXES)
