"""``logprobs``: each returned token's log-probability, checked against the model itself.

The reference is a plain forward pass over the prompt and the tokens so far: its last
logits' log-softmax must give the recorded logprob of every chosen token and its top
alternatives. Logprobs are taken after the grammar mask and before temperature, so greedy's
token is always the top one, and asking for them never changes what greedy generates.
"""

from __future__ import annotations

import asyncio
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import pytest
from openai.types.chat import ChatCompletionTokenLogprob
from openai.types.completion_choice import Logprobs

import mlflow_tfx_plugin as tfx
from mlflow_tfx_plugin.deployments.engine import (
    ContinuousBatchingEngine,
    EngineSettings,
    MicroBatchingEngine,
)
from mlflow_tfx_plugin.detokenize import IncrementalDetokenizer
from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.generation import Completion, TextGenerator
from mlflow_tfx_plugin.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationParams,
    parse_request,
)
from mlflow_tfx_plugin.structured import ConstraintSpec
from mlflow_tfx_plugin.structured.logprobs import LOGPROB_FLOOR, token_text

HELLO = [{"role": "user", "content": "Say something."}]
PROMPTS = ["Hello", "Once upon a time", "{"]
MOOD = {
    "type": "object",
    "properties": {"mood": {"enum": ["happy", "sad"]}, "n": {"type": "integer", "maximum": 9}},
    "required": ["mood", "n"],
    "additionalProperties": False,
}


def _load(path: Path) -> TextGenerator:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    return TextGenerator(model, AutoTokenizer.from_pretrained(str(path)))


@pytest.fixture(scope="module", params=["gpt2", "llama", "llama_sp"])
def generator(request: pytest.FixtureRequest) -> TextGenerator:
    return _load(request.getfixturevalue(f"tiny_{request.param}_dir"))


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir: Path) -> TextGenerator:
    return _load(tiny_gpt2_dir)


def _reference(generator: TextGenerator, prompt: str, token_ids: list[int]) -> list[Any]:
    """log_softmax of the model's next-token logits before each of ``token_ids``."""
    import torch

    prompt_ids = generator.tokenizer(prompt)["input_ids"]
    with torch.inference_mode():
        logits = generator.model(torch.tensor([prompt_ids + token_ids])).logits[0]
    start = len(prompt_ids) - 1
    return [logits[start + i].float().log_softmax(-1) for i in range(len(token_ids))]


def _token_ids(generator: TextGenerator, completion: Completion) -> list[int]:
    """The ids of a completion's tokens, looked up by their bytes (unique in these vocabularies)."""
    assert completion.logprobs is not None
    by_bytes: dict[bytes, list[int]] = {}
    for token_id, data in enumerate(generator.vocab_bytes):
        by_bytes.setdefault(data, []).append(token_id)
    ids = [by_bytes[item.token] for item in completion.logprobs]
    assert all(len(candidates) == 1 for candidates in ids)
    return [candidates[0] for candidates in ids]


def _greedy_ids(generator: TextGenerator, prompt: str, max_new: int) -> list[int]:
    """Greedy continuation straight from ``model.generate`` (no plugin code)."""
    import torch

    prompt_ids = generator.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = generator.model.generate(
            prompt_ids, do_sample=False, max_new_tokens=max_new, pad_token_id=0
        )
    ids = out[0, prompt_ids.shape[1] :].tolist()
    stops = generator.stop_token_ids
    end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    return ids[:end]


def _assert_close(actual: float, expected: float) -> None:
    assert math.isclose(actual, max(expected, LOGPROB_FLOOR), abs_tol=1e-4), (actual, expected)


def test_greedy_logprobs_equal_the_models_log_softmax(generator: TextGenerator):
    params = GenerationParams(max_tokens=10, temperature=0, logprobs=5)
    [result] = generator.generate(["Hello"], params)
    [completion] = result.completions
    assert completion.logprobs is not None and len(completion.logprobs) >= 1
    records = completion.logprobs
    ids = _greedy_ids(generator, "Hello", 10)
    assert [item.token for item in records] == [generator.vocab_bytes[i] for i in ids]
    reference = _reference(generator, "Hello", ids)

    for item, token_id, logprobs in zip(records, ids, reference, strict=True):
        _assert_close(item.logprob, float(logprobs[token_id]))
        top_values, top_ids = logprobs.topk(5)
        assert [value for _, value in item.top] == pytest.approx(top_values.tolist(), abs=1e-4)
        assert [generator.vocab_bytes[i] for i in top_ids.tolist()] == [t for t, _ in item.top]
        assert item.top[0] == (item.token, item.logprob), "greedy's token is the top one"


