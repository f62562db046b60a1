"""``-C backend=ray`` end to end: a real local Ray cluster, the real CLI, Serve's real proxy.

The module starts a Ray head (``--num-cpus 2``, as a user would: no token) and stops it
at the end; every deployment names it with ``-C ray_address``. A tiny GPT-2 chat model is
registered as ``chat`` v1 and v2 in a sqlite store; replicas fetch it from there
themselves. Replicas ask for half a CPU each, so that two of them and the one more a
rolling update starts fit on two CPUs. The head that the plugin starts itself (no cluster
running) is tested in test_ray_local_head.py, where no other cluster runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
import requests

import mlflow_tfx_plugin as tfx
from integration import servers
from integration.deploy_support import (
    CHAT,
    ROOT,
    cli,
    deployment_env,
    described,
    register_chat_models,
    wait_for,
)
from mlflow_tfx_plugin.deployments import TfxDeploymentClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

API_KEY = "ray-test-key-not-a-secret"
REPLICA = ("-C", "backend=ray", "-C", "num_cpus=0.5", "-C", "max_batch_size=4")


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return register_chat_models(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with servers.ray_head(tmp_path_factory.mktemp("ray")) as address:
        yield address


@pytest.fixture(scope="module")
def env(tracking_uri: str, ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return deployment_env(tracking_uri, tmp_path_factory.mktemp("tfx-state"))


def replica_pids(url: str, *, samples: int = 30) -> set[int]:
    """The replica pids answering ``/health`` behind Serve's proxy (sampled)."""
    return {requests.get(f"{url}/health", timeout=30).json()["pid"] for _ in range(samples)}


