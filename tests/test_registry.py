"""The model-registry hook: entry points, delegation, signature, and persist-before-register.

``persist_for_registration`` is stubbed with ``mocker.patch(..., autospec=True)`` in the
registration tests. That is the unit seam of this module: ``persist.py`` has its own tests;
here we check when and with what the registry store calls it, and what happens to the model
version when it fails. ``autospec`` keeps the stub honest: a call that the real function's
signature would reject fails here too.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pytest
from mlflow.exceptions import MlflowException
from mlflow.store.model_registry.abstract_store import AbstractStore
from mlflow.store.model_registry.file_store import FileStore
from mlflow.store.model_registry.rest_store import RestStore
from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore
from mlflow.store.model_registry.sqlalchemy_workspace_store import WorkspaceAwareSqlAlchemyStore
from mlflow.utils.uri import get_uri_scheme
from pytest_mock import MockerFixture

from mlflow_tfx_plugin import _compat, registry
from mlflow_tfx_plugin.errors import TfxError
from mlflow_tfx_plugin.registry import (
    AutoPersistFileStore,
    AutoPersistMixin,
    AutoPersistRestStore,
    auto_persist_enabled,
    get_file_store,
    get_rest_store,
    get_sqlalchemy_store,
)

ENTRY_POINT_GROUP = "mlflow.model_registry_store"
DATABRICKS_SCHEMES = {"databricks", "databricks-uc", "uc"}

# scheme (entry-point name) -> the factory that must be registered for it.
EXPECTED_FACTORIES: dict[str, Callable[..., AbstractStore]] = {
    "": get_file_store,
    "file": get_file_store,
    "sqlite": get_sqlalchemy_store,
    "postgresql": get_sqlalchemy_store,
    "mysql": get_sqlalchemy_store,
    "mssql": get_sqlalchemy_store,
    "http": get_rest_store,
    "https": get_rest_store,
}


# --- helpers around MLflow's private registry machinery (kept in one place) ----------------


def _registry_store(store_uri: str) -> AbstractStore:
    """The registry store MLflow's client builds for ``store_uri``.

    ``MlflowClient(registry_uri=...)`` goes through this very function; calling it directly
    avoids building a tracking store for a URI nothing listens on.
    """
    from mlflow.tracking._model_registry.utils import _get_store

    return _get_store(store_uri, tracking_uri=store_uri)


def _client_builders() -> dict[str, Callable[..., Any]]:
    """Scheme -> builder table of MLflow's client-side registry (entry points loaded)."""
    from mlflow.tracking._model_registry.utils import _get_store_registry

    return dict(_get_store_registry()._registry)


def _server_builders() -> dict[str, Callable[..., Any]]:
    """Scheme -> builder table ``mlflow server`` uses for its registry store."""
    from mlflow.server.handlers import _model_registry_store_registry

    return dict(_model_registry_store_registry._registry)


def _client_store(client: mlflow.MlflowClient) -> AbstractStore:
    """The registry store behind an ``MlflowClient``."""
    return client._get_registry_client().store


def _arg_names(func: Callable[..., Any]) -> list[str]:
    """Argument names as MLflow's registry client reads them before passing local_model_path."""
    from mlflow.utils.arguments_utils import _get_arg_names

    return list(_get_arg_names(func))


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _registry_follows_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    """No registry URI left over from elsewhere: the registry uses the tracking URI."""
    monkeypatch.setattr("mlflow.tracking._model_registry.utils._registry_uri", None)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv(registry.AUTO_PERSIST_ENV_VAR, raising=False)


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory, _mlflow_db_template: Path) -> Any:
    """One wrapped sqlite registry store, built through MLflow, shared by read-only tests."""
    db = tmp_path_factory.mktemp("registry") / "db.sqlite"
    shutil.copyfile(_mlflow_db_template, db)
    return _registry_store(f"sqlite:///{db}")


@pytest.fixture
def persist_stub(mocker: MockerFixture) -> Any:
    """Stub of ``persist_for_registration`` (the unit seam; see the module docstring)."""
    return mocker.patch(
        "mlflow_tfx_plugin.persist.persist_for_registration", autospec=True, return_value=None
    )


@pytest.fixture
def run_id(tracking_uri: str) -> str:
    """A finished run in the test experiment of the ``tracking_uri`` fixture."""
    with mlflow.start_run() as run:
        pass
    return run.info.run_id


