"""The ``tfx`` deployment target: one local OpenAI-compatible server process per deployment.

MLflow's plugin loader finds :class:`TfxDeploymentClient`, :func:`run_local` and
:func:`~.usage.target_help` in ``mlflow_tfx_plugin.deployments`` (the ``mlflow.deployments``
entry point). This module runs the commands; the work lives beside it: records in
:mod:`.state`, server processes in :mod:`.process`, model URIs in :mod:`.resolve`,
predict inputs in :mod:`.payloads`, HTTP to the server in :mod:`.transport`, the help
text in :mod:`.usage`.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import requests
from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.protos.databricks_pb2 import (
    NOT_IMPLEMENTED,
    RESOURCE_ALREADY_EXISTS,
    TEMPORARILY_UNAVAILABLE,
    UNAUTHENTICATED,
)

from mlflow_tfx_plugin.deployments import process
from mlflow_tfx_plugin.deployments.config import (
    API_KEY_ENV,
    DeploymentConfig,
    parse_config,
)
from mlflow_tfx_plugin.deployments.payloads import (
    CHAT_ROUTE,
    COMPLETIONS_ROUTE,
    requests_from_inputs,
    route_of,
)
from mlflow_tfx_plugin.deployments.process import ServerProcess, say
from mlflow_tfx_plugin.deployments.resolve import (
    ResolvedModel,
    fetch_model,
    recorded_fields,
    resolve_model,
    resolved_of,
)
from mlflow_tfx_plugin.deployments.state import (
    DeploymentRecord,
    DeploymentStore,
    utc_now,
    validate_name,
)
from mlflow_tfx_plugin.deployments.transport import UnreachableError, iter_sse_chunks, post_json
from mlflow_tfx_plugin.errors import (
    CorruptRecordError,
    InvalidInputError,
    ModelNotFoundError,
    TfxError,
)

FLAVOR = "tfx"
SWITCH_GRACE_SECONDS = 1.0
"""After an update that moves a deployment to another address switches the record, the old
server keeps serving this long before SIGTERM, so that clients which read the old URL just
before the switch still reach it."""


# --- the client ----------------------------------------------------------------------------


class TfxDeploymentClient(BaseDeploymentClient):
    """Deployments of the ``tfx`` target: local server processes, records on disk.

    The target URI is ``tfx`` (records under ``$MLFLOW_TFX_STATE_DIR`` or
    ``~/.mlflow-tfx/deployments``) or ``tfx:/PATH`` (records under ``PATH``).

    Example:
        >>> from mlflow.deployments import get_deploy_client
        >>> client = get_deploy_client("tfx")  # doctest: +SKIP
        >>> client.create_deployment("chat", "models:/chat@prod", config={"max_batch_size": "4"})
        >>> client.predict("chat", {"messages": [{"role": "user", "content": "Hi"}]})
    """

    def __init__(self, target_uri: str) -> None:
        super().__init__(target_uri)
        self.store = DeploymentStore(_state_dir_of(target_uri))

    # --- lifecycle -------------------------------------------------------------------------

    def create_deployment(
        self,
        name: str,
        model_uri: str,
        flavor: str | None = None,
        config: dict[str, Any] | None = None,
        endpoint: str | None = None,
    ) -> dict[str, Any]:
        """Serve ``model_uri`` as deployment ``name``; returns once ``/health`` answers 200.

        Raises:
            InvalidInputError: a bad name, flavor or ``-C`` option; a busy fixed port.
            TfxError: a live deployment of that name exists (code RESOURCE_ALREADY_EXISTS),
                or the server did not start (the message holds the end of its log).
            ModelNotFoundError: the model URI resolves to nothing.
        """
        _check_common(name, flavor, endpoint)
        cfg = parse_config(config)
        with self._locked(name), process.sigterm_raises():
            existing = self.store.read(name)
            if existing is not None and self._is_running(existing):
                raise TfxError(
                    f"Deployment {name!r} already exists and is running at {existing.url}. "
                    f"Use `mlflow deployments update -t tfx --name {name}` to change it or "
                    "`mlflow deployments delete` first.",
                    error_code=RESOURCE_ALREADY_EXISTS,
                )
            resolved = resolve_model(model_uri)
            if cfg.backend == "ray":
                record = _ray().deploy(self.store, name, resolved, cfg)
                self.store.write(record)
                if existing is not None and existing.local_model_dir:
                    self.store.remove_cached_model(existing.local_model_dir)
                return self._describe(record)
            model_dir = fetch_model(self.store, resolved)
            server, url = _launch(self.store, name, model_dir, cfg)
            record = _new_record(name, resolved, model_dir, cfg, server, url)
            try:
                self.store.write(record)
            except BaseException:
                process.stop(server.pid, server.create_time, grace=5)
                raise
            if existing is not None and existing.local_model_dir != record.local_model_dir:
                self.store.remove_cached_model(existing.local_model_dir)
        return self._describe(record)

    def update_deployment(
        self,
        name: str,
        model_uri: str | None = None,
        flavor: str | None = None,
        config: dict[str, Any] | None = None,
        endpoint: str | None = None,
    ) -> dict[str, Any]:
        """Replace the model and/or config (merged over the old config) of ``name``.

        The URL stays the same: the new server starts on the running one's host and port
        (both listen at once with ``SO_REUSEPORT``, the kernel spreads new connections over
        them). Once the new server itself answers ``/health`` (its pid in the answer), the
        record switches to it and the old server is stopped gracefully: it stops accepting,
        finishes its in-flight requests, and is killed only after
        :data:`~.process.STOP_GRACE_SECONDS`. With ``-C host=...`` or ``-C port=...`` naming
        another address, the new server starts there instead. If the new server fails, it
        is stopped, the old one keeps serving and the record is unchanged.

        Raises:
            ModelNotFoundError: no deployment ``name``.
            InvalidInputError, TfxError: as for :meth:`create_deployment`.
        """
        _check_common(name, flavor, endpoint)
        parse_config(config)  # unknown keys and bad values fail before anything happens
        with self._locked(name), process.sigterm_raises():
            old = self._require(name)
            cfg = _merged_config(old, config or {})
            if cfg.backend != old.backend:
                raise InvalidInputError(
                    f"Deployment {name!r} runs on backend={old.backend}; an update cannot move "
                    "it to another backend: delete it and create it again.",
                    param="backend",
                )
            if old.backend == "ray":
                resolved = resolve_model(model_uri) if model_uri else resolved_of(old)
                new = _ray().deploy(self.store, name, resolved, cfg, previous=old)
                new = replace(new, created_at=old.created_at)
                self.store.write(new)
                return self._describe(new)
            if model_uri:
                resolved = resolve_model(model_uri)
                model_dir = fetch_model(self.store, resolved)
            else:
                resolved, model_dir = resolved_of(old), Path(old.local_model_dir)
            old_alive = self._is_running(old)
            shared_port = _shared_port(old, cfg) if old_alive else None
            server, url = _launch(self.store, name, model_dir, cfg, shared_port=shared_port)
            new = _new_record(name, resolved, model_dir, cfg, server, url)
            new = replace(new, created_at=old.created_at)
            try:
                self.store.write(new)
            except BaseException:
                process.stop(server.pid, server.create_time, grace=5)
                raise
            if old_alive:
                if url != old.url:
                    time.sleep(SWITCH_GRACE_SECONDS)
                say(f"Stopping the old server (pid {old.pid}); it finishes in-flight requests...")
                process.stop(old.pid, old.pid_create_time)
            if old.local_model_dir != new.local_model_dir:
                self.store.remove_cached_model(old.local_model_dir)
        return self._describe(new)

    def delete_deployment(
        self, name: str, config: dict[str, Any] | None = None, endpoint: str | None = None
    ) -> None:
        """Stop the server of ``name`` (SIGTERM, 30 s, SIGKILL), remove its record and the
        downloaded model copy if no other deployment uses it. Its logs stay (see state.py).

        A corrupt record is removed too, after its server is stopped if its pid can be read.

        Raises:
            ModelNotFoundError: no deployment ``name`` (code RESOURCE_DOES_NOT_EXIST).
        """
        _check_common(name, None, endpoint)
        if config:
            raise InvalidInputError(
                f"delete takes no -C options, got {sorted(config)}.", param=sorted(config)[0]
            )
        with self._locked(name):
            try:
                record = self._require(name)
            except CorruptRecordError as corrupt:
                self._delete_corrupt(corrupt)
                return
            if record.backend == "ray":
                _ray().delete(self.store, record)
                return
            if self._is_running(record):
                say(f"Stopping server pid {record.pid}...")
                process.stop(record.pid, record.pid_create_time)
            else:
                say(f"Deployment {name!r} was not running; removing its record.")
            self.store.remove(name)
            self.store.remove_cached_model(record.local_model_dir)
            say(f"Its server logs stay in {Path(record.log_path).parent}.")

    def list_deployments(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        """Every deployment of this target: ``name``, ``status`` ("running", "dead" or
        "corrupt"; for backend=ray, Serve's application status) and ``url`` each (``get``
        shows the whole record)."""
        _check_endpoint(endpoint)
        entries = self.store.records()
        on_ray = [e for e in entries if isinstance(e, DeploymentRecord) and e.backend == "ray"]
        rows = [self._summary(entry) for entry in entries if entry not in on_ray]
        if on_ray:
            rows += _ray().summaries(self.store, on_ray)
        return sorted(rows, key=lambda row: row["name"])

    def get_deployment(self, name: str, endpoint: str | None = None) -> dict[str, Any]:
        """The record of ``name`` with its live ``status`` ("running" or "dead").

        Raises:
            ModelNotFoundError: no deployment ``name``.
        """
        _check_common(name, None, endpoint)
        return self._describe(self._require(name))

    # --- inference -------------------------------------------------------------------------

    def predict(
        self, deployment_name: str | None = None, inputs: Any = None, endpoint: str | None = None
    ) -> PredictionsResponse:
        """Send ``inputs`` to deployment ``deployment_name`` and return the server's JSON.

        A body with ``messages`` goes to /v1/chat/completions, ``prompt`` to /v1/completions,
        ``input`` to /v1/embeddings, anything else to /invocations (see
        :func:`requests_from_inputs` for DataFrames). One request returns its response
        object; several return ``{"predictions": [response, ...]}``. The API key, if the
        deployment has one, is read from ``$MLFLOW_TFX_API_KEY``.

        Example:
            >>> client.predict("chat", {"messages": [{"role": "user", "content": "Hi"}]})
            {'id': 'chatcmpl-...', 'object': 'chat.completion', 'choices': [...], ...}
        """
        name = _deployment_name(deployment_name, endpoint)
        bodies = requests_from_inputs(inputs)
        if any(body.get("stream") for body in bodies):
            raise InvalidInputError(
                "predict does not stream: drop 'stream' or call predict_stream().", param="stream"
            )
        answers = [self._request(name, body, stream=False).json() for body in bodies]
        if len(answers) == 1:
            answer = answers[0]
            return PredictionsResponse(
                answer if isinstance(answer, dict) else {"predictions": answer}
            )
        return PredictionsResponse({"predictions": answers})

    def predict_stream(
        self, deployment_name: str | None = None, inputs: Any = None, endpoint: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Stream a chat or completions request; yields the chunks as dicts.

        The request is checked and sent before this returns, so errors surface here and
        not at the first ``next()``.

        Raises:
            InvalidInputError: inputs that are not one chat/completions body.
            TfxError: the server sent an error frame mid-stream.
        """
        name = _deployment_name(deployment_name, endpoint)
        bodies = requests_from_inputs(inputs)
        if len(bodies) != 1 or route_of(bodies[0]) not in (CHAT_ROUTE, COMPLETIONS_ROUTE):
            raise InvalidInputError(
                "predict_stream takes one chat ('messages') or completions ('prompt') request.",
                param="inputs",
            )
        response = self._request(name, {**bodies[0], "stream": True}, stream=True)
        return iter_sse_chunks(response)

    def explain(
        self, deployment_name: str | None = None, df: Any = None, endpoint: str | None = None
    ) -> Any:
        """Not supported: raises."""
        raise TfxError(
            "explain is not supported by the tfx target; use predict.", error_code=NOT_IMPLEMENTED
        )

    # --- helpers ---------------------------------------------------------------------------

    def _locked(self, name: str) -> Any:
        def waiting() -> None:
            say(f"Waiting for another operation on deployment {name!r} to finish...")

        return self.store.lock(name, on_wait=waiting, remove=True)

    def _require(self, name: str) -> DeploymentRecord:
        record = self.store.read(name)
        if record is None:
            raise ModelNotFoundError(
                f"No tfx deployment named {name!r} (state dir {self.store.root}). "
                "`mlflow deployments list -t tfx` shows the existing ones."
            )
        return record

    def _is_running(self, record: DeploymentRecord) -> bool:
        if record.backend == "ray":
            live = _ray().describe(self.store, record)["status"]
            return bool(live in ("running", "deploying", "unhealthy"))
        return process.is_running(record.pid, record.pid_create_time)

    def _summary(self, entry: DeploymentRecord | CorruptRecordError) -> dict[str, Any]:
        if isinstance(entry, CorruptRecordError):
            return {"name": entry.name, "status": "corrupt", "url": None, "record": entry.path}
        return {"name": entry.name, "status": self._status(entry), "url": entry.url}

    def _delete_corrupt(self, corrupt: CorruptRecordError) -> None:
        started = corrupt.pid_create_time
        if corrupt.pid and started is None:
            started = process.server_start_time(corrupt.pid, corrupt.name)
        if corrupt.pid and started is not None and process.is_running(corrupt.pid, started):
            say(f"Stopping server pid {corrupt.pid} of the corrupt record {corrupt.path}...")
            process.stop(corrupt.pid, started)
        else:
            say(f"No running server could be read from the corrupt record {corrupt.path}.")
        self.store.remove(corrupt.name)

    def _describe(self, record: DeploymentRecord) -> dict[str, Any]:
        if record.backend == "ray":
            return {**_ray().describe(self.store, record), "flavor": FLAVOR}
        return {**record.to_dict(), "status": self._status(record), "flavor": FLAVOR}

    def _status(self, record: DeploymentRecord) -> str:
        """ "running" only when the server answers that it can generate, else why not."""
        if not self._is_running(record):
            return "dead"
        return process.health_status(record.url)

    def _running_record(self, name: str) -> DeploymentRecord:
        record = self._require(name)
        if record.backend == "ray":  # Serve's proxy answers for it; no process of ours
            return record
        if not self._is_running(record):
            raise TfxError(
                f"Deployment {name!r} is not running (pid {record.pid} exited); see log "
                f"{record.log_path}; delete and create it again.",
                error_code=TEMPORARILY_UNAVAILABLE,
            )
        return record

    def _request(self, name: str, body: dict[str, Any], *, stream: bool) -> requests.Response:
        record = self._running_record(name)
        api_key = os.environ.get(API_KEY_ENV) or None
        if record.config.get("api_key") and not api_key:
            raise TfxError(
                f"Deployment {name!r} requires an API key: set ${API_KEY_ENV}.",
                error_code=UNAUTHENTICATED,
            )
        timeout = float(record.config.get("timeout") or 60.0) + 30.0
        route = route_of(body)

        def send(url: str) -> requests.Response:
            return post_json(url + route, body, api_key=api_key, timeout=timeout, stream=stream)

        try:
            return send(record.url)
        except UnreachableError as err:
            current = self._running_record(name)  # an update may have moved it
            if current.url == record.url:
                where = record.log_path or f"`mlflow deployments get -t tfx --name {name}`"
                raise TfxError(
                    f"Cannot reach deployment {name!r} at {record.url}: {err}. See {where}.",
                    error_code=TEMPORARILY_UNAVAILABLE,
                ) from None
            return send(current.url)


