"""The Ray Serve backend: one Serve application per deployment, replicas behind Serve's proxy.

A deployment ``NAME`` is the Serve application ``NAME`` with ``route_prefix=/NAME``; its one
Serve deployment (:data:`SERVE_DEPLOYMENT`) runs :class:`~.ray_replica.TfxReplica`, which
serves the same FastAPI app and engine as a server process. Replicas fetch the model from
the MLflow store themselves: the tracking/registry URIs and the credentials found in this
process's environment (:data:`FORWARDED_ENV`) travel in the replicas' runtime environment.

``create`` and ``update`` deploy with ``serve.run_many`` and wait, printing replica progress,
until the application is RUNNING; an update is Serve's rolling update, and a failed one is
rolled back to the recorded model and config. ``get``/``list`` read Serve's status.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from mlflow_tfx_plugin.deployments.config import DEFAULT_BATCH_SIZE, DeploymentConfig, key_digest
from mlflow_tfx_plugin.deployments.process import client_host, free_port, say, startup_timeout
from mlflow_tfx_plugin.deployments.ray_cluster import Connection, connected, stop_head_if_unused
from mlflow_tfx_plugin.deployments.resolve import ResolvedModel, recorded_fields, resolved_of
from mlflow_tfx_plugin.deployments.state import DeploymentRecord, DeploymentStore, utc_now
from mlflow_tfx_plugin.errors import InvalidInputError, TfxError

SERVE_DEPLOYMENT = "model"
"""The name of the one Serve deployment inside each application."""

FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCESS_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "HF_TOKEN",
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
)
"""Environment variables a replica needs to fetch the model as this process would."""

LOG_TAIL_LINES = 30


# -- the commands ---------------------------------------------------------------------------


def deploy(
    store: DeploymentStore,
    name: str,
    resolved: ResolvedModel,
    cfg: DeploymentConfig,
    *,
    previous: DeploymentRecord | None = None,
) -> DeploymentRecord:
    """Create the application ``name``, or roll it to a new model/config (``previous``).

    Returns once every replica answers; the record to write.

    Raises:
        InvalidInputError: an address Serve's proxy cannot take, an app of that name that
            is not ours.
        TfxError: the application did not become RUNNING (with Serve's message and the end
            of a replica log); an update is rolled back first.
    """
    address = cfg.ray_address or (previous.ray_address if previous else None)
    with connected(store, address, may_start=previous is None) as connection:
        from ray import serve

        if previous is None and name in serve.status().applications:
            raise TfxError(
                f"A Serve application named {name!r} already runs on the Ray cluster at "
                f"{connection.address}: choose another --name or `serve.delete({name!r})` it."
            )
        host, port = _proxy_address(cfg)
        verb = "Rolling" if previous else "Deploying"
        say(f"{verb} Serve application {name!r} on the Ray cluster at {connection.address}...")
        started = time.monotonic()
        try:
            _run(name, resolved, cfg)
            _wait_until_running(name, started)
        except BaseException:
            _undo(name, previous, cfg)
            if previous is None:  # a head started for this deployment goes with it
                stop_head_if_unused(store, connection, len(serve.status().applications))
            raise
        url = f"http://{client_host(host)}:{port}/{name}"
        say(f"Ready at {url} ({time.monotonic() - started:.1f} s)")
        return _record(name, resolved, cfg, connection, host, port, url)


def delete(store: DeploymentStore, record: DeploymentRecord) -> None:
    """Delete the application and, when it was the last on a head we started, the head."""
    with connected(store, record.ray_address) as connection:
        from ray import serve

        if record.name in serve.status().applications:
            say(
                f"Deleting Serve application {record.name!r}; its replicas finish in-flight work..."
            )
            serve.delete(record.name)
        else:
            say(f"Serve application {record.name!r} was not running; removing its record.")
        store.remove(record.name)
        stop_head_if_unused(store, connection, len(serve.status().applications))


def describe(store: DeploymentStore, record: DeploymentRecord) -> dict[str, Any]:
    """The record's Ray facts with Serve's live view: status, replicas, message."""
    try:
        with connected(store, record.ray_address):
            live = _live_status(record.name)
    except (InvalidInputError, TfxError) as err:
        live = {"status": "unreachable", "message": err.message}
    return {**_public_fields(record), **live}


def summaries(store: DeploymentStore, records: list[DeploymentRecord]) -> list[dict[str, Any]]:
    """``list`` rows for Ray records: one connection per cluster."""
    rows: list[dict[str, Any]] = []
    by_address: dict[str | None, list[DeploymentRecord]] = {}
    for record in records:
        by_address.setdefault(record.ray_address, []).append(record)
    for address, group in by_address.items():
        try:
            with connected(store, address):
                statuses = {r.name: _live_status(r.name)["status"] for r in group}
        except (InvalidInputError, TfxError):
            statuses = {r.name: "unreachable" for r in group}
        rows += [{"name": r.name, "status": statuses[r.name], "url": r.url} for r in group]
    return rows


# -- deploying ------------------------------------------------------------------------------


def _run(name: str, resolved: ResolvedModel, cfg: DeploymentConfig) -> None:
    from ray import serve

    target = serve.RunTarget(
        build_application(name, resolved, cfg), name=name, route_prefix=f"/{name}"
    )
    serve.run_many(
        [target],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )


def build_application(name: str, resolved: ResolvedModel, cfg: DeploymentConfig) -> Any:
    """The bound Serve application of deployment ``name``."""
    from ray import serve

    from mlflow_tfx_plugin.deployments.ray_replica import TfxReplica

    deployment = serve.deployment(TfxReplica, name=SERVE_DEPLOYMENT, **deployment_options(cfg))
    return deployment.bind(replica_spec(name, resolved, cfg))


def replica_spec(name: str, resolved: ResolvedModel, cfg: DeploymentConfig) -> Any:
    """What each replica is built from: the pinned model URI, the config, the key's digest."""
    from mlflow_tfx_plugin.deployments.ray_replica import ReplicaSpec

    key = cfg.api_key_value()
    return ReplicaSpec(
        name=name,
        model_uri=resolved.resolved_model_uri,
        config=cfg.server_arguments(),
        api_key_sha256=key_digest(key) if key else None,
    )