class _Echo(mlflow.pyfunc.PythonModel):
    """The smallest pyfunc model: returns its input."""

    def predict(self, context: Any, model_input: list[str], params: Any = None) -> list[str]:
        return model_input


# --- entry points ---------------------------------------------------------------------------


def test_entry_points_name_every_builtin_scheme_but_databricks() -> None:
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    ours = {ep.name: ep.load() for ep in entry_points if ep.value.startswith("mlflow_tfx_plugin.")}
    assert ours == EXPECTED_FACTORIES
    # If MLflow grows a built-in scheme, this tells us to cover it.
    assert set(_client_builders()) - DATABRICKS_SCHEMES == set(EXPECTED_FACTORIES)


@pytest.mark.parametrize("scheme", sorted(EXPECTED_FACTORIES))
def test_entry_points_replace_builtin_builders(scheme: str) -> None:
    assert _client_builders()[scheme] is EXPECTED_FACTORIES[scheme]


@pytest.mark.parametrize("scheme", sorted(EXPECTED_FACTORIES))
def test_entry_points_replace_server_builders(scheme: str) -> None:
    assert _server_builders()[scheme] is EXPECTED_FACTORIES[scheme]


@pytest.mark.parametrize("scheme", sorted(DATABRICKS_SCHEMES))
def test_databricks_builders_are_left_alone(scheme: str) -> None:
    assert not _client_builders()[scheme].__module__.startswith("mlflow_tfx_plugin")


# --- the store each scheme gets -------------------------------------------------------------

# scheme -> (registry URI under tmp_path, MLflow's class for it, the plugin's wrapper class)
STORE_TABLE: dict[str, tuple[Callable[[Path], str], type, type]] = {
    "": (lambda tmp: str(tmp / "mlruns"), FileStore, AutoPersistFileStore),
    "file": (lambda tmp: (tmp / "mlruns").as_uri(), FileStore, AutoPersistFileStore),
    "sqlite": (lambda tmp: f"sqlite:///{tmp}/db.sqlite", SqlAlchemyStore, AutoPersistMixin),
    "http": (lambda tmp: "http://127.0.0.1:1", RestStore, AutoPersistRestStore),
    "https": (lambda tmp: "https://127.0.0.1:1", RestStore, AutoPersistRestStore),
}


@pytest.mark.parametrize("scheme", sorted(STORE_TABLE))
def test_each_scheme_gets_mlflows_store_wrapped(
    scheme: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mocker: MockerFixture,
    _mlflow_db_template: Path,
) -> None:
    uri_for, mlflow_cls, wrapper_cls = STORE_TABLE[scheme]
    uri = uri_for(tmp_path)
    assert get_uri_scheme(uri) == scheme  # the table exercises the scheme it names
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    if scheme == "sqlite":
        shutil.copyfile(_mlflow_db_template, tmp_path / "db.sqlite")  # migrated
    # Building a store must not talk to anything (the REST store reads credentials lazily).
    mocker.patch("requests.Session.request", side_effect=AssertionError("request made"))
    store = _registry_store(uri)
    assert type(store).__module__ == registry.__name__
    assert isinstance(store, wrapper_cls)
    assert isinstance(store, mlflow_cls)
    assert _registry_store(uri) is store  # MLflow caches stores per (registry, tracking) URI


@pytest.mark.parametrize(
    "uri",
    [
        "postgresql://user:pw@127.0.0.1:1/{db}",
        "postgresql+psycopg2://user:pw@127.0.0.1:1/{db}",
        "mysql://user:pw@127.0.0.1:1/{db}",
        "mysql+pymysql://user:pw@127.0.0.1:1/{db}",
        "mssql+pyodbc://user:pw@127.0.0.1:1/{db}",
    ],
)
def test_server_databases_get_the_wrapped_sql_store(
    uri: str, tmp_path: Path, mocker: MockerFixture
) -> None:
    # No driver is installed and nothing listens: stop MLflow's constructor before it connects.
    init = mocker.patch.object(SqlAlchemyStore, "__init__", autospec=True, return_value=None)
    store_uri = uri.format(db=tmp_path.name)  # unique, since MLflow caches stores per URI
    store = _registry_store(store_uri)
    assert isinstance(store, AutoPersistMixin)
    assert isinstance(store, SqlAlchemyStore)
    init.assert_called_once_with(store, store_uri, read_db_uri=None)


