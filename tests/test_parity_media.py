"""Parity with stock ``mlflow.transformers`` for speech recognition, image classification and
seq2seq input parsing.

Speech recognition and image classification are differential: the same tiny pipeline is
saved with stock ``mlflow.transformers.save_model`` and with ``tfx.save_model``, and both are
loaded with ``mlflow.pyfunc.load_model`` and given the same input. Stock's text2text,
summarization and translation cannot run on transformers 5 (the pipelines were removed), so
there stock's own input parser is the reference.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile
import transformers
from mlflow.exceptions import MlflowException
from PIL import Image

import mlflow_tfx_plugin as tfx
from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.tasks.seq2seq import (
    Seq2SeqRunner,
    SummarizationAdapter,
    Text2TextGenerationAdapter,
)


def _sine(sr: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * sr), dtype=np.float64) / sr
    return (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


def _wav_bytes(sr: int, channels: int = 1) -> bytes:
    wave = _sine(sr)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    buf = io.BytesIO()
    soundfile.write(buf, data, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _ffmpeg_stand_in(bpayload: bytes, sampling_rate: int) -> np.ndarray:
    """transformers' ``ffmpeg_read`` contract (decode, downmix to mono, resample, float32),
    for stock, which needs the ffmpeg binary for audio bytes and paths."""
    from math import gcd

    from scipy.signal import resample_poly

    wave, rate = soundfile.read(io.BytesIO(bpayload), dtype="float32", always_2d=True)
    mono = wave.mean(axis=1)
    if rate != sampling_rate:
        g = gcd(rate, sampling_rate)
        mono = resample_poly(mono, sampling_rate // g, rate // g)
    return mono.astype(np.float32)


@pytest.fixture(scope="module")
def stock_ffmpeg() -> Iterator[None]:
    """Real ffmpeg when installed; otherwise the stand-in above (measured against ffmpeg
    9.0: interior samples of a resampled 8 kHz sine agree within 1e-3)."""
    if shutil.which("ffmpeg"):
        yield
        return
    import transformers.pipelines.automatic_speech_recognition as asr

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(asr, "ffmpeg_read", _ffmpeg_stand_in)
        yield


@pytest.fixture(scope="module")
def asr_models(tiny_whisper_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    pipe = transformers.pipeline("automatic-speech-recognition", model=str(tiny_whisper_dir))
    root = tmp_path_factory.mktemp("asr")
    mlflow.transformers.save_model(pipe, root / "stock", pip_requirements=["transformers"])
    tfx.save_model(pipe, root / "tfx")
    return (
        pipe,
        mlflow.pyfunc.load_model(str(root / "stock")),
        mlflow.pyfunc.load_model(str(root / "tfx")),
    )


@pytest.fixture(scope="module")
def image_models(tiny_vit_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    pipe = transformers.pipeline("image-classification", model=str(tiny_vit_dir))
    root = tmp_path_factory.mktemp("vit")
    mlflow.transformers.save_model(pipe, root / "stock", pip_requirements=["transformers"])
    tfx.save_model(pipe, root / "tfx")
    return (
        pipe,
        mlflow.pyfunc.load_model(str(root / "stock")),
        mlflow.pyfunc.load_model(str(root / "tfx")),
    )


# --------------------------------------------------------------------------- speech recognition


@pytest.mark.parametrize(
    "make_input",
    [
        pytest.param(lambda tmp: _wav_bytes(16000), id="bytes-16k"),
        pytest.param(lambda tmp: _wav_bytes(8000), id="bytes-8k"),
        pytest.param(lambda tmp: _wav_bytes(44100, channels=2), id="bytes-44k-stereo"),
        pytest.param(lambda tmp: _write(tmp / "a.wav", _wav_bytes(8000)), id="path-8k"),
        # How MLflow hands stock a binary column sent as REST `inputs`: base64 text as bytes.
        pytest.param(lambda tmp: base64.b64encode(_wav_bytes(8000)), id="b64-bytes"),
        pytest.param(lambda tmp: [_wav_bytes(16000), _wav_bytes(44100)], id="list"),
        pytest.param(lambda tmp: pd.DataFrame({"audio": [_wav_bytes(8000)] * 2}), id="frame"),
    ],
)
def test_asr_matches_stock(asr_models: Any, stock_ffmpeg: None, tmp_path: Path, make_input: Any):
    _, stock, ours = asr_models
    data = make_input(tmp_path)
    expected = stock.predict(data)
    assert ours.predict(data) == expected
    assert len(expected) == (2 if isinstance(data, (list, pd.DataFrame)) else 1)


def test_asr_resamples_what_it_decodes(asr_models: Any, monkeypatch: pytest.MonkeyPatch):
    """The pipeline gets 16 kHz audio: the same sine, whatever rate the file was written at."""
    _, _, ours = asr_models
    pipe = ours.get_raw_model()
    seen: list[np.ndarray] = []
    original = pipe.preprocess

    def spy(inputs: Any, **kwargs: Any) -> Any:
        seen.append(np.asarray(inputs))
        return original(inputs, **kwargs)

    monkeypatch.setattr(pipe, "preprocess", spy)
    for rate in (8000, 44100):
        ours.predict(_wav_bytes(rate))
    reference = _sine(16000)
    for waveform in seen:
        assert waveform.shape == reference.shape
        assert np.abs(waveform[200:-200] - reference[200:-200]).max() < 1e-2


def test_asr_base64_strings_and_arrays(asr_models: Any, stock_ffmpeg: None):
    pipe, stock, ours = asr_models
    wav = _wav_bytes(8000)
    expected = stock.predict(base64.b64encode(wav))
    assert ours.predict(base64.b64encode(wav).decode()) == expected
    assert ours.predict(base64.encodebytes(wav).decode()) == expected  # with line breaks
    assert ours.predict([base64.b64encode(wav).decode()] * 2) == expected * 2
    # REST `{"inputs": "<base64>"}` reaches predict as a 0-d string array.
    assert ours.predict(np.array(base64.b64encode(wav).decode())) == expected
    # Float waveforms at the model's rate still work (stock's binary signature rejects them).
    waveform = _sine(16000)
    assert ours.predict(waveform) == [pipe(waveform)["text"].strip()]
    assert ours.predict({"raw": _sine(8000), "sampling_rate": 8000}) == expected


def test_asr_signature_and_input_example(asr_models: Any, tiny_whisper_dir: Path, tmp_path: Path):
    _, _, ours = asr_models
    signature = ours.metadata.signature
    assert signature.inputs is None  # no enforcement: bytes, paths and float arrays all pass
    assert signature.outputs.input_types() == [mlflow.types.DataType.string]
    assert "max_new_tokens" in {param.name for param in signature.params.params}
    # An 8 kHz input_example is resampled, not refused.
    tfx.save_model(str(tiny_whisper_dir), tmp_path / "m", input_example=_wav_bytes(8000))
    assert mlflow.pyfunc.load_model(str(tmp_path / "m")).predict(_wav_bytes(8000))


@pytest.mark.parametrize(
    ("bad", "quoted"),
    [(b"This isn't a real audio file", "audio bytes"), ("no-such-file.wav", "no-such-file.wav")],
)
def test_asr_bad_input_names_it(asr_models: Any, bad: Any, quoted: str):
    with pytest.raises(InvalidInputError, match=quoted) as info:
        asr_models[2].predict(bad)
    assert info.value.param == "inputs"


def _write(path: Path, payload: bytes) -> str:
    path.write_bytes(payload)
    return str(path)


# --------------------------------------------------------------------------- image classification


def _png_b64(png_path: Path, *, lines: bool = False) -> str:
    encode = base64.encodebytes if lines else base64.b64encode
    return encode(png_path.read_bytes()).decode()


@pytest.mark.parametrize(
    "make_input",
    [
        pytest.param(lambda png: str(png), id="path"),
        pytest.param(lambda png: _png_b64(png), id="base64"),
        pytest.param(lambda png: _png_b64(png, lines=True), id="base64-encodebytes"),
        pytest.param(lambda png: [str(png), _png_b64(png, lines=True)], id="list"),
        pytest.param(lambda png: pd.DataFrame({"image": [str(png), _png_b64(png)]}), id="frame"),
    ],
)
def test_image_classification_matches_stock(image_models: Any, png_path: Path, make_input: Any):
    _, stock, ours = image_models
    data = make_input(png_path)
    expected = stock.predict(data)
    pd.testing.assert_frame_equal(ours.predict(data), expected)
    # One row per image, one column per label holding the pipeline's {label, score} dicts.
    assert len(expected) == (2 if isinstance(data, (list, pd.DataFrame)) else 1)
    assert set(expected.iloc[0, 0]) == {"label", "score"}


def test_image_classification_top_k_matches_stock(
    image_models: Any, png_path: Path, tmp_path: Path
):
    pipe = image_models[0]
    # Stock's default signature has no params; its docs log one to pass top_k.
    signature = mlflow.models.infer_signature(
        str(png_path),
        mlflow.transformers.generate_signature_output(pipe, str(png_path)),
        params={"top_k": 2},
    )
    mlflow.transformers.save_model(
        pipe, tmp_path / "stock", signature=signature, pip_requirements=["transformers"]
    )
    stock = mlflow.pyfunc.load_model(str(tmp_path / "stock"))
    ours = image_models[2]
    for data in (str(png_path), [str(png_path), _png_b64(png_path)]):
        expected = stock.predict(data, params={"top_k": 1})
        pd.testing.assert_frame_equal(ours.predict(data, params={"top_k": 1}), expected)
        assert list(expected.columns) == [0]
        assert expected.iloc[0, 0] == pipe(str(png_path), top_k=1)[0]


def test_image_classification_accepts_pil_where_no_schema_applies(
    image_models: Any, png_path: Path, tmp_path: Path
):
    """The signature is stock's (a string column), so mlflow.pyfunc refuses a PIL image as
    stock's does; the native pipeline and the deployment server (no schema) take one."""
    pipe, stock, ours = image_models
    tfx.save_model(pipe, tmp_path / "m")
    adapter = tfx._load_pyfunc(str(tmp_path / "m"))
    expected = stock.predict(str(png_path))

    pd.testing.assert_frame_equal(adapter.predict(Image.open(png_path)), expected)
    pd.testing.assert_frame_equal(adapter.predict([Image.open(png_path)]), expected)
    assert ours.metadata.signature.inputs == stock.metadata.signature.inputs
    for model in (stock, ours):
        with pytest.raises(MlflowException):
            model.predict(Image.open(png_path))


