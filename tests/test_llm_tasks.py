"""llm/v1 chat, completions and embeddings: logging, OpenAI semantics, stop strings, streaming.

Tiny random models produce gibberish, so tests compare the flavor with itself and with
transformers (same seed, same tokens) rather than with expected words; the real
SmolLM2 test in test_smollm2.py checks an actual answer.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import transformers

import mlflow_tfx_plugin as tfx
from mlflow_tfx_plugin.errors import InvalidInputError

HELLO = {
    "messages": [
        {"role": "system", "content": "You are a bot."},
        {"role": "user", "content": "Hello, how are you?"},
    ]
}
SAMPLED = {"temperature": 1.0, "seed": 7, "max_tokens": 24}


@pytest.fixture(scope="module")
def chat_model_path(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    target = tmp_path_factory.mktemp("chat") / "model"
    tfx.save_model(
        tiny_gpt2_dir, target, task="llm/v1/chat", model_config={"max_tokens": 6, "temperature": 0}
    )
    return str(target)


@pytest.fixture(scope="module")
def chat(chat_model_path: str) -> Any:
    return mlflow.pyfunc.load_model(chat_model_path)


@pytest.fixture(scope="module")
def chat_predictor(chat_model_path: str) -> Any:
    """The flavor's predictor, without MLflow's schema enforcement (what the server uses)."""
    return tfx._load_pyfunc(chat_model_path)


def test_log_chat_pipeline_like_the_seed(tiny_gpt2_dir: Path, tracking_uri: str):
    pipeline = transformers.pipeline("text-generation", str(tiny_gpt2_dir))
    with mlflow.start_run():
        model_info = tfx.log_model(
            transformers_model=pipeline, name="model", task="llm/v1/chat", input_example=HELLO
        )

    assert model_info.flavors["tfx"]["inference_task"] == "llm/v1/chat"
    assert model_info.flavors["tfx"]["task"] == "text-generation"
    assert model_info.metadata["task"] == "llm/v1/chat"
    inputs = {spec.name for spec in model_info.signature.inputs.inputs}
    assert {"messages", "temperature", "max_tokens", "stop", "n", "stream", "top_p"} <= inputs
    outputs = {spec.name for spec in model_info.signature.outputs.inputs}
    assert {"id", "object", "created", "model", "choices", "usage"} <= outputs
    assert model_info.signature.params is None

    prediction = mlflow.pyfunc.load_model(model_info.model_uri).predict(
        {**HELLO, "temperature": 0.5, "max_tokens": 20}
    )
    assert isinstance(prediction, dict), "one request answers with one chat.completion object"
    assert prediction["object"] == "chat.completion"
    assert prediction["choices"][0]["message"]["role"] == "assistant"
    assert prediction["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_usage_counts_are_exact(chat: Any, tiny_gpt2_dir: Path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    prompt = tokenizer.apply_chat_template(
        HELLO["messages"], add_generation_prompt=True, tokenize=False
    )
    response = chat.predict({**HELLO, "max_tokens": 5})

    usage = response["usage"]
    assert usage["prompt_tokens"] == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert response["choices"][0]["finish_reason"] == "length"


def test_chat_matches_transformers_greedy(chat: Any, tiny_gpt2_dir: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    ids = tokenizer.apply_chat_template(
        HELLO["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**ids, max_new_tokens=6, do_sample=False)
    expected = tokenizer.decode(output[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)

    assert chat.predict(HELLO)["choices"][0]["message"]["content"] == expected


def test_model_config_defaults_and_request_overrides(chat: Any):
    default = chat.predict(HELLO)  # model_config: max_tokens=6, temperature=0
    override = chat.predict({**HELLO, "max_tokens": 2})
    assert default["usage"]["completion_tokens"] == 6
    assert override["usage"]["completion_tokens"] == 2
    assert default["choices"][0]["message"]["content"].startswith(
        override["choices"][0]["message"]["content"]
    )


@pytest.mark.parametrize(
    "fixture", ["tiny_gpt2_dir", "tiny_llama_sp_dir"], ids=["byte-level-bpe", "sentencepiece"]
)
def test_stop_strings_across_token_boundaries(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
):
    checkpoint = request.getfixturevalue(fixture)
    tfx.save_model(checkpoint, tmp_path / "m", task="llm/v1/completions")
    model = tfx._load_pyfunc(str(tmp_path / "m"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    full = model.predict({"prompt": "Paris is the capital of", **SAMPLED})["choices"][0]["text"]
    stop, position = _stop_spanning_tokens(tokenizer, full)

    cut = model.predict({"prompt": "Paris is the capital of", **SAMPLED, "stop": [stop]})[
        "choices"
    ][0]

    assert cut["text"] == full[:position]
    assert stop not in cut["text"]
    assert cut["finish_reason"] == "stop"
    streamed = model.predict_stream(
        {"prompt": "Paris is the capital of", **SAMPLED, "stop": [stop]}
    )
    assert (
        "".join(chunk["choices"][0]["text"] for chunk in streamed if chunk["choices"])
        == full[:position]
    )


def _stop_spanning_tokens(tokenizer: Any, text: str) -> tuple[str, int]:
    """A 3-character substring of ``text`` that crosses a token boundary, and its position."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    for (_, end), _ in zip(encoding["offset_mapping"][2:], range(1000), strict=False):
        start = end - 1
        candidate = text[start : start + 3]
        if len(candidate) == 3 and candidate.strip() and text.find(candidate) == start:
            return candidate, start
    pytest.skip(f"no boundary-spanning substring in {text!r}")


