"""Stock-documented REST payloads for the native text tasks, over real HTTP.

For each task one tfx model is served twice: by the real ``mlflow models serve`` CLI (MLflow's
schema enforcement, then our adapter) and by the ``tfx`` target's app on uvicorn in this process
(``/invocations`` hands ``inputs`` to the adapter as is). Both must answer what pyfunc
``predict`` gives in-process and, where stock works on transformers 5, what stock's model
answers (through MLflow's own scoring-server parser) for the same payload.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from integration import servers

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TABLE = {"city": ["Paris", "Rome"], "country": ["France", "Italy"]}
PAIR = {"text": "a man sleeps", "text_pair": "a person rests"}
QUESTIONS = ["What is the capital?", "Who lives there?"]
CONTEXTS = ["Paris is the capital of France.", "Alice lives in Rome with Bob."]
# stock's default zero-shot signature requires the template
TEMPLATE = {"hypothesis_template": "This example is {}."}


@dataclass(frozen=True)
class Case:
    task: str
    builder: str
    payloads: list[Any]  # the `inputs` of each request
    stock_works: bool  # stock can save and answer this task on transformers 5
    input_example: Any = None
    # the pyfunc input equal to a request's `inputs` (pyfunc cannot take a dict table: MLflow's
    # schema enforcement splits it into a row per column before the model sees it)
    pyfunc_form: Callable[[Any], Any] = copy.deepcopy


CASES = {
    "zero-shot": Case(
        "zero-shot-classification",
        "build_bert_nli",
        [
            {"sequences": "I love it", "candidate_labels": ["happy", "sad"], **TEMPLATE},
            {"sequences": "I love it", "candidate_labels": '["happy", "sad"]', **TEMPLATE},
            {
                "sequences": ["I love it", "I hate it"],
                "candidate_labels": ["happy", "sad"],
                **TEMPLATE,
            },
        ],
        stock_works=True,
    ),
    "table-qa": Case(
        "table-question-answering",
        "build_tapas",
        [
            {"query": "Which city is in France?", "table": TABLE},
            {"query": ["Which city is in France?", "Where is Rome?"], "table": TABLE},
            {"query": ["Which city is in France?", "Where is Rome?"], "table": json.dumps(TABLE)},
        ],
        stock_works=True,
        pyfunc_form=lambda inputs: {**inputs, "table": _as_json(inputs["table"])},
    ),
    # stock cannot infer a pair signature on transformers 5 (it falls back to one that drops
    # text_pair), so the expectation is the pair output pyfunc gives in-process
    "text-pairs": Case(
        "text-classification",
        "build_bert_nli",
        [PAIR, [PAIR, {"text": "hi there", "text_pair": "goodbye"}]],
        stock_works=False,
        input_example=PAIR,
    ),
    # transformers 5 has no question-answering pipeline: stock cannot save one
    "question-answering": Case(
        "question-answering",
        "build_bert_qa",
        [
            {"question": QUESTIONS, "context": CONTEXTS},
            [{"question": q, "context": c} for q, c in zip(QUESTIONS, CONTEXTS, strict=True)],
            {"question": QUESTIONS[0], "context": CONTEXTS[0]},
        ],
        stock_works=False,
    ),
}


@dataclass(frozen=True)
class Served:
    case: Case
    models_serve_url: str
    target_url: str
    predict: Callable[[Any], Any]  # the tfx model's pyfunc predict, JSON-shaped
    stock_served: Callable[[Any], Any] | None  # stock's answer to a request's `inputs`


@pytest.fixture(scope="module", params=list(CASES))
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    import mlflow
    import transformers

    import mlflow_tfx_plugin as tfx

    case = CASES[request.param]
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    root = tmp_path_factory.mktemp(request.param)
    checkpoint = getattr(tiny_models, case.builder)(root / "ckpt")
    pipe = tfx.pipeline(case.task, model=str(checkpoint))
    example = copy.deepcopy(case.input_example)
    tfx.save_model(pipe, root / "tfx", input_example=example)
    model = mlflow.pyfunc.load_model(str(root / "tfx"))
    stock_served = None
    if case.stock_works:
        stock_pipe = transformers.pipeline(case.task, model=str(checkpoint))
        stock_path = str(root / "stock")
        mlflow.transformers.save_model(stock_pipe, stock_path, pip_requirements=["transformers"])
        stock = mlflow.pyfunc.load_model(stock_path)
        stock_served = lambda inputs: _score_in_process(stock, inputs)  # noqa: E731
    with _models_serve(root / "tfx") as url, _tfx_target(root / "tfx") as target_url:
        yield Served(
            case, url, target_url, lambda data: _jsonable(model.predict(data)), stock_served
        )


def test_models_serve_answers_stock_payloads(served: Served):
    for inputs in served.case.payloads:
        answer = _post(served.models_serve_url, inputs)
        _assert_close(answer, served.predict(served.case.pyfunc_form(inputs)))
        if served.stock_served is not None:
            _assert_close(answer, served.stock_served(inputs))


def test_tfx_target_answers_stock_payloads(served: Served):
    for inputs in served.case.payloads:
        answer = _post(served.target_url, inputs)
        _assert_close(answer, served.predict(served.case.pyfunc_form(inputs)))
        if served.stock_served is not None:
            _assert_close(answer, served.stock_served(inputs))


def _post(url: str, inputs: Any) -> Any:
    response = requests.post(f"{url}/invocations", json={"inputs": inputs}, timeout=60)
    assert response.status_code == 200, f"{inputs!r}: {response.text}"
    return response.json()["predictions"]


def _score_in_process(model: Any, inputs: Any) -> Any:
    """Stock's answer, parsed by MLflow's scoring server exactly as ``models serve`` does."""
    from mlflow.pyfunc import scoring_server

    body = json.dumps({"inputs": inputs})
    schema = model.metadata.get_input_schema()
    response = scoring_server.invocations(body, "application/json", model, schema)
    assert response.status == 200, response.response
    return json.loads(response.response)["predictions"]


def _as_json(table: Any) -> str:
    return table if isinstance(table, str) else json.dumps(table)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value.to_dict("records") if hasattr(value, "to_dict") else value))


def _assert_close(actual: Any, expected: Any) -> None:
    if isinstance(expected, float):
        assert math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-7), (actual, expected)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), (actual, expected)
        for key in expected:
            _assert_close(actual[key], expected[key])
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), (actual, expected)
        for got, want in zip(actual, expected, strict=True):
            _assert_close(got, want)
    else:
        assert actual == expected


@contextlib.contextmanager
def _models_serve(model_path: Path) -> Iterator[str]:
    """``mlflow models serve`` on 127.0.0.1 for the duration of the block."""
    log = model_path.parent / "models-serve.log"
    with servers.models_serve(model_path, log=log, extra_args=["-w", "1"]) as server:
        yield server.url


@contextlib.contextmanager
def _tfx_target(model_dir: Path) -> Iterator[str]:
    """The ``tfx`` deployment target's app, served by uvicorn in a thread of this process."""
    from mlflow_tfx_plugin.deployments.config import DeploymentConfig
    from mlflow_tfx_plugin.deployments.server import create_app

    port = servers.free_port()
    app = create_app(
        "parity", DeploymentConfig(port=port), model_dir=model_dir, listen_after_load=True
    )
    with servers.uvicorn_in_thread(app, port=port) as url:
        yield url
