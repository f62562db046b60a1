"""The Ray Serve backend against the process backend, side by side, interleaved in one run.

    python benchmarks/ray_serving.py                     # SmolLM2-135M-Instruct, 3 rounds
    python benchmarks/ray_serving.py --model tiny --rounds 1 --requests 8   # a smoke run

Contenders, all deployed at once with ``mlflow deployments create -t tfx`` from the same
logged model, ``max_batch_size=16``:

  process   the default backend: one server process (torch's threads: every CPU)
  ray-1     ``-C backend=ray -C num_replicas=1 -C num_cpus=<CPUs>``: the same engine behind
            Serve's proxy
  ray-1-default  the same with the default ``num_cpus`` (1: one torch thread)
  ray-2     ``-C backend=ray -C num_replicas=2 -C num_cpus=<CPUs/2>``: two replicas sharing
            the machine (Ray gives each ``OMP_NUM_THREADS=num_cpus``)

Each round visits every contender (the order rotates from round to round) and measures
concurrency 1 (``--requests`` requests, one at a time) and concurrency 16 (32 requests),
with the workload of ``benchmarks/serve.py``: greedy, 32 new tokens forced. The report
gives medians over the rounds and ratios to ``process`` at the same concurrency, the time
``create`` and ``update`` (to a second logged copy of the model) took, the median time
of ``GET /v1/models`` (the path to the app without the model: Serve's proxy), and each
contender's peak RSS (server process, or the sum of its replicas; Ray's own processes
are not counted). The run starts its own Ray head (``ray start --head``) and stops it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import serve  # noqa: E402
from _serving import LevelResult, PeakRss, drive, openai_sender  # noqa: E402
from _shared import servers  # noqa: E402

LEVELS = (1, 16)
BATCH = 16


@dataclass(kw_only=True)
class Contender:
    """One deployment under test and everything measured on it."""

    name: str
    config: dict[str, Any]
    url: str = ""
    create_s: float = 0.0
    update_s: float = 0.0
    levels: dict[int, list[LevelResult]] = field(default_factory=dict)
    route_ms: list[float] = field(default_factory=list)  # GET /v1/models p50, per round
    rss: list[PeakRss] = field(default_factory=list)


def contenders(cpus: int) -> list[Contender]:
    base = {"max_batch_size": BATCH, "device": "cpu", "timeout": 900}
    ray = {**base, "backend": "ray", "max_concurrent_requests": 64}
    return [
        Contender(name="process", config=base),
        Contender(name="ray-1", config={**ray, "num_replicas": 1, "num_cpus": cpus}),
        Contender(name="ray-1-default", config={**ray, "num_replicas": 1}),
        Contender(name="ray-2", config={**ray, "num_replicas": 2, "num_cpus": cpus / 2}),
    ]


def deploy(verb: str, contender: Contender, model_uri: str, env: dict[str, str]) -> float:
    """``mlflow deployments create|update -t tfx``; the seconds it took."""
    cmd = [str(serve.BIN / "mlflow"), "deployments", verb, "-t", "tfx", "--name", contender.name]
    cmd += ["-m", model_uri]
    for key, value in contender.config.items():
        cmd += ["-C", f"{key}={value}"]
    started = time.perf_counter()
    serve._run_cli(cmd, env)
    return time.perf_counter() - started


def server_pids(contender: Contender, env: dict[str, str]) -> set[int]:
    """The process answering the URL, or every replica behind Serve's proxy (sampled)."""
    record = serve._deployment_record(contender.name, env)
    if record.get("pid"):
        return {int(record["pid"])}
    health = f"{contender.url}/health"
    return {requests.get(health, timeout=60).json()["pid"] for _ in range(40)}


def route_ms(url: str, *, samples: int = 40) -> float:
    """Median milliseconds of ``GET /v1/models``: the cost of the path to the app, no model."""
    session = requests.Session()
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        session.get(f"{url}/v1/models", timeout=60).raise_for_status()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(contender: Contender, n_requests: int) -> None:
    contender.route_ms.append(route_ms(contender.url))
    forced = {"min_tokens": serve.NEW_TOKENS, "ignore_eos": True}
    client = {"model": contender.name, "max_tokens": serve.NEW_TOKENS, "extra_body": forced}
    send = openai_sender(f"{contender.url}/v1", **client)
    for concurrency in LEVELS:
        count = n_requests if concurrency == 1 else 2 * concurrency
        level = drive(send, serve.PROMPTS, concurrency=concurrency, requests=count)
        contender.levels.setdefault(concurrency, []).append(level)
        serve._progress(f"    {contender.name} c={concurrency}: {level}")