def test_sampled_logprobs_are_taken_before_temperature(gpt2: TextGenerator):
    params = GenerationParams(max_tokens=8, temperature=1.7, seed=3, logprobs=2)
    [result] = gpt2.generate(["Hello"], params)
    [completion] = result.completions
    ids = _token_ids(gpt2, completion)
    assert completion.logprobs is not None
    for item, token_id, logprobs in zip(
        completion.logprobs, ids, _reference(gpt2, "Hello", ids), strict=True
    ):
        _assert_close(item.logprob, float(logprobs[token_id]))


def test_asking_for_logprobs_does_not_change_greedy_output(generator: TextGenerator):
    plain = generator.generate(PROMPTS, GenerationParams(max_tokens=12, temperature=0))
    params = GenerationParams(max_tokens=12, temperature=0)
    mixed = generator.generate(PROMPTS, params, logprobs=[3, None, 0])

    for with_logprobs, without in zip(mixed, plain, strict=True):
        [a], [b] = with_logprobs.completions, without.completions
        assert (a.text, a.finish_reason, a.completion_tokens) == (
            b.text,
            b.finish_reason,
            b.completion_tokens,
        )
    assert mixed[1].completions[0].logprobs is None
    assert all(item.top == () for item in mixed[2].completions[0].logprobs or ())
    [first] = mixed[0].completions
    ended = first.finish_reason == "stop"  # an end-of-sequence token: it has no logprob
    assert len(first.logprobs or ()) == first.completion_tokens - ended


def test_a_completions_token_texts_join_to_its_text(generator: TextGenerator):
    params = GenerationParams(max_tokens=16, temperature=0, logprobs=1)
    for result in generator.generate(PROMPTS, params):
        [completion] = result.completions
        assert completion.logprobs is not None
        offsets = [item.text_offset for item in completion.logprobs]
        assert offsets == sorted(offsets) and offsets[0] == 0
        assert all(offset <= len(completion.text) for offset in offsets)


def test_logprobs_under_a_grammar_are_after_the_mask(gpt2: TextGenerator):
    spec = ConstraintSpec.json_schema(MOOD, param="response_format.json_schema.schema")
    params = GenerationParams(max_tokens=30, temperature=0, logprobs=20, constraint=spec)
    [result] = gpt2.generate(["Hello"], params)
    [completion] = result.completions
    assert completion.finish_reason == "stop"
    assert completion.logprobs is not None
    for item in completion.logprobs:
        assert item.top[0] == (item.token, item.logprob), "greedy's token is the top one"
        assert all(value > -math.inf for _, value in item.top)
        # the allowed tokens' probabilities add up to one: the mask came first
        assert sum(math.exp(value) for _, value in item.top) <= 1 + 1e-4
    assert any(len(item.top) < 20 for item in completion.logprobs), "forbidden tokens dropped"
    assert b"".join(item.token for item in completion.logprobs).decode() == completion.text


def _stop_inside(generator: TextGenerator) -> tuple[str, str]:
    """A prompt, and a stop string that first occurs at the start of the third token or a
    later one of its greedy output."""
    params = GenerationParams(max_tokens=16, temperature=0, logprobs=0)
    for prompt in PROMPTS:
        [completion] = generator.generate([prompt], params)[0].completions
        text = completion.text
        for item in (completion.logprobs or ())[2:]:
            stop = text[item.text_offset : item.text_offset + 2]
            if len(stop) == 2 and text.find(stop) == item.text_offset:
                return prompt, stop
    raise AssertionError("no greedy output with a stop string inside it")


def test_a_stop_string_drops_the_tokens_past_the_cut(gpt2: TextGenerator):
    prompt, stop = _stop_inside(gpt2)
    params = GenerationParams(max_tokens=16, temperature=0, logprobs=2)
    [free] = gpt2.generate([prompt], params)[0].completions
    [completion] = gpt2.generate([prompt], replace(params, stop=(stop,)))[0].completions
    assert completion.logprobs is not None and free.logprobs is not None
    assert completion.finish_reason == "stop" and stop not in completion.text
    assert completion.logprobs == free.logprobs[: len(completion.logprobs)]
    assert len(completion.logprobs) < len(free.logprobs)
    assert all(item.text_offset < len(completion.text) for item in completion.logprobs)
    joined = b"".join(item.token for item in completion.logprobs).decode()
    assert joined == completion.text, "the stop string starts at a token"


