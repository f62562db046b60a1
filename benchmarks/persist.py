"""Persisting a reference-only ~1 GB model from a warm HF cache, side by side, in one run.

    python benchmarks/persist.py [--size-gb 1.0] [--repeat 2] [--workdir DIR]

A local Hub double (integration/hub_server.py) serves a random-weight Llama checkpoint on
127.0.0.1; its snapshot is downloaded into an HF cache once (warm cache). Then, each in its
own child process, interleaved:

  (a) tfx auto-persist   ``mlflow.register_model`` of a tfx reference-only model: the
                          registry hook persists before the version is created
  (b) tfx persist         ``mlflow_tfx_plugin.persist_pretrained_model(uri)``
  (c) stock persist       ``mlflow.transformers.persist_pretrained_model(uri)`` of a stock
                          ``save_pretrained=False`` model
  (d) cp                  copying the cached weight file into a directory: the floor

The model is logged in a separate, untimed child first, so timings and peak RSS cover
persisting only. Prints a Markdown table with ratios to ``cp``.
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
    Sample,
    bench_arguments,
    build_checkpoint,
    print_table,
    run_child,
)

REPO = "bench/llama"

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
    checkpoint = build_checkpoint(args.workdir, args.size_gb)
    hub = hub_server.LocalHub()
    hub.add_repo_from_dir(REPO, checkpoint)
    with hub.serve():
        env = {**os.environ, **hub_server.hf_client_env(hub.endpoint, args.workdir / "hf-cache")}
        env["PYTHONPATH"] = str(ROOT)
        cached = _warm_cache(env)
        results: dict[str, list[Sample]] = {"cp (d)": [], **{name: [] for name in PERSISTERS}}
        for _ in range(args.repeat):
            for name in results:
                results[name].append(_bench(name, cached, args.workdir, env))
                print(f"  {name}: {results[name][-1]}", file=sys.stderr)
    heading = f"Weights: {cached.stat().st_size / 1e6:.0f} MB in a warm HF cache"
    print_table(results, floor="cp (d)", heading=heading, operation="persist")


def _warm_cache(env: dict[str, str]) -> Path:
    """Download the snapshot once; returns the cached weight file (resolved blob)."""
    code = f"from huggingface_hub import snapshot_download; print(snapshot_download({REPO!r}))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return (Path(out.stdout.strip().splitlines()[-1]) / "model.safetensors").resolve()


def _bench(name: str, cached: Path, workdir: Path, env: dict[str, str]) -> Sample:
    store = workdir / "persist-store" / str(time.time_ns())
    store.mkdir(parents=True)
    try:
        if name == "cp (d)":
            return run_child(["cp", str(cached), str(store / "model.safetensors")])
        uri = f"sqlite:///{store / 'mlflow.db'}"
        # (b) persists by hand: registration must not do it first. Stock is not ours to hook.
        child_env = {**env, "MLFLOW_TFX_AUTO_PERSIST": "false" if "(a)" not in name else "true"}
        logged = _log("stock" if name.startswith("stock") else "tfx", uri, store, child_env)
        code = _PRELUDE + textwrap.dedent(PERSISTERS[name]) + _EPILOGUE
        return run_child([sys.executable, "-c", code, uri, logged], env=child_env)
    finally:
        shutil.rmtree(store, ignore_errors=True)


def _log(flavor: str, uri: str, store: Path, env: dict[str, str]) -> str:
    code = _PRELUDE + textwrap.dedent(LOGGERS[flavor])
    artifacts = (store / "artifacts").as_uri()
    out = subprocess.run(
        [sys.executable, "-c", code, uri, artifacts, REPO],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])["uri"]


if __name__ == "__main__":
    main()
