"""No request's sampling parameters can stop the continuous-batching engine.

The engine runs in-process on the tiny GPT-2, without the server's request validation:
it must defend itself (a request the protocol lets through, or ``model_config``
defaults, reach it unchecked). A request may fail alone, with an :class:`InvalidInputError`
naming its field; every other request in the same batch completes, and the generation
loop keeps running. If the loop dies anyway, its requests fail (never hang) and the
engine restarts it, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlflow_tfx_plugin.deployments.batching import MicroBatcher
from mlflow_tfx_plugin.deployments.engine import (
    ContinuousBatchingEngine,
    EngineSettings,
    MicroBatchingEngine,
)
from mlflow_tfx_plugin.errors import EngineError, InvalidInputError
from mlflow_tfx_plugin.generation import PromptResult, TextGenerator
from mlflow_tfx_plugin.protocol import GenerationParams

PROMPTS = ["Hello there", "Once upon a time", "x"]
CANARY = GenerationParams(max_tokens=4, temperature=0)
TINY = [5e-324, 1e-320, 1e-300, 1e-45, 1e-38, 1e-30, 1e-8, 1e-6]
SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "repetition_penalty", "seed", "max_tokens"}


@pytest.fixture(scope="module")
def generator(tiny_gpt2_dir: Path) -> TextGenerator:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir)).eval()
    return TextGenerator(model, AutoTokenizer.from_pretrained(str(tiny_gpt2_dir)))


@pytest.fixture(scope="module")
def canary_texts(generator: TextGenerator) -> dict[str, str]:
    return {p: generator.generate([p], CANARY)[0].completions[0].text for p in PROMPTS}


@pytest.fixture(scope="module", params=["mixed", "greedy"])
def engine(request: pytest.FixtureRequest, generator: TextGenerator) -> Iterator[Any]:
    settings = EngineSettings(max_batch_size=4, greedy_only=request.param == "greedy")
    built = ContinuousBatchingEngine(generator, settings)
    yield built
    built.close()


def _temperatures() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from([0.0, 1e-5, 2.0, *TINY]), st.floats(0, 2))


def _top_ps() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from([1.0, *TINY]), st.floats(0, 1, exclude_min=True))


def _repetition_penalties() -> st.SearchStrategy[float | None]:
    huge = [1e3, 1e30, 1e300, 1.7e308]
    sane = st.floats(0.5, 2.0)
    return st.one_of(st.none(), sane, st.sampled_from([*TINY, *huge]), st.floats(1e-300, 1e300))


def _seeds() -> st.SearchStrategy[int | None]:
    edges = [0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, 2**70, -(2**70)]
    return st.one_of(st.none(), st.sampled_from(edges), st.integers(-(2**70), 2**70))


def _params() -> st.SearchStrategy[GenerationParams]:
    return st.builds(
        GenerationParams,
        max_tokens=st.integers(1, 4),
        temperature=_temperatures(),
        top_p=_top_ps(),
        top_k=st.one_of(st.none(), st.integers(0, 60), st.sampled_from([10**6, 2**40])),
        n=st.integers(1, 3),
        stop=st.lists(st.text(min_size=1, max_size=3), max_size=2).map(tuple),
        seed=_seeds(),
        repetition_penalty=_repetition_penalties(),
        ignore_eos=st.booleans(),
    )


_REQUEST = st.tuples(_params(), st.sampled_from(PROMPTS), st.booleans())


def _may_reject(params: GenerationParams) -> set[str]:
    """The fields the engine documents as unrunnable for these values (its 400s)."""
    fields = set()
    penalty = params.repetition_penalty
    if penalty is not None and not 0.01 <= penalty <= 100:
        fields.add("repetition_penalty")
    if params.seed is not None and not -(2**63) <= params.seed <= 2**64 - 1:
        fields.add("seed")
    return fields


async def _run(engine: Any, params: GenerationParams, prompt: str, stream: bool) -> Any:
    if stream and params.n == 1:
        deltas = [d async for d in engine.stream(prompt, params, add_special_tokens=True)]
        return deltas[-1]
    return await engine.generate(prompt, params, add_special_tokens=True)


async def _batch(engine: Any, batch: list[tuple[GenerationParams, str, bool]]) -> list[Any]:
    jobs = [_run(engine, params, prompt, stream) for params, prompt, stream in batch]
    canaries = [engine.generate(p, CANARY, add_special_tokens=True) for p in PROMPTS]
    return await asyncio.wait_for(
        asyncio.gather(*jobs, *canaries, return_exceptions=True), timeout=120
    )


@settings(max_examples=100, deadline=None, database=None)
@given(batch=st.lists(_REQUEST, min_size=1, max_size=4))
def test_no_sampling_parameters_stop_the_loop(engine, canary_texts, batch):
    outcomes = asyncio.run(_batch(engine, batch))

    for (params, _, _), outcome in zip(batch, outcomes, strict=False):
        if isinstance(outcome, InvalidInputError):
            assert outcome.param in _may_reject(params), (params, outcome)
        else:
            assert not isinstance(outcome, BaseException), (params, repr(outcome))
            if isinstance(outcome, PromptResult):
                assert len(outcome.completions) == params.n
                tokens = [c.completion_tokens for c in outcome.completions]
            else:  # the stream's last delta
                tokens = [outcome.completion_tokens]
            assert all(count <= params.max_tokens for count in tokens), (params, tokens)
    canaries = outcomes[len(batch) :]
    assert [c.completions[0].text for c in canaries] == [canary_texts[p] for p in PROMPTS]
    assert engine.healthy
    assert getattr(engine, "loop_restarts", 0) == 0, "the generation loop died"
    assert engine.in_flight == 0


def test_the_issue_repro_decodes_greedily_and_the_loop_keeps_serving(engine, canary_texts):
    tiny = GenerationParams(max_tokens=4, temperature=1e-300, n=2)

    async def run() -> list[Any]:
        return await asyncio.gather(
            engine.generate("Hi", tiny, add_special_tokens=True),
            *(engine.generate(p, CANARY, add_special_tokens=True) for p in PROMPTS),
        )

    result, *canaries = asyncio.run(run())

    assert len(result.completions) == 2
    assert len({c.text for c in result.completions}) == 1  # temperature -> 0: greedy
    assert [c.completions[0].text for c in canaries] == [canary_texts[p] for p in PROMPTS]
    assert engine.healthy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", math.nan),
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_p", math.inf),
        ("top_k", -1),
        ("repetition_penalty", 1e-300),
        ("repetition_penalty", math.inf),
        ("seed", 2**70),
        ("max_tokens", 0),
    ],
)
def test_unrunnable_values_are_input_errors_naming_the_field(engine, field: str, value: Any):
    params = GenerationParams(**{"max_tokens": 3, "temperature": 1.0, field: value})

    with pytest.raises(InvalidInputError) as caught:
        asyncio.run(engine.generate("Hi", params, add_special_tokens=True))

    assert caught.value.param == field
    assert repr(value) in caught.value.message or str(value) in caught.value.message


# -- the loop dies anyway: its requests fail, and it restarts -------------------------------


def _kill_loop(generator: TextGenerator, times: int) -> Any:
    """Make the next ``times`` forward passes on transformers' loop thread raise.

    Stands in for a fatal error inside the continuous-batching loop that validation did
    not foresee (the loop catches it, fails its requests and exits).
    """
    left = [times]

    def pre_hook(module: Any, args: Any) -> None:
        if "_run_generation_loop" in threading.current_thread().name and left[0] > 0:
            left[0] -= 1
            raise RuntimeError("injected fatal error")

    return generator.model.register_forward_pre_hook(pre_hook)


async def _concurrent(engine: Any, params: GenerationParams) -> list[Any]:
    jobs = [engine.generate(p, params, add_special_tokens=True) for p in PROMPTS]
    return await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), timeout=60)


def _wait_healthy(engine: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not engine.healthy and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(engine.healthy)


def test_a_dead_loop_fails_its_requests_and_restarts(generator, canary_texts):
    engine = ContinuousBatchingEngine(generator, EngineSettings(max_batch_size=4))
    params = GenerationParams(max_tokens=8, temperature=0, ignore_eos=True)
    try:
        handle = _kill_loop(generator, times=1)
        try:
            failed = asyncio.run(_concurrent(engine, params))
        finally:
            handle.remove()
        assert any(isinstance(outcome, EngineError) for outcome in failed), failed
        assert all(isinstance(o, EngineError | PromptResult) for o in failed), failed
        assert _wait_healthy(engine, timeout=10)
        after = asyncio.run(_concurrent(engine, CANARY))
        assert [r.completions[0].text for r in after] == [canary_texts[p] for p in PROMPTS]
        assert engine.loop_restarts == 1
        assert engine.in_flight == 0
    finally:
        engine.close()


def test_restarts_are_bounded_then_resume_after_the_window(generator, canary_texts):
    # The window outlasts the four rounds below even on a loaded machine.
    settings = EngineSettings(max_batch_size=4, max_loop_restarts=2, loop_restart_window_s=8)
    engine = ContinuousBatchingEngine(generator, settings)
    params = GenerationParams(max_tokens=8, temperature=0, ignore_eos=True)
    try:
        handle = _kill_loop(generator, times=1000)  # dies at every step
        try:
            for _ in range(4):
                asyncio.run(_concurrent(engine, params))
                _wait_healthy(engine, timeout=1)
            assert not engine.healthy  # out of restarts: /health says so
            assert engine.loop_restarts == 2
            outcomes = asyncio.run(_concurrent(engine, params))  # fail fast, never hang
            assert all(isinstance(outcome, EngineError) for outcome in outcomes), outcomes
        finally:
            handle.remove()
        assert _wait_healthy(engine, timeout=15)  # a restart once the window has passed
        after = asyncio.run(_concurrent(engine, CANARY))
        assert [r.completions[0].text for r in after] == [canary_texts[p] for p in PROMPTS]
    finally:
        engine.close()


# -- micro-batching: a failing group fails only its own requests ---------------------------


def test_a_failing_micro_batch_group_fails_only_its_requests(generator, canary_texts):
    engine = MicroBatchingEngine(generator, EngineSettings(max_batch_size=8))
    poisoned = GenerationParams(max_tokens=4, temperature=1.0, seed=13)
    real_generate = generator.generate

    def generate(prompts: Any, params: GenerationParams, **kwargs: Any) -> Any:
        if params == poisoned:  # stands in for a sampling failure no check foresaw
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_generate(prompts, params, **kwargs)

    async def run() -> list[Any]:
        jobs = [engine.generate("Hi", poisoned, add_special_tokens=True)]
        jobs += [engine.generate(p, CANARY, add_special_tokens=True) for p in PROMPTS]
        return await asyncio.gather(*jobs, return_exceptions=True)

    object.__setattr__(generator, "generate", generate)
    try:
        bad, *good = asyncio.run(run())
    finally:
        del generator.generate
        engine.close()

    assert isinstance(bad, EngineError) and "probability tensor" in str(bad)
    assert [r.completions[0].text for r in good] == [canary_texts[p] for p in PROMPTS]


def test_micro_batcher_fails_only_the_items_whose_result_is_an_error():
    from concurrent.futures import ThreadPoolExecutor

    def run_batch(items: list[int]) -> list[int | Exception]:
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    async def run() -> list[asyncio.Task[Any]]:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(run_batch, max_batch_size=4, executor=executor, window_s=0.05)
            tasks = [asyncio.create_task(batcher.submit(i)) for i in (1, -2, 3)]
            await asyncio.wait(tasks)
            batcher.close()
            return tasks

    one, bad, three = asyncio.run(run())

    assert (one.result(), three.result()) == (10, 30)
    assert isinstance(bad.exception(), ValueError) and str(bad.exception()) == "bad -2"
