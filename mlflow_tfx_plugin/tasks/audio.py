"""Audio tasks: ``automatic-speech-recognition`` and ``audio-classification``.

Both take float waveforms, audio file bytes (raw or base64) or paths.

Audio files are decoded with soundfile and resampled to the model's rate with scipy, where
the transformers pipeline would need ffmpeg for both.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.tasks.base import (
    STOCK_INVALID_STRING_INPUT,
    TaskAdapter,
    column_schema,
    decode_base64,
    string_schema,
    unwrap_record,
)

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema

#: How WAV, FLAC and OGG files start: such bytes are audio, never base64 text.
_AUDIO_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS")
#: Stock ``mlflow.transformers``' words for audio it cannot decode, which callers match on.
_STOCK_UNDECODABLE_AUDIO = (
    "Failed to process the input audio data. Either the audio file is corrupted or a uri was "
    "passed in without overriding the default model signature."
)


class SpeechRecognitionAdapter(TaskAdapter):
    """Transcribes audio; returns one string per input."""

    task = "automatic-speech-recognition"
    pipeline_task = "automatic-speech-recognition"
    pipeline_class = "AutomaticSpeechRecognitionPipeline"
    model_mappings = ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "MODEL_FOR_CTC_MAPPING_NAMES")
    auto_model_class = "AutoModelForSpeechSeq2Seq"
    call_params: ClassVar[dict[str, str]] = {"max_new_tokens": "long", "chunk_length_s": "double"}
    untyped_params = ("return_timestamps", "stride_length_s")
    needs_tokenizer = False
    pip_packages = ("soundfile", "scipy")

    @classmethod
    def default_signature(cls, model_config: Mapping[str, Any] | None = None) -> ModelSignature:
        """A string output and the call params, but no input schema.

        Stock declares a binary input column, and MLflow's schema enforcement then rejects
        float waveforms. Without one, waveforms, bytes, paths and base64 strings all reach
        :meth:`run`, which decodes base64 itself. An ``input_example`` still yields a
        signature for its own input type.
        """
        from mlflow.models.signature import ModelSignature

        params: Any = cls.params_schema(model_config)
        return ModelSignature(inputs=None, outputs=string_schema(), params=params)

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> list[str]:
        """One transcript per input; with ``return_timestamps`` "word" or "char", the
        pipeline's output (text and chunks) as a JSON string, as stock returns it."""
        waveforms = _waveforms(self.runner, data)
        outputs = self.call_runner(waveforms, _generate_kwargs(call_kwargs))
        if call_kwargs.get("return_timestamps") in ("word", "char"):
            return [json.dumps(output) for output in outputs]
        return [output["text"].strip() for output in outputs]  # stock strips, as here


class AudioClassificationAdapter(TaskAdapter):
    """``audio-classification``: a DataFrame of ``score`` and ``label`` (the pipeline's
    output, as stock returns it: a row per label for one input)."""

    task = "audio-classification"
    pipeline_task = "audio-classification"
    pipeline_class = "AudioClassificationPipeline"
    model_mappings = ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",)
    auto_model_class = "AutoModelForAudioClassification"
    call_params: ClassVar[dict[str, str]] = {"top_k": "long"}
    needs_tokenizer = False
    pip_packages = ("soundfile", "scipy")
    default_signature = SpeechRecognitionAdapter.default_signature

    @classmethod
    def output_schema(cls) -> Schema:
        return column_schema(("double", "score"), ("string", "label"))

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> pd.DataFrame:
        import pandas as pd

        waveforms = _waveforms(self.runner, data)
        single = len(waveforms) == 1 and not isinstance(data, list)
        inputs = waveforms[0] if single else waveforms
        return pd.DataFrame(self.call_runner(inputs, call_kwargs))


def _waveforms(pipeline: Any, data: Any) -> list[np.ndarray]:
    sampling_rate = pipeline.feature_extractor.sampling_rate
    return [_to_waveform(item, sampling_rate) for item in _as_audio_list(data)]