def test_image_classification_bad_string_is_quoted(image_models: Any):
    with pytest.raises(InvalidInputError, match="'notafile'") as info:
        image_models[2].predict("notafile")
    assert info.value.param == "inputs"


# --------------------------------------------------------------------------- seq2seq input


def _stock_text2text(data: Any) -> list[str]:
    """Stock's parser (``_TransformersWrapper._parse_text2text_input``), as a list."""
    from mlflow.transformers import _TransformersWrapper

    parsed = _TransformersWrapper(pipeline=None)._parse_text2text_input(data)
    return [parsed] if isinstance(parsed, str) else parsed


@pytest.fixture(scope="module")
def t5_runner(tiny_t5_dir: Path) -> Seq2SeqRunner:
    return tfx.pipeline("text2text-generation", model=str(tiny_t5_dir))


@pytest.mark.parametrize(
    "data",
    [
        "abc",
        ["abc", "def"],
        {"context": "abc", "answer": "def"},
        [{"context": "abc", "answer": "def"}, {"context": "ghi", "answer": "jkl"}],
        {"inputs": "abc"},
    ],
)
def test_text2text_parses_as_stock(t5_runner: Seq2SeqRunner, data: Any):
    assert Text2TextGenerationAdapter(t5_runner).parse_texts(data) == _stock_text2text(data)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"context": ["a", "b"], "answer": "def"}, "context"),
        ([{"context": "abc", "answer": "def"}, {"context": "x", "answer": ["y"]}], "answer"),
    ],
)
def test_text2text_rejects_what_stock_rejects(t5_runner: Seq2SeqRunner, data: Any, field: str):
    with pytest.raises(MlflowException, match="An invalid type has been supplied"):
        _stock_text2text(data)
    with pytest.raises(InvalidInputError, match=f"'{field}'") as info:
        Text2TextGenerationAdapter(t5_runner).predict(data)
    assert info.value.param == field


