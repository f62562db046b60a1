"""Interop with stock ``mlflow.transformers``: each flavor loads the other's models."""

from __future__ import annotations

from pathlib import Path

import mlflow
import transformers

import mlflow_tfx_plugin as tfx

GREEDY = {"max_new_tokens": 4, "do_sample": False}


def test_loads_model_logged_by_stock_flavor(tiny_gpt2_dir: Path, tmp_path: Path):
    pipe = transformers.pipeline("text-generation", model=str(tiny_gpt2_dir))
    # Stock default requirements import torchvision (a known stock defect): pass them explicitly.
    mlflow.transformers.save_model(pipe, tmp_path / "stock", pip_requirements=["transformers"])

    loaded = tfx.load_model(str(tmp_path / "stock"))
    assert loaded("Hello", **GREEDY) == pipe("Hello", **GREEDY)
    components = tfx.load_model(str(tmp_path / "stock"), return_type="components")
    assert set(components) == {"model", "tokenizer", "task"}


def test_stock_flavor_loads_model_saved_by_plugin(tiny_gpt2_dir: Path, tmp_path: Path):
    pipe = transformers.pipeline("text-generation", model=str(tiny_gpt2_dir))
    tfx.save_model(pipe, tmp_path / "ours")

    loaded = mlflow.transformers.load_model(str(tmp_path / "ours"))
    assert loaded("Hello", **GREEDY) == pipe("Hello", **GREEDY)


def test_stock_flavor_loads_checkpoint_saved_by_plugin(tiny_llama_dir: Path, tmp_path: Path):
    tfx.save_model(tiny_llama_dir, tmp_path / "ours")
    reference = transformers.pipeline("text-generation", model=str(tiny_llama_dir))

    loaded = mlflow.transformers.load_model(str(tmp_path / "ours"))
    assert loaded("Hello", **GREEDY) == reference("Hello", **GREEDY)


def test_loads_llm_chat_model_logged_by_stock_flavor(tiny_gpt2_dir: Path, tmp_path: Path):
    pipe = transformers.pipeline("text-generation", model=str(tiny_gpt2_dir))
    mlflow.transformers.save_model(
        pipe, tmp_path / "stock", task="llm/v1/chat", pip_requirements=["transformers"]
    )
    request = {
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 3,
        "temperature": 0,
    }

    response = tfx._load_pyfunc(str(tmp_path / "stock")).predict(request)

    assert response["object"] == "chat.completion", "an object, not stock's list"
    assert response["usage"]["completion_tokens"] == 3
