"""The deployment server, driven by the real ``openai`` client over real HTTP.

Each server is the real ``python -m mlflow_tfx_plugin.deployments.listener`` process (what
``mlflow deployments create -t tfx`` starts), on 127.0.0.1, stopped by its fixture. The
CLI lifecycle is tested in ``test_deployments_cli.py``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import pytest
import requests

import mlflow_tfx_plugin as tfx
from integration import servers
from mlflow_tfx_plugin.deployments.config import API_KEY_ENV
from mlflow_tfx_plugin.deployments.process import server_environment

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-not-a-secret"
HELLO = [{"role": "user", "content": "Hello there"}]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)

    def metrics(self) -> str:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return requests.get(f"{self.url}/metrics", headers=headers, timeout=10).text


@contextlib.contextmanager
def serve(model_dir: Path, log: Path, name: str = "tiny", **config: object) -> Iterator[Server]:
    """The deployment server on a free port until the block ends (SIGTERM, then SIGKILL)."""
    env = {**server_environment(API_KEY, API_KEY_ENV), "HF_HUB_OFFLINE": "1"}  # as the target does
    with servers.listener_process(model_dir, name=name, config=config, log=log, env=env) as running:
        yield Server(running.url, running.proc, running.log)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    base = tmp_path_factory.mktemp("chat")
    checkpoint = tiny_models.build_llama(base / "checkpoint")
    tfx.save_model(checkpoint, base / "model", task="llm/v1/chat")
    return base / "model"


@pytest.fixture(scope="module")
def long_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with an 8k context (rotary positions), so a stream can run for long."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    base = tmp_path_factory.mktemp("long")
    checkpoint = tiny_models.build_llama(base / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    config["max_position_embeddings"] = 8192
    (checkpoint / "config.json").write_text(json.dumps(config))
    tfx.save_model(checkpoint, base / "model", task="llm/v1/chat")
    return base / "model"


@pytest.fixture(scope="module")
def server(chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with serve(chat_model, log, max_batch_size=4) as running:
        yield running


@pytest.fixture(scope="module")
def reference(chat_model: Path):
    """The flavor's own pyfunc predictor: what the server must answer."""
    return tfx._load_pyfunc(str(chat_model))


def _reference_text(reference, **request: object) -> str:
    response = reference.predict({"messages": HELLO, "temperature": 0, **request})
    return response["choices"][0]["message"]["content"]


def test_chat_matches_the_flavor(server: Server, reference):
    response = server.client().chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=8, temperature=0
    )

    assert response.object == "chat.completion"
    assert response.model == "tiny"
    [choice] = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == _reference_text(reference, max_tokens=8)
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 8
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )


def test_streamed_chat_joins_to_the_same_text(server: Server, reference):
    stream = server.client().chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _reference_text(reference, max_tokens=8)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 8


def test_stream_without_usage_has_no_usage_chunk(server: Server):
    response = requests.post(
        f"{server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": "tiny", "messages": HELLO, "max_tokens": 4, "stream": True},
        stream=True,
        timeout=60,
    )
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]

    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("usage" not in chunk for chunk in chunks)


def test_stop_string_cuts_the_text(server: Server, reference):
    full = _reference_text(reference, max_tokens=12, ignore_eos=True)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), "the tiny model's text has a usable middle"

    response = server.client().chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=12, temperature=0, stop=[stop]
    )

    [choice] = response.choices
    assert choice.message.content == full[: full.index(stop)]
    assert choice.finish_reason == "stop"


def test_completions_with_two_choices(server: Server):
    client = server.client()
    greedy = client.completions.create(
        model="tiny", prompt="Once", max_tokens=5, temperature=0, n=2
    )
    sampled = client.completions.create(model="tiny", prompt="Once", max_tokens=5, n=2)

    assert greedy.object == "text_completion"
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].text == greedy.choices[1].text, "greedy choices are identical"
    assert len(sampled.choices) == 2
    single = client.completions.create(model="tiny", prompt="Once", max_tokens=5, temperature=0)
    assert greedy.usage.completion_tokens == 2 * single.usage.completion_tokens


def test_seeded_sampling_is_reproducible(server: Server):
    client = server.client()
    runs = [
        client.completions.create(model="tiny", prompt="Once", max_tokens=6, seed=7).choices[0].text
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_embeddings_from_the_chat_model(server: Server):
    response = server.client().embeddings.create(model="tiny", input=["a cat", "a dog", "a cat"])

    vectors = np.array([item.embedding for item in response.data])
    assert [item.index for item in response.data] == [0, 1, 2]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], rtol=1e-5, atol=1e-6)
    assert response.usage.prompt_tokens > 0


