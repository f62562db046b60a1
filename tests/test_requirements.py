"""Default pip requirements fit the model and never pull torchvision."""

from __future__ import annotations

from pathlib import Path

import mlflow

import mlflow_tfx_plugin as tfx


def _requirements(model_uri: str) -> list[str]:
    return Path(mlflow.pyfunc.get_model_dependencies(model_uri)).read_text().split()


def test_text_model_requirements(tiny_gpt2_dir: Path, tracking_uri: str):
    with mlflow.start_run():
        info = tfx.log_model(str(tiny_gpt2_dir), name="model")
    names = {req.split("==")[0] for req in _requirements(info.model_uri)}

    assert {
        "mlflow-tfx-plugin",
        "transformers",
        "torch",
        "accelerate",
        "safetensors",
        "tokenizers",
    } <= names
    assert "torchvision" not in names
    assert "peft" not in names


def test_task_specific_requirements():
    audio = {
        r.split("==")[0]
        for r in tfx.get_default_pip_requirements(task="automatic-speech-recognition")
    }
    image = {
        r.split("==")[0] for r in tfx.get_default_pip_requirements(task="image-classification")
    }
    assert "soundfile" in audio
    assert "pillow" in image
    assert "torchvision" not in audio | image


def test_user_requirements_override(tiny_gpt2_dir: Path, tracking_uri: str):
    with mlflow.start_run():
        info = tfx.log_model(str(tiny_gpt2_dir), name="model", extra_pip_requirements=["einops"])
    assert "einops" in _requirements(info.model_uri)
