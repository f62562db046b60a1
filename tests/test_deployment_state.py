"""Deployment records on disk and the process lifecycle, against a stand-in server script.

The stand-in speaks the server contract (``/health`` with its pid, bearer auth, SSE ending in
``[DONE]``, a port shared with ``SO_REUSEPORT``, SIGTERM exits 0) in a few lines of
``http.server``, so these tests need no model.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import psutil
import pytest
import requests
from mlflow.exceptions import MlflowException

from mlflow_tfx_plugin.deployments import TfxDeploymentClient, process, resolve
from mlflow_tfx_plugin.deployments import client as tfx_client
from mlflow_tfx_plugin.deployments.config import API_KEY_ENV, parse_config
from mlflow_tfx_plugin.deployments.state import KEPT_LOGS, DeploymentRecord, DeploymentStore
from mlflow_tfx_plugin.errors import InvalidInputError, ModelNotFoundError, TfxError

STAND_IN = r"""
import argparse, json, os, signal, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
for flag in ("--model-dir", "--name", "--config-json"):
    parser.add_argument(flag)
args = parser.parse_args()
config = json.loads(args.config_json)
print("stand-in starting", args.name, flush=True)
if os.environ.get("STANDIN_FAIL"):
    print("boom: the model could not be loaded", flush=True)
    sys.exit(3)
ready_at = time.time() + float(os.environ.get("STANDIN_DELAY", "0"))
key = os.environ.get("MLFLOW_TFX_API_KEY")


