"""``update`` under load from clients that open a new connection for every request.

3000 requests, 32 at a time, each on a fresh TCP connection (as many HTTP clients do),
with an ``update`` of the deployment in the middle: not one may fail. Real servers
(``python -m mlflow_tfx_plugin.deployments.listener``) on 127.0.0.1, a tiny GPT-2.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pytest

from mlflow_tfx_plugin.deployments import TfxDeploymentClient, process
from mlflow_tfx_plugin.deployments.listener import DRAIN_S

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 3000
CONCURRENCY = 32
COMPLETION = json.dumps({"prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
_JSON = {"Content-Type": "application/json"}


@pytest.fixture
def client(tmp_path: Path) -> TfxDeploymentClient:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    import mlflow_tfx_plugin as tfx

    tfx.save_model(
        tiny_models.build_gpt2(tmp_path / "gpt2"), tmp_path / "model", task="llm/v1/completions"
    )
    client = TfxDeploymentClient(f"tfx:{tmp_path / 'state'}")
    yield client
    for entry in client.store.records():
        if not isinstance(entry, Exception):
            process.stop(entry.pid, entry.pid_create_time, grace=10)


def _one_request(host: str, port: int, index: int) -> str | None:
    """One request on a new connection; None when it succeeded, else what went wrong."""
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        if index % 2:
            connection.request("GET", "/v1/models")
        else:
            connection.request("POST", "/v1/completions", body=COMPLETION, headers=_JSON)
        response = connection.getresponse()
        response.read()
        return None if response.status == 200 else f"HTTP {response.status}"
    except (OSError, http.client.HTTPException) as err:
        return f"{type(err).__name__}: {err}"
    finally:
        connection.close()


def test_update_fails_no_request_of_fresh_connection_clients(
    client: TfxDeploymentClient, tmp_path: Path
):
    created = client.create_deployment("load", str(tmp_path / "model"))
    url = urlparse(created["url"])
    host, port = str(url.hostname), int(url.port or 80)
    update_done = threading.Event()
    failures: list[str] = []
    sent = 0

    def update() -> None:
        try:
            client.update_deployment("load", config={"timeout": "61"})
        finally:
            update_done.set()

    updater = threading.Thread(target=update)
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        pending = set()
        deadline = time.monotonic() + 600
        settle_until = 0.0
        # keep sending until REQUESTS are done and the update has finished for a second
        while sent < REQUESTS or not update_done.is_set() or time.monotonic() < settle_until:
            assert time.monotonic() < deadline, "the load did not finish"
            if sent == REQUESTS // 6:
                updater.start()
            pending.add(pool.submit(_one_request, host, port, sent))
            sent += 1
            if len(pending) >= CONCURRENCY:
                done = {future for future in pending if future.done()}
                while not done:
                    time.sleep(0.001)
                    done = {future for future in pending if future.done()}
                failures.extend(f.result() for f in done if f.result() is not None)
                pending -= done
            if not update_done.is_set():
                settle_until = time.monotonic() + 1
        failures.extend(f.result() for f in pending if f.result() is not None)
    updater.join(60)

    assert updater.is_alive() is False
    updated = client.get_deployment("load")
    assert updated["pid"] != created["pid"] and updated["url"] == created["url"]
    assert sent >= REQUESTS
    assert failures == [], f"{len(failures)} of {sent} requests failed: {failures[:10]}"


def test_a_connection_the_old_server_accepted_is_served_after_its_sigterm(
    client: TfxDeploymentClient, tmp_path: Path
):
    """The race behind fresh-connection failures, made deterministic: a client connected to
    the old server sends its request only after that server got SIGTERM from ``update``."""
    created = client.create_deployment("held", str(tmp_path / "model"))
    url = urlparse(created["url"])
    held = http.client.HTTPConnection(str(url.hostname), int(url.port or 80), timeout=60)
    held.connect()
    time.sleep(0.3)  # the old server has accepted it; no request on it yet
    old_log = Path(client.store.read("held").log_path)
    updater = threading.Thread(
        target=client.update_deployment, args=("held",), kwargs={"config": {"timeout": "61"}}
    )
    updater.start()
    deadline = time.monotonic() + 120
    while "Stopping in" not in old_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the old server was never stopped"
        time.sleep(0.02)
    time.sleep(DRAIN_S / 2)  # a client slowed down by load, still inside the drain

    held.request("POST", "/v1/completions", body=COMPLETION, headers=_JSON)
    response = held.getresponse()

    assert response.status == 200, response.read()
    assert json.loads(response.read())["choices"]
    updater.join(60)
    assert client.get_deployment("held")["pid"] != created["pid"]
