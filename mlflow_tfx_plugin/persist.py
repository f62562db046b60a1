"""Turn a reference-only model into a self-contained one, in place.

The weights of the pinned Hub snapshot are downloaded (or taken from the HF cache),
checked against their size, then uploaded into the model's own artifact location while
threads check their sha256 (both a few files at a time: reading for the hash and the
store's copy overlap). The order makes it safe: sizes checked before the first upload,
every sha256 before anything else is uploaded, the rewritten MLmodel last; weight files
that fail their check, or whose batch failed, are deleted from the store again. Until
MLmodel is replaced the model is a loadable reference; after, it is complete; running
again finishes an interrupted job and returns at once for a model already persisted.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME

from mlflow_tfx_plugin import _compat
from mlflow_tfx_plugin.checkpoint import (
    WeightEntry,
    is_weight_file,
    list_weight_files,
    start_hash_files,
)
from mlflow_tfx_plugin.errors import HubError, IntegrityError
from mlflow_tfx_plugin.flavor_config import (
    FLAVOR_NAME,
    STOCK_COMPONENTS_DIR,
    STOCK_FLAVOR_NAME,
    FlavorConfig,
)
from mlflow_tfx_plugin.hub import (
    WEIGHT_PATTERNS,
    HubReference,
    check_hashes,
    check_sizes,
    download_files,
    weight_manifest,
)
from mlflow_tfx_plugin.uploads import Upload, delete_uploads, upload_files, uploaded_artifact

_logger = logging.getLogger(__name__)
_SERVER_ARTIFACTS_SCHEME = "mlflow-artifacts:"


@dataclass(frozen=True)
class PersistResult:
    """What :func:`persist_pretrained_model` uploaded."""

    artifact_uri: str
    reference: str
    files: int
    bytes: int
    seconds: float


def persist_pretrained_model(model_uri: str) -> PersistResult | None:
    """Download a reference-only model's weights and store them with the model, in place.

    Works for ``runs:/``, ``models:/m-...``, ``models:/name/version`` (and aliases) and
    local paths, on local, SQL-backed and ``http://`` (proxied artifacts) stores, for
    models of this flavor and of stock ``mlflow.transformers``.

    Returns:
        What was uploaded, or None when the model already holds its weights.

    Raises:
        HubError: the snapshot cannot be downloaded. IntegrityError: a file's sha256
            differs from the recorded one. Nothing is changed in either case.

    Example:
        >>> tfx.persist_pretrained_model("models:/chat/1")  # doctest: +SKIP
    """
    return persist_at(artifact_location(model_uri))


def persist_for_registration(
    source: str,
    *,
    model_id: str | None = None,
    local_model_path: str | None = None,
) -> PersistResult | None:
    """The registry hook: persist ``source`` if it is a reference-only transformers model.

    Costs one MLmodel read when there is nothing to do.
    """
    location = _logged_model_location(model_id) if model_id else artifact_location(source)
    local_mlmodel = Path(local_model_path, MLMODEL_FILE_NAME) if local_model_path else None
    try:
        return persist_at(
            location,
            local_mlmodel=local_mlmodel if local_mlmodel and local_mlmodel.is_file() else None,
        )
    except IntegrityError:
        raise
    except HubError as err:  # "persist first" needs the same Hub: name the fixes that apply
        raise HubError(
            f"{err.detail} Registering a reference-only model copies its weights into the "
            "artifact store first.",
            fix=REGISTRATION_HELP,
        ) from err


REGISTRATION_HELP = (
    "To register it: set HF_ENDPOINT to a Hub mirror this machine reaches, and HF_TOKEN if the "
    "repo is private or gated; or put the snapshot in the local HF cache (`hf download REPO "
    "--revision COMMIT` where the Hub is reachable, copied to $HF_HUB_CACHE here) and set "
    "HF_HUB_OFFLINE=1; or register it as a reference without its weights with "
    "MLFLOW_TFX_AUTO_PERSIST=false."
)


def persist_at(artifact_uri: str, *, local_mlmodel: Path | None = None) -> PersistResult | None:
    """Persist the model stored at ``artifact_uri`` (1. read, 2. fetch, 3. upload, 4. MLmodel)."""
    with tempfile.TemporaryDirectory(prefix="tfx-persist-") as scratch:
        found = _read_mlmodel(artifact_uri, scratch, local_mlmodel)
        if found is None:
            return None
        repository, model = found
        config = _flavor_config(model)
        if not config.reference_only:
            return None
        started = time.monotonic()
        reference = HubReference(str(config.source_model_name), str(config.source_model_revision))
        snapshot, expected = _fetch(reference, config)
        _logger.info("Persisting %s into %s ...", reference, artifact_uri)
        uploads = _uploads(snapshot, config)
        hashed = {entry.path for entry in expected} or set(list_weight_files(snapshot))
        weight_uploads = [upload for upload in uploads if upload[0] in hashed]
        other_uploads = [upload for upload in uploads if upload[0] not in hashed]
        weights = _upload_verifying(repository, snapshot, weight_uploads, expected, reference)
        _upload(repository, snapshot, other_uploads)
        _rewrite_mlmodel(model, config, weights, Path(scratch) / MLMODEL_FILE_NAME)
        repository.log_artifact(str(Path(scratch) / MLMODEL_FILE_NAME))  # last: the switch
    result = PersistResult(
        artifact_uri=artifact_uri,
        reference=str(reference),
        files=len(weights),
        bytes=sum(entry.size for entry in weights),
        seconds=time.monotonic() - started,
    )
    _logger.info(
        "Persisted %s: %d weight files, %.1f MB in %.1f s.",
        reference,
        result.files,
        result.bytes / 1e6,
        result.seconds,
    )
    return result


def _read_mlmodel(
    artifact_uri: str, scratch: str, local_mlmodel: Path | None
) -> tuple[Any, Model] | None:
    """The store's repository and MLmodel of a transformers model; None for anything else
    (no MLmodel, another flavor, a store this environment cannot read): those register as
    MLflow alone would register them."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        repository = get_artifact_repository(_writable(artifact_uri))
        mlmodel = local_mlmodel or Path(repository.download_artifacts(MLMODEL_FILE_NAME, scratch))
        model = Model.load(str(mlmodel))
    except Exception as err:  # not ours to judge: MLflow validates sources itself
        _logger.debug("No readable MLmodel at %s (%s); nothing to persist.", artifact_uri, err)
        return None
    return (repository, model) if _is_transformers(model) else None