def test_models_lists_the_deployment(server: Server):
    models = server.client().models.list()
    assert [model.id for model in models.data] == ["tiny"]


def test_invalid_request_is_a_bad_request_error(server: Server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model="tiny", messages=[], max_tokens=2)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "messages"

    with pytest.raises(openai.BadRequestError, match="temperature"):
        server.client().chat.completions.create(
            model="tiny", messages=HELLO, temperature=5, max_tokens=2
        )


def test_an_openai_field_the_server_cannot_honour_is_rejected_not_dropped(server: Server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=2, logit_bias={"1": -100}
        )
    assert caught.value.body["param"] == "logit_bias"
    # a field that cannot change the answer is still just ignored
    answer = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=2, extra_body={"metadata": {"team": "a"}}
    )
    assert answer.choices[0].message.content is not None


def test_wrong_key_is_an_authentication_error(server: Server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=2
        )
    assert requests.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


def test_unknown_model_is_not_found(server: Server):
    with pytest.raises(openai.NotFoundError, match="tiny"):
        server.client().chat.completions.create(model="gpt-4", messages=HELLO, max_tokens=2)


def test_oversized_and_malformed_bodies(server: Server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    huge = b'{"prompt": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    response = requests.post(f"{server.url}/v1/completions", data=huge, headers=headers, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"

    response = requests.post(
        f"{server.url}/v1/completions", data=b"{not json", headers=headers, timeout=10
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_invocations_accepts_mlflow_payloads(server: Server, reference):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    expected = _reference_text(reference, max_tokens=4)
    body = {"messages": HELLO, "max_tokens": 4, "temperature": 0}

    direct = requests.post(f"{server.url}/invocations", json=body, headers=headers, timeout=60)
    records = requests.post(
        f"{server.url}/invocations", json={"dataframe_records": [body]}, headers=headers, timeout=60
    )
    split = {"columns": list(body), "data": [list(body.values())]}
    frame = requests.post(
        f"{server.url}/invocations", json={"dataframe_split": split}, headers=headers, timeout=60
    )
    ragged = {"columns": ["messages", "max_tokens"], "data": [[HELLO]]}
    bad = requests.post(
        f"{server.url}/invocations", json={"dataframe_split": ragged}, headers=headers, timeout=60
    )

    assert direct.json()["choices"][0]["message"]["content"] == expected
    assert records.json()["predictions"]["choices"][0]["message"]["content"] == expected
    assert frame.json()["predictions"]["choices"][0]["message"]["content"] == expected
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "dataframe_split"
    # DataFrame payloads are read without pandas: the server never loads it (nor MLflow,
    # which would load pandas and pyarrow).
    mapped = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "/pandas/" not in mapped and "/pyarrow/" not in mapped


def test_metrics_count_requests_by_route_and_status(server: Server):
    before = _requests_total(server.metrics())
    client = server.client()
    client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)

    after = _requests_total(server.metrics())
    assert (
        after[("/v1/chat/completions", "200")] - before.get(("/v1/chat/completions", "200"), 0) == 1
    )
    assert (
        after[("/v1/chat/completions", "400")] - before.get(("/v1/chat/completions", "400"), 0) == 1
    )
    text = server.metrics()
    assert "tfx_completion_tokens_total" in text and "tfx_batch_size_bucket" in text


def test_metrics_export_the_engine_counters(server: Server):
    server.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)

    text = server.metrics()
    assert _metric(text, "tfx_engine_loop_restarts_total") == 0
    assert "tfx_engine_solo_requests_total" not in text  # lone requests run in the batch


def _metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} not exported once in:\n{text}"
    return values[0]


def _requests_total(text: str) -> dict[tuple[str, str], float]:
    counts = {}
    for line in text.splitlines():
        if line.startswith("tfx_requests_total{"):
            labels, value = line[len("tfx_requests_total{") :].split("} ")
            parts = dict(part.split("=") for part in labels.split(","))
            counts[(parts["route"].strip('"'), parts["status"].strip('"'))] = float(value)
    return counts