def test_text2text_rejects_mismatched_records(t5_runner: Seq2SeqRunner, tmp_path: Path):
    records = [{"context": "abc", "answer": "def"}, {"context": "x"}]
    # The deployment server hands records over as they are ...
    with pytest.raises(InvalidInputError, match="'answer'") as info:
        Text2TextGenerationAdapter(t5_runner).predict(records)
    assert info.value.param == "answer"
    # ... pyfunc as a DataFrame, whose missing cell is NaN: stock rejects a non-string value.
    with pytest.raises(MlflowException, match="An invalid type has been supplied"):
        _stock_text2text(pd.DataFrame(records).to_dict("records")[1])
    tfx.save_model(t5_runner, tmp_path / "m", input_example=records[:1])
    with pytest.raises(InvalidInputError, match="'answer'"):
        mlflow.pyfunc.load_model(str(tmp_path / "m")).predict(pd.DataFrame(records))


def test_text2text_dict_through_pyfunc(t5_runner: Seq2SeqRunner, tmp_path: Path):
    example = {"context": "The sky is blue", "answer": "blue"}
    tfx.save_model(t5_runner, tmp_path / "m", input_example=example)
    model = mlflow.pyfunc.load_model(str(tmp_path / "m"))
    params = {"max_new_tokens": 4}
    expected = t5_runner(_stock_text2text(example), **params)[0]["generated_text"]
    assert model.predict(example, params=params) == [expected]