def _flavor_config(model: Model) -> FlavorConfig:
    """The config of a transformers MLmodel, ours or stock's: ``loading.flavor_config_of``
    without importing the task adapters (~0.07 s), which a registration with nothing to
    persist never needs."""
    if FLAVOR_NAME in model.flavors:
        return FlavorConfig.from_dict(model.flavors[FLAVOR_NAME])
    return FlavorConfig.from_stock_dict(model.flavors[STOCK_FLAVOR_NAME], model.metadata)


def artifact_location(model_uri: str) -> str:
    """The artifact URI where a model's files live (and can be written)."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    if model_uri.startswith("runs:/"):
        return RunsArtifactRepository.get_underlying_uri(model_uri)
    if model_uri.startswith("models:/m-"):
        return _logged_model_location(model_uri.removeprefix("models:/").split("/")[0])
    if model_uri.startswith("models:/"):
        return artifact_location(ModelsArtifactRepository.get_underlying_uri(model_uri))
    return model_uri


def _logged_model_location(model_id: str) -> str:
    store = _compat.server_tracking_store()
    if store is not None:
        return store.get_logged_model(model_id).artifact_location  # type: ignore[attr-defined]
    from mlflow import MlflowClient

    return MlflowClient().get_logged_model(model_id).artifact_location


def _writable(artifact_uri: str) -> str:
    """Inside ``mlflow server``, ``mlflow-artifacts:/`` points at the server's own destination."""
    destination = _compat.server_artifact_destination()
    if destination and artifact_uri.startswith(_SERVER_ARTIFACTS_SCHEME):
        path = artifact_uri.removeprefix(_SERVER_ARTIFACTS_SCHEME).lstrip("/")
        return f"{destination.rstrip('/')}/{path}"
    return artifact_uri