def deployment_options(cfg: DeploymentConfig, environ: Mapping[str, str] | None = None) -> dict:
    """Serve's options for the deployment: replicas, resources, limits, runtime env."""
    environ = os.environ if environ is None else environ
    env_vars = {key: environ[key] for key in FORWARDED_ENV if environ.get(key)}
    env_vars.setdefault("MLFLOW_TRACKING_URI", _tracking_uri())
    env_vars["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no bars in replica logs
    env_vars["MALLOC_ARENA_MAX"] = environ.get("MALLOC_ARENA_MAX", "2")  # as process.py does
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests or cfg.max_concurrent_requests,
        "ray_actor_options": {
            "num_cpus": 1 if cfg.num_cpus is None else cfg.num_cpus,
            "num_gpus": cfg.num_gpus or 0,
            "runtime_env": {"env_vars": env_vars},
        },
        # a rolling update starts each replacement before it stops an old replica, which
        # then finishes its requests: no request fails (the cluster needs room for one more)
        "max_surge_percent": 100,
        "graceful_shutdown_timeout_s": cfg.timeout + 5,
        "health_check_period_s": 5,
    }
    if cfg.autoscaling:
        options["autoscaling_config"] = _autoscaling(cfg)
    else:
        options["num_replicas"] = cfg.num_replicas or 1
    return options


def _autoscaling(cfg: DeploymentConfig) -> dict[str, Any]:
    scaling: dict[str, Any] = {
        "min_replicas": 1 if cfg.min_replicas is None else cfg.min_replicas,
        "max_replicas": cfg.max_replicas,
        "target_ongoing_requests": cfg.target_ongoing_requests
        or cfg.max_batch_size
        or DEFAULT_BATCH_SIZE,
    }
    for key in ("upscale_delay_s", "downscale_delay_s"):
        if getattr(cfg, key) is not None:
            scaling[key] = getattr(cfg, key)
    return scaling


def _tracking_uri() -> str:
    import mlflow

    return str(mlflow.get_tracking_uri())


def _proxy_address(cfg: DeploymentConfig) -> tuple[str, int]:
    """Serve's HTTP proxy address: the running one (which must match ``cfg``), else started."""
    from ray import serve
    from ray.serve.context import _get_global_client

    try:
        running = _get_global_client().http_config
    except Exception:  # Serve is not running on this cluster yet
        running = None
    if running is None:
        port = cfg.port or free_port(cfg.host)
        serve.start(http_options={"host": cfg.host, "port": port})
        return cfg.host, port
    if running.host != cfg.host or (cfg.port and running.port != cfg.port):
        raise InvalidInputError(
            f"Serve's HTTP proxy on this cluster listens on {running.host}:{running.port}, and "
            "its address is the same for every application: pass "
            f"-C host={running.host} -C port={running.port} (or shut Serve down first).",
            param="host" if running.host != cfg.host else "port",
        )
    return running.host, running.port


