"""Every supported task: log (pipeline and checkpoint modes), reload, predict through pyfunc.

Pyfunc predictions are compared with what the native transformers object returns for
the same input, so a wrong output shape or a dropped parameter fails here.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import transformers

import mlflow_tfx_plugin as tfx

GREEDY = {"max_new_tokens": 4, "do_sample": False}


@dataclass(frozen=True)
class Case:
    task: str
    fixture: str
    example: Any
    native: Callable[[Any, Any], Any]  # (runner, example) -> expected pyfunc output
    params: dict[str, Any] | None = None


def _generated(pipe: Any, text: str) -> list[str]:
    return [pipe(text, return_full_text=False, **GREEDY)[0]["generated_text"]]


def _seq2seq(pipe: Any, texts: list[str]) -> list[str]:
    return [out["generated_text"] for out in pipe(texts, **GREEDY)]


def _labels(pipe: Any, texts: list[str]) -> pd.DataFrame:
    return pd.DataFrame(pipe(texts), columns=["label", "score"])


def _fill(pipe: Any, text: str) -> list[str]:
    return [pipe(text)[0]["token_str"]]


def _entities(pipe: Any, texts: list[str]) -> list[str]:
    # stock mlflow.transformers answers the entity labels, comma-joined
    return [",".join(e["entity"] for e in ents) for ents in pipe(texts)]


def _zero_shot(pipe: Any, example: dict[str, Any]) -> pd.DataFrame:
    out = pipe(example["sequences"], candidate_labels=example["candidate_labels"])
    return pd.DataFrame(
        {"sequence": out["sequence"], "labels": out["labels"], "scores": out["scores"]}
    )


def _features(pipe: Any, text: str) -> np.ndarray:
    return np.asarray(pipe(text)[0])


def _qa(runner: Any, example: dict[str, str]) -> list[str]:
    return [runner(question=example["question"], context=example["context"])["answer"]]


CASES = [
    Case("text-generation", "tiny_gpt2_dir", "Hello world", _generated, GREEDY),
    Case("text-generation", "tiny_llama_dir", "The capital of France", _generated, GREEDY),
    Case("text2text-generation", "tiny_t5_dir", ["hello world", "Paris"], _seq2seq, GREEDY),
    Case("text-classification", "tiny_bert_classifier_dir", ["good", "bad day"], _labels),
    Case("fill-mask", "tiny_bert_mlm_dir", "Paris is the [MASK] of France.", _fill),
    Case("token-classification", "tiny_bert_token_classifier_dir", ["Alice in Paris"], _entities),
    Case(
        "zero-shot-classification",
        "tiny_bert_nli_dir",
        {"sequences": "hello world", "candidate_labels": ["greeting", "farewell"]},
        _zero_shot,
    ),
    Case("feature-extraction", "tiny_bert_encoder_dir", "hello world", _features),
    Case(
        "question-answering",
        "tiny_bert_qa_dir",
        {"question": "What is the capital?", "context": "Paris is the capital of France."},
        _qa,
    ),
]


def _assert_same(actual: Any, expected: Any) -> None:
    if isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(actual.reset_index(drop=True), expected, atol=1e-5)
    elif isinstance(expected, np.ndarray):
        np.testing.assert_allclose(actual, expected, atol=1e-5)
    else:
        assert actual == expected


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.task}-{c.fixture}")
def test_pipeline_roundtrip_matches_native(
    case: Case, request: pytest.FixtureRequest, tracking_uri: str
):
    runner = tfx.pipeline(case.task, model=str(request.getfixturevalue(case.fixture)))
    expected = case.native(runner, case.example)

    with mlflow.start_run():
        info = tfx.log_model(runner, name="model", input_example=case.example)

    assert info.flavors["tfx"]["task"] == case.task
    assert info.signature is not None
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    _assert_same(loaded.predict(case.example, params=case.params), expected)
    native = tfx.load_model(info.model_uri)
    _assert_same(case.native(native, case.example), expected)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.task}-{c.fixture}")
def test_checkpoint_roundtrip_infers_task(
    case: Case, request: pytest.FixtureRequest, tracking_uri: str
):
    checkpoint = request.getfixturevalue(case.fixture)
    expected = case.native(tfx.pipeline(case.task, model=str(checkpoint)), case.example)
    explicit = (
        case.task if case.task in ("feature-extraction", "zero-shot-classification") else None
    )

    with mlflow.start_run():
        info = tfx.log_model(str(checkpoint), name="model", task=explicit)

    assert info.flavors["tfx"]["task"] == case.task
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    _assert_same(loaded.predict(case.example, params=case.params), expected)


def test_table_question_answering(tiny_tapas_dir: Path, tracking_uri: str):
    pipe = transformers.pipeline("table-question-answering", model=str(tiny_tapas_dir))
    example = {
        "query": "Which city is in France?",
        "table": '{"city": ["Paris", "Rome"], "country": ["France", "Italy"]}',
    }
    with mlflow.start_run():
        info = tfx.log_model(pipe, name="model", input_example=example)
    answer = mlflow.pyfunc.load_model(info.model_uri).predict(example)
    expected = pipe(
        query=example["query"], table={"city": ["Paris", "Rome"], "country": ["France", "Italy"]}
    )
    assert answer == [expected["answer"]]


@pytest.mark.parametrize("mode", ["pipeline", "checkpoint"])
def test_speech_recognition_accepts_array_and_wav_bytes(
    tiny_whisper_dir: Path, wav_path: Path, tracking_uri: str, mode: str
):
    import soundfile

    pipe = transformers.pipeline("automatic-speech-recognition", model=str(tiny_whisper_dir))
    waveform, _ = soundfile.read(wav_path, dtype="float32")
    expected = pipe(waveform)["text"]
    with mlflow.start_run():
        info = tfx.log_model(pipe if mode == "pipeline" else str(tiny_whisper_dir), name="model")
    model = mlflow.pyfunc.load_model(info.model_uri)

    assert info.flavors["tfx"]["task"] == "automatic-speech-recognition"
    assert model.predict(wav_path.read_bytes()) == [expected]
    assert model.predict(waveform) == [expected]
    assert model.predict(str(wav_path)) == [expected]
    assert tfx.load_model(info.model_uri)(waveform)["text"] == expected


def test_image_classification_native_and_pyfunc(
    tiny_vit_dir: Path, png_path: Path, tracking_uri: str
):
    from PIL import Image

    pipe = transformers.pipeline("image-classification", model=str(tiny_vit_dir))
    # Stock's shape: one row per image, its top-k {label, score} dicts in columns 0..k-1.
    expected = pd.DataFrame([pipe(Image.open(png_path))])
    with mlflow.start_run():
        info = tfx.log_model(pipe, name="model")

    native = tfx.load_model(info.model_uri)
    assert native(Image.open(png_path))[0] == expected[0][0]
    model = mlflow.pyfunc.load_model(info.model_uri)
    encoded = base64.b64encode(png_path.read_bytes()).decode()
    _assert_same(model.predict(encoded), expected)
    _assert_same(model.predict(str(png_path)), expected)
    assert {cell["label"] for cell in expected.iloc[0]} <= {"cat", "dog"}


def test_text_generation_returns_only_new_text(tiny_gpt2_dir: Path, tracking_uri: str):
    pipe = transformers.pipeline("text-generation", model=str(tiny_gpt2_dir))
    with mlflow.start_run():
        info = tfx.log_model(pipe, name="model", model_config=GREEDY)
    outputs = mlflow.pyfunc.load_model(info.model_uri).predict(["Hello world", "Paris"])

    full = pipe("Hello world", **GREEDY)[0]["generated_text"]
    assert len(outputs) == 2
    assert full == "Hello world" + outputs[0]


def test_dataframe_input_is_batched_per_row(tiny_bert_classifier_dir: Path, tracking_uri: str):
    with mlflow.start_run():
        info = tfx.log_model(str(tiny_bert_classifier_dir), name="model")
    model = mlflow.pyfunc.load_model(info.model_uri)
    frame = pd.DataFrame({"text": ["good", "bad", "fine"]})

    result = model.predict(frame)

    assert list(result.columns) == ["label", "score"]
    assert len(result) == 3
    assert set(result["label"]) <= {"NEGATIVE", "POSITIVE"}
