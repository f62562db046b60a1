"""The model-registry hook: MLflow's own registry stores, persisting before registration.

MLflow builds its model-registry store from the scheme of the registry URI, through a
table of builders (``mlflow/tracking/_model_registry/utils.py: _get_store_registry`` on the
client, ``mlflow/server/handlers.py: ModelRegistryStoreRegistryWrapper`` inside
``mlflow server``). Both tables load the ``mlflow.model_registry_store`` entry points *after*
their built-ins, so an entry point named like a built-in scheme replaces it. This plugin
declares one for every built-in scheme but the Databricks ones (``databricks``,
``databricks-uc`` and ``uc`` are left alone):

================================================  ========================
scheme (entry-point name)                         factory
================================================  ========================
``""`` (a plain local path), ``file``             :func:`get_file_store`
``sqlite``, ``postgresql``, ``mysql``, ``mssql``  :func:`get_sqlalchemy_store`
``http``, ``https``                               :func:`get_rest_store`
================================================  ========================

(``mlflow server`` has no ``http(s)`` builder of its own; with this plugin installed it
gets one, which only matters for a server whose backend store is another server.)

Each factory builds exactly what MLflow's builder would, from a subclass of MLflow's
concrete store class that puts :class:`AutoPersistMixin` first. Every method but
``create_model_version`` is therefore MLflow's own, inherited, not forwarded: nothing can
be forgotten. (Forgetting would be silent: the registry ``AbstractStore`` declares
``__metaclass__ = ABCMeta``, which Python 3 ignores, so an unimplemented method returns
``None`` instead of failing.) MLflow calls a factory as ``factory(store_uri=...)`` and caches
the store per (registry URI, tracking URI) pair.

``create_model_version`` keeps MLflow's parameter list exactly (names, order, defaults):
MLflow's registry client reads it with :func:`inspect.signature` and passes
``local_model_path`` only to a store that names it. Unless ``MLFLOW_TFX_AUTO_PERSIST`` is
``false``/``0``/``no``/``off``, it first calls
:func:`mlflow_tfx_plugin.persist.persist_for_registration`, which turns a reference-only
model (weights left on the Hugging Face Hub) into a self-contained one. If that raises, the
error propagates and no version is created; it is an ``MlflowException``, so a tracking
server answers with its status. Prompt versions (which MLflow also creates through
``create_model_version``, with a placeholder source) are never persisted; copies made by
``copy_model_version`` are offered to the hook with a ``models:/<name>/<version>`` source.

Client and server both with the plugin: with an ``http(s)`` registry URI the client's
:class:`AutoPersistRestStore` persists (it reaches the artifacts through the tracking
server), and then the server's store (sqlite, postgresql, ... inside ``mlflow server``)
runs the hook again. Nothing is done twice because ``persist_for_registration`` is
idempotent: it reads the MLmodel and returns at once when the model is not reference-only.
Whichever side runs first persists; the other only reads the MLmodel. This module adds no
rule of its own on top of that.

The SQL store classes are built on first use (see :func:`sqlalchemy_store_class`): importing
MLflow's SQL registry store costs about a second, which a client of a remote ``http(s)``
registry never pays with MLflow's own builders and should not pay for this plugin either.
"""

from __future__ import annotations

import importlib
import os
import threading
from functools import partial
from typing import TYPE_CHECKING

from mlflow.environment_variables import MLFLOW_ENABLE_WORKSPACES
from mlflow.prompt.registry_utils import has_prompt_tag
from mlflow.store.model_registry.abstract_store import AbstractStore
from mlflow.store.model_registry.file_store import FileStore
from mlflow.store.model_registry.rest_store import RestStore
from mlflow.utils.credentials import get_default_host_creds

from mlflow_tfx_plugin._compat import READ_REPLICA_BACKEND_STORE_URI_ENV_VAR

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

__all__ = [
    "AUTO_PERSIST_ENV_VAR",
    "AutoPersistFileStore",
    "AutoPersistMixin",
    "AutoPersistRestStore",
    "auto_persist_enabled",
    "get_file_store",
    "get_rest_store",
    "get_sqlalchemy_store",
    "sqlalchemy_store_class",
]

AUTO_PERSIST_ENV_VAR = "MLFLOW_TFX_AUTO_PERSIST"
"""Set to ``false``, ``0``, ``no`` or ``off`` (any case) to turn the hook off."""

_FALSE_VALUES = frozenset({"false", "0", "no", "off"})


def auto_persist_enabled() -> bool:
    """Tell whether ``create_model_version`` should persist reference-only models.

    Returns:
        ``False`` when ``MLFLOW_TFX_AUTO_PERSIST`` is ``false``, ``0``, ``no`` or ``off``
        (case-insensitive, surrounding spaces ignored); ``True`` otherwise, unset included.
    """
    return os.environ.get(AUTO_PERSIST_ENV_VAR, "").strip().lower() not in _FALSE_VALUES