# --- shared steps --------------------------------------------------------------------------


def _ray() -> ModuleType:
    """The Ray backend, imported only when a deployment uses it (it loads Ray)."""
    from mlflow_tfx_plugin.deployments import ray_backend

    return ray_backend


def _state_dir_of(target_uri: str) -> Path | None:
    """``tfx`` -> default state dir; ``tfx:/PATH`` -> ``PATH``."""
    parsed = urllib.parse.urlparse(target_uri or FLAVOR)
    if parsed.netloc:
        raise InvalidInputError(
            f"Invalid target {target_uri!r}: use 'tfx' or 'tfx:/path/to/state-dir'.",
            param="target",
        )
    return Path(parsed.path) if parsed.scheme and parsed.path not in ("", "/") else None


def _check_endpoint(endpoint: str | None) -> None:
    if endpoint is not None:
        raise InvalidInputError(
            f"The tfx target has no endpoints (got --endpoint {endpoint!r}); use --name.",
            param="endpoint",
        )


def _check_common(name: str, flavor: str | None, endpoint: str | None) -> None:
    validate_name(name)
    _check_endpoint(endpoint)
    if flavor not in (None, FLAVOR):
        raise InvalidInputError(
            f"The tfx target deploys flavor 'tfx' only, got flavor {flavor!r}.", param="flavor"
        )