def report(runs: list[Contender], heading: str) -> None:
    print(f"\n{heading}\n")
    base = {c: _median(runs[0], c, "completion_tokens_per_s") for c in LEVELS}
    base_p50 = {c: _median(runs[0], c, "p50_s") for c in LEVELS}
    print("| backend | conc | compl tok/s (range) | vs process | p50 (s) | p50 vs process |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        for c in LEVELS:
            rates = [lv.completion_tokens_per_s for lv in run.levels[c]]
            rate, p50 = _median(run, c, "completion_tokens_per_s"), _median(run, c, "p50_s")
            print(
                f"| {run.name} | {c} | {rate:.1f} ({min(rates):.1f}-{max(rates):.1f}) | "
                f"{rate / base[c]:.2f}x | {p50:.2f} | {p50 / base_p50[c]:.2f}x |"
            )
    print("\n| backend | GET /v1/models p50 (ms) | create (s) | update (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for run in runs:
        rss = sum(r.peak_mb for r in run.rss)
        route = statistics.median(run.route_ms)
        print(f"| {run.name} | {route:.1f} | {run.create_s:.1f} | {run.update_s:.1f} | {rss:.0f} |")


def _median(run: Contender, concurrency: int, key: str) -> float:
    return statistics.median(getattr(lv, key) for lv in run.levels[concurrency])


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--only", help="comma-separated contenders (default: all); process is always first"
    )
    parser.add_argument("--requests", type=int, default=6, help="requests at concurrency 1")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tfx-bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def main() -> None:
    args = parse_arguments()
    builder = serve.tiny_checkpoint if args.model == "tiny" else serve.smollm2_checkpoint
    checkpoint = builder(args.workdir)
    run_dir = Path(tempfile.mkdtemp(prefix="ray-serving-", dir=args.workdir))
    cpus = os.cpu_count() or 2
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{run_dir / 'mlflow.db'}",
        "MLFLOW_TFX_STATE_DIR": str(run_dir / "tfx-state"),
        "MLFLOW_TFX_STARTUP_TIMEOUT": "600",
    }
    runs = contenders(cpus)
    if args.only:
        wanted = {"process", *args.only.split(",")}
        runs = [run for run in runs if run.name in wanted]
    load_before = os.getloadavg()[0]
    try:
        with ExitStack() as stack:
            # room for every replica at once, plus the one more a rolling update starts
            address = stack.enter_context(servers.ray_head(run_dir, num_cpus=3 * cpus))
            env["RAY_ADDRESS"] = address
            first, second = (serve.log_model("tfx", checkpoint, env) for _ in range(2))
            for run in runs:
                run.create_s = deploy("create", run, first, env)
                stack.callback(serve._run_cli, _delete(run), env)
                run.url = str(serve._deployment_record(run.name, env)["url"]).rstrip("/")
                run.rss = [stack.enter_context(PeakRss(pid)) for pid in server_pids(run, env)]
                serve._progress(f"  {run.name}: created in {run.create_s:.1f} s at {run.url}")
            for round_index in range(args.rounds):
                serve._progress(f"  round {round_index + 1}/{args.rounds}")
                for run in runs[round_index % len(runs) :] + runs[: round_index % len(runs)]:
                    measure(run, args.requests)
            for run in runs:
                for rss in run.rss:
                    rss.sample()
                run.update_s = deploy("update", run, second, env)
                serve._progress(f"  {run.name}: updated in {run.update_s:.1f} s")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    heading = (
        f"Model: {args.model} ({checkpoint.name}); greedy, {serve.NEW_TOKENS} new tokens "
        f"forced; max_batch_size={BATCH}; {args.rounds} interleaved rounds, medians; "
        f"{cpus} CPUs ({platform.machine()}), load average {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after."
    )
    report(runs, heading)


def _delete(run: Contender) -> list[str]:
    return [str(serve.BIN / "mlflow"), "deployments", "delete", "-t", "tfx", "--name", run.name]


if __name__ == "__main__":
    main()