class AutoPersistMixin(AbstractStore):
    """Adds persist-before-register to a concrete MLflow registry store.

    Put it first among the bases (``class S(AutoPersistMixin, FileStore)``) so that its
    ``create_model_version`` runs and ``super()`` reaches the concrete store's. It subclasses
    ``AbstractStore`` only so that ``super()`` is typed; the method resolution order places
    the concrete store between the two.
    """

    def create_model_version(
        self,
        name: str,
        source: str,
        run_id: str | None = None,
        tags: Sequence[ModelVersionTag] | None = None,
        run_link: str | None = None,
        description: str | None = None,
        local_model_path: str | None = None,
        model_id: str | None = None,
    ) -> ModelVersion:
        """Persist a reference-only model, then create the version as MLflow does.

        Args:
            name: Name of the registered model.
            source: URI of the model's artifacts.
            run_id: ID of the run that produced the model, if any.
            tags: ``ModelVersionTag`` entities (or protobuf messages, on the server).
            run_link: Link to the source run.
            description: Description of the version.
            local_model_path: Local copy of the model, when MLflow has one at hand
                (``log_model(..., registered_model_name=...)``).
            model_id: ID of the logged model being registered, if any.

        Returns:
            The ``ModelVersion`` created by MLflow's store.

        Raises:
            mlflow_tfx_plugin.errors.TfxError: persisting failed; no version was created.
        """
        if auto_persist_enabled() and not has_prompt_tag(tags):
            from mlflow_tfx_plugin.persist import persist_for_registration

            persist_for_registration(source, model_id=model_id, local_model_path=local_model_path)
        return super().create_model_version(
            name,
            source,
            run_id=run_id,
            tags=tags,
            run_link=run_link,
            description=description,
            local_model_path=local_model_path,
            model_id=model_id,
        )


class AutoPersistFileStore(AutoPersistMixin, FileStore):
    """MLflow's file registry store (``file:`` URIs and plain paths), with auto-persist."""


class AutoPersistRestStore(AutoPersistMixin, RestStore):
    """MLflow's REST registry store (``http:``/``https:`` tracking servers), with auto-persist."""


# workspaces? -> (module, class) of the MLflow SQL registry store to subclass.
_SQL_STORE_BASES: dict[bool, tuple[str, str]] = {
    False: ("mlflow.store.model_registry.sqlalchemy_store", "SqlAlchemyStore"),
    True: (
        "mlflow.store.model_registry.sqlalchemy_workspace_store",
        "WorkspaceAwareSqlAlchemyStore",
    ),
}
_sql_store_classes: dict[bool, type[AutoPersistMixin]] = {}
_sql_store_lock = threading.Lock()


def sqlalchemy_store_class(*, workspaces: bool) -> type[AutoPersistMixin]:
    """Return the auto-persist subclass of MLflow's SQL registry store, building it once.

    Built on first use because importing MLflow's SQL store takes about a second (see the
    module docstring). Always the same class object for the same argument, so ``isinstance``
    checks hold.

    Args:
        workspaces: ``True`` for MLflow's ``WorkspaceAwareSqlAlchemyStore`` (what MLflow picks
            when ``MLFLOW_ENABLE_WORKSPACES`` is set), ``False`` for ``SqlAlchemyStore``.

    Returns:
        ``AutoPersistWorkspaceAwareSqlAlchemyStore`` or ``AutoPersistSqlAlchemyStore``: a
        subclass of :class:`AutoPersistMixin` and of the chosen MLflow store class.
    """
    with _sql_store_lock:
        if workspaces not in _sql_store_classes:
            module_name, base_name = _SQL_STORE_BASES[workspaces]
            base = getattr(importlib.import_module(module_name), base_name)
            namespace = {
                "__module__": __name__,
                "__doc__": f"MLflow's ``{base_name}`` registry store, with auto-persist.",
            }
            _sql_store_classes[workspaces] = type(
                f"AutoPersist{base_name}", (AutoPersistMixin, base), namespace
            )
        return _sql_store_classes[workspaces]


def get_file_store(store_uri: str) -> AutoPersistFileStore:
    """Build the registry store for a ``file:`` URI or a plain local path.

    Args:
        store_uri: The registry URI, e.g. ``file:///srv/mlruns`` or ``./mlruns``.

    Returns:
        An :class:`AutoPersistFileStore`, built like MLflow's ``FileStore(store_uri)``
        (which refuses to start unless ``MLFLOW_ALLOW_FILE_STORE=true``).
    """
    return AutoPersistFileStore(store_uri)


def get_sqlalchemy_store(store_uri: str) -> AutoPersistMixin:
    """Build the registry store for a ``sqlite``/``postgresql``/``mysql``/``mssql`` URI.

    Like MLflow's builders, this picks the workspace-aware class when
    ``MLFLOW_ENABLE_WORKSPACES`` is set, and passes the read-replica URI that
    ``mlflow server`` gives its workers (unset anywhere else, which means no replica).

    Args:
        store_uri: The SQLAlchemy database URI, e.g. ``sqlite:///mlflow.db``.

    Returns:
        A store that is an :class:`AutoPersistMixin` and MLflow's SQL registry store.
    """
    store_cls = sqlalchemy_store_class(workspaces=bool(MLFLOW_ENABLE_WORKSPACES.get()))
    read_db_uri = os.environ.get(READ_REPLICA_BACKEND_STORE_URI_ENV_VAR) or None
    return store_cls(store_uri, read_db_uri=read_db_uri)  # type: ignore[call-arg]


def get_rest_store(store_uri: str) -> AutoPersistRestStore:
    """Build the registry store for an ``http:``/``https:`` tracking server.

    No request is made here: credentials are read from the environment before each call.

    Args:
        store_uri: The tracking server's URI, e.g. ``https://mlflow.example.com``.

    Returns:
        An :class:`AutoPersistRestStore`, built like MLflow's
        ``RestStore(partial(get_default_host_creds, store_uri))``.
    """
    return AutoPersistRestStore(partial(get_default_host_creds, store_uri))