def _wait_until_running(name: str, started: float) -> None:
    """Poll Serve until the application runs, printing each change of its replicas."""
    from ray import serve

    timeout = startup_timeout()
    shown = None
    while time.monotonic() - started < timeout:
        app = serve.status().applications.get(name)
        if app is not None:
            if _text(app.status) == "RUNNING":
                return
            if _text(app.status) == "DEPLOY_FAILED":
                deployment = app.deployments.get(SERVE_DEPLOYMENT)
                raise TfxError(
                    _failure_message(name, deployment.message if deployment else app.message)
                )
            states = _replica_states(app)
            if states != shown:
                say(f"  {_text(app.status).lower()}: replicas {states or 'scheduling'}")
                shown = states
        time.sleep(0.5)
    raise TfxError(
        _failure_message(name, f"not running after {timeout:g} s (see $MLFLOW_TFX_STARTUP_TIMEOUT)")
    )


def _undo(name: str, previous: DeploymentRecord | None, cfg: DeploymentConfig) -> None:
    """After a failed deploy: remove a new app, or roll an update back to the record.

    The record holds no API key, so the rolled-back app checks the key of ``cfg``.
    """
    from ray import serve

    try:
        if previous is None:
            serve.delete(name)
            return
        say(f"Rolling {name!r} back to its recorded model and config...")
        recorded = {k: v for k, v in previous.config.items() if k != "api_key"}
        _run(name, resolved_of(previous), DeploymentConfig(**recorded, api_key=cfg.api_key))
    except Exception as err:  # the original failure matters more
        say(f"Could not undo the failed deployment of {name!r}: {err}")


def _failure_message(name: str, serve_message: str) -> str:
    lines = [f"Serve application {name!r} failed to deploy: {_tail(serve_message, 15)}"]
    log = _replica_log_tail(name)
    if log:
        lines.append(f"End of a replica's log:\n{log}")
    return "\n".join(lines)


def _replica_log_tail(name: str) -> str | None:
    """The last lines of the newest (dead or living) replica's log, where Ray can fetch it."""
    try:
        from ray.util.state import get_log

        deployment = _details(name)["deployments"][SERVE_DEPLOYMENT]
        replicas = deployment.get("recent_dead_replicas") or deployment.get("replicas") or []
        if not replicas:
            return None
        newest = replicas[-1]
        lines = get_log(actor_id=newest["actor_id"], tail=LOG_TAIL_LINES, suffix="err", timeout=10)
        return _tail("".join(lines))
    except Exception:  # the log is a courtesy; Serve's message is the error
        return None


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(str(text).strip().splitlines()[-lines:])


# -- reading Serve's status -----------------------------------------------------------------


def _details(name: str) -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    applications: dict[str, Any] = _get_global_client().get_serve_details()["applications"]
    return dict(applications[name])


def _replica_states(app: Any) -> dict[str, int]:
    deployment = app.deployments.get(SERVE_DEPLOYMENT)
    if deployment is None:
        return {}
    return {_text(state).lower(): count for state, count in deployment.replica_states.items()}


def _text(value: Any) -> str:
    """A Serve status as its name (Serve hands out enums or plain strings)."""
    return str(getattr(value, "value", value))


def _live_status(name: str) -> dict[str, Any]:
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        return {"status": "dead", "message": "No Serve application of this name is running."}
    deployment = _details(name)["deployments"].get(SERVE_DEPLOYMENT, {})
    replicas = deployment.get("replicas", [])
    return {
        "status": _STATUS.get(_text(app.status), _text(app.status).lower()),
        "serve_status": _text(app.status),
        "message": app.message,
        "replicas": {
            "running": sum(1 for r in replicas if r.get("state") == "RUNNING"),
            "target": deployment.get("target_num_replicas"),
            "states": _replica_states(app),
        },
    }


_STATUS = {
    "RUNNING": "running",
    "DEPLOYING": "deploying",
    "UNHEALTHY": "unhealthy",
    "DEPLOY_FAILED": "failed",
    "DELETING": "deleting",
}


# -- records --------------------------------------------------------------------------------


#: The record fields that only describe a server process.
_PROCESS_FIELDS = ("pid", "pid_create_time", "local_model_dir", "log_path")


def _public_fields(record: DeploymentRecord) -> dict[str, Any]:
    return {k: v for k, v in record.to_dict().items() if k not in _PROCESS_FIELDS}


def _record(
    name: str,
    resolved: ResolvedModel,
    cfg: DeploymentConfig,
    connection: Connection,
    host: str,
    port: int,
    url: str,
) -> DeploymentRecord:
    return DeploymentRecord(
        name=name,
        **recorded_fields(resolved),
        local_model_dir="",
        pid=0,
        pid_create_time=0.0,
        host=host,
        port=port,
        url=url,
        log_path="",
        config=cfg.to_public_dict(),
        updated_at=utc_now(),
        backend="ray",
        ray_address=connection.address,
    )
