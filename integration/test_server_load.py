"""Load: 200 mixed requests at concurrency 32 against one deployment server.

Every valid request must be answered correctly (the same text as the flavor's own greedy
generation, the same vector as an unbatched embedding), every invalid one with a 4xx,
nothing with a 5xx; the server stays up and ``/metrics`` agrees with what was sent.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

import mlflow_tfx_plugin as tfx
from integration.test_server_openai import API_KEY, Server, _requests_total, serve

pytestmark = pytest.mark.integration

PROMPTS = [f"Tell me about the number {i}." for i in range(6)]
TEXTS = ["a red apple", "the blue sea", "green hills far away", "x"]
INVALID = [
    ({"messages": []}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, 404),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_models

    base = tmp_path_factory.mktemp("load")
    checkpoint = tiny_models.build_llama(base / "checkpoint")
    tfx.save_model(checkpoint, base / "model", task="llm/v1/chat")
    return base / "model"


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def test_mixed_load_at_concurrency_32(model_dir: Path, tmp_path: Path):
    reference = tfx._load_pyfunc(str(model_dir))
    expected = {
        prompt: reference.predict(
            {"messages": _messages(prompt), "max_tokens": 8, "temperature": 0}
        )["choices"][0]["message"]["content"]
        for prompt in PROMPTS
    }
    kinds = ["chat"] * 80 + ["stream"] * 60 + ["embed"] * 40 + ["invalid"] * 20
    random.Random(0).shuffle(kinds)

    with serve(model_dir, tmp_path / "server.log", max_batch_size=8) as server:
        single = {text: _embed(server, [text])[0] for text in TEXTS}
        before = _requests_total(server.metrics())
        with ThreadPoolExecutor(max_workers=32) as pool:
            outcomes = list(pool.map(lambda job: _run(server, *job), enumerate(kinds)))
        after = _requests_total(server.metrics())
        metrics = server.metrics()
        assert requests.get(f"{server.url}/health", timeout=10).status_code == 200

    completion_tokens = 0
    for kind, index, outcome in outcomes:
        if kind in ("chat", "stream"):
            text, tokens = outcome
            assert text == expected[PROMPTS[index % len(PROMPTS)]], (kind, index)
            completion_tokens += tokens
        elif kind == "embed":
            for text, vector in outcome:
                np.testing.assert_allclose(vector, single[text], rtol=1e-4, atol=1e-5)
        else:
            status, wanted = outcome
            assert status == wanted, (index, status)

    sent = Counter()
    for kind, _, outcome in outcomes:
        route = "/v1/embeddings" if kind == "embed" else "/v1/chat/completions"
        status = outcome[0] if kind == "invalid" else 200
        sent[(route, str(status))] += 1
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    assert {key: value for key, value in delta.items() if value and key[0] != "/metrics"} == sent
    assert not any(s.startswith("5") for route, s in after if route != "/health"), after
    assert _metric(metrics, "tfx_completion_tokens_total") >= completion_tokens
    batches = _metric(metrics, "tfx_batch_size_count")
    single_batches = _metric(metrics, 'tfx_batch_size_bucket{le="1.0"}')
    assert single_batches < batches, "concurrent requests shared model batches"


def _run(server: Server, index: int, kind: str) -> tuple[str, int, object]:
    client = server.client()
    prompt = PROMPTS[index % len(PROMPTS)]
    if kind == "chat":
        response = client.chat.completions.create(
            model="tiny", messages=_messages(prompt), max_tokens=8, temperature=0
        )
        return kind, index, (response.choices[0].message.content, response.usage.completion_tokens)
    if kind == "stream":
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=_messages(prompt),
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return kind, index, (text, chunks[-1].usage.completion_tokens)
    if kind == "embed":
        texts = [TEXTS[index % len(TEXTS)], TEXTS[(index + 1) % len(TEXTS)]]
        return kind, index, list(zip(texts, _embed(server, texts), strict=True))
    body, wanted = INVALID[index % len(INVALID)]
    response = requests.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "tiny", "max_tokens": 4, **body},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    )
    return kind, index, (response.status_code, wanted)


def _embed(server: Server, texts: list[str]) -> list[np.ndarray]:
    response = server.client().embeddings.create(model="tiny", input=texts)
    return [np.array(item.embedding) for item in response.data]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")