def error(message, param, code):
    return {"error": {"message": message, "type": "x", "param": param, "code": code}}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _json(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path != "/health":
            return self._json(404, error("no route", None, 404))
        ok = time.time() >= ready_at
        state = {"status": "ready" if ok else "loading", "pid": os.getpid()}
        self._json(200 if ok else 503, state)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            return self._json(401, error("bad key", None, 401))
        if body.get("fail"):
            return self._json(400, error("bad field", "fail", 400))
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i in range(2):
                self.wfile.write(f"data: {json.dumps({'i': i})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            return
        argv_has_key = bool(key) and any(key in arg for arg in sys.argv)
        self._json(200, {"route": self.path, "body": body, "pid": os.getpid(),
                         "config": config, "argv_has_key": argv_has_key})


class Server(ThreadingHTTPServer):
    allow_reuse_port = not os.environ.get("STANDIN_EXCLUSIVE_PORT")


server = Server((config["host"], config["port"]), Handler)
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
server.serve_forever()
print("stand-in stopped", flush=True)
"""

MLMODEL = "artifact_path: model\nflavors:\n  tfx:\n    task: llm/v1/chat\n"


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    (path / "MLmodel").write_text(MLMODEL)
    return path


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TfxDeploymentClient]:
    """A client whose servers are the stand-in script; every server is stopped at the end."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)

    def command(model_dir: Any, name: str, arguments: Any, listen_after_load: bool = False):
        argv = ["--model-dir", str(model_dir), "--name", name]
        return [sys.executable, str(script), *argv, "--config-json", json.dumps(arguments)]

    monkeypatch.setattr(process, "server_command", command)
    monkeypatch.setenv(process.STARTUP_TIMEOUT_ENV, "20")
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.setattr(tfx_client, "SWITCH_GRACE_SECONDS", 0.1)
    client = TfxDeploymentClient(f"tfx:{tmp_path / 'state'}")
    started: list[DeploymentRecord] = []
    real_write = client.store.write

    def remembering_write(record: DeploymentRecord) -> None:
        started.append(record)
        real_write(record)

    monkeypatch.setattr(client.store, "write", remembering_write)
    try:
        yield client
    finally:
        for record in started:
            process.stop(record.pid, record.pid_create_time, grace=5)


def _record(store: DeploymentStore, name: str = "chat", **overrides: Any) -> DeploymentRecord:
    values: dict[str, Any] = {
        "name": name,
        "model_uri": "models:/chat@prod",
        "resolved_model_uri": "models:/chat/3",
        "local_model_dir": "/models/chat",
        "pid": os.getpid(),
        "pid_create_time": psutil.Process().create_time(),
        "host": "127.0.0.1",
        "port": 5001,
        "url": "http://127.0.0.1:5001",
        "log_path": str(store.root / "logs" / f"{name}.log"),
        "config": parse_config({"api_key": "s3cret-key"}, environ={}).to_public_dict(),
    }
    values.update(overrides)
    return DeploymentRecord(**values)


# --- the store -----------------------------------------------------------------------------


def test_record_round_trip_and_atomic_write(tmp_path: Path):
    store = DeploymentStore(tmp_path)
    record = _record(store)
    store.write(record)
    assert store.read("chat") == record
    assert [r.name for r in store.records()] == ["chat"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["chat.json", "chat.lock"]
    assert oct(os.stat(tmp_path / "chat.json").st_mode & 0o777) == "0o600"
    store.remove("chat")
    assert store.read("chat") is None and store.records() == []


def test_record_files_hold_no_secret(tmp_path: Path):
    store = DeploymentStore(tmp_path)
    store.write(_record(store))
    text = (tmp_path / "chat.json").read_text()
    assert "s3cret-key" not in text
    assert json.loads(text)["config"]["api_key"] == "***"
    leaky = _record(store, config={"api_key": "s3cret-key"})
    with pytest.raises(TfxError, match="API key"):
        store.write(leaky)
    assert "s3cret-key" not in (tmp_path / "chat.json").read_text()


def test_unknown_fields_from_other_versions_are_ignored(tmp_path: Path):
    store = DeploymentStore(tmp_path)
    data = _record(store).to_dict() | {"written_by_a_future_version": 1}
    (tmp_path / "chat.json").write_text(json.dumps(data))
    assert store.read("chat") == _record(store)


def test_corrupt_record_names_the_file(tmp_path: Path):
    (tmp_path / "chat.json").write_text("{not json")
    with pytest.raises(TfxError, match=r"chat\.json"):
        DeploymentStore(tmp_path).read("chat")


@pytest.mark.parametrize("name", ["", "a b", "../x", "x/y", ".hidden", "-dash", "x" * 65, None])
def test_bad_names_are_rejected(tmp_path: Path, name: Any):
    with pytest.raises(InvalidInputError):
        DeploymentStore(tmp_path).record_path(name)


def _hammer(root: str, writer: int, rounds: int) -> None:
    store = DeploymentStore(root)
    for i in range(rounds):
        store.write(_record(store, port=writer * 1000 + i, pid=writer))


def test_concurrent_writers_never_leave_a_torn_record(tmp_path: Path):
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_hammer, args=(str(tmp_path), w, 40)) for w in (1, 2, 3)]
    for proc in writers:
        proc.start()
    store = DeploymentStore(tmp_path)
    seen = 0
    while any(proc.is_alive() for proc in writers):
        record = store.read("chat")  # raises on a half-written file
        seen += record is not None
    for proc in writers:
        proc.join()
        assert proc.exitcode == 0
    final = store.read("chat")
    assert final is not None and final.port % 1000 == 39
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"


def test_lock_excludes_other_threads(tmp_path: Path):
    store = DeploymentStore(tmp_path)
    inside: list[int] = []
    overlaps: list[bool] = []

    def work(i: int) -> None:
        for _ in range(20):
            with store.lock("chat"):
                inside.append(i)
                overlaps.append(len(inside) > 1)
                time.sleep(0.001)
                inside.remove(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(overlaps) == 80 and not any(overlaps)


def test_lock_timeout_names_the_deployment(tmp_path: Path):
    store = DeploymentStore(tmp_path)
    waited: list[bool] = []
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with store.lock("chat"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    try:
        with (
            pytest.raises(TfxError, match="'chat' is in progress"),
            store.lock("chat", timeout=0.2, on_wait=lambda: waited.append(True)),
        ):
            pass
    finally:
        release.set()
        thread.join()
    assert waited == [True]


def test_model_cache_downloads_once(tmp_path: Path):
    store = DeploymentStore(tmp_path)
    calls: list[Path] = []

    def download(tmp: Path) -> Path:
        calls.append(tmp)
        (tmp / "model").mkdir()
        (tmp / "model" / "MLmodel").write_text(MLMODEL)
        time.sleep(0.05)
        return tmp / "model"

    results: list[tuple[Path, bool]] = []
    threads = [
        threading.Thread(target=lambda: results.append(store.cached_model("k-1", download)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert sorted(fresh for _, fresh in results) == [False, False, True]
    assert {path for path, _ in results} == {tmp_path / "models" / "k-1"}
    assert (tmp_path / "models" / "k-1" / "MLmodel").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")] == []


def test_failed_download_leaves_no_cache_entry(tmp_path: Path):
    store = DeploymentStore(tmp_path)

    def broken(tmp: Path) -> Path:
        (tmp / "partial").write_text("x")
        raise OSError("network down")

    with pytest.raises(OSError, match="network down"):
        store.cached_model("k-2", broken)
    assert not (tmp_path / "models" / "k-2").exists()
    assert [p.name for p in (tmp_path / "models").iterdir() if p.suffix != ".lock"] == []


# --- processes -----------------------------------------------------------------------------


def test_is_running_compares_the_start_time():
    me = psutil.Process()
    assert process.is_running(me.pid, me.create_time())
    assert not process.is_running(me.pid, me.create_time() - 100), "pid reused by another program"
    assert not process.is_running(None, None)


def test_dead_and_zombie_processes_are_not_running():
    proc = psutil.Popen([sys.executable, "-c", "pass"])
    created = proc.create_time()
    deadline = time.monotonic() + 20
    while proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)  # exited but not yet reaped: a zombie
    assert not process.is_running(proc.pid, created)
    assert not psutil.pid_exists(proc.pid) or proc.status() != psutil.STATUS_ZOMBIE


def test_stop_escalates_to_sigkill(tmp_path: Path):
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    server = process.start_detached(
        [sys.executable, "-c", stubborn], os.environ, tmp_path / "log.txt"
    )
    time.sleep(0.5)  # let it install the handler
    assert process.stop(server.pid, server.create_time, grace=0.5) is False
    assert not process.is_running(server.pid, server.create_time)


def test_free_port_and_busy_port(tmp_path: Path):
    port = process.free_port("127.0.0.1")
    process.check_port_free("127.0.0.1", port)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        with pytest.raises(InvalidInputError, match=f"127.0.0.1:{port}"):
            process.check_port_free("127.0.0.1", port)


def test_startup_timeout_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(process.STARTUP_TIMEOUT_ENV, raising=False)
    assert process.startup_timeout() == 600
    monkeypatch.setenv(process.STARTUP_TIMEOUT_ENV, "12.5")
    assert process.startup_timeout() == 12.5
    monkeypatch.setenv(process.STARTUP_TIMEOUT_ENV, "soon")
    with pytest.raises(TfxError, match="MLFLOW_TFX_STARTUP_TIMEOUT"):
        process.startup_timeout()


# --- lifecycle through the client, with the stand-in server ---------------------------------


def test_lifecycle(client: TfxDeploymentClient, model_dir: Path):
    created = client.create_deployment("chat", str(model_dir), config={"max_batch_size": "4"})
    assert created["name"] == "chat" and created["flavor"] == "tfx"
    assert created["status"] == "running" and created["config"]["max_batch_size"] == 4
    assert created["url"] == f"http://127.0.0.1:{created['port']}"
    assert Path(created["log_path"]).parent == client.store.root / "logs"
    assert client.get_deployment("chat")["pid"] == created["pid"]
    assert [d["name"] for d in client.list_deployments()] == ["chat"]

    answer = client.predict("chat", {"messages": [{"role": "user", "content": "hi"}]})
    assert answer["route"] == "/v1/chat/completions"
    assert json.loads(answer.to_json())["route"] == "/v1/chat/completions"  # the CLI prints this
    assert answer["config"]["port"] == created["port"]
    assert client.predict(endpoint="chat", inputs={"input": ["a"]})["route"] == "/v1/embeddings"
    both = client.predict("chat", [{"prompt": "a"}, {"inputs": ["x"]}])
    assert [p["route"] for p in both["predictions"]] == ["/v1/completions", "/invocations"]
    assert list(client.predict_stream("chat", {"prompt": "a"})) == [{"i": 0}, {"i": 1}]
    with pytest.raises(InvalidInputError, match="predict_stream takes one chat"):
        client.predict_stream("chat", {"input": ["a"]})  # raises before any iteration
    with pytest.raises(InvalidInputError, match="bad field") as info:
        client.predict("chat", {"prompt": "a", "fail": True})
    assert info.value.param == "fail"
    with pytest.raises(InvalidInputError, match="predict_stream"):
        client.predict("chat", {"prompt": "a", "stream": True})

    client.delete_deployment("chat")
    assert not process.is_running(created["pid"], created["pid_create_time"])
    assert Path(created["log_path"]).exists(), "the last log stays, for a post-mortem"
    assert not (client.store.root / "chat.lock").exists()
    with pytest.raises(ModelNotFoundError) as info:
        client.get_deployment("chat")
    assert info.value.get_http_status_code() == 404
    with pytest.raises(ModelNotFoundError, match="No tfx deployment named 'chat'"):
        client.delete_deployment("chat")
    with pytest.raises(ModelNotFoundError):
        client.update_deployment("never-existed", config={"timeout": "5"})
    assert sorted(p.name for p in client.store.root.glob("*.lock")) == []


def test_create_refuses_a_running_deployment(client: TfxDeploymentClient, model_dir: Path):
    client.create_deployment("chat", str(model_dir))
    with pytest.raises(TfxError, match=r"already exists.*update") as info:
        client.create_deployment("chat", str(model_dir))
    assert info.value.error_code == "RESOURCE_ALREADY_EXISTS"


def test_concurrent_creates_one_wins(
    client: TfxDeploymentClient, model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("STANDIN_DELAY", "0.5")
    outcomes: list[str] = []

    def create() -> None:
        try:
            client.create_deployment("chat", str(model_dir))
            outcomes.append("created")
        except TfxError as err:
            outcomes.append(err.error_code)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["RESOURCE_ALREADY_EXISTS", "created"]
    assert len(client.list_deployments()) == 1


def test_failed_start_reports_the_log_and_records_nothing(
    client: TfxDeploymentClient, model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("STANDIN_FAIL", "1")
    with pytest.raises(TfxError, match="exited before it was ready") as info:
        client.create_deployment("chat", str(model_dir))
    assert "boom: the model could not be loaded" in info.value.message
    assert client.list_deployments() == []


def test_startup_timeout_kills_the_server(
    client: TfxDeploymentClient, model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("STANDIN_DELAY", "60")
    monkeypatch.setenv(process.STARTUP_TIMEOUT_ENV, "1")
    spawned = _remember_spawned(monkeypatch)
    with pytest.raises(TfxError, match="not ready within 1 s") as info:
        client.create_deployment("chat", str(model_dir))
    assert "stand-in starting" in info.value.message
    assert not process.is_running(spawned[0].pid, spawned[0].create_time)


def test_killed_server_is_dead_then_cleaned_up(client: TfxDeploymentClient, model_dir: Path):
    created = client.create_deployment("chat", str(model_dir))
    os.kill(created["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while client.get_deployment("chat")["status"] != "dead" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get_deployment("chat")["status"] == "dead"
    assert client.list_deployments()[0]["status"] == "dead"
    with pytest.raises(TfxError, match=r"'chat' is not running \(pid \d+ exited\); see log"):
        client.predict("chat", {"prompt": "a"})
    again = client.create_deployment("chat", str(model_dir))  # a dead one is replaced
    assert again["status"] == "running" and again["pid"] != created["pid"]
    client.delete_deployment("chat")
    assert client.list_deployments() == []


def test_update_keeps_the_url_and_stops_the_old_server(
    client: TfxDeploymentClient, model_dir: Path
):
    old = client.create_deployment("chat", str(model_dir), config={"timeout": "5"})
    new = client.update_deployment("chat", config={"max_batch_size": "2"})
    assert (new["url"], new["port"]) == (old["url"], old["port"]) and new["pid"] != old["pid"]
    assert new["config"]["timeout"] == 5.0 and new["config"]["max_batch_size"] == 2
    assert new["config"]["port"] is None  # still "a free port chosen at create time"
    assert new["created_at"] == old["created_at"]
    assert not process.is_running(old["pid"], old["pid_create_time"])
    assert Path(old["log_path"]).exists(), "the old server's log stays, for a post-mortem"
    assert client.predict("chat", {"prompt": "a"})["config"]["max_batch_size"] == 2


def test_update_on_the_same_fixed_port_keeps_serving_there(
    client: TfxDeploymentClient, model_dir: Path
):
    port = process.free_port()
    old = client.create_deployment("chat", str(model_dir), config={"port": str(port)})
    new = client.update_deployment("chat", config={"port": str(port), "timeout": "7"})
    assert (new["url"], new["port"]) == (old["url"], port) and new["pid"] != old["pid"]
    assert not process.is_running(old["pid"], old["pid_create_time"])
    answer = client.predict("chat", {"prompt": "a"})
    assert (answer["pid"], answer["config"]["timeout"]) == (new["pid"], 7.0)


def test_update_waits_for_the_new_server_not_the_old_one(
    client: TfxDeploymentClient, model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    old = client.create_deployment("chat", str(model_dir))
    monkeypatch.setenv("STANDIN_DELAY", "1.5")  # the old server answers /health meanwhile
    new = client.update_deployment("chat", config={"timeout": "7"})
    health = requests.get(f"{old['url']}/health", timeout=5)
    assert (health.status_code, health.json()["pid"]) == (200, new["pid"])
    assert not process.is_running(old["pid"], old["pid_create_time"])


def test_update_to_another_port_moves_the_deployment(client: TfxDeploymentClient, model_dir: Path):
    old = client.create_deployment("chat", str(model_dir))
    port = process.free_port()
    new = client.update_deployment("chat", config={"port": str(port)})
    assert new["url"] == f"http://127.0.0.1:{port}" != old["url"]
    assert not process.is_running(old["pid"], old["pid_create_time"])
    assert client.predict("chat", {"prompt": "a"})["pid"] == new["pid"]


def test_failed_update_keeps_the_old_server(
    client: TfxDeploymentClient, model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    old = client.create_deployment("chat", str(model_dir))
    spawned = _remember_spawned(monkeypatch)
    monkeypatch.setenv("STANDIN_FAIL", "1")
    with pytest.raises(TfxError, match="boom"):
        client.update_deployment("chat", config={"max_batch_size": "2"})
    assert client.get_deployment("chat") == old
    assert client.predict("chat", {"prompt": "a"})["pid"] == old["pid"]
    assert not process.is_running(spawned[0].pid, spawned[0].create_time)


def test_update_that_times_out_kills_the_new_server_only(
    client: TfxDeploymentClient, model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    old = client.create_deployment("chat", str(model_dir))
    spawned = _remember_spawned(monkeypatch)
    monkeypatch.setenv("STANDIN_DELAY", "60")
    monkeypatch.setenv(process.STARTUP_TIMEOUT_ENV, "1")
    with pytest.raises(TfxError, match="not ready within 1 s"):
        client.update_deployment("chat", config={"timeout": "7"})
    assert not process.is_running(spawned[0].pid, spawned[0].create_time)
    assert client.get_deployment("chat") == old
    assert client.predict("chat", {"prompt": "a"})["pid"] == old["pid"]


def test_update_beside_a_server_that_does_not_share_its_port(
    client: TfxDeploymentClient, model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("STANDIN_EXCLUSIVE_PORT", "1")  # as servers before SO_REUSEPORT
    old = client.create_deployment("chat", str(model_dir))
    monkeypatch.delenv("STANDIN_EXCLUSIVE_PORT")
    with pytest.raises(InvalidInputError, match=r"beside the running server.*-C port=") as info:
        client.update_deployment("chat", config={"timeout": "7"})
    assert info.value.param == "port"
    assert client.get_deployment("chat") == old


def _remember_spawned(monkeypatch: pytest.MonkeyPatch) -> list[process.ServerProcess]:
    """Servers started from now on, in order."""
    spawned: list[process.ServerProcess] = []
    real_start = process.start_detached

    def start(*args: Any) -> process.ServerProcess:
        spawned.append(real_start(*args))
        return spawned[-1]

    monkeypatch.setattr(process, "start_detached", start)
    return spawned


def test_update_of_unknown_deployment(client: TfxDeploymentClient):
    with pytest.raises(ModelNotFoundError):
        client.update_deployment("nope", config={"timeout": "7"})


def test_bad_config_fails_before_anything_starts(client: TfxDeploymentClient, model_dir: Path):
    with pytest.raises(InvalidInputError, match="Valid keys: backend, host, port"):
        client.create_deployment("chat", str(model_dir), config={"batch": "4"})
    assert client.list_deployments() == []


def test_api_key_travels_by_environment_only(
    client: TfxDeploymentClient, model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    created = client.create_deployment("chat", str(model_dir), config={"api_key": "s3cret-key"})
    assert created["config"]["api_key"] == "***"
    state_text = "".join(
        p.read_text(errors="replace") for p in client.store.root.rglob("*") if p.is_file()
    )
    assert "s3cret-key" not in state_text
    assert "s3cret-key" not in " ".join(psutil.Process(created["pid"]).cmdline())
    with pytest.raises(TfxError, match=API_KEY_ENV):
        client.predict("chat", {"prompt": "a"})
    monkeypatch.setenv(API_KEY_ENV, "wrong")
    with pytest.raises(MlflowException, match="HTTP 401") as info:
        client.predict("chat", {"prompt": "a"})
    assert info.value.get_http_status_code() == 401
    monkeypatch.setenv(API_KEY_ENV, "s3cret-key")
    assert client.predict("chat", {"prompt": "a"})["argv_has_key"] is False


def test_model_that_is_not_tfx_is_rejected(client: TfxDeploymentClient, tmp_path: Path):
    other = tmp_path / "sk"
    other.mkdir()
    (other / "MLmodel").write_text("flavors:\n  sklearn: {}\n")
    with pytest.raises(InvalidInputError, match="flavors"):
        client.create_deployment("chat", str(other))
    with pytest.raises(ModelNotFoundError):
        client.create_deployment("chat", str(tmp_path / "missing"))


# --- model resolution ----------------------------------------------------------------------


def test_registry_uris_resolve_to_one_pinned_version(tracking_uri: str, model_dir: Path):
    registry = mlflow.MlflowClient()
    registry.create_registered_model("chat")
    for _ in range(2):
        registry.create_model_version("chat", str(model_dir))
    registry.set_registered_model_alias("chat", "prod", "1")

    by_alias = resolve.resolve_model("models:/chat@prod")
    by_version = resolve.resolve_model("models:/chat/1")
    latest = resolve.resolve_model("models:/chat/latest")
    assert (by_alias.resolved_model_uri, by_alias.model_version) == ("models:/chat/1", "1")
    assert by_alias.registered_model_name == "chat" and by_alias.model_uri == "models:/chat@prod"
    assert by_alias.cache_key == by_version.cache_key, "one download for alias and version"
    assert (latest.resolved_model_uri, latest.model_version) == ("models:/chat/2", "2")
    with pytest.raises(ModelNotFoundError, match="models:/chat@nope"):
        resolve.resolve_model("models:/chat@nope")


def test_other_uris_resolve(model_dir: Path):
    local = resolve.resolve_model(str(model_dir))
    assert local.cache_key is None and local.resolved_model_uri == str(model_dir.resolve())
    assert resolve.resolve_model(model_dir.as_uri()).resolved_model_uri == local.resolved_model_uri
    run = resolve.resolve_model("runs:/0123abc/model")
    assert run.run_id == "0123abc" and run.cache_key and run.cache_key.startswith("run-0123abc-")
    with pytest.raises(InvalidInputError):
        resolve.resolve_model("")


# --- damaged state, cleanup and what list shows ---------------------------------------------


CORRUPTIONS: dict[str, tuple[Any, bool]] = {
    # name: (how the file is rewritten, whether its server's pid can still be read)
    "a list": (lambda text: "[]", False),
    "pid not a number": (lambda text: text.replace('"pid": ', '"pid": "abc", "was": '), False),
    "config null": (lambda text: json.dumps({**json.loads(text), "config": None}), True),
    "truncated": (lambda text: text[: text.index(",", text.index('"pid_create_time"'))], True),
    "truncated early": (lambda text: text[:40], False),
}


@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
def test_a_corrupt_record_is_listed_and_deleted_with_its_server(
    client: TfxDeploymentClient, model_dir: Path, damage: str
):
    rewrite, pid_readable = CORRUPTIONS[damage]
    good = client.create_deployment("good", str(model_dir))
    bad = client.create_deployment("bad", str(model_dir))
    path = client.store.record_path("bad")
    path.write_text(rewrite(path.read_text()))

    assert client.list_deployments() == [
        {"name": "bad", "status": "corrupt", "url": None, "record": str(path)},
        {"name": "good", "status": "running", "url": good["url"]},
    ]
    with pytest.raises(TfxError, match=r"is corrupt.*mlflow deployments delete -t tfx --name bad"):
        client.get_deployment("bad")

    client.delete_deployment("bad")

    assert not path.exists() and not (client.store.root / "bad.lock").exists()
    assert process.is_running(bad["pid"], bad["pid_create_time"]) is not pid_readable
    assert [d["name"] for d in client.list_deployments()] == ["good"]
    process.stop(bad["pid"], bad["pid_create_time"], grace=5)


def test_delete_removes_the_model_copy_only_when_nothing_uses_it(
    client: TfxDeploymentClient, tmp_path: Path
):
    copy = client.store.root / "models" / "chat-v3"
    copy.mkdir(parents=True)
    (copy / "MLmodel").write_text(MLMODEL)
    client.create_deployment("one", str(copy))
    client.create_deployment("two", str(copy))

    client.delete_deployment("one")
    assert copy.is_dir(), "deployment 'two' still serves it"
    client.delete_deployment("two")
    assert not copy.exists()
    assert list((client.store.root / "models").iterdir()) == [], "no lock file left either"
    assert sorted(p.name for p in client.store.root.iterdir()) == ["logs", "models"]


def test_only_the_newest_logs_of_a_name_are_kept(tmp_path: Path):
    store = DeploymentStore(tmp_path)
    made = []
    for _ in range(KEPT_LOGS + 3):
        made.append(store.new_log_path("chat"))
        made[-1].write_text("a server log")
        time.sleep(0.01)  # distinct modification times
    store.new_log_path("other").write_text("another deployment's log")

    kept = sorted((tmp_path / "logs").glob("chat-*.log"))
    assert kept == sorted(made[-KEPT_LOGS:])
    assert (tmp_path / "logs").glob("other-*.log")


def test_an_unwritable_state_dir_is_a_one_line_error_naming_it(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o500)
    if os.access(state, os.W_OK):  # root ignores permission bits: simulate the refusal
        real_mkdir = Path.mkdir

        def read_only(self: Path, *args: Any, **kwargs: Any) -> None:
            if self.is_relative_to(state):
                raise PermissionError(13, "Permission denied", str(self))
            real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
    client = TfxDeploymentClient(f"tfx:{state}")
    try:
        with pytest.raises(TfxError) as info:
            client.create_deployment("chat", str(model_dir))
    finally:
        state.chmod(0o700)
    message = info.value.message
    assert str(state) in message and "Permission denied" in message
    assert "MLFLOW_TFX_STATE_DIR" in message and "\n" not in message
