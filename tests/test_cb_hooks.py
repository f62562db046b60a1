"""Constrained and logprobs requests inside the continuous-batching manager (engine/cb_hooks.py).

They run in the manager, side by side with plain requests, and come out as ``generate``
gives them: the same text, and the same logprobs within 1e-4.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mlflow_tfx_plugin.deployments.engine import ContinuousBatchingEngine, EngineSettings
from mlflow_tfx_plugin.deployments.engine import continuous as continuous_module
from mlflow_tfx_plugin.deployments.engine.cb_hooks import ControlRegistry, install_controls
from mlflow_tfx_plugin.generation import Completion, StreamDelta, TextGenerator
from mlflow_tfx_plugin.protocol import GenerationParams
from mlflow_tfx_plugin.structured import ConstraintSpec, RowControls

pytest.importorskip("llguidance")

MOOD = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["happy", "sad"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["mood", "n"],
    "additionalProperties": False,
}
SPEC = ConstraintSpec.json_schema(MOOD, param="response_format.json_schema.schema")
TOLERANCE = 1e-4

# (prompt, params): constrained, logprobs, both, and plain requests in one run.
REQUESTS = [
    ("Hello", GenerationParams(max_tokens=30, temperature=0, constraint=SPEC)),
    ("Once upon a time", GenerationParams(max_tokens=30, temperature=0, constraint=SPEC)),
    ("Hello", GenerationParams(max_tokens=12, temperature=0, logprobs=3)),
    ("{", GenerationParams(max_tokens=12, temperature=0, logprobs=0)),
    ("Tell me", GenerationParams(max_tokens=30, temperature=0, constraint=SPEC, logprobs=5)),
    ("Hello", GenerationParams(max_tokens=12, temperature=0)),
    ("Once upon a time", GenerationParams(max_tokens=12, temperature=0)),
]
CONTROLLED = sum(1 for _, p in REQUESTS if p.constraint is not None or p.logprobs is not None)


@pytest.fixture(scope="module")
def generator(tiny_llama_dir: Path) -> TextGenerator:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    return TextGenerator(model, AutoTokenizer.from_pretrained(str(tiny_llama_dir)))


def _engine(generator: TextGenerator, *, greedy_only: bool = False) -> ContinuousBatchingEngine:
    settings = EngineSettings(max_batch_size=8, max_tokens_limit=50, greedy_only=greedy_only)
    engine = ContinuousBatchingEngine(generator, settings)

    def no_fallback(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a request went to the micro-batching fallback")

    engine._fallback.generate = no_fallback  # type: ignore[method-assign]
    engine._fallback.stream = no_fallback  # type: ignore[method-assign]
    return engine


@pytest.fixture(scope="module", params=["sampling", "greedy-only"])
def engine(request: pytest.FixtureRequest, generator: TextGenerator):
    built = _engine(generator, greedy_only=request.param == "greedy-only")
    yield built
    built.close()


def _reference(generator: TextGenerator, prompt: str, params: GenerationParams) -> Completion:
    return generator.generate([prompt], params)[0].completions[0]


def _assert_same(got: Completion, expected: Completion) -> None:
    assert (got.text, got.finish_reason, got.completion_tokens) == (
        expected.text,
        expected.finish_reason,
        expected.completion_tokens,
    )
    if expected.logprobs is None:
        assert got.logprobs is None
        return
    assert got.logprobs is not None
    assert len(got.logprobs) == len(expected.logprobs)
    for item, want in zip(got.logprobs, expected.logprobs, strict=True):
        assert (item.token, item.text_offset) == (want.token, want.text_offset)
        assert item.logprob == pytest.approx(want.logprob, abs=TOLERANCE)
        assert [token for token, _ in item.top] == [token for token, _ in want.top]
        for (_, value), (_, wanted) in zip(item.top, want.top, strict=True):
            assert value == pytest.approx(wanted, abs=TOLERANCE)


def _check_json(completion: Completion) -> None:
    assert completion.finish_reason == "stop", completion
    value = json.loads(completion.text)
    assert value["mood"] in ("happy", "sad") and 0 <= value["n"] <= 9
    assert set(value) == {"mood", "n"}
    assert completion.finish_reason == "stop"


def test_controlled_and_plain_requests_share_the_manager(engine, generator: TextGenerator):
    before = engine.controlled_requests

    async def run() -> list[Any]:
        jobs = [engine.generate(p, params, add_special_tokens=True) for p, params in REQUESTS]
        return list(await asyncio.gather(*jobs))

    results = asyncio.run(run())

    assert engine.controlled_requests - before == CONTROLLED, "controlled requests ran in it"
    for (prompt, params), result in zip(REQUESTS, results, strict=True):
        [completion] = result.completions
        _assert_same(completion, _reference(generator, prompt, params))
        if params.constraint is not None:
            _check_json(completion)


def test_greedy_logprobs_are_the_top_ones(engine):
    params = GenerationParams(max_tokens=12, temperature=0, logprobs=2)
    result = asyncio.run(engine.generate("Hello", params, add_special_tokens=True))
    [completion] = result.completions
    assert completion.logprobs
    for item in completion.logprobs:
        assert item.top[0][0] == item.token
        assert item.logprob == pytest.approx(item.top[0][1], abs=TOLERANCE)


def test_streamed_deltas_carry_their_logprobs(engine, generator: TextGenerator):
    cases = [
        ("Tell me", GenerationParams(max_tokens=30, temperature=0, constraint=SPEC, logprobs=2)),
        ("Hello", GenerationParams(max_tokens=12, temperature=0, logprobs=1, stop=("e",))),
        ("Hello", GenerationParams(max_tokens=12, temperature=0)),
    ]
    before = engine.controlled_requests

    async def collect(prompt: str, params: GenerationParams) -> list[StreamDelta]:
        return [d async for d in engine.stream(prompt, params, add_special_tokens=True)]

    async def run() -> list[list[StreamDelta]]:
        return list(await asyncio.gather(*(collect(p, params) for p, params in cases)))

    streams = asyncio.run(run())

    assert engine.controlled_requests - before == 2
    for (prompt, params), deltas in zip(cases, streams, strict=True):
        final = deltas[-1]
        assert final.finish_reason is not None
        joined = Completion(
            "".join(d.text for d in deltas),
            final.finish_reason,
            final.completion_tokens,
            tuple(item for d in deltas for item in d.logprobs)
            if params.logprobs is not None
            else None,
        )
        _assert_same(joined, _reference(generator, prompt, params))


def test_sampled_constrained_requests_stay_valid(generator: TextGenerator):
    engine = _engine(generator)
    params = GenerationParams(max_tokens=30, temperature=1.3, top_k=40, top_p=0.9, constraint=SPEC)

    async def run() -> list[Any]:
        jobs = [engine.generate("Hello", params, add_special_tokens=True) for _ in range(4)]
        return list(await asyncio.gather(*jobs))

    try:
        results = asyncio.run(run())
        assert engine.controlled_requests == 4
    finally:
        engine.close()
    for result in results:
        _check_json(result.completions[0])


def test_without_the_hook_controlled_requests_are_micro_batched(
    generator: TextGenerator, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(continuous_module, "self_check", lambda *args: False)
    engine = ContinuousBatchingEngine(generator, EngineSettings(max_batch_size=4))
    try:
        assert engine._controls is None
        assert engine.controlled_requests == 0
        prompt, params = REQUESTS[4]
        result = asyncio.run(engine.generate(prompt, params, add_special_tokens=True))
        _assert_same(result.completions[0], _reference(generator, prompt, params))
        assert engine._manager.logit_processor.logits_processor[-1].__class__.__name__ != (
            "ControlProcessor"
        )
    finally:
        engine.close()


def test_rows_follow_the_requests_that_get_a_new_token():
    def state(request_id: str, new: bool) -> Any:
        return SimpleNamespace(state=SimpleNamespace(request_id=request_id), has_new_token=new)

    requests = [state("a", True), state("b", False), state("c", True), state("d", True)]
    manager = SimpleNamespace(
        batch_processor=SimpleNamespace(
            inputs_and_outputs=SimpleNamespace(requests_in_batch=requests)
        )
    )
    registry = ControlRegistry(manager, eos_token_id=0, mask_width=lambda: 8)
    a, b, d = RowControls(), RowControls(), RowControls()
    for request_id, controls in (("a", a), ("b", b), ("d", d)):
        registry.register(request_id, controls)
    registry.forget("d")
    assert registry.batch_rows() == [a, None, None]
    assert registry.registered == 3


@pytest.mark.parametrize(
    "config",
    [
        {"use_async_batching": True, "cuda_graph_booleans": (False, False)},
        {"use_async_batching": False, "cuda_graph_booleans": (False, True)},
    ],
    ids=["async-batching", "cuda-graphs"],
)
def test_the_hook_stays_out_of_a_loop_it_cannot_run_in(config: dict[str, Any]):
    processors: list[Any] = []
    manager = SimpleNamespace(
        continuous_batching_config=SimpleNamespace(**config),
        logit_processor=SimpleNamespace(logits_processor=processors, do_processing=False),
        batch_processor=None,
    )
    assert install_controls(manager, eos_token_id=0, mask_width=lambda: 8) is None
    assert processors == [] and manager.logit_processor.do_processing is False


def test_rows_out_of_step_with_the_logits_fail_their_requests_and_touch_nothing():
    import torch

    from mlflow_tfx_plugin.structured.controls import ControlProcessor

    controls = [RowControls(temperature=0.0), None]
    processor = ControlProcessor(lambda: controls, eos_token_id=0, mask_width=None)
    scores = torch.randn(3, 11)

    out = processor(torch.zeros((3, 1), dtype=torch.long), scores.clone())

    assert torch.equal(out, scores)
    assert controls[0] is not None and "2 controlled rows for 3" in str(controls[0].error)