@pytest.mark.parametrize("stop", [False, True])
def test_a_joined_stream_has_the_completions_logprobs(generator: TextGenerator, stop: bool):
    prompt, stop_string = _stop_inside(generator)
    stops = (stop_string,) if stop else ()
    params = GenerationParams(max_tokens=16, temperature=0, stop=stops, logprobs=3)
    [result] = generator.generate([prompt], params)
    events = list(generator.stream(prompt, params))

    [completion] = result.completions
    assert "".join(event.text for event in events) == completion.text
    assert tuple(item for event in events for item in event.logprobs) == completion.logprobs
    assert events[-1].finish_reason == completion.finish_reason
    assert sum(bool(event.logprobs) for event in events) > 1, "logprobs come with their text"


def test_a_joined_constrained_stream_has_the_completions_logprobs(generator: TextGenerator):
    spec = ConstraintSpec.json_schema(MOOD, param="response_format.json_schema.schema")
    params = GenerationParams(max_tokens=30, temperature=0, logprobs=4, constraint=spec)
    [completion] = generator.generate(["Hello"], params)[0].completions
    events = list(generator.stream("Hello", params))

    assert "".join(event.text for event in events) == completion.text
    assert tuple(item for event in events for item in event.logprobs) == completion.logprobs
    assert completion.finish_reason == "stop"


def test_a_character_split_across_tokens_belongs_to_the_token_that_completes_it(
    gpt2: TextGenerator,
):
    tokenizer = gpt2.tokenizer
    ids = tokenizer("é😀 ok")["input_ids"]
    texts = IncrementalDetokenizer(tokenizer)
    pieces = [texts.push(token) for token in ids]
    assert "".join(pieces) + texts.flush() == "é😀 ok"
    assert all("\ufffd" not in piece for piece in pieces)
    assert [end - start for start, end in texts.spans] == [len(piece) for piece in pieces]


