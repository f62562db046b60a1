"""Persisting a reference-only ~1 GB model from a warm HF cache, side by side, in one run.

    python benchmarks/persist.py [--size-gb 1.0] [--shards 1] [--repeat 2] [--only a,b,d]
        [--baseline DIR] [--workdir DIR]

A local Hub double (integration/hub_server.py) serves a random-weight Llama checkpoint
(log_checkpoint.py builds it) on 127.0.0.1; its snapshot is downloaded into an HF cache
once (warm cache). Then, each in its own child process, interleaved:

  (a) tfx auto-persist   ``mlflow.register_model`` of a tfx reference-only model: the
                          registry hook persists before the version is created
  (b) tfx persist         ``mlflow_tfx_plugin.persist_pretrained_model(uri)``
  (c) stock persist       ``mlflow.transformers.persist_pretrained_model(uri)`` of a stock
                          ``save_pretrained=False`` model
  (d) cp                  copying the cached weight files into a directory: the floor
  (e) tfx persist of a ~1 MB model: the fixed cost per call, so (b) - (e) is what the
                          weights themselves cost (printed per GB after the table)

The model is logged in a separate, untimed child first, so timings and peak RSS cover
persisting only. ``--only`` and ``--baseline`` work as in log_checkpoint.py; before every
run (untimed) the cached weights are read into the page cache and dirty pages flushed.
Prints a Markdown table with ratios to ``cp``, then fixed and per-GB costs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _shared import hub_server  # noqa: E402
from log_checkpoint import (  # noqa: E402
    BASELINE_SUFFIX,
    Sample,
    bench_arguments,
    build_checkpoint,
    build_tiny_checkpoint,
    child_env,
    print_costs,
    print_table,
    run_child,
    selected_modes,
    settle,
)

REPO = "bench/llama"
TINY_REPO = "bench/llama-tiny"
FLOOR = "cp (d)"
TINY_MODE = "tfx persist_pretrained_model, ~1 MB model (e)"

_PRELUDE = """
import json, os, sys, time
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
"""
LOGGERS = {
    "tfx": """
import mlflow_tfx_plugin as tfx
mlflow.set_experiment(experiment_id=mlflow.create_experiment("b", artifact_location=sys.argv[2]))
with mlflow.start_run():
    print(json.dumps({"uri": tfx.log_model(sys.argv[3], name="model").model_uri}))
""",
    "stock": """
import transformers
mlflow.set_experiment(experiment_id=mlflow.create_experiment("b", artifact_location=sys.argv[2]))
pipe = transformers.pipeline("text-generation", model=sys.argv[3])
with mlflow.start_run():
    info = mlflow.transformers.log_model(
        pipe, name="model", save_pretrained=False, pip_requirements=["transformers", "torch"]
    )
print(json.dumps({"uri": info.model_uri}))
""",
}
PERSISTERS = {
    "tfx auto-persist at registration (a)": """
start = time.perf_counter()
mlflow.register_model(sys.argv[2], "bench")
""",
    "tfx persist_pretrained_model (b)": """
import mlflow_tfx_plugin as tfx
start = time.perf_counter()
tfx.persist_pretrained_model(sys.argv[2])
""",
    "stock mlflow.transformers.persist_pretrained_model (c)": """
start = time.perf_counter()
mlflow.transformers.persist_pretrained_model(sys.argv[2])
""",
}
_EPILOGUE = """
print(json.dumps({"op_s": time.perf_counter() - start}))
"""


def main() -> None:
    args = bench_arguments(__doc__ or "")
    checkpoint = build_checkpoint(args.workdir, args.size_gb, args.shards)
    hub = hub_server.LocalHub()
    hub.add_repo_from_dir(REPO, checkpoint)
    hub.add_repo_from_dir(TINY_REPO, build_tiny_checkpoint(args.workdir))
    with hub.serve():
        env = {**os.environ, **hub_server.hf_client_env(hub.endpoint, args.workdir / "hf-cache")}
        env["PYTHONPATH"] = str(ROOT)
        cached = _warm_cache(env, REPO)
        _warm_cache(env, TINY_REPO)
        names = selected_modes([FLOOR, *PERSISTERS, TINY_MODE], args)
        results: dict[str, list[Sample]] = {name: [] for name in names}
        for _ in range(args.repeat):
            for name in results:
                envs = child_env(name, args.baseline, env)
                results[name].append(_bench(name, cached, args.workdir, envs))
                print(f"  {name}: {results[name][-1]}", file=sys.stderr)
    size_mb = sum(blob.stat().st_size for blob in cached) / 1e6
    heading = f"Weights: {size_mb:.0f} MB in {len(cached)} file(s) in a warm HF cache"
    print_table(results, floor=FLOOR, heading=heading, operation="persist")
    pairs = {"tfx persist_pretrained_model (b)": TINY_MODE}
    print_costs(results, floor=FLOOR, pairs=pairs, size_gb=size_mb / 1e3)


def _warm_cache(env: dict[str, str], repo: str) -> list[Path]:
    """Download the snapshot once; returns the cached weight files (resolved blobs)."""
    code = f"from huggingface_hub import snapshot_download; print(snapshot_download({repo!r}))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    snapshot = Path(out.stdout.strip().splitlines()[-1])
    return [path.resolve() for path in sorted(snapshot.glob("*.safetensors"))]


def _bench(name: str, cached: list[Path], workdir: Path, env: dict[str, str]) -> Sample:
    store = workdir / "persist-store" / str(time.time_ns())
    store.mkdir(parents=True)
    try:
        if name == FLOOR:
            settle(cached)
            return run_child(["cp", *map(str, cached), str(store)])
        uri = f"sqlite:///{store / 'mlflow.db'}"
        # (b) persists by hand: registration must not do it first. Stock is not ours to hook.
        env = {**env, "MLFLOW_TFX_AUTO_PERSIST": "false" if "(a)" not in name else "true"}
        mode = name.removesuffix(BASELINE_SUFFIX)
        repo = TINY_REPO if mode == TINY_MODE else REPO
        logged = _log("stock" if name.startswith("stock") else "tfx", uri, store, env, repo)
        persister = PERSISTERS["tfx persist_pretrained_model (b)" if mode == TINY_MODE else mode]
        code = _PRELUDE + textwrap.dedent(persister)
        settle([] if mode == TINY_MODE else cached)
        # cwd: ``python -c`` puts it first on sys.path, ahead of PYTHONPATH
        cmd = [sys.executable, "-c", code + _EPILOGUE, uri, logged]
        return run_child(cmd, env=env, cwd=store)
    finally:
        shutil.rmtree(store, ignore_errors=True)


def _log(flavor: str, uri: str, store: Path, env: dict[str, str], repo: str) -> str:
    code = _PRELUDE + textwrap.dedent(LOGGERS[flavor])
    artifacts = (store / "artifacts").as_uri()
    out = subprocess.run(
        [sys.executable, "-c", code, uri, artifacts, repo],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=store,
    )
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])["uri"]


if __name__ == "__main__":
    main()