def test_limits_disconnects_and_graceful_shutdown(long_chat_model: Path, tmp_path: Path):
    """One request slot: a second request is a 429; a client that leaves frees the slot;
    SIGTERM lets the in-flight stream finish."""
    long = {"model": "tiny", "messages": HELLO, "max_tokens": 8000, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with serve(long_chat_model, tmp_path / "log", max_concurrent_requests=1) as server:
        stream = requests.post(
            f"{server.url}/v1/chat/completions",
            json={**long, "stream": True},
            headers=headers,
            stream=True,
            timeout=60,
        )
        lines_in = stream.iter_lines()  # keep it: a dropped iterator closes the stream
        next(lines_in)
        with pytest.raises(openai.RateLimitError):
            server.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)

        stream.close()  # the client goes away: its generation is cancelled
        _eventually(lambda: "tfx_requests_in_flight 0.0" in server.metrics())
        server.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)

        finished = threading.Event()
        lines: list[str] = []

        def consume() -> None:
            response = requests.post(
                f"{server.url}/v1/chat/completions",
                json={**long, "max_tokens": 500, "stream": True},
                headers=headers,
                stream=True,
                timeout=60,
            )
            lines.extend(line for line in response.iter_lines(decode_unicode=True) if line)
            finished.set()

        consumer = threading.Thread(target=consume)
        consumer.start()
        _eventually(lambda: "tfx_requests_in_flight 1.0" in server.metrics())
        server.proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises SIGTERM after its graceful shutdown, as servers conventionally do
        assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        consumer.join(timeout=60)
        assert finished.is_set() and lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "length", "ran to its end, not cut"
        assert not any('"error"' in line for line in lines)


def test_slow_request_is_a_gateway_timeout(chat_model: Path, tmp_path: Path):
    with serve(chat_model, tmp_path / "log", timeout=0.001) as server:
        with pytest.raises(openai.APIStatusError) as caught:
            server.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=50)
        assert caught.value.status_code == 504
        assert caught.value.body["type"] == "timeout_error"
        assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


def _eventually(check, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_serves_a_model_logged_by_stock_mlflow_transformers(tmp_path: Path):
    import mlflow
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    checkpoint = tiny_models.build_gpt2(tmp_path / "gpt2")
    pipe = transformers.pipeline("text-generation", model=str(checkpoint))
    mlflow.transformers.save_model(
        pipe, tmp_path / "stock", task="llm/v1/chat", pip_requirements=["transformers"]
    )
    expected = tfx._load_pyfunc(str(tmp_path / "stock")).predict(
        {"messages": HELLO, "max_tokens": 5, "temperature": 0}
    )

    with serve(tmp_path / "stock", tmp_path / "log", name="stock") as server:
        response = server.client().chat.completions.create(
            model="stock", messages=HELLO, max_tokens=5, temperature=0
        )
        streamed = server.client().chat.completions.create(
            model="stock", messages=HELLO, max_tokens=5, temperature=0, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)

    assert response.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert text == response.choices[0].message.content


def test_embeddings_match_sentence_transformers(tmp_path: Path):
    from sentence_transformers import SentenceTransformer

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    checkpoint = tiny_models.build_minilm_copy(tmp_path / "minilm")
    tfx.save_model(checkpoint, tmp_path / "model", task="llm/v1/embeddings")
    texts = ["MLflow tracks models.", "The cat sat on the mat.", "Paris is in France."]
    expected = SentenceTransformer(str(checkpoint), device="cpu").encode(texts)

    with serve(tmp_path / "model", tmp_path / "log", name="minilm") as server:
        response = server.client().embeddings.create(model="minilm", input=texts)
        with pytest.raises(openai.NotFoundError, match="embeddings"):
            server.client().chat.completions.create(model="minilm", messages=HELLO)

    vectors = np.array([item.embedding for item in response.data])
    cosine = (vectors * expected).sum(axis=1) / (
        np.linalg.norm(vectors, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert cosine.min() > 0.9999


def test_greedy_batch_decoding_serves_greedy_and_sampled_requests(
    chat_model: Path, tmp_path: Path, reference
):
    with serve(chat_model, tmp_path / "log", batch_decoding="greedy") as server:
        client = server.client()
        greedy = client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=8, temperature=0
        )
        streamed = client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=8, temperature=0, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        sampled = client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=8, temperature=0.9, n=2
        )

    assert greedy.choices[0].message.content == _reference_text(reference, max_tokens=8)
    assert text == greedy.choices[0].message.content
    assert len(sampled.choices) == 2