def _generate_kwargs(call_kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(call_kwargs)
    if "max_new_tokens" in kwargs:
        kwargs["generate_kwargs"] = {"max_new_tokens": kwargs.pop("max_new_tokens")}
    return kwargs


def _as_audio_list(data: Any) -> list[Any]:
    if isinstance(data, np.ndarray):
        if _is_numeric(data):
            return [data] if data.ndim == 1 else list(data)
        data = data.tolist()  # strings or bytes: REST `inputs` parsed by MLflow
    if isinstance(data, (bytes, bytearray, str)) or _is_sampled(data):
        return [data]
    if isinstance(data, list) and data:
        if all(_is_number(x) for x in data):
            return [np.asarray(data, dtype=np.float32)]
        return [unwrap_record(item) for item in data]
    if isinstance(data, Mapping) and data:
        return [unwrap_record(data)]
    raise InvalidInputError(
        "Audio input must be a 1-D float array (at the model's sampling rate), a "
        '{"raw": array, "sampling_rate": int} dict, audio file bytes or their base64 '
        f"encoding, a local file path, or a list of these; got {_describe(data)}.",
        param="inputs",
    )


def _to_waveform(item: Any, sampling_rate: int) -> np.ndarray:
    if isinstance(item, np.ndarray) and _is_numeric(item):
        return item.astype(np.float32, copy=False)
    if isinstance(item, list) and item and all(_is_number(x) for x in item):
        return np.asarray(item, dtype=np.float32)
    if _is_sampled(item):
        waveform = np.asarray(item.get("raw", item.get("array")), dtype=np.float32)
        if waveform.ndim == 2:  # (channels, samples) or (samples, channels): downmix
            waveform = waveform.mean(axis=int(np.argmin(waveform.shape)))
        return _resample(waveform, int(item["sampling_rate"]), sampling_rate)
    if isinstance(item, str):
        return _decode_audio(_read_path_or_base64(item), sampling_rate, source=item)
    if isinstance(item, (bytes, bytearray)):
        return _decode_audio(_maybe_base64(bytes(item)), sampling_rate)
    raise InvalidInputError(
        f"Cannot read audio from {_describe(item)}; pass a float array, audio file bytes, "
        "their base64 encoding or a local path.",
        param="inputs",
    )


def _read_path_or_base64(text: str) -> bytes:
    if "://" in text:
        raise InvalidInputError(
            f"Audio URLs are not fetched ('{text[:80]}'): download the file and pass its bytes "
            "or a local path.",
            param="inputs",
        )
    if len(text) < 4096 and os.path.isfile(text):
        with open(text, "rb") as f:
            return f.read()
    decoded = decode_base64(text)
    if decoded is None:
        raise InvalidInputError(
            f"{STOCK_INVALID_STRING_INPUT} '{text[:80]}' is neither an existing audio file nor "
            "base64-encoded audio; send a local path, the file's bytes, or their base64 "
            "encoding.",
            param="inputs",
        )
    return decoded


def _maybe_base64(payload: bytes) -> bytes:
    """Decode base64 text sent as bytes (how MLflow passes a binary column's `inputs`)."""
    if payload[:4] in _AUDIO_MAGIC:
        return payload
    decoded = decode_base64(payload)
    return payload if decoded is None else decoded


def _decode_audio(payload: bytes, sampling_rate: int, *, source: str | None = None) -> np.ndarray:
    import soundfile

    try:
        waveform, rate = soundfile.read(io.BytesIO(payload), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        what = f"'{source[:80]}' (read as base64)" if source is not None else "audio bytes"
        raise InvalidInputError(
            f"{_STOCK_UNDECODABLE_AUDIO} Could not decode {what}: {err}. Send WAV, FLAC or OGG "
            "data, raw or base64.",
            param="inputs",
        ) from err
    return _resample(waveform.mean(axis=1), rate, sampling_rate)


def _resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Resample mono audio from ``rate`` to ``target`` Hz (what ffmpeg does for stock)."""
    if rate <= 0:
        raise InvalidInputError(f"sampling_rate must be positive, got {rate}.", param="inputs")
    if rate == target:
        return waveform.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    gcd = math.gcd(rate, target)
    return resample_poly(waveform, target // gcd, rate // gcd).astype(np.float32)


def _is_sampled(item: Any) -> bool:
    """A ``{"raw" | "array": waveform, "sampling_rate": int}`` dict, as pipelines take."""
    if not isinstance(item, Mapping) or "sampling_rate" not in item:
        return False
    return "raw" in item or "array" in item


def _is_numeric(array: np.ndarray) -> bool:
    return array.dtype.kind in "fiu"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"