def _deployment_name(deployment_name: str | None, endpoint: str | None) -> str:
    """``--name`` or, as MLflow's gateway clients use it, ``--endpoint``: one of them."""
    if deployment_name and endpoint and deployment_name != endpoint:
        raise InvalidInputError("Pass the deployment name once (--name).", param="endpoint")
    return validate_name(deployment_name or endpoint)


def _merged_config(old: DeploymentRecord, update: Mapping[str, Any]) -> DeploymentConfig:
    """The old public config with ``update`` over it; the key comes from ``update`` or env."""
    base = {k: v for k, v in old.config.items() if k != "api_key" and v is not None}
    if "api_key" not in update and old.config.get("api_key") and not os.environ.get(API_KEY_ENV):
        raise InvalidInputError(
            f"Deployment {old.name!r} requires an API key, which is never stored: set "
            f"${API_KEY_ENV} (or pass -C api_key=...) for the update.",
            param="api_key",
        )
    return parse_config({**base, **update})


@dataclass(frozen=True, kw_only=True)
class _ServerPlan:
    """How to start a server: its command line, environment, port and client URL."""

    command: list[str]
    env: dict[str, str]
    port: int
    url: str


def _shared_port(old: DeploymentRecord, cfg: DeploymentConfig) -> int | None:
    """The running server's port if the updated config keeps its address, else ``None``."""
    same_port = not cfg.port or cfg.port == old.port
    return old.port if cfg.host == old.host and same_port else None