def test_stream_joins_to_the_non_streamed_text(chat: Any):
    request = {**HELLO, **SAMPLED, "stream_options": {"include_usage": True}}
    response = chat.predict({**HELLO, **SAMPLED})
    chunks = list(chat.predict_stream(request))

    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == response["choices"][0]["message"]["content"]
    finishes = [
        c["choices"][0]["finish_reason"]
        for c in chunks
        if c["choices"] and "finish_reason" in c["choices"][0]
    ]
    assert finishes == [response["choices"][0]["finish_reason"]]
    assert chunks[-1]["usage"] == response["usage"]
    assert len({chunk["id"] for chunk in chunks}) == 1


def test_stream_with_multibyte_text_joins_exactly(tiny_gpt2_dir: Path, tmp_path: Path):
    # Random weights emit arbitrary byte tokens; a chunk boundary inside a multi-byte
    # character would show up as a difference from the non-streamed text.
    tfx.save_model(tiny_gpt2_dir, tmp_path / "m", task="llm/v1/completions")
    model = tfx._load_pyfunc(str(tmp_path / "m"))
    for seed in range(5):
        request = {
            "prompt": "héllo wörld ✓ 東京",
            "temperature": 1.0,
            "seed": seed,
            "max_tokens": 24,
        }
        full = model.predict(request)["choices"][0]["text"]
        chunks = model.predict_stream(request)
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == full


def test_n_choices_and_seed(chat: Any):
    sampled = chat.predict({**HELLO, **SAMPLED, "n": 3})
    again = chat.predict({**HELLO, **SAMPLED, "n": 3})
    greedy = chat.predict({**HELLO, "n": 2, "temperature": 0})

    assert [c["index"] for c in sampled["choices"]] == [0, 1, 2]
    assert sampled["choices"] == again["choices"], "the same seed reproduces the same choices"
    assert len({c["message"]["content"] for c in sampled["choices"]}) > 1
    first, second = greedy["choices"]
    assert first["message"] == second["message"], "n>1 at temperature 0 returns identical choices"


