"""Smoke tests: every tiny checkpoint fixture loads offline and produces sane output."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import soundfile as sf
import transformers
from PIL import Image


def _pipe(task: str, model_dir: Path) -> Any:
    pipe = transformers.pipeline(task, model=str(model_dir))
    assert pipe.task == task
    return pipe


def _text_generation(model_dir: Path, inputs: dict[str, Path]) -> None:
    pipe = _pipe("text-generation", model_dir)
    out = pipe("Hello world", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("Hello world")
    chat = pipe([{"role": "user", "content": "hi"}], max_new_tokens=2)
    assert chat[0]["generated_text"][-1]["role"] == "assistant"
    assert pipe.tokenizer.decode(pipe.tokenizer("Paris é 北京")["input_ids"]).endswith(
        "Paris é 北京"
    )


def _t5(model_dir: Path, inputs: dict[str, Path]) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    out = model.generate(**tokenizer("hello", return_tensors="pt"), max_new_tokens=5)
    assert out.shape[0] == 1 and 1 < out.shape[1] <= 6
    assert isinstance(tokenizer.decode(out[0], skip_special_tokens=True), str)


def _text_classification(model_dir: Path, inputs: dict[str, Path]) -> None:
    out = _pipe("text-classification", model_dir)(["I love Paris", "I hate rain"])
    assert {o["label"] for o in out} <= {"NEGATIVE", "POSITIVE"}


def _token_classification(model_dir: Path, inputs: dict[str, Path]) -> None:
    out = _pipe("token-classification", model_dir)("John lives in Paris")
    assert out and {o["entity"] for o in out} <= {"O", "B-LOC", "I-LOC", "B-PER", "I-PER"}


def _fill_mask(model_dir: Path, inputs: dict[str, Path]) -> None:
    out = _pipe("fill-mask", model_dir)("Paris is the [MASK] of France.", top_k=3)
    assert len(out) == 3 and all("sequence" in o for o in out)


def _zero_shot(model_dir: Path, inputs: dict[str, Path]) -> None:
    labels = ["travel", "sports"]
    out = _pipe("zero-shot-classification", model_dir)("Paris is nice.", candidate_labels=labels)
    assert sorted(out["labels"]) == sorted(labels) and len(out["scores"]) == 2


def _qa(model_dir: Path, inputs: dict[str, Path]) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(model_dir)
    enc = tokenizer("What is the capital?", "Paris is the capital.", return_tensors="pt")
    out = model(**enc)
    assert out.start_logits.shape == out.end_logits.shape == enc["input_ids"].shape


def _feature_extraction(model_dir: Path, inputs: dict[str, Path]) -> None:
    out = np.asarray(_pipe("feature-extraction", model_dir)("hello world"))
    assert out.ndim == 3 and out.shape[0] == 1 and out.shape[2] == 32


def _table_qa(model_dir: Path, inputs: dict[str, Path]) -> None:
    table = {"city": ["Paris", "Rome"], "country": ["France", "Italy"]}
    out = _pipe("table-question-answering", model_dir)(
        {"query": "What is the capital of France?", "table": table}
    )
    assert {"answer", "coordinates", "cells", "aggregator"} <= out.keys()


def _asr(model_dir: Path, inputs: dict[str, Path]) -> None:
    audio, sr = sf.read(inputs["wav"], dtype="float32")
    assert sr == 16000 and audio.shape == (16000,)
    out = _pipe("automatic-speech-recognition", model_dir)(audio)
    assert isinstance(out["text"], str)


def _image_classification(model_dir: Path, inputs: dict[str, Path]) -> None:
    out = _pipe("image-classification", model_dir)(Image.open(inputs["png"]))
    assert {o["label"] for o in out} == {"cat", "dog"}


def _sentence_transformer(model_dir: Path, inputs: dict[str, Path]) -> None:
    from sentence_transformers import SentenceTransformer

    assert (model_dir / "modules.json").is_file() and (model_dir / "1_Pooling").is_dir()
    assert SentenceTransformer(str(model_dir)).encode(["hello world"]).shape == (1, 384)


CASES: dict[str, Callable[[Path, dict[str, Path]], None]] = {
    "tiny_gpt2_dir": _text_generation,
    "tiny_llama_dir": _text_generation,
    "tiny_t5_dir": _t5,
    "tiny_bert_classifier_dir": _text_classification,
    "tiny_bert_token_classifier_dir": _token_classification,
    "tiny_bert_mlm_dir": _fill_mask,
    "tiny_bert_nli_dir": _zero_shot,
    "tiny_bert_qa_dir": _qa,
    "tiny_bert_encoder_dir": _feature_extraction,
    "tiny_tapas_dir": _table_qa,
    "tiny_whisper_dir": _asr,
    "tiny_vit_dir": _image_classification,
    "minilm_dir": _sentence_transformer,
}


@pytest.mark.parametrize("fixture_name", list(CASES))
def test_tiny_checkpoint(
    fixture_name: str, request: pytest.FixtureRequest, wav_path: Path, png_path: Path
) -> None:
    model_dir = request.getfixturevalue(fixture_name)
    assert (model_dir / "config.json").is_file()
    assert (model_dir / "model.safetensors").is_file()
    CASES[fixture_name](model_dir, {"wav": wav_path, "png": png_path})


@pytest.mark.parametrize("attempt", [1, 2])
def test_tracking_uri(tracking_uri: str, tmp_path: Path, attempt: int) -> None:
    assert mlflow.get_tracking_uri() == tracking_uri
    experiment = mlflow.get_experiment_by_name("tests")
    assert mlflow.search_runs([experiment.experiment_id]).empty  # fresh store every test
    with mlflow.start_run() as run:
        mlflow.log_text("hi", "note.txt")
    assert run.info.experiment_id == experiment.experiment_id
    assert (tmp_path / "artifacts" / run.info.run_id / "artifacts" / "note.txt").is_file()