def keyed(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


class Load:
    """Chat requests, one after another from ``threads`` threads, until stopped; counts
    the answers and keeps every failure."""

    def __init__(self, url: str, *, threads: int = 2, body: dict[str, Any] = CHAT) -> None:
        self.url, self.body = url, body
        self.successes, self.failures = 0, []  # type: tuple[int, list[str]]
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(120)

    def _loop(self) -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        while not self._done.is_set():
            try:
                reply = requests.post(
                    f"{self.url}/v1/chat/completions", json=self.body, headers=headers, timeout=120
                )
            except requests.RequestException as err:
                self.failures.append(repr(err))
                continue
            if reply.status_code == 200 and reply.json()["choices"]:
                self.successes += 1
            else:
                self.failures.append(f"HTTP {reply.status_code}: {reply.text[:300]}")


# --- two replicas: concurrency, streaming, the key, a killed replica, a rolling update -----


@pytest.fixture(scope="module")
def duo(env: dict[str, str], ray_address: str) -> Iterator[dict[str, Any]]:
    keyed_env = {**env, "MLFLOW_TFX_API_KEY": API_KEY}
    started = time.monotonic()
    out = cli(
        keyed_env, "create", "-t", "tfx", "--name", "duo", "-m", "models:/chat/1", *REPLICA,
        "-C", "num_replicas=2", "-C", f"ray_address={ray_address}",
    )  # fmt: skip
    print(f"create took {time.monotonic() - started:.1f} s")
    assert "tfx deployment duo is created" in out.stdout
    yield {"env": keyed_env, **described(env, "duo")}
    cli(keyed_env, "delete", "-t", "tfx", "--name", "duo", check=False)


def test_get_reports_serve_status_replicas_and_url(duo: dict[str, Any], ray_address: str):
    assert duo["status"] == "running" and duo["serve_status"] == "RUNNING"
    assert duo["replicas"]["running"] == 2 and duo["replicas"]["target"] == 2
    assert duo["backend"] == "ray" and duo["ray_address"] == ray_address
    assert duo["url"].startswith("http://127.0.0.1:") and duo["url"].endswith("/duo")
    assert duo["config"]["num_replicas"] == 2 and duo["config"]["api_key"] == "***"
    assert "pid" not in duo and "local_model_dir" not in duo, "no process of ours to show"
    listed = cli(duo["env"], "list", "-t", "tfx").stdout
    assert "'name': 'duo'" in listed and "'status': 'running'" in listed


def test_two_replicas_answer_concurrent_and_streamed_requests(duo: dict[str, Any]):
    client = keyed(duo["url"])

    def complete(_: int) -> str:
        answer = client.chat.completions.create(model="duo", **CHAT)
        return answer.choices[0].finish_reason

    def stream(_: int) -> tuple[str, str | None]:
        chunks = list(client.chat.completions.create(model="duo", stream=True, **CHAT))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(12) as pool:
        finished = list(pool.map(complete, range(12)))
        streamed = list(pool.map(stream, range(6)))
    assert set(finished) <= {"stop", "length"} and len(finished) == 12
    assert all(reason in ("stop", "length") for _, reason in streamed)
    assert len(replica_pids(duo["url"])) == 2, "both replicas answer behind one URL"

    completion = client.completions.create(model="duo", prompt="Hello", max_tokens=4)
    assert completion.choices[0].text is not None
    assert [m.id for m in client.models.list()] == ["duo"]
    metrics = requests.get(
        f"{duo['url']}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    ).text
    assert 'route="/v1/chat/completions"' in metrics, "routes are labelled below /duo"


def test_predict_and_predict_stream_go_through_the_proxy(duo: dict[str, Any], tmp_path: Path):
    body = tmp_path / "body.json"
    body.write_text(json.dumps(CHAT))
    out = cli(duo["env"], "predict", "-t", "tfx", "--name", "duo", "-I", str(body)).stdout
    assert json.loads(out)["object"] == "chat.completion"
    client = TfxDeploymentClient(f"tfx:{duo['env']['MLFLOW_TFX_STATE_DIR']}")
    os.environ["MLFLOW_TFX_API_KEY"] = API_KEY
    try:
        chunks = list(client.predict_stream("duo", CHAT))
    finally:
        os.environ.pop("MLFLOW_TFX_API_KEY")
    assert chunks[0]["object"] == "chat.completion.chunk"


def test_the_api_key_is_enforced_through_the_proxy(duo: dict[str, Any], tmp_path: Path):
    url = duo["url"]
    anonymous = requests.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert requests.get(f"{url}/health", timeout=30).status_code == 200, "health stays open"
    unkeyed_env = {k: v for k, v in duo["env"].items() if k != "MLFLOW_TFX_API_KEY"}
    body = tmp_path / "body.json"
    body.write_text(json.dumps(CHAT))
    refused = cli(
        unkeyed_env, "predict", "-t", "tfx", "--name", "duo", "-I", str(body), check=False
    )
    assert refused.returncode != 0 and "requires an API key" in refused.stderr


def test_a_killed_replica_is_replaced_while_requests_keep_being_answered(duo: dict[str, Any]):
    before = replica_pids(duo["url"])
    victim = min(before)
    with Load(duo["url"]) as load:
        time.sleep(1)
        os.kill(victim, signal.SIGKILL)
        answered_at_kill = load.successes
        restored = wait_for(
            lambda: (pids := replica_pids(duo["url"], samples=20)) - before and len(pids) == 2,
            timeout=120,
            what="Serve to start a replacement replica",
        )
        time.sleep(2)
    assert restored
    assert load.successes - answered_at_kill >= 10, "requests kept being answered"
    # only a request the killed replica was working on can fail
    assert len(load.failures) <= 2, load.failures
    assert described(duo["env"], "duo")["replicas"]["running"] == 2


def test_update_is_a_rolling_update_with_no_failed_request(duo: dict[str, Any]):
    before = replica_pids(duo["url"])
    with Load(duo["url"]) as load:
        time.sleep(1)
        started = time.monotonic()
        cli(duo["env"], "update", "-t", "tfx", "--name", "duo", "-m", "models:/chat/2")
        print(f"update took {time.monotonic() - started:.1f} s")
        time.sleep(1)
    assert load.failures == [], load.failures
    assert load.successes > 10
    after = described(duo["env"], "duo")
    assert after["model_version"] == "2" and after["replicas"]["running"] == 2
    assert after["config"]["num_replicas"] == 2, "the config is kept over an update"
    assert replica_pids(duo["url"]).isdisjoint(before), "every replica was replaced"


# --- autoscaling, failures, delete ---------------------------------------------------------


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(
    env: dict[str, str], ray_address: str
):
    cli(
        env, "create", "-t", "tfx", "--name", "elastic", "-m", "models:/chat/1", *REPLICA,
        "-C", f"ray_address={ray_address}", "-C", "min_replicas=1", "-C", "max_replicas=2",
        "-C", "target_ongoing_requests=1", "-C", "upscale_delay_s=1", "-C", "downscale_delay_s=2",
    )  # fmt: skip
    try:
        state = described(env, "elastic")
        assert state["replicas"]["running"] == 1
        url = state["url"]
        slow = {**CHAT, "max_tokens": 64}
        with Load(url, threads=4, body=slow) as load:
            wait_for(
                lambda: described(env, "elastic")["replicas"]["running"] == 2,
                timeout=120,
                what="a second replica under load",
            )
        assert load.failures == [], load.failures
        wait_for(
            lambda: described(env, "elastic")["replicas"]["running"] == 1,
            timeout=180,
            what="the second replica to go once the load stopped",
        )
    finally:
        cli(env, "delete", "-t", "tfx", "--name", "elastic", check=False)


def test_a_replica_that_fails_to_load_fails_create_with_its_error(
    env: dict[str, str], ray_address: str, tmp_path: Path
):
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    broken = tmp_path / "broken"
    tfx.save_model(str(tiny_models.build_gpt2(tmp_path / "gpt2")), str(broken), task="llm/v1/chat")
    for path in broken.rglob("config.json"):  # the checkpoint's config no longer parses
        path.write_text("{ not json")
    out = cli(
        env, "create", "-t", "tfx", "--name", "broken", "-m", str(broken), *REPLICA,
        "-C", f"ray_address={ray_address}", check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert "failed to deploy" in out.stderr and "config.json" in out.stderr, out.stderr[-3000:]
    assert "broken" not in cli(env, "list", "-t", "tfx").stdout, "nothing is left behind"


def test_delete_leaves_no_replica_and_keeps_a_head_we_did_not_start(
    env: dict[str, str], ray_address: str
):
    cli(
        env, "create", "-t", "tfx", "--name", "brief", "-m", "models:/chat/1", *REPLICA,
        "-C", f"ray_address={ray_address}",
    )  # fmt: skip
    pids = replica_pids(described(env, "brief")["url"])
    cli(env, "delete", "-t", "tfx", "--name", "brief")
    wait_for(
        lambda: not any(psutil.pid_exists(pid) for pid in pids),
        timeout=60,
        what="the replica processes to exit",
    )
    assert "brief" not in cli(env, "list", "-t", "tfx").stdout
    host, port = ray_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5):
        pass  # the test's own head still runs