def test_dataframe_rows_share_one_generate_call(chat_predictor: Any, mocker):
    model = chat_predictor.adapter.runner.model
    spy = mocker.spy(model, "generate")
    frame = pd.DataFrame(
        {"messages": [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Paris"}]]}
    )

    responses = chat_predictor.predict(frame)

    assert len(responses) == 2
    assert all(r["object"] == "chat.completion" for r in responses)
    assert spy.call_count == 1


def test_prompt_longer_than_context_window(chat_predictor: Any):
    long_prompt = {"messages": [{"role": "user", "content": "Paris " * 400}]}
    with pytest.raises(InvalidInputError, match=r"prompt has \d+ tokens.*context window is 128"):
        chat_predictor.predict(long_prompt)


def test_chat_without_template_is_a_clear_error(tiny_gpt2_dir: Path, tmp_path: Path):
    checkpoint = tmp_path / "no-template"
    shutil.copytree(tiny_gpt2_dir, checkpoint)
    (checkpoint / "chat_template.jinja").unlink()
    tfx.save_model(checkpoint, tmp_path / "m", task="llm/v1/chat")
    with pytest.raises(InvalidInputError, match="no chat template"):
        tfx._load_pyfunc(str(tmp_path / "m")).predict(HELLO)

    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tfx.save_model(
        checkpoint, tmp_path / "m2", task="llm/v1/chat", model_config={"chat_template": template}
    )
    assert (
        tfx._load_pyfunc(str(tmp_path / "m2")).predict({**HELLO, "max_tokens": 2})["object"]
        == "chat.completion"
    )


def test_incompatible_llm_task_fails_at_log_time(tiny_bert_mlm_dir: Path, tmp_path: Path):
    with pytest.raises(InvalidInputError, match="cannot perform task 'llm/v1/chat'"):
        tfx.save_model(tiny_bert_mlm_dir, tmp_path / "m", task="llm/v1/chat")
    assert not (tmp_path / "m").exists()


CHAT_ERRORS = [
    ("missing messages", {}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("non-string content", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    (
        "image content part",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages.0.content",
    ),
    ("max_tokens zero", {**HELLO, "max_tokens": 0}, "max_tokens"),
    ("temperature too high", {**HELLO, "temperature": 2.5}, "temperature"),
    ("temperature negative", {**HELLO, "temperature": -1}, "temperature"),
    ("n zero", {**HELLO, "n": 0}, "n"),
    ("five stops", {**HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("presence penalty", {**HELLO, "presence_penalty": 0.5}, "presence_penalty"),
]


@pytest.mark.parametrize(
    ("body", "param"), [c[1:] for c in CHAT_ERRORS], ids=[c[0] for c in CHAT_ERRORS]
)
def test_chat_bad_requests_name_the_field(chat_predictor: Any, body: dict[str, Any], param: str):
    with pytest.raises(InvalidInputError) as excinfo:
        chat_predictor.predict(body)
    assert excinfo.value.param == param
    assert excinfo.value.get_http_status_code() == 400
    assert f"'{param}'" in excinfo.value.message


def test_completions(tiny_gpt2_dir: Path, tracking_uri: str):
    with mlflow.start_run():
        info = tfx.log_model(
            str(tiny_gpt2_dir),
            name="model",
            task="llm/v1/completions",
            model_config={"max_tokens": 4},
        )
    model = mlflow.pyfunc.load_model(info.model_uri)
    predictor = tfx._load_pyfunc(mlflow.artifacts.download_artifacts(info.model_uri))

    single = model.predict({"prompt": "Paris is", "temperature": 0})
    several = predictor.predict({"prompt": ["Paris is", "Rome is"], "temperature": 0, "n": 2})

    assert single["object"] == "text_completion"
    assert single["usage"]["completion_tokens"] == 4
    assert [c["index"] for c in several["choices"]] == [0, 1, 2, 3]
    assert several["choices"][0]["text"] == single["choices"][0]["text"]
    with pytest.raises(InvalidInputError, match="'echo' is not supported"):
        predictor.predict({"prompt": "x", "echo": True})
    with pytest.raises(InvalidInputError, match="'suffix'"):
        predictor.predict({"prompt": "x", "suffix": "y"})


@pytest.fixture(scope="module")
def embeddings_model(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    target = tmp_path_factory.mktemp("emb") / "model"
    tfx.save_model(minilm_dir, target, task="llm/v1/embeddings")
    return mlflow.pyfunc.load_model(str(target))


def test_embeddings_match_sentence_transformers(embeddings_model: Any, minilm_dir: Path):
    from sentence_transformers import SentenceTransformer

    sentences = ["The capital of France is Paris.", "MLflow tracks models.", "short"]
    expected = SentenceTransformer(str(minilm_dir), device="cpu").encode(sentences)

    response = embeddings_model.predict({"input": sentences})

    assert response["object"] == "list"
    vectors = np.array([item["embedding"] for item in response["data"]])
    cosine = (vectors * expected).sum(axis=1) / (
        np.linalg.norm(vectors, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert cosine.min() > 0.9999
    assert [item["index"] for item in response["data"]] == [0, 1, 2]
    assert response["usage"]["prompt_tokens"] == response["usage"]["total_tokens"] > 0


def test_embeddings_of_many_texts_come_back_in_input_order(embeddings_model: Any):
    """More texts than one batch: encoded in length-sorted batches, answered in input order."""
    texts = [("word " * (i % 7 + 1)).strip() + f" {i}" for i in range(70)]  # 3 batches of 32

    response = embeddings_model.predict({"input": texts})

    singles = [embeddings_model.predict({"input": text}) for text in texts]
    vectors = np.array([item["embedding"] for item in response["data"]])
    one_by_one = np.array([single["data"][0]["embedding"] for single in singles])
    np.testing.assert_allclose(vectors, one_by_one, atol=1e-5)
    assert response["usage"]["prompt_tokens"] == sum(
        single["usage"]["prompt_tokens"] for single in singles
    )


def test_embeddings_base64_and_errors(embeddings_model: Any, minilm_dir: Path, tmp_path: Path):
    floats = embeddings_model.predict({"input": "Paris"})["data"][0]["embedding"]
    encoded = embeddings_model.predict({"input": "Paris", "encoding_format": "base64"})["data"][0][
        "embedding"
    ]
    np.testing.assert_allclose(
        np.frombuffer(base64.b64decode(encoded), dtype=np.float32), floats, rtol=1e-6
    )

    tfx.save_model(minilm_dir, tmp_path / "m", task="llm/v1/embeddings")
    predictor = tfx._load_pyfunc(str(tmp_path / "m"))
    for bad, param in [
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"inputs": "x"}, "input"),
    ]:
        with pytest.raises(InvalidInputError) as excinfo:
            predictor.predict(bad)
        assert excinfo.value.param == param


def test_seed_faq_model_config_defaults_include_stop(tiny_gpt2_dir: Path, tmp_path: Path):
    """Seed 000 FAQ: model_config sets default temperature and stop sequences."""
    tfx.save_model(tiny_gpt2_dir, tmp_path / "plain", task="llm/v1/completions")
    full = tfx._load_pyfunc(str(tmp_path / "plain")).predict(
        {"prompt": "Paris is", "temperature": 0, "max_tokens": 24}
    )["choices"][0]["text"]
    stop = full[3:6]

    config = {"temperature": 0, "stop": [stop, "never-appears"], "max_tokens": 24}
    tfx.save_model(tiny_gpt2_dir, tmp_path / "faq", task="llm/v1/completions", model_config=config)
    model = mlflow.pyfunc.load_model(str(tmp_path / "faq"))

    default = model.predict({"prompt": "Paris is"})["choices"][0]
    overridden = model.predict({"prompt": "Paris is", "stop": ["never-appears"]})["choices"][0]
    assert default["text"] == full[: full.find(stop)]
    assert default["finish_reason"] == "stop"
    assert overridden["text"] == full


@pytest.mark.parametrize(("field", "value"), [("echo", True), ("suffix", " the end")])
def test_completions_echo_and_suffix_are_rejected_through_pyfunc_not_dropped(
    tiny_gpt2_dir: Path, tmp_path: Path, field: str, value: Any
):
    tfx.save_model(tiny_gpt2_dir, tmp_path / "m", task="llm/v1/completions")
    model = mlflow.pyfunc.load_model(str(tmp_path / "m"))  # MLflow's schema enforcement first

    with pytest.raises(InvalidInputError, match=field) as info:
        model.predict({"prompt": "Hello", "max_tokens": 2, field: value})
    assert info.value.param == field
    assert model.predict({"prompt": "Hello", "max_tokens": 2, "echo": False})["choices"]
