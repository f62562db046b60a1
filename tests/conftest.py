"""Shared pytest fixtures: offline Hugging Face settings, tiny checkpoints, MLflow store."""

from __future__ import annotations

import os
import shutil

# huggingface_hub / transformers read these at import time, so set them before anything
# imports them (fixtures run too late).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
import tiny_models


def _checkpoint_fixture(name: str, builder: Callable[[Path], Path]) -> Callable[..., Path]:
    """Create a session-scoped fixture that builds ``builder``'s checkpoint once."""

    @pytest.fixture(scope="session", name=name)
    def _fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return builder(tmp_path_factory.mktemp(name) / "model")

    _fixture.__doc__ = builder.__doc__
    return _fixture


tiny_gpt2_dir = _checkpoint_fixture("tiny_gpt2_dir", tiny_models.build_gpt2)
tiny_llama_dir = _checkpoint_fixture("tiny_llama_dir", tiny_models.build_llama)
tiny_llama_sp_dir = _checkpoint_fixture("tiny_llama_sp_dir", tiny_models.build_llama_sentencepiece)
tiny_t5_dir = _checkpoint_fixture("tiny_t5_dir", tiny_models.build_t5)
tiny_bert_classifier_dir = _checkpoint_fixture(
    "tiny_bert_classifier_dir", tiny_models.build_bert_classifier
)
tiny_bert_token_classifier_dir = _checkpoint_fixture(
    "tiny_bert_token_classifier_dir", tiny_models.build_bert_token_classifier
)
tiny_bert_mlm_dir = _checkpoint_fixture("tiny_bert_mlm_dir", tiny_models.build_bert_mlm)
tiny_bert_nli_dir = _checkpoint_fixture("tiny_bert_nli_dir", tiny_models.build_bert_nli)
tiny_bert_qa_dir = _checkpoint_fixture("tiny_bert_qa_dir", tiny_models.build_bert_qa)
tiny_bert_encoder_dir = _checkpoint_fixture("tiny_bert_encoder_dir", tiny_models.build_bert_encoder)
tiny_tapas_dir = _checkpoint_fixture("tiny_tapas_dir", tiny_models.build_tapas)
tiny_whisper_dir = _checkpoint_fixture("tiny_whisper_dir", tiny_models.build_whisper)
tiny_vit_dir = _checkpoint_fixture("tiny_vit_dir", tiny_models.build_vit)
minilm_dir = _checkpoint_fixture("minilm_dir", tiny_models.build_minilm_copy)


@pytest.fixture(scope="session")
def wav_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 s, 16 kHz mono sine-wave WAV file."""
    return tiny_models.write_wav(tmp_path_factory.mktemp("audio") / "sine.wav")


@pytest.fixture(scope="session")
def png_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32x32 RGB PNG file."""
    return tiny_models.make_png(tmp_path_factory.mktemp("image") / "image.png")


@pytest.fixture(scope="session")
def _mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Empty, fully migrated MLflow sqlite DB: migrating takes seconds, copying it does not."""
    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def tracking_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _mlflow_db_template: Path
) -> Iterator[str]:
    """Point MLflow at a fresh sqlite store with artifacts under ``tmp_path/artifacts``."""
    # set_experiment() stores the active experiment in a module global and in
    # MLFLOW_EXPERIMENT_ID; monkeypatch restores both when the test ends.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    db = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_db_template, db)
    uri = f"sqlite:///{db}"
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment(
        "tests", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    mlflow.set_experiment(experiment_id=experiment_id)
    try:
        yield uri
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)


tiny_wav2vec2_dir = _checkpoint_fixture("tiny_wav2vec2_dir", tiny_models.build_wav2vec2_classifier)
