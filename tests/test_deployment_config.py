"""The tfx deployment target without servers: -C parsing, help text, predict input shaping."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from mlflow_tfx_plugin.deployments import client as tfx_client
from mlflow_tfx_plugin.deployments import payloads, target_help
from mlflow_tfx_plugin.deployments.config import (
    API_KEY_ENV,
    DeploymentConfig,
    parse_config,
    valid_keys,
)
from mlflow_tfx_plugin.deployments.state import DeploymentRecord
from mlflow_tfx_plugin.errors import InvalidInputError

# --- parse_config ----------------------------------------------------------------------------

VALID = [
    ({}, {"host": "127.0.0.1", "port": None, "max_batch_size": None, "timeout": 60.0}),
    ({"port": "8080"}, {"port": 8080}),
    ({"port": "0"}, {"port": 0}),
    ({"port": ""}, {"port": None}),
    ({"port": "none"}, {"port": None}),
    ({"max_batch_size": "4"}, {"max_batch_size": 4}),
    ({"prefix_caching": "false"}, {"prefix_caching": False}),
    ({"timeout": "2.5"}, {"timeout": 2.5}),
    ({"max_tokens_limit": "128"}, {"max_tokens_limit": 128}),
    ({"torch_dtype": "torch.bfloat16"}, {"torch_dtype": "bfloat16"}),
    ({"torch_dtype": "auto"}, {"torch_dtype": "auto"}),
    ({"device": "cpu"}, {"device": "cpu"}),
    ({"host": "0.0.0.0", "api_key": "k"}, {"host": "0.0.0.0"}),
    ({"max_batch_size": 8}, {"max_batch_size": 8}),  # already typed (Python callers)
    ({"batch_decoding": "greedy"}, {"batch_decoding": "greedy"}),
    ({}, {"batch_decoding": "auto"}),
    ({"kv_cache_tokens": "4096"}, {"kv_cache_tokens": 4096}),
    ({}, {"kv_cache_tokens": None}),
    ({}, {"backend": "process"}),
    ({"backend": "ray", "num_replicas": "2", "num_cpus": "0.5"}, {"num_replicas": 2}),
    ({"backend": "ray", "max_replicas": "3"}, {"max_replicas": 3, "min_replicas": None}),
    ({"backend": "ray", "min_replicas": "0", "max_replicas": "2"}, {"min_replicas": 0}),
    ({"backend": "ray", "ray_address": "10.0.0.5:6379"}, {"ray_address": "10.0.0.5:6379"}),
    ({"backend": "ray", "num_replicas": ""}, {"num_replicas": None}),
]

INVALID = [
    ({"max_batch": "4"}, "max_batch", "unknown key"),
    ({"Port": "1"}, "Port", "keys are case-sensitive"),
    ({"port": "http"}, "port", "not an integer"),
    ({"port": "70000"}, "port", "above 65535"),
    ({"port": "-1"}, "port", "negative"),
    ({"max_batch_size": "0"}, "max_batch_size", "below 1"),
    ({"max_batch_size": "2.5"}, "max_batch_size", "not an integer"),
    ({"timeout": "0"}, "timeout", "must be > 0"),
    ({"timeout": "soon"}, "timeout", "not a number"),
    ({"torch_dtype": "float8"}, "torch_dtype", "unknown dtype"),
    ({"max_concurrent_requests": "0"}, "max_concurrent_requests", "below 1"),
    ({"batch_decoding": "fast"}, "batch_decoding", "not a mode"),
    ({"kv_cache_tokens": "0"}, "kv_cache_tokens", "below 1"),
    ({"backend": "k8s"}, "backend", "not a backend"),
    ({"num_replicas": "2"}, "num_replicas", "a Ray key without backend=ray"),
    ({"backend": "process", "ray_address": "h:1"}, "ray_address", "a Ray key on process"),
    ({"backend": "ray", "num_replicas": "0"}, "num_replicas", "below 1"),
    ({"backend": "ray", "num_replicas": "2", "max_replicas": "3"}, "num_replicas", "both"),
    ({"backend": "ray", "min_replicas": "1"}, "max_replicas", "autoscaling without max"),
    ({"backend": "ray", "target_ongoing_requests": "4"}, "max_replicas", "target without max"),
    ({"backend": "ray", "min_replicas": "3", "max_replicas": "2"}, "min_replicas", "min > max"),
    ({"backend": "ray", "num_gpus": "-1"}, "num_gpus", "negative"),
    ({"backend": "ray", "max_ongoing_requests": "0"}, "max_ongoing_requests", "below 1"),
]


@pytest.mark.parametrize(("raw", "expected"), VALID)
def test_parse_config_valid(raw: dict[str, Any], expected: dict[str, Any]):
    config = parse_config(raw, environ={})
    for key, value in expected.items():
        assert getattr(config, key) == value


@pytest.mark.parametrize(("raw", "param", "reason"), INVALID)
def test_parse_config_invalid(raw: dict[str, Any], param: str, reason: str):
    with pytest.raises(InvalidInputError) as info:
        parse_config(raw, environ={})
    assert info.value.param == param, reason
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, MlflowException) and info.value.get_http_status_code() == 400


def test_unknown_key_lists_valid_keys():
    with pytest.raises(InvalidInputError) as info:
        parse_config({"batch": "4"}, environ={})
    for key in valid_keys():
        assert key in info.value.message


def test_api_key_from_environment_and_never_public():
    config = parse_config({}, environ={API_KEY_ENV: "s3cret"})
    assert config.api_key_value() == "s3cret"
    assert "s3cret" not in json.dumps(config.to_public_dict())
    assert "s3cret" not in json.dumps(config.server_arguments())
    assert parse_config({"api_key": "k2"}, environ={API_KEY_ENV: "s3cret"}).api_key_value() == "k2"


# --- target_help -----------------------------------------------------------------------------


def test_target_help_documents_every_key_with_its_description():
    text = target_help()
    flat = " ".join(text.split())
    for key, field in DeploymentConfig.model_fields.items():
        assert f"  {key} " in text
        assert " ".join((field.description or "").split()) in flat
    for command in ("create", "list", "get", "predict", "update", "delete", "run-local"):
        assert f"mlflow deployments {command} -t tfx" in text
    for env in ("MLFLOW_TFX_API_KEY", "MLFLOW_TFX_STATE_DIR", "MLFLOW_TFX_STARTUP_TIMEOUT"):
        assert env in text
    assert "RAY_ADDRESS" in text and "Ray backend (-C backend=ray" in text


def test_readme_configuration_table_lists_every_key():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Configuration", 1)[1].split("Environment and other settings", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    documented = {key for row in rows for key in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert documented == set(DeploymentConfig.model_fields)


# --- predict inputs: what `mlflow deployments predict --input-path` hands over ----------------


def _cli_frame(body: Any) -> pd.DataFrame:
    """What the CLI passes to predict: ``pd.read_json`` of the input file."""
    return pd.read_json(io.StringIO(json.dumps(body)))


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

CONVERSIONS = [
    (
        "chat body: one row per message, folded back",
        {"messages": CHAT, "max_tokens": 5, "temperature": 0},
        [{"messages": CHAT, "max_tokens": 5, "temperature": 0}],
    ),
    ("chat body, messages only", {"messages": CHAT[1:]}, [{"messages": CHAT[1:]}]),
    (
        "prompt list: one completions request",
        {"prompt": ["Hello", "Paris is"], "max_tokens": 3},
        [{"prompt": ["Hello", "Paris is"], "max_tokens": 3}],
    ),
    ("single prompt", {"prompt": ["Hello"]}, [{"prompt": "Hello"}]),
    ("embeddings input", {"input": ["a", "b"]}, [{"input": ["a", "b"]}]),
    (
        "list of chat bodies (list-valued stop works here): one request each",
        [
            {"messages": CHAT, "stop": ["\n", "."]},
            {"messages": CHAT[1:], "max_tokens": 2},
        ],
        [
            {"messages": CHAT, "stop": ["\n", "."]},
            {"messages": CHAT[1:], "max_tokens": 2},
        ],
    ),
    (
        "list of prompts with different options: one request each",
        [{"prompt": "a"}, {"prompt": "b", "max_tokens": 2}],
        [{"prompt": "a"}, {"prompt": "b", "max_tokens": 2}],
    ),
    ("mlflow models serve inputs", {"inputs": ["x", "y"]}, [{"inputs": ["x", "y"]}]),
    ("instances", {"instances": [1, 2]}, [{"instances": [1, 2]}]),
    (
        "dataframe_split",
        {"dataframe_split": {"columns": ["text"], "data": [["x"]]}},
        [{"dataframe_split": {"columns": ["text"], "data": [["x"]]}}],
    ),
    (
        "dataframe_records",
        {"dataframe_records": [{"text": "x"}, {"text": "y"}]},
        [{"dataframe_records": [{"text": "x"}, {"text": "y"}]}],
    ),
    (
        "plain columns: one /invocations request",
        [{"text": "x"}, {"text": "y"}],
        [{"dataframe_split": {"columns": ["text"], "data": [["x"], ["y"]]}}],
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"), [case[1:] for case in CONVERSIONS], ids=[c[0] for c in CONVERSIONS]
)
def test_dataframe_from_cli_becomes_requests(body: Any, expected: list[dict[str, Any]]):
    assert payloads.requests_from_inputs(_cli_frame(body)) == expected


def test_dict_and_list_inputs_pass_through():
    body = {"messages": CHAT, "stop": ["\n"]}
    assert payloads.requests_from_inputs(body) == [body]
    assert payloads.requests_from_inputs([body, body]) == [body, body]


@pytest.mark.parametrize(
    ("inputs", "reason"),
    [
        ("Hello", "a bare string"),
        (42, "a number"),
        ([], "an empty list"),
        (pd.DataFrame(), "an empty DataFrame"),
        (
            pd.DataFrame({"messages": CHAT, "max_tokens": [1, 2]}),
            "chat rows that disagree on max_tokens",
        ),
    ],
)
def test_bad_inputs(inputs: Any, reason: str):
    with pytest.raises(InvalidInputError):
        payloads.requests_from_inputs(inputs)


@pytest.mark.parametrize(
    ("body", "route"),
    [
        ({"messages": []}, "/v1/chat/completions"),
        ({"prompt": "x"}, "/v1/completions"),
        ({"input": "x"}, "/v1/embeddings"),
        ({"inputs": ["x"]}, "/invocations"),
        ({"dataframe_split": {}}, "/invocations"),
    ],
)
def test_route_of(body: dict[str, Any], route: str):
    assert payloads.route_of(body) == route


# --- target URI, names, flavors, endpoints, merged update config -----------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [("tfx", None), ("tfx:/", None), ("tfx:/srv/state", "/srv/state")],
)
def test_target_uri_selects_state_dir(target: str, expected: str | None):
    result = tfx_client._state_dir_of(target)
    assert (str(result) if result else None) == expected


def test_target_uri_with_host_is_rejected():
    with pytest.raises(InvalidInputError, match="tfx:/path"):
        tfx_client._state_dir_of("tfx://somehost/x")


@pytest.mark.parametrize(
    ("name", "flavor", "endpoint"),
    [
        ("bad name", None, None),
        ("../escape", None, None),
        ("", None, None),
        ("chat", "python_function", None),
        ("chat", None, "ep"),
    ],
)
def test_check_common_rejects(name: str, flavor: str | None, endpoint: str | None):
    with pytest.raises(InvalidInputError):
        tfx_client._check_common(name, flavor, endpoint)


def test_explain_is_not_supported(tmp_path):
    client = tfx_client.TfxDeploymentClient(f"tfx:{tmp_path}")
    with pytest.raises(MlflowException, match="not supported by the tfx target; use predict"):
        client.explain("chat", pd.DataFrame({"x": [1]}))


def _record(config: dict[str, Any]) -> DeploymentRecord:
    return DeploymentRecord(
        name="chat",
        model_uri="models:/chat@prod",
        resolved_model_uri="models:/chat/1",
        local_model_dir="/m",
        pid=1,
        pid_create_time=0.0,
        host="127.0.0.1",
        port=5000,
        url="http://127.0.0.1:5000",
        log_path="/l",
        config=config,
    )


def test_update_config_merges_over_old_and_keeps_auto_port(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    old = parse_config({"max_batch_size": "4", "timeout": "5"}, environ={}).to_public_dict()
    merged = tfx_client._merged_config(_record(old), {"timeout": "9"})
    assert (merged.max_batch_size, merged.timeout, merged.port) == (4, 9.0, None)


def test_update_of_keyed_deployment_needs_the_key(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    old = parse_config({"api_key": "k"}, environ={}).to_public_dict()
    with pytest.raises(InvalidInputError, match=API_KEY_ENV):
        tfx_client._merged_config(_record(old), {})
    monkeypatch.setenv(API_KEY_ENV, "k")
    assert tfx_client._merged_config(_record(old), {}).api_key_value() == "k"


def test_exposed_host_requires_an_api_key():
    from mlflow_tfx_plugin.deployments.config import parse_config

    with pytest.raises(InvalidInputError, match="api_key") as caught:
        parse_config({"host": "0.0.0.0"}, environ={})
    assert caught.value.param == "host"
    assert parse_config({"host": "0.0.0.0", "api_key": "k"}).host == "0.0.0.0"
    assert parse_config({"host": "0.0.0.0"}, environ={"MLFLOW_TFX_API_KEY": "k"}).api_key
    assert parse_config({"host": "localhost"}, environ={}).api_key is None
