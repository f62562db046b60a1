"""Plumbing for benchmarks/serve.py: peak memory, load generation, clients.

Nothing here knows which server it drives: a server is a process tree to watch, and a client
is a ``send(messages) -> Reply`` callable. Starting and stopping servers is
``integration/servers.py``'s job (through ``_shared``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psutil
import requests

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Reply:
    """One answered request, timed by the client."""

    latency_s: float
    completion_tokens: int
    ttft_s: float | None = None
    text: str = ""


Sender = Callable[[Messages], Reply]
ReplyT = TypeVar("ReplyT")


@dataclass(frozen=True, kw_only=True)
class LevelResult:
    """One concurrency level of one server."""

    concurrency: int
    requests: int
    wall_s: float
    requests_per_s: float
    completion_tokens_per_s: float
    mean_completion_tokens: float
    p50_s: float
    p95_s: float
    ttft_p50_s: float | None = None

    @classmethod
    def from_replies(cls, replies: Sequence[Reply], *, concurrency: int, wall_s: float):
        latencies = [r.latency_s for r in replies]
        tokens = sum(r.completion_tokens for r in replies)
        return cls(
            concurrency=concurrency,
            requests=len(replies),
            wall_s=wall_s,
            requests_per_s=len(replies) / wall_s,
            completion_tokens_per_s=tokens / wall_s,
            mean_completion_tokens=tokens / len(replies),
            p50_s=float(np.percentile(latencies, 50)),
            p95_s=float(np.percentile(latencies, 95)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- peak memory


def _hwm_kb(pid: int) -> int:
    """``VmHWM`` of ``pid`` (its peak resident set) in kB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


class PeakRss:
    """Samples a process tree and keeps each process's peak RSS (``VmHWM``).

    ``peak_mb`` sums the peaks of every process seen in the tree (the root, forked
    workers, ``uvicorn`` children), an upper bound of the tree's simultaneous peak.
    """

    def __init__(self, root_pid: int, *, interval_s: float = 0.25) -> None:
        self.root_pid = root_pid
        self._interval_s = interval_s
        self._peaks_kb: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
            pids = [root.pid, *(child.pid for child in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return
        for pid in pids:
            self._peaks_kb[pid] = max(self._peaks_kb.get(pid, 0), _hwm_kb(pid))

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    @property
    def peak_mb(self) -> float:
        return sum(self._peaks_kb.values()) / 1024


def listening_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1:``port``, for servers started by another tool."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid
    return None


# --------------------------------------------------------------------------- load generation


def drive(send: Sender, prompts: Sequence[Messages], *, concurrency: int, requests: int):
    """One warm-up request, then ``requests`` requests ``concurrency`` at a time.

    Returns:
        The :class:`LevelResult`; ``ttft_p50_s`` is left for a streamed pass to fill in.
    """
    send(prompts[0])
    replies, wall_s = fan_out(send, prompts, concurrency=concurrency, requests=requests)
    return LevelResult.from_replies(replies, concurrency=concurrency, wall_s=wall_s)


def ttft_p50(send: Sender, prompts: Sequence[Messages], *, concurrency: int) -> float:
    """Median time to first token over one wave of ``max(concurrency, 4)`` streamed requests."""
    replies, _ = fan_out(send, prompts, concurrency=concurrency, requests=max(concurrency, 4))
    return float(np.median([r.ttft_s for r in replies if r.ttft_s is not None]))


def fan_out(
    send: Callable[[Any], ReplyT], prompts: Sequence[Any], *, concurrency: int, requests: int
) -> tuple[list[ReplyT], float]:
    """``requests`` calls of ``send`` (cycling through ``prompts``) from ``concurrency``
    threads; returns the replies in order and the wall seconds."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        replies = list(pool.map(send, (prompts[i % len(prompts)] for i in range(requests))))
    return replies, time.perf_counter() - start


# --------------------------------------------------------------------------- clients


def openai_sender(
    base_url: str,
    *,
    model: str,
    max_tokens: int,
    extra_body: dict[str, Any],
    stream: bool = False,
) -> Sender:
    """Chat completions through the official ``openai`` client (temperature 0).

    Completion tokens come from ``usage`` (the last streamed chunk carries it when the
    server honours ``stream_options``); without it, from the number of content chunks.
    """
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=900)
    common: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "extra_body": extra_body,
    }

    def send(messages: Messages) -> Reply:
        start = time.perf_counter()
        if not stream:
            response = client.chat.completions.create(messages=messages, **common)  # type: ignore[arg-type]
            tokens = response.usage.completion_tokens if response.usage else -1
            text = response.choices[0].message.content or ""
            return Reply(latency_s=time.perf_counter() - start, completion_tokens=tokens, text=text)
        first: float | None = None
        chunks, usage_tokens = 0, None
        for chunk in client.chat.completions.create(
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            **common,
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                chunks += 1
            if chunk.usage:
                usage_tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        return Reply(
            latency_s=end - start,
            completion_tokens=usage_tokens if usage_tokens is not None else chunks,
            ttft_s=(first or end) - start,
        )

    return send


def invocations_sender(url: str, *, max_tokens: int, extra: dict[str, Any]) -> Sender:
    """MLflow's scoring server: ``POST /invocations`` with a chat body (``requests``)."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=64, pool_maxsize=64)
    session.mount("http://", adapter)

    def send(messages: Messages) -> Reply:
        start = time.perf_counter()
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
        response = session.post(url, json=body, timeout=900)
        latency = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:500]}")
        payload = response.json()
        payload = payload[0] if isinstance(payload, list) else payload
        return Reply(
            latency_s=latency,
            completion_tokens=payload["usage"]["completion_tokens"],
            text=payload["choices"][0]["message"]["content"],
        )

    return send