def _plan_server(
    name: str, model_dir: Path, cfg: DeploymentConfig, *, shared_port: int | None = None
) -> _ServerPlan:
    """Pick the port and build the server's command.

    A fixed port must be free; ``shared_port`` (a running server's, for an update) must
    accept a second listener with ``SO_REUSEPORT``.
    """
    if shared_port:
        port = shared_port
        process.check_port_free(cfg.host, port, shared=True)
    else:
        port = cfg.port or process.free_port(cfg.host)
        if cfg.port:
            process.check_port_free(cfg.host, port)
    return _ServerPlan(
        command=process.server_command(
            model_dir,
            name,
            {**cfg.server_arguments(), "port": port},
            listen_after_load=shared_port is not None,
        ),
        env=process.server_environment(cfg.api_key_value(), API_KEY_ENV),
        port=port,
        url=f"http://{process.client_host(cfg.host)}:{port}",
    )


def _launch(
    store: DeploymentStore,
    name: str,
    model_dir: Path,
    cfg: DeploymentConfig,
    *,
    shared_port: int | None = None,
) -> tuple[ServerProcess, str]:
    """Start a detached server for ``model_dir`` and wait until it answers ``/health``.

    On a ``shared_port`` another server answers too; only an answer with the new
    server's pid counts. A server that fails to start is stopped before this raises.
    """
    plan = _plan_server(name, model_dir, cfg, shared_port=shared_port)
    log_path = store.new_log_path(name)
    beside = " beside the running server" if shared_port else ""
    say(f"Starting server for {name!r} on {cfg.host}:{plan.port}{beside} (log: {log_path})")
    server = process.start_detached(plan.command, plan.env, log_path)
    try:
        process.wait_until_healthy(server, plan.url, timeout=process.startup_timeout())
    except BaseException:
        process.stop(server.pid, server.create_time, grace=5)
        raise
    say(f"Ready at {plan.url}")
    return server, plan.url