def _is_transformers(model: Model) -> bool:
    return FLAVOR_NAME in model.flavors or STOCK_FLAVOR_NAME in model.flavors


def _fetch(reference: HubReference, config: FlavorConfig) -> tuple[Path, list[WeightEntry]]:
    """Download the snapshot's weights (all files for stock models); the snapshot and the
    recorded manifest (empty when no sha256 is known)."""
    expected = config.weights or weight_manifest(reference)
    allow = None if config.is_stock_layout else [*WEIGHT_PATTERNS, "*.bin.index.json"]
    snapshot = download_files(reference, allow=allow)
    check_sizes(snapshot, expected, reference=reference)
    if not expected:
        _logger.warning(
            "No sha256 is known for %s's weights; recording the downloaded files' hashes.",
            reference,
        )
    return snapshot, expected


def _upload_verifying(
    repository: Any,
    snapshot: Path,
    uploads: list[Upload],
    expected: list[WeightEntry],
    reference: HubReference,
) -> list[WeightEntry]:
    """Upload the weight files while threads hash them; their manifest once every sha256
    matches ``expected`` (or, with nothing recorded, as found). On any failure the
    uploaded weight files are deleted again (none existed: the model is reference-only)."""
    names = [entry.path for entry in expected] or [file for file, _ in uploads]
    try:
        with start_hash_files(snapshot, names) as hashing:
            _upload(repository, snapshot, uploads)
            found = hashing.result()
        if expected:
            check_hashes(expected, found, reference=reference)
        return found
    except BaseException:
        delete_uploads(
            repository,
            [uploaded_artifact(file, target) for file, target in uploads],
            why="the model still references its Hub snapshot, so it is unused until the next "
            "persist replaces it.",
        )
        raise


def _uploads(snapshot: Path, config: FlavorConfig) -> list[Upload]:
    """(file in the snapshot, artifact dir): weights into ``model/``; for stock models the
    whole snapshot there, and its preprocessor files into ``components/<name>/`` too."""
    files = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    if not config.is_stock_layout:
        weights = [f for f in files if f.endswith((".safetensors", ".index.json"))]
        return [(f, str(Path(config.model_dir, f).parent)) for f in weights]
    uploads = [(f, str(Path(config.model_dir, f).parent)) for f in files]
    small = [f for f in files if not is_weight_file(f) and "/" not in f]
    for name in config.components:
        uploads += [(f, f"{STOCK_COMPONENTS_DIR}/{name}") for f in small]
    return uploads


def _upload(repository: Any, snapshot: Path, uploads: list[Upload]) -> None:
    upload_files(repository, snapshot, uploads, failure_note=_UPLOAD_FAILED)


_UPLOAD_FAILED = (
    "The model is unchanged (still a reference to its Hub snapshot); fix the store, then "
    "persist or register again: that finishes the job."
)


def _rewrite_mlmodel(
    model: Model, config: FlavorConfig, weights: list[WeightEntry], target: Path
) -> None:
    config.reference_only = False
    config.weights = weights
    if FLAVOR_NAME in model.flavors:  # ours: both sections come from the config
        model.flavors[FLAVOR_NAME] = config.to_dict()
        model.flavors[STOCK_FLAVOR_NAME] = config.to_stock_dict()
    else:  # a stock model, rewritten the way stock's own persist does
        model.flavors[STOCK_FLAVOR_NAME] = _persisted_stock_section(
            model.flavors[STOCK_FLAVOR_NAME], config.model_dir
        )
    os.makedirs(target.parent, exist_ok=True)
    model.save(str(target))


def _persisted_stock_section(section: dict[str, Any], model_dir: str) -> dict[str, Any]:
    pinned = {key for key in section if key.endswith(("_name", "_revision"))}
    kept = {k: v for k, v in section.items() if k not in pinned or k == "source_model_name"}
    return {**kept, "model_binary": model_dir}