def test_summarization_takes_first_field_of_records(t5_runner: Seq2SeqRunner):
    from mlflow.transformers import _TransformersWrapper

    records = [{"text": "abc", "other": "x"}, {"text": "def", "other": "y"}]
    # Stock (_parse_raw_pipeline_input for summarization/translation): each record's first value.
    stock = [next(iter(entry.values())) for entry in records]
    assert SummarizationAdapter(t5_runner).parse_texts(records) == stock
    with pytest.raises(MlflowException, match="incorrect type"):
        _TransformersWrapper._validate_str_or_list_str({"text": "abc"})
    with pytest.raises(InvalidInputError, match="string or a list of strings"):
        SummarizationAdapter(t5_runner).parse_texts({"text": "abc"})


def test_seq2seq_runner_single_string(t5_runner: Seq2SeqRunner):
    single = t5_runner("hello", max_new_tokens=3)
    assert single == t5_runner(["hello"], max_new_tokens=3)
    assert len(single) == 1


# ----------------------------------------------------------------- found by MLflow's own tests


def test_audio_classification_answers_the_pipeline_output_as_stock(
    tiny_wav2vec2_dir: Path, tmp_path: Path
):
    """Stock returns ``pd.DataFrame(pipeline(audio))``: a score/label row per label."""
    pipe = transformers.pipeline("audio-classification", model=str(tiny_wav2vec2_dir))
    waveform = soundfile.read(io.BytesIO(_wav_bytes(16000)), dtype="float32")[0]
    tfx.save_model(pipe, tmp_path / "m")
    model = mlflow.pyfunc.load_model(str(tmp_path / "m"))

    expected = pd.DataFrame(pipe(waveform))
    pd.testing.assert_frame_equal(model.predict(_wav_bytes(16000)), expected, atol=1e-5)
    assert set(expected["label"]) == {"yes", "no"}
    assert tfx.load_model(str(tmp_path / "m"))(waveform)[0]["label"] in {"yes", "no"}
    assert "soundfile" in (tmp_path / "m" / "requirements.txt").read_text()


def test_speech_recognition_timestamps_answer_json_as_stock(tiny_whisper_dir: Path, tmp_path: Path):
    pipe = transformers.pipeline("automatic-speech-recognition", model=str(tiny_whisper_dir))
    config = {"return_timestamps": "word", "chunk_length_s": 20, "stride_length_s": [5, 3]}
    tfx.save_model(pipe, tmp_path / "ts", model_config=config)
    tfx.save_model(pipe, tmp_path / "plain")
    audio = _wav_bytes(16000)

    (answer,) = mlflow.pyfunc.load_model(str(tmp_path / "ts")).predict(audio)
    (text,) = mlflow.pyfunc.load_model(str(tmp_path / "plain")).predict(audio)
    decoded = json.loads(answer)
    assert set(decoded) == {"text", "chunks"} and isinstance(decoded["text"], str)
    assert not text.startswith("{"), "without timestamps: the transcript itself"
    assert all(set(chunk) == {"text", "timestamp"} for chunk in decoded["chunks"])