def test_logprobs_need_no_grammar_engine(gpt2: TextGenerator, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now fails
    [result] = gpt2.generate(["Hi"], GenerationParams(max_tokens=4, temperature=0, logprobs=1))
    assert result.completions[0].logprobs


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "fields", "param"),
    [
        (ChatCompletionRequest, {"top_logprobs": 2}, "top_logprobs"),
        (ChatCompletionRequest, {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
        (ChatCompletionRequest, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (ChatCompletionRequest, {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        (ChatCompletionRequest, {"logprobs": "maybe"}, "logprobs"),
        (CompletionRequest, {"logprobs": 21}, "logprobs"),
        (CompletionRequest, {"logprobs": -1}, "logprobs"),
    ],
)
def test_bad_logprobs_fields_are_400s_naming_the_field(
    model: Any, fields: dict[str, Any], param: str
):
    body = {"messages": HELLO} if model is ChatCompletionRequest else {"prompt": "Hi"}
    with pytest.raises(InvalidInputError) as raised:
        parse_request(model, {**body, **fields})
    assert raised.value.param == param
    assert f"'{param}'" in str(raised.value)


def test_requests_turn_logprobs_into_generation_params():
    def chat(**fields: Any) -> int | None:
        return (
            parse_request(ChatCompletionRequest, {"messages": HELLO, **fields})
            .generation_params()
            .logprobs
        )

    def completion(**fields: Any) -> int | None:
        return (
            parse_request(CompletionRequest, {"prompt": "Hi", **fields})
            .generation_params()
            .logprobs
        )

    assert chat() is None and chat(logprobs=False) is None
    assert chat(logprobs=True) == 0 and chat(logprobs=True, top_logprobs=20) == 20
    assert completion() is None and completion(logprobs=0) == 0 and completion(logprobs=5) == 5


# -- engines --------------------------------------------------------------------------------


def test_without_the_cb_hook_logprob_requests_go_to_the_micro_batcher():
    needs_fallback = ContinuousBatchingEngine._needs_fallback
    engine: Any = type("Engine", (), {"settings": EngineSettings()})()
    assert needs_fallback(engine, GenerationParams(temperature=0, logprobs=0))
    assert not needs_fallback(engine, GenerationParams(temperature=0))


def test_logprob_settings_do_not_split_a_micro_batch(gpt2: TextGenerator):
    engine = MicroBatchingEngine(gpt2, EngineSettings(max_batch_size=8))
    calls: list[list[int | None]] = []
    generate = gpt2.generate

    def spy(prompts: Any, params: Any, **kwargs: Any) -> Any:
        calls.append(list(kwargs["logprobs"]))
        return generate(prompts, params, **kwargs)

    tops = [None, 0, 3, 20]

    async def run() -> list[Any]:
        jobs = [
            engine.generate(
                "Hello",
                GenerationParams(max_tokens=6, temperature=0, logprobs=top),
                add_special_tokens=True,
            )
            for top in tops
        ]
        return list(await asyncio.gather(*jobs))

    try:
        gpt2.generate = spy  # type: ignore[method-assign]
        results = asyncio.run(run())
    finally:
        del gpt2.generate
        engine.close()
    assert calls == [tops], "one generate for the batch"
    texts = {result.completions[0].text for result in results}
    assert len(texts) == 1
    for top, result in zip(tops, results, strict=True):
        logprobs = result.completions[0].logprobs
        assert (logprobs is None) == (top is None)
        if logprobs:
            assert {len(item.top) for item in logprobs} == {top}


# -- pyfunc ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    target = tmp_path_factory.mktemp("logprobs-chat") / "model"
    tfx.save_model(tiny_gpt2_dir, target, task="llm/v1/chat", model_config={"max_tokens": 12})
    return mlflow.pyfunc.load_model(str(target))  # with MLflow's schema enforcement


def test_pyfunc_chat_answers_openai_shaped_logprobs(chat_model: Any):
    request = {"messages": HELLO, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    [choice] = chat_model.predict(request)["choices"]
    content = choice["logprobs"]["content"]
    entries = [ChatCompletionTokenLogprob.model_validate(entry) for entry in content]
    assert entries and all(len(entry.top_logprobs) == 3 for entry in entries)
    assert all(bytes(entry.bytes or []).decode() == entry.token for entry in entries)
    assert "".join(entry.token for entry in entries) == choice["message"]["content"]

    chunks = list(chat_model.predict_stream(request))
    streamed = [
        entry
        for chunk in chunks
        if chunk["choices"]
        for entry in (chunk["choices"][0].get("logprobs") or {}).get("content", [])
    ]
    assert streamed == content
    plain = chat_model.predict({"messages": HELLO, "temperature": 0})["choices"][0]
    assert plain["logprobs"] is None
    assert plain["message"]["content"] == choice["message"]["content"]


def test_pyfunc_signatures_declare_the_logprobs_fields(
    chat_model: Any, tiny_gpt2_dir: Path, tmp_path: Path
):
    chat_inputs = {spec.name: spec for spec in chat_model.metadata.get_input_schema().inputs}
    assert {"logprobs", "top_logprobs"} <= set(chat_inputs)
    tfx.save_model(tiny_gpt2_dir, tmp_path / "model", task="llm/v1/completions")
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    inputs = {spec.name for spec in model.metadata.get_input_schema().inputs}
    assert "logprobs" in inputs and "top_logprobs" not in inputs

    request = {"prompt": "Hello", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    [choice] = model.predict(request)["choices"]
    logprobs = Logprobs.model_validate(choice["logprobs"])
    assert logprobs.tokens and len(logprobs.tokens) == len(logprobs.text_offset or [])
    for token, value, top in zip(
        logprobs.tokens, logprobs.token_logprobs or [], logprobs.top_logprobs or [], strict=True
    ):
        assert top[token] == value and len(top) <= 3, "the top two and the chosen token"
    assert "".join(logprobs.tokens) == choice["text"]
    chunks = list(model.predict_stream(request))
    joined = [
        t
        for c in chunks
        if c["choices"]
        for t in (c["choices"][0].get("logprobs") or {}).get("tokens", [])
    ]
    assert joined == logprobs.tokens


def test_token_text_replaces_a_partial_character():
    assert token_text("é".encode()[:1]) == "\ufffd"