def _new_record(
    name: str,
    resolved: ResolvedModel,
    model_dir: Path,
    cfg: DeploymentConfig,
    server: ServerProcess,
    url: str,
) -> DeploymentRecord:
    port = int(url.rsplit(":", 1)[1])
    return DeploymentRecord(
        name=name,
        **recorded_fields(resolved),
        local_model_dir=str(model_dir),
        pid=server.pid,
        pid_create_time=server.create_time,
        host=cfg.host,
        port=port,
        url=url,
        log_path=str(server.log_path),
        config=cfg.to_public_dict(),
        updated_at=utc_now(),
    )


# --- module-level target API ---------------------------------------------------------------


def run_local(
    name: str, model_uri: str, flavor: str | None = None, config: dict[str, Any] | None = None
) -> None:
    """Serve ``model_uri`` in the foreground until Ctrl-C (SIGINT) or SIGTERM.

    Nothing is recorded: ``get``/``list``/``delete`` do not see it. The model is cached
    like for ``create``. The server's log goes to this terminal.

    Raises:
        TfxError: the server exited by itself with a non-zero code.
    """
    _check_common(name, flavor, None)
    cfg = parse_config(config)
    if cfg.backend != "process":
        raise InvalidInputError(
            "run-local serves in the foreground with the process backend; for Ray Serve use "
            "`mlflow deployments create -t tfx -C backend=ray`.",
            param="backend",
        )
    store = DeploymentStore()
    model_dir = fetch_model(store, resolve_model(model_uri))
    plan = _plan_server(name, model_dir, cfg)
    say(f"Serving {name!r} at {plan.url} in the foreground; Ctrl-C stops it.")
    code = process.run_foreground(plan.command, plan.env, plan.url)
    if code != 0:
        raise TfxError(f"The server for {name!r} exited with code {code}; see its log above.")
    say("Server stopped.")
