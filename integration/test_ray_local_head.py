"""``-C backend=ray`` with no cluster anywhere: the plugin starts a local head and stops it.

Nothing else runs Ray while this module runs (test_ray_backend.py's head is stopped by its
module fixture). The first ``create`` starts a head with a token of its own; a second
deployment shares it; the head outlives the first ``delete`` and goes with the last one,
its processes, record, token and temp dir with it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from integration.deploy_support import CHAT, cli, deployment_env, described, register_chat_models
from mlflow_tfx_plugin.deployments import ray_cluster
from mlflow_tfx_plugin.deployments.state import DeploymentStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPLICA = ("-C", "backend=ray", "-C", "num_cpus=0.5", "-C", "max_batch_size=4")


def running_raylets() -> list[int]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        if proc.info.get("status") == psutil.STATUS_ZOMBIE:  # dead, not yet reaped
            continue
        args = " ".join(proc.info.get("cmdline") or [])
        if proc.info.get("name") == "raylet" or "/raylet " in args:
            found.append(proc.pid)
    return found


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    assert not running_raylets(), "this module needs a machine where no Ray cluster runs"
    tracking_uri = register_chat_models(tmp_path_factory.mktemp("registry"))
    environ = deployment_env(tracking_uri, tmp_path_factory.mktemp("tfx-state"))
    yield environ
    store = DeploymentStore(Path(environ["MLFLOW_TFX_STATE_DIR"]))
    head = ray_cluster.read_head(store)
    if head is not None:  # a failed test left it: stop it all the same
        for name in ("one", "two"):
            cli(environ, "delete", "-t", "tfx", "--name", name, check=False)
        for proc in ray_cluster.head_processes(head):
            proc.kill()


def test_the_plugin_starts_one_head_shares_it_and_stops_it_with_the_last_deployment(
    env: dict[str, str],
):
    store = DeploymentStore(Path(env["MLFLOW_TFX_STATE_DIR"]))

    first = cli(env, "create", "-t", "tfx", "--name", "one", "-m", "models:/chat/1", *REPLICA)
    assert "No Ray cluster found: starting a local Ray head" in first.stderr + first.stdout
    head = ray_cluster.read_head(store)
    assert head is not None and head.address.startswith("127.0.0.1:")
    token = Path(head.token_path)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600, "only the owner may read the token"
    assert ray_cluster.head_processes(head), "the head's processes run"
    one = described(env, "one")
    assert one["status"] == "running" and one["ray_address"] == head.address
    reply = requests.post(f"{one['url']}/v1/chat/completions", json=CHAT, timeout=120)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]

    second = cli(env, "create", "-t", "tfx", "--name", "two", "-m", "models:/chat/2", *REPLICA)
    assert "starting a local Ray head" not in second.stderr + second.stdout
    assert ray_cluster.read_head(store) == head, "the second deployment shares the head"
    assert described(env, "two")["ray_address"] == head.address

    cli(env, "delete", "-t", "tfx", "--name", "one")
    assert head.is_alive() and ray_cluster.read_head(store) == head, "two still runs on it"
    assert described(env, "two")["status"] == "running"

    last = cli(env, "delete", "-t", "tfx", "--name", "two")
    assert "stopping the head" in last.stderr + last.stdout
    assert not ray_cluster.head_processes(head), "no process of the head is left"
    assert not head.is_alive()
    assert ray_cluster.read_head(store) is None and not token.exists()
    assert not Path(head.temp_dir).exists()
    assert "'name'" not in cli(env, "list", "-t", "tfx").stdout


def test_the_head_refuses_a_driver_without_its_token(env: dict[str, str]):
    create = cli(env, "create", "-t", "tfx", "--name", "one", "-m", "models:/chat/1", *REPLICA)
    assert create.returncode == 0
    head = ray_cluster.read_head(DeploymentStore(Path(env["MLFLOW_TFX_STATE_DIR"])))
    assert head is not None
    stranger = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    attach = f"import ray; ray.init(address={head.address!r}); print('attached')"
    command = [sys.executable, "-c", attach]
    try:
        done = subprocess.run(command, env=stranger, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        done = None  # refused by hanging is still refused
    assert done is None or (done.returncode != 0 and "attached" not in done.stdout)
    cli(env, "delete", "-t", "tfx", "--name", "one")
    assert not head.is_alive()
