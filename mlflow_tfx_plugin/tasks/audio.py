"""``automatic-speech-recognition``: numpy waveforms, WAV/FLAC bytes or local file paths."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.tasks.base import TaskAdapter, unwrap_record


class SpeechRecognitionAdapter(TaskAdapter):
    """Transcribes audio; returns one string per input."""

    task = "automatic-speech-recognition"
    pipeline_task = "automatic-speech-recognition"
    pipeline_class = "AutomaticSpeechRecognitionPipeline"
    model_mappings = ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "MODEL_FOR_CTC_MAPPING_NAMES")
    auto_model_class = "AutoModelForSpeechSeq2Seq"
    call_params: ClassVar[dict[str, str]] = {"max_new_tokens": "long", "chunk_length_s": "double"}
    default_input_example = None

    @classmethod
    def default_signature(cls, model_config: Mapping[str, Any] | None = None) -> None:
        """None: audio arrives as bytes or as float arrays, and one schema cannot admit both.

        An ``input_example`` still yields a signature for its own input type.
        """
        return None

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> list[str]:
        sampling_rate = self.runner.feature_extractor.sampling_rate
        waveforms = [_to_waveform(item, sampling_rate) for item in _as_audio_list(data)]
        outputs = self.runner(waveforms, **_generate_kwargs(call_kwargs))
        return [output["text"] for output in outputs]


def _generate_kwargs(call_kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(call_kwargs)
    if "max_new_tokens" in kwargs:
        kwargs["generate_kwargs"] = {"max_new_tokens": kwargs.pop("max_new_tokens")}
    return kwargs


def _as_audio_list(data: Any) -> list[Any]:
    if isinstance(data, np.ndarray) and data.dtype != object:
        return [data] if data.ndim == 1 else list(data)
    if isinstance(data, (bytes, str)):
        return [data]
    if isinstance(data, list) and data:
        if all(isinstance(x, (int, float)) for x in data):
            return [np.asarray(data, dtype=np.float32)]
        return [unwrap_record(item) for item in data]
    if isinstance(data, dict):
        return [unwrap_record(data)]
    raise InvalidInputError(
        "Audio input must be a 1-D float numpy array, WAV/FLAC bytes, a local file path, or a "
        f"list of these; got {type(data).__name__}.",
        param="inputs",
    )


def _to_waveform(item: Any, sampling_rate: int) -> np.ndarray:
    if isinstance(item, np.ndarray):
        return item.astype(np.float32, copy=False)
    if isinstance(item, str):
        item = _read_local_file(item)
    if isinstance(item, (bytes, bytearray)):
        return _decode_audio(bytes(item), sampling_rate)
    raise InvalidInputError(
        f"Cannot read audio from {type(item).__name__}; pass a numpy array, bytes or a path.",
        param="inputs",
    )


def _read_local_file(path: str) -> bytes:
    if "://" in path:
        raise InvalidInputError(
            f"Audio URLs are not fetched ('{path[:80]}'): download the file and pass its bytes "
            "or a local path.",
            param="inputs",
        )
    if not os.path.isfile(path):
        raise InvalidInputError(f"Audio file '{path}' does not exist.", param="inputs")
    with open(path, "rb") as f:
        return f.read()


def _decode_audio(payload: bytes, sampling_rate: int) -> np.ndarray:
    import soundfile

    try:
        waveform, rate = soundfile.read(io.BytesIO(payload), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise InvalidInputError(
            f"Could not decode audio bytes ({err}); send WAV, FLAC or OGG data.", param="inputs"
        ) from err
    if rate != sampling_rate:
        raise InvalidInputError(
            f"Audio is sampled at {rate} Hz but the model expects {sampling_rate} Hz; resample "
            "it first.",
            param="inputs",
        )
    return waveform.mean(axis=1)