def test_file_store_still_refuses_without_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(MlflowException, match="MLFLOW_ALLOW_FILE_STORE"):
        get_file_store(str(tmp_path / "mlruns"))


def test_sql_store_uses_the_server_read_replica(
    monkeypatch: pytest.MonkeyPatch, mocker: MockerFixture
) -> None:
    monkeypatch.setenv(_compat.READ_REPLICA_BACKEND_STORE_URI_ENV_VAR, "sqlite:///replica.db")
    init = mocker.patch.object(SqlAlchemyStore, "__init__", autospec=True, return_value=None)
    store = get_sqlalchemy_store("sqlite:///primary.db")
    init.assert_called_once_with(store, "sqlite:///primary.db", read_db_uri="sqlite:///replica.db")


def test_read_replica_variable_name_matches_mlflow() -> None:
    from mlflow.server.constants import READ_REPLICA_BACKEND_STORE_URI_ENV_VAR

    assert READ_REPLICA_BACKEND_STORE_URI_ENV_VAR == _compat.READ_REPLICA_BACKEND_STORE_URI_ENV_VAR


def test_workspaces_get_the_workspace_aware_sql_store(
    monkeypatch: pytest.MonkeyPatch, mocker: MockerFixture
) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_WORKSPACES", "true")
    mocker.patch.object(WorkspaceAwareSqlAlchemyStore, "__init__", autospec=True, return_value=None)
    store = get_sqlalchemy_store("sqlite:///workspaces.db")
    assert isinstance(store, AutoPersistMixin)
    assert isinstance(store, WorkspaceAwareSqlAlchemyStore)
    assert registry.sqlalchemy_store_class(workspaces=True) is type(store)


# --- delegation -----------------------------------------------------------------------------

# Every public method of MLflow's registry AbstractStore. Its ``__metaclass__ = ABCMeta`` is
# Python 2 syntax that Python 3 ignores, so a method a wrapper failed to delegate would
# silently return None: each must resolve to MLflow's own implementation.
STORE_METHODS = sorted(
    name
    for name, _ in inspect.getmembers(AbstractStore, callable)
    if not name.startswith("_") and name in vars(AbstractStore)
)
WRAPPERS: list[tuple[Callable[[], type], type]] = [
    (lambda: AutoPersistFileStore, FileStore),
    (lambda: AutoPersistRestStore, RestStore),
    (lambda: registry.sqlalchemy_store_class(workspaces=False), SqlAlchemyStore),
    (lambda: registry.sqlalchemy_store_class(workspaces=True), WorkspaceAwareSqlAlchemyStore),
]


def test_store_methods_were_collected() -> None:
    assert {"create_model_version", "get_model_version", "search_registered_models"} <= set(
        STORE_METHODS
    )


def test_mixin_adds_only_create_model_version() -> None:
    added = {name for name in vars(AutoPersistMixin) if not name.startswith("__")}
    assert added == {"create_model_version"}


@pytest.mark.parametrize("name", STORE_METHODS)
@pytest.mark.parametrize(
    ("wrapper", "mlflow_cls"), WRAPPERS, ids=[cls.__name__ for _, cls in WRAPPERS]
)
def test_wrapper_classes_inherit_mlflows_methods(
    name: str, wrapper: Callable[[], type], mlflow_cls: type
) -> None:
    if name == "create_model_version":
        assert wrapper().create_model_version is AutoPersistMixin.create_model_version
    else:
        assert getattr(wrapper(), name) is getattr(mlflow_cls, name)


@pytest.mark.parametrize("name", STORE_METHODS)
def test_wrapped_sqlite_store_delegates(name: str, sqlite_store: Any) -> None:
    method = getattr(sqlite_store, name)
    if name == "create_model_version":
        assert method.__func__ is AutoPersistMixin.create_model_version
    else:
        assert method.__func__ is getattr(SqlAlchemyStore, name)


# --- create_model_version's signature ------------------------------------------------------


def _parameters(func: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """Name, kind and default of each parameter: what callers and MLflow's client rely on.

    Annotations are left out on purpose: ours are typed, MLflow's mostly are not, and only
    ``FileStore`` annotates its return, so no one signature could equal all of them.
    """
    return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values()]


@pytest.mark.parametrize(
    "mlflow_cls", [AbstractStore, FileStore, SqlAlchemyStore, RestStore], ids=lambda c: c.__name__
)
def test_create_model_version_keeps_mlflows_parameters(mlflow_cls: type) -> None:
    assert _parameters(AutoPersistMixin.create_model_version) == _parameters(
        mlflow_cls.create_model_version
    )


