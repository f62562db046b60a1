"""Drop-in parity with stock ``mlflow.transformers`` for the native text tasks.

Each task's tiny model is saved twice, with stock ``mlflow.transformers.save_model`` and with
``tfx.save_model``; the same input goes through both ``mlflow.pyfunc`` models (and through
MLflow's own scoring-server parser, as ``mlflow models serve`` parses a request), and the
answers must be equal. Where stock is broken on transformers 5, the test asserts the contract
stock documents instead, and says so.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import transformers
from mlflow.pyfunc import PyFuncModel, scoring_server

import mlflow_tfx_plugin as tfx
from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.tasks.text import TableQuestionAnsweringAdapter

TABLE = {"city": ["Paris", "Rome"], "country": ["France", "Italy"]}
TEMPLATE = "This example is {}."


@dataclass(frozen=True)
class Saved:
    """One pipeline saved by both flavors and loaded back through pyfunc."""

    pipe: Any
    stock: PyFuncModel
    tfx: PyFuncModel


def _save_both(pipe: Any, root: Path, **kwargs: Any) -> Saved:
    mlflow.transformers.save_model(
        pipe, str(root / "stock"), pip_requirements=["transformers"], **kwargs
    )
    tfx.save_model(pipe, root / "tfx", **kwargs)
    return Saved(
        pipe,
        mlflow.pyfunc.load_model(str(root / "stock")),
        mlflow.pyfunc.load_model(str(root / "tfx")),
    )


def _saved(task: str, checkpoint: Path, root: Path, **kwargs: Any) -> Saved:
    return _save_both(transformers.pipeline(task, model=str(checkpoint)), root, **kwargs)


def _served(model: PyFuncModel, payload: dict[str, Any]) -> Any:
    """What ``mlflow models serve`` answers: MLflow's own request parsing and schema checks."""
    response = scoring_server.invocations(
        json.dumps(payload), "application/json", model, model.metadata.get_input_schema()
    )
    assert response.status == 200, response.response
    return json.loads(response.response)["predictions"]


def _predict_both(saved: Saved, data: Any, **kwargs: Any) -> tuple[Any, Any]:
    # stock's table parsing mutates its input, so each flavor gets its own copy
    return (
        saved.stock.predict(copy.deepcopy(data), **kwargs),
        saved.tfx.predict(copy.deepcopy(data), **kwargs),
    )


