"""Stock MLflow's documented REST payloads for speech recognition and image classification.

A real ``mlflow models serve`` process serves each tfx model; its answers must equal
in-process pyfunc predictions (and, for images, what stock's own model predicts). The
``tfx`` target's ``/invocations`` gets the same payloads: there no MLflow schema parsing
runs, the raw ``inputs`` reach the adapter.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import soundfile

import mlflow_tfx_plugin as tfx
from integration import servers

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def _wav(sr: int) -> bytes:
    t = np.arange(sr, dtype=np.float64) / sr
    buf = io.BytesIO()
    soundfile.write(
        buf,
        (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32),
        sr,
        format="WAV",
        subtype="PCM_16",
    )
    return buf.getvalue()


WAV_16K, WAV_8K = _wav(16000), _wav(8000)
B64_16K, B64_8K = base64.b64encode(WAV_16K).decode(), base64.b64encode(WAV_8K).decode()


def _tiny_models() -> Any:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    return tiny_models


@pytest.fixture(scope="module")
def whisper_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = _tiny_models().build_whisper(tmp_path_factory.mktemp("ckpt") / "whisper")
    path = tmp_path_factory.mktemp("saved") / "whisper"
    tfx.save_model(str(ckpt), path)
    return path


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    """(tfx model, stock model, PNG bytes) of one tiny ViT pipeline."""
    import transformers

    models = _tiny_models()
    root = tmp_path_factory.mktemp("vit")
    pipe = transformers.pipeline("image-classification", model=str(models.build_vit(root / "c")))
    tfx.save_model(pipe, root / "tfx")
    mlflow.transformers.save_model(pipe, root / "stock", pip_requirements=["transformers"])
    return root / "tfx", root / "stock", models.make_png(root / "image.png").read_bytes()


@contextlib.contextmanager
def _mlflow_serve(model_path: Path) -> Iterator[str]:
    """``mlflow models serve`` on 127.0.0.1 for the duration of the block."""
    log = model_path.parent / "models-serve.log"
    with servers.models_serve(model_path, log=log) as server:
        yield server.url


@contextlib.contextmanager
def _tfx_serve(model_path: Path) -> Iterator[str]:
    """The tfx target's server app, in this process (cheaper than a server process)."""
    from mlflow_tfx_plugin.deployments.config import DeploymentConfig
    from mlflow_tfx_plugin.deployments.server import create_app
    from mlflow_tfx_plugin.deployments.service import LoadOptions, load_served_model

    port = servers.free_port()
    served = load_served_model(
        "media", model_path, LoadOptions.from_config(DeploymentConfig(max_batch_size=4))
    )
    app = create_app("media", DeploymentConfig(port=port), served=served)
    with servers.uvicorn_in_thread(app, port=port) as url:
        yield url


def _post(url: str, body: dict[str, Any]) -> Any:
    response = requests.post(f"{url}/invocations", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def _frame_payloads(column: str, values: list[str]) -> list[dict[str, Any]]:
    """Stock's documented DataFrame payloads for a base64 column."""
    frame = pd.DataFrame({column: values})
    return [
        {"dataframe_split": frame.to_dict(orient="split")},
        {"dataframe_records": frame.to_dict(orient="records")},
    ]


def _asr_payloads() -> list[tuple[dict[str, Any], list[bytes]]]:
    """(payload, the audio it carries) as stock's docs and tests send them."""
    lines = base64.encodebytes(WAV_8K).decode()
    return [
        ({"inputs": [B64_16K]}, [WAV_16K]),
        ({"inputs": B64_8K}, [WAV_8K]),
        ({"inputs": [B64_16K, B64_8K]}, [WAV_16K, WAV_8K]),
        ({"inputs": [lines]}, [WAV_8K]),
        *((payload, [WAV_8K]) for payload in _frame_payloads("audio_file", [B64_8K])),
    ]


def test_speech_recognition_rest_payloads(whisper_model: Path):
    pyfunc = mlflow.pyfunc.load_model(str(whisper_model))
    cases = [(payload, pyfunc.predict(audio)) for payload, audio in _asr_payloads()]
    with _mlflow_serve(whisper_model) as url:
        served = [_post(url, payload) for payload, _ in cases]
    with _tfx_serve(whisper_model) as url:
        target = [_post(url, payload) for payload, _ in cases]
    expected = [answer for _, answer in cases]
    assert served == expected
    assert target == expected
    assert [len(answer) for answer in expected] == [1, 1, 2, 1, 1, 1]


def test_image_classification_rest_payloads(vit: tuple[Path, Path, bytes]):
    model_path, stock_path, png = vit
    b64 = base64.b64encode(png).decode()
    lines = base64.encodebytes(png).decode()
    payloads = [
        {"inputs": [b64]},
        {"inputs": b64},
        {"inputs": [b64, lines]},
        {"inputs": [b64], "params": {"top_k": 1}},
        *_frame_payloads("image_file", [b64, lines]),
    ]
    ours, stock = (
        mlflow.pyfunc.load_model(str(model_path)),
        mlflow.pyfunc.load_model(str(stock_path)),
    )
    images = [[b64], [b64], [b64, lines], [b64], [b64, lines], [b64, lines]]
    expected = [
        _as_json(ours.predict(data, params=p.get("params")))
        for data, p in zip(images, payloads, strict=True)
    ]
    with _mlflow_serve(model_path) as url:
        served = [_post(url, payload) for payload in payloads]
    with _tfx_serve(model_path) as url:
        target = [_post(url, payload) for payload in payloads if "params" not in payload]
    assert served == expected
    assert target == [
        answer for answer, p in zip(expected, payloads, strict=True) if "params" not in p
    ]
    # Stock's own model agrees (its default signature has no params: top_k=1 is not compared).
    for data, answer in zip(images, expected, strict=True):
        if len(answer[0]) == 2:
            assert _as_json(stock.predict(data)) == answer
    assert [len(answer) for answer in expected] == [1, 1, 2, 1, 2, 2]
    assert list(expected[3][0]) == ["0"]


def test_tfx_target_invocations_applies_params(vit: tuple[Path, Path, bytes]):
    model_path, _, png = vit
    b64 = base64.b64encode(png).decode()
    expected = _as_json(mlflow.pyfunc.load_model(str(model_path)).predict([b64], {"top_k": 1}))
    with _tfx_serve(model_path) as url:
        assert _post(url, {"inputs": [b64], "params": {"top_k": 1}}) == expected


def _as_json(frame: pd.DataFrame) -> Any:
    """What a server's JSON answer holds for a DataFrame: its records, keys as strings."""
    return json.loads(json.dumps(frame.to_dict(orient="records")))