def test_bound_create_model_version_exposes_local_model_path(sqlite_store: Any) -> None:
    bound_parent = SqlAlchemyStore.create_model_version.__get__(sqlite_store)
    assert _parameters(sqlite_store.create_model_version) == _parameters(bound_parent)
    assert "local_model_path" in _arg_names(sqlite_store.create_model_version)


# --- the switch -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "enabled"),
    [
        (None, True),
        ("", True),
        ("true", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("no", False),
        ("No", False),
        ("off", False),
        (" Off ", False),
    ],
)
def test_auto_persist_switch(
    value: str | None, enabled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value is not None:
        monkeypatch.setenv(registry.AUTO_PERSIST_ENV_VAR, value)
    assert auto_persist_enabled() is enabled


# --- registration through a real sqlite store -----------------------------------------------


def test_client_create_model_version_persists_then_creates(
    tracking_uri: str, run_id: str, persist_stub: Any, tmp_path: Path
) -> None:
    client = mlflow.MlflowClient()
    client.create_registered_model("m")
    source = str(tmp_path / "model")
    mv = client.create_model_version("m", source, run_id=run_id, tags={"k": "v"})
    persist_stub.assert_called_once_with(source, model_id=None, local_model_path=None)
    assert isinstance(_client_store(client), AutoPersistMixin)
    assert (int(mv.version), mv.source, mv.run_id, mv.tags) == (1, source, run_id, {"k": "v"})


def test_failed_persist_creates_no_version(
    tracking_uri: str, persist_stub: Any, tmp_path: Path
) -> None:
    client = mlflow.MlflowClient()
    client.create_registered_model("m")
    persist_stub.side_effect = TfxError("boom")
    with pytest.raises(TfxError, match="boom"):
        client.create_model_version("m", str(tmp_path / "model"))
    assert client.search_model_versions("name='m'") == []
    persist_stub.side_effect = None
    assert int(client.create_model_version("m", str(tmp_path / "model")).version) == 1


@pytest.mark.parametrize("value", ["false", "0", "NO", "off"])
def test_switched_off_creates_without_persisting(
    value: str,
    tracking_uri: str,
    persist_stub: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(registry.AUTO_PERSIST_ENV_VAR, value)
    client = mlflow.MlflowClient()
    client.create_registered_model("m")
    assert int(client.create_model_version("m", str(tmp_path / "model")).version) == 1
    persist_stub.assert_not_called()


def test_log_model_with_registered_model_name_passes_model_id_and_local_path(
    tracking_uri: str, persist_stub: Any
) -> None:
    seen: dict[str, Any] = {}

    def record(source: str, **kwargs: Any) -> None:
        local_path = kwargs["local_model_path"]
        seen.update(kwargs, source=source, files=sorted(p.name for p in Path(local_path).iterdir()))

    persist_stub.side_effect = record
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=_Echo(),
            pip_requirements=["mlflow"],
            registered_model_name="m",
        )
    assert seen["source"] == f"models:/{info.model_id}"
    assert seen["model_id"] == info.model_id
    assert "MLmodel" in seen["files"]  # the local copy exists while the store runs
    assert info.registered_model_version == 1


def test_register_model_passes_model_id(tracking_uri: str, persist_stub: Any) -> None:
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(
            name="model", python_model=_Echo(), pip_requirements=["mlflow"]
        )
    persist_stub.assert_not_called()

    mlflow.register_model(info.model_uri, "by-model-uri")
    persist_stub.assert_called_once_with(
        f"models:/{info.model_id}", model_id=info.model_id, local_model_path=None
    )

    persist_stub.reset_mock()
    mv = mlflow.register_model(f"runs:/{run.info.run_id}/model", "by-run-uri")
    assert persist_stub.call_args.args == (f"models:/{info.model_id}",)
    assert persist_stub.call_args.kwargs["model_id"] == info.model_id
    assert persist_stub.call_args.kwargs["local_model_path"] is None
    assert int(mv.version) == 1


def test_prompt_versions_are_not_persisted(tracking_uri: str, persist_stub: Any) -> None:
    prompt = mlflow.genai.register_prompt(name="greeting", template="Hello {{name}}")
    assert prompt.version == 1
    persist_stub.assert_not_called()