def _assert_frames_equal(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(
        actual.reset_index(drop=True), expected.reset_index(drop=True), atol=1e-6
    )


# --- zero-shot-classification ----------------------------------------------------------------


@pytest.fixture(scope="module")
def zero_shot(tiny_bert_nli_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return _saved("zero-shot-classification", tiny_bert_nli_dir, tmp_path_factory.mktemp("zs"))


ZERO_SHOT_INPUTS = [
    {"sequences": "hello world", "candidate_labels": ["happy", "sad"]},
    {"sequences": "hello world", "candidate_labels": '["happy", "sad"]'},
    {"sequences": ["hello world", "bye now"], "candidate_labels": ["happy", "sad"]},
    {"sequences": ["hello world", "bye now"], "candidate_labels": '["happy", "sad", "ok"]'},
    {"sequences": "hello world", "candidate_labels": "happy, sad"},
]


@pytest.mark.parametrize("data", ZERO_SHOT_INPUTS, ids=lambda d: json.dumps(d)[:60])
def test_zero_shot_pyfunc_matches_stock(zero_shot: Saved, data: dict[str, Any]):
    data = {**data, "hypothesis_template": TEMPLATE}  # stock's signature requires it
    stock, ours = _predict_both(zero_shot, data)
    _assert_frames_equal(ours, stock)


@pytest.mark.parametrize("data", ZERO_SHOT_INPUTS, ids=lambda d: json.dumps(d)[:60])
def test_zero_shot_served_payloads_match_stock(zero_shot: Saved, data: dict[str, Any]):
    payload = {"inputs": {**data, "hypothesis_template": TEMPLATE}}
    assert _served(zero_shot.tfx, payload) == _served(zero_shot.stock, payload)


def test_zero_shot_default_signature_has_stock_column_types(zero_shot: Saved):
    def types(model: PyFuncModel) -> dict[str, str]:
        schema = model.metadata.get_input_schema()
        return {spec.name: str(spec.type) for spec in schema.inputs}

    assert types(zero_shot.tfx) == types(zero_shot.stock)


def test_zero_shot_hypothesis_template_stays_optional(zero_shot: Saved):
    data = {"sequences": "hello world", "candidate_labels": ["happy", "sad"]}
    expected = zero_shot.pipe(data["sequences"], candidate_labels=data["candidate_labels"])
    out = zero_shot.tfx.predict(data)
    assert list(out["labels"]) == expected["labels"]
    np.testing.assert_allclose(out["scores"], expected["scores"], atol=1e-6)


def test_zero_shot_input_example_with_list_labels_keeps_working(
    tiny_bert_nli_dir: Path, tmp_path_factory: pytest.TempPathFactory
):
    example = {
        "sequences": "hello world",
        "candidate_labels": ["happy", "sad"],
        "hypothesis_template": TEMPLATE,
    }
    root = tmp_path_factory.mktemp("zs-example")
    saved = _saved(
        "zero-shot-classification", tiny_bert_nli_dir, root, input_example=copy.deepcopy(example)
    )
    stock, ours = _predict_both(saved, example)
    _assert_frames_equal(ours, stock)
    assert _served(saved.tfx, {"inputs": example}) == stock.to_dict("records")


# --- table-question-answering ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tqa(tiny_tapas_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return _saved("table-question-answering", tiny_tapas_dir, tmp_path_factory.mktemp("tqa"))


QUERIES = ["Which city is in France?", "Where is Rome?"]


@pytest.mark.parametrize("query", [QUERIES[0], QUERIES], ids=["one-query", "two-queries"])
def test_table_qa_pyfunc_matches_stock_one_answer_per_query(tqa: Saved, query: Any):
    data = {"query": query, "table": json.dumps(TABLE)}
    stock, ours = _predict_both(tqa, data)
    native = tqa.pipe(table=TABLE, query=query)
    native = native if isinstance(native, list) else [native]
    assert ours == stock == [answer["answer"] for answer in native]


@pytest.mark.parametrize("query", [QUERIES[0], QUERIES], ids=["one-query", "two-queries"])
@pytest.mark.parametrize("table", [TABLE, json.dumps(TABLE)], ids=["object", "json-string"])
def test_table_qa_served_payloads_match_stock(tqa: Saved, query: Any, table: Any):
    payload = {"inputs": {"query": query, "table": table}}
    answers = _served(tqa.tfx, payload)
    assert answers == _served(tqa.stock, payload)
    assert len(answers) == (len(query) if isinstance(query, list) else 1)


def test_table_qa_pyfunc_dict_table_answers_once(tqa: Saved):
    # Stock rejects a dict table through pyfunc; the contract is one answer per query.
    answers = tqa.tfx.predict({"query": QUERIES[0], "table": copy.deepcopy(TABLE)})
    assert answers == [tqa.pipe(table=TABLE, query=QUERIES[0])["answer"]]


def test_table_qa_split_table_is_a_clear_error(tqa: Saved):
    adapter = TableQuestionAnsweringAdapter(tqa.pipe)
    rows = [{"query": QUERIES[0], "table": cells} for cells in TABLE.values()]  # as pyfunc splits
    with pytest.raises(InvalidInputError, match=r"json\.dumps") as err:
        adapter.predict(rows)
    assert err.value.param == "table"


def test_table_qa_numeric_cells_are_read_as_text(tqa: Saved):
    # TAPAS's tokenizer crashes on a number cell; stock documents string cells ("1000").
    numbers = {"city": ["Paris", "Rome"], "people": [2100000, 2800000]}
    as_text = {"city": ["Paris", "Rome"], "people": ["2100000", "2800000"]}
    answers = tqa.tfx.predict({"query": QUERIES[0], "table": json.dumps(numbers)})
    assert answers == [tqa.pipe(table=as_text, query=QUERIES[0])["answer"]]


# --- text-classification ---------------------------------------------------------------------

PAIR = {"text": "a man sleeps", "text_pair": "a person rests"}
PAIRS = [PAIR, {"text": "hi there", "text_pair": "goodbye"}]


@pytest.fixture(scope="module")
def classifier(tiny_bert_nli_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return _saved("text-classification", tiny_bert_nli_dir, tmp_path_factory.mktemp("tc"))


@pytest.mark.parametrize("data", ["a man sleeps", ["a man sleeps", "hi there"]])
def test_text_classification_matches_stock(classifier: Saved, data: Any):
    stock, ours = _predict_both(classifier, data)
    _assert_frames_equal(ours, stock)
    assert list(ours.columns) == ["label", "score"]
    assert _served(classifier.tfx, {"inputs": data}) == _served(classifier.stock, {"inputs": data})


def _native_pairs(pipe: Any, pairs: list[dict[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(pipe([dict(pair) for pair in pairs]), columns=["label", "score"])


@pytest.mark.parametrize("data", [PAIR, PAIRS], ids=["one-pair", "two-pairs"])
def test_text_pairs_reach_the_model(classifier: Saved, data: Any):
    # Stock documents {"text", "text_pair"} input, but on transformers 5 it cannot infer a
    # signature from it and its default signature drops text_pair: assert the contract (the
    # native pipeline's pair output) instead.
    pairs = data if isinstance(data, list) else [data]
    expected = _native_pairs(classifier.pipe, pairs)
    alone = pd.DataFrame(classifier.pipe([pair["text"] for pair in pairs]))
    assert not np.allclose(expected["score"], alone["score"], atol=1e-9)

    _assert_frames_equal(tfx.generate_signature_output(classifier.pipe, data), expected)


@pytest.fixture(scope="module")
def pair_classifier(
    tiny_bert_nli_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> PyFuncModel:
    path = tmp_path_factory.mktemp("tc-pairs") / "tfx"
    pipe = transformers.pipeline("text-classification", model=str(tiny_bert_nli_dir))
    tfx.save_model(pipe, path, input_example=dict(PAIR))
    return mlflow.pyfunc.load_model(str(path))


def test_text_pair_input_example_gives_a_pair_signature(pair_classifier: PyFuncModel):
    assert pair_classifier.metadata.get_input_schema().input_names() == ["text", "text_pair"]


@pytest.mark.parametrize("data", [PAIR, PAIRS], ids=["one-pair", "two-pairs"])
def test_text_pairs_through_pyfunc_and_serving(
    pair_classifier: PyFuncModel, classifier: Saved, data: Any
):
    pairs = data if isinstance(data, list) else [data]
    expected = _native_pairs(classifier.pipe, pairs)
    _assert_frames_equal(pair_classifier.predict(copy.deepcopy(data)), expected)
    served = pd.DataFrame(_served(pair_classifier, {"inputs": data}))
    _assert_frames_equal(served, expected)


def test_text_classification_rejects_unknown_dict_keys(classifier: Saved):
    with pytest.raises(InvalidInputError, match="text_pair") as err:
        tfx.generate_signature_output(classifier.pipe, {"text": "a", "second": "b"})
    assert err.value.param == "second"


# --- question-answering ----------------------------------------------------------------------

QUESTIONS = ["What is the capital?", "Who lives there?"]
CONTEXTS = ["Paris is the capital of France.", "Alice lives in Rome with Bob."]


@pytest.fixture(scope="module")
def qa(tiny_bert_qa_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("qa") / "tfx"
    tfx.save_model(tfx.pipeline("question-answering", model=str(tiny_bert_qa_dir)), path)
    return mlflow.pyfunc.load_model(str(path)), tfx.load_model(str(path))


def test_question_answering_dict_of_lists_answers_each_pair(qa: Any):
    # transformers 5 has no question-answering pipeline, so stock cannot save one: assert its
    # documented contract, one (stripped) answer per (question, context) pair.
    model, runner = qa
    expected = [
        runner(question=q, context=c)["answer"].strip()
        for q, c in zip(QUESTIONS, CONTEXTS, strict=True)
    ]
    records = [{"question": q, "context": c} for q, c in zip(QUESTIONS, CONTEXTS, strict=True)]
    assert model.predict({"question": QUESTIONS, "context": CONTEXTS}) == expected
    assert model.predict(records) == expected
    assert _served(model, {"inputs": {"question": QUESTIONS, "context": CONTEXTS}}) == expected


def test_question_answering_questions_share_one_context(qa: Any):
    model, runner = qa
    expected = [runner(question=q, context=CONTEXTS[0])["answer"].strip() for q in QUESTIONS]
    assert model.predict({"question": QUESTIONS, "context": CONTEXTS[0]}) == expected


def test_question_answering_unequal_lists_are_a_clear_error(qa: Any):
    model, _ = qa
    with pytest.raises(InvalidInputError, match="one question per context"):
        model.predict({"question": QUESTIONS, "context": [*CONTEXTS, "More text."]})


# --- token-classification --------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_config", [None, {"aggregation_strategy": "simple"}], ids=["entity", "entity_group"]
)
def test_token_classification_returns_stock_entity_labels(
    tiny_bert_token_classifier_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    model_config: dict[str, str] | None,
):
    root = tmp_path_factory.mktemp("tok")
    saved = _saved(
        "token-classification", tiny_bert_token_classifier_dir, root, model_config=model_config
    )
    for data in ["Alice lives in Paris", ["Alice lives in Paris", "Bob met Carol"]]:
        stock, ours = _predict_both(saved, data)
        assert ours == stock
    key = "entity_group" if model_config else "entity"
    entities = saved.pipe("Alice lives in Paris", **(model_config or {}))
    assert saved.tfx.predict("Alice lives in Paris") == [",".join(e[key] for e in entities)]


# --- fill-mask -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fill_mask(tiny_bert_mlm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return _saved("fill-mask", tiny_bert_mlm_dir, tmp_path_factory.mktemp("fm"))


@pytest.mark.parametrize(
    "data",
    [
        "Paris is the [MASK] of France.",
        "Paris is the [MASK] of [MASK].",
        ["Paris is the [MASK] of [MASK].", "hello [MASK] world"],
        ["hello [MASK] world", "the [MASK] sat"],
    ],
)
def test_fill_mask_matches_stock_one_answer_per_mask(fill_mask: Saved, data: Any):
    stock, ours = _predict_both(fill_mask, data)
    assert ours == stock
    assert _served(fill_mask.tfx, {"inputs": data}) == _served(fill_mask.stock, {"inputs": data})


def test_fill_mask_without_mask_names_the_mask_token(fill_mask: Saved):
    with pytest.raises(InvalidInputError, match=r"\[MASK\]") as err:
        fill_mask.tfx.predict(["hello [MASK]", "no mask here"])
    assert "no mask here" in err.value.message
    assert err.value.param == "inputs"


# --- feature-extraction ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def features(tiny_bert_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return _saved("feature-extraction", tiny_bert_encoder_dir, tmp_path_factory.mktemp("fe"))


def test_feature_extraction_matches_stock(features: Saved):
    stock, ours = _predict_both(features, "hello world")
    np.testing.assert_allclose(ours, stock, atol=1e-6)
    assert ours.dtype == stock.dtype
    served = _served(features.tfx, {"inputs": "hello world"})
    np.testing.assert_allclose(served, _served(features.stock, {"inputs": "hello world"}))


def test_feature_extraction_answers_every_input(features: Saved):
    # Stock answers only the first input of a batch (it returns ``output[0][0]``); we answer
    # each one, the first equal to stock's.
    texts = ["hello world", "bye now longer text"]
    stock, ours = _predict_both(features, texts)
    assert len(ours) == len(texts)
    np.testing.assert_allclose(ours[0], stock, atol=1e-6)
    np.testing.assert_allclose(ours[1], np.asarray(features.pipe(texts[1])[0]), atol=1e-6)


def test_question_answering_runner_takes_what_the_pipeline_took(tiny_bert_qa_dir: Path):
    """transformers 4's pipeline: keywords, one positional dict, or a list of dicts."""
    runner = tfx.pipeline("question-answering", model=str(tiny_bert_qa_dir))
    question, context = "What is the capital?", "Paris is the capital of France."
    one = runner(question=question, context=context)

    assert set(one) == {"answer", "score", "start", "end"}
    assert runner({"question": question, "context": context}) == one
    assert runner([{"question": question, "context": context}] * 2) == [one, one]
    assert runner(question=[question, question], context=context) == [one, one]
    with pytest.raises(InvalidInputError, match="context"):
        runner(question=question)
