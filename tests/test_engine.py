"""The deployment server's batching engines, in-process on a tiny Llama.

Both engines must answer exactly what the flavor's :class:`TextGenerator` answers for
the same request (greedy), whatever else runs in the same batch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import Any

import pytest

from mlflow_tfx_plugin.deployments.batching import MicroBatcher
from mlflow_tfx_plugin.deployments.engine import (
    ContinuousBatchingEngine,
    EngineSettings,
    MicroBatchingEngine,
    create_generation_engine,
    kv_cache_blocks,
)
from mlflow_tfx_plugin.deployments.engine.continuous import running_batch_size
from mlflow_tfx_plugin.errors import EngineError, InvalidInputError
from mlflow_tfx_plugin.generation import TextGenerator
from mlflow_tfx_plugin.protocol import GenerationParams

PROMPTS = ["Hello there", "Once upon a time", "The capital of France", "x"]


@pytest.fixture(scope="module")
def generator(tiny_llama_dir: Path) -> TextGenerator:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    return TextGenerator(model, AutoTokenizer.from_pretrained(str(tiny_llama_dir)))


@pytest.fixture(scope="module", params=["continuous", "continuous-greedy", "micro"])
def engine(request: pytest.FixtureRequest, generator: TextGenerator):
    sizes: list[int] = []
    settings = EngineSettings(
        max_batch_size=4,
        max_tokens_limit=50,
        on_batch=sizes.append,
        greedy_only=request.param == "continuous-greedy",
    )
    continuous = request.param != "micro"
    built = create_generation_engine(generator, settings, continuous=continuous)
    expected = ContinuousBatchingEngine if continuous else MicroBatchingEngine
    assert isinstance(built, expected)
    built.batch_sizes = sizes  # type: ignore[attr-defined]
    yield built
    built.close()


def _reference(generator: TextGenerator, prompt: str, params: GenerationParams):
    return generator.generate([prompt], params)[0]


def test_concurrent_greedy_requests_match_generate(engine, generator: TextGenerator):
    params = GenerationParams(max_tokens=12, temperature=0)

    async def run():
        return await asyncio.gather(
            *(engine.generate(p, params, add_special_tokens=True) for p in PROMPTS)
        )

    results = asyncio.run(run())

    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result == _reference(generator, prompt, params)
    assert max(engine.batch_sizes) > 1, "concurrent requests shared a batch"


def test_stop_strings_and_streaming_match_generate(engine, generator: TextGenerator):
    full = _reference(generator, PROMPTS[0], GenerationParams(max_tokens=16, temperature=0))
    text = full.completions[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    params = GenerationParams(max_tokens=16, temperature=0, stop=(stop,))

    async def run():
        deltas = [d async for d in engine.stream(PROMPTS[0], params, add_special_tokens=True)]
        result = await engine.generate(PROMPTS[0], params, add_special_tokens=True)
        return deltas, result

    deltas, result = asyncio.run(run())

    assert "".join(d.text for d in deltas) == text[: text.index(stop)]
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]
    assert result.completions[0].text == text[: text.index(stop)]


def test_n_choices_and_ignore_eos(engine):
    async def run():
        greedy = await engine.generate(
            "Hello", GenerationParams(max_tokens=6, temperature=0, n=3), add_special_tokens=True
        )
        forced = await engine.generate(
            "Hello",
            GenerationParams(max_tokens=20, temperature=0, ignore_eos=True),
            add_special_tokens=True,
        )
        sampled = await engine.generate(
            "Hello", GenerationParams(max_tokens=6, temperature=1.0, n=2), add_special_tokens=True
        )
        return greedy, forced, sampled

    greedy, forced, sampled = asyncio.run(run())

    assert len({c.text for c in greedy.completions}) == 1 and len(greedy.completions) == 3
    assert forced.completions[0].completion_tokens == 20
    assert forced.completions[0].finish_reason == "length"
    assert len(sampled.completions) == 2


def test_limits_are_input_errors(engine):
    async def run(params: GenerationParams, prompt: str = "Hello"):
        return await engine.generate(prompt, params, add_special_tokens=True)

    with pytest.raises(InvalidInputError, match="limit of 50") as caught:
        asyncio.run(run(GenerationParams(max_tokens=51)))
    assert caught.value.param == "max_tokens"
    with pytest.raises(InvalidInputError, match="context window"):
        asyncio.run(run(GenerationParams(max_tokens=5), prompt="word " * 500))


def test_closing_a_stream_early_cancels_its_generation(engine):
    params = GenerationParams(max_tokens=50, temperature=0, ignore_eos=True)

    async def run():
        stream = engine.stream("Hello", params, add_special_tokens=True)
        async for _ in stream:
            break
        await stream.aclose()
        return await engine.generate(
            "Hello", GenerationParams(max_tokens=2, temperature=0), add_special_tokens=True
        )

    result = asyncio.run(run())
    assert result.completions[0].completion_tokens <= 2
    assert engine.queue_depth == 0


def test_micro_batcher_batches_concurrent_items_and_isolates_failures():
    batches: list[list[int]] = []

    def run_batch(items: list[int]) -> list[int]:
        batches.append(items)
        if -1 in items:
            raise ValueError("bad item")
        return [item * 10 for item in items]

    async def run():
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(run_batch, max_batch_size=3, executor=executor, window_s=0.05)
            good = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
            bad = await asyncio.gather(batcher.submit(-1), return_exceptions=True)
            after = await batcher.submit(7)
            batcher.close()
            return good, bad, after

    good, bad, after = asyncio.run(run())

    assert good == [0, 10, 20, 30, 40]
    assert max(len(batch) for batch in batches) == 3
    assert isinstance(bad[0], ValueError)
    assert after == 70


def test_a_batch_answering_the_wrong_number_of_results_fails_and_the_batcher_lives_on():
    def run_batch(items: list[int]) -> list[int]:
        return [] if 0 in items else [item * 10 for item in items]

    async def run():
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(run_batch, max_batch_size=3, executor=executor, window_s=0.01)
            bad = await asyncio.gather(batcher.submit(0), return_exceptions=True)
            after = await asyncio.wait_for(batcher.submit(7), timeout=10)
            batcher.close()
            return bad, after

    bad, after = asyncio.run(run())

    assert isinstance(bad[0], RuntimeError) and "0 results for a batch of 1" in str(bad[0])
    assert after == 70


def test_kv_cache_is_sized_from_batch_size_not_memory():
    assert kv_cache_blocks(EngineSettings(max_batch_size=16), 8192) == 8192 // 32  # a window
    assert kv_cache_blocks(EngineSettings(max_batch_size=64), 2048) == 64 * 128 // 32
    assert kv_cache_blocks(EngineSettings(max_batch_size=1), 128) == 4


def test_without_max_batch_size_the_cache_holds_16_slots_or_a_window():
    assert kv_cache_blocks(EngineSettings(), 1024) == 16 * 128 // 32
    assert kv_cache_blocks(EngineSettings(), 8192) == 8192 // 32


def test_without_max_batch_size_the_batch_is_what_the_cache_holds():
    assert running_batch_size(EngineSettings(), 2048) == 16  # 16 slots of 128 tokens
    assert running_batch_size(EngineSettings(), 1024) == 16  # never fewer than 16
    assert running_batch_size(EngineSettings(), 4096) == 32
    assert running_batch_size(EngineSettings(), 8192) == 64  # SmolLM2's window
    assert running_batch_size(EngineSettings(), 10**6) == 64  # at most 64
    assert running_batch_size(EngineSettings(max_batch_size=4), 8192) == 4  # as set
    assert running_batch_size(EngineSettings(kv_cache_tokens=4096), 4096) == 32


def test_more_than_16_requests_decode_together_when_the_cache_holds_them(
    generator: TextGenerator,
):
    sizes: list[int] = []
    settings = EngineSettings(kv_cache_tokens=4096, on_batch=sizes.append)  # 32 sequences
    engine = ContinuousBatchingEngine(generator, settings)
    params = GenerationParams(max_tokens=24, temperature=0, ignore_eos=True)

    async def run() -> list:
        prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(24)]
        return await asyncio.gather(
            *(engine.generate(p, params, add_special_tokens=True) for p in prompts)
        )

    try:
        results = asyncio.run(run())
    finally:
        engine.close()
    assert all(r.completions[0].completion_tokens == 24 for r in results)
    assert max(sizes) > 16


def test_prefix_caching_can_be_turned_off_and_changes_no_output(generator: TextGenerator):
    """Prompts sharing a 2-page prefix: the same greedy answers with and without sharing."""
    shared = "Answer briefly and politely. " * 6  # ~75 tokens; the window is 128
    prompts = [shared + question for question in PROMPTS]
    params = GenerationParams(max_tokens=10, temperature=0)
    answers, matched = {}, {}
    for caching in (True, False):
        engine = ContinuousBatchingEngine(generator, EngineSettings(prefix_caching=caching))
        cache = engine._manager.batch_processor.cache
        search, found = cache.search_prefix_match, []

        def recorded(*args: Any, search: Any = search, found: list = found) -> int:
            found.append(search(*args))
            return found[-1]

        cache.search_prefix_match = recorded
        try:
            for _ in range(2):  # the second round finds the first round's pages
                answers[caching] = asyncio.run(_generate_all(engine, prompts, params))
        finally:
            engine.close()
        matched[caching] = max(found, default=0)
    assert matched[True] >= 64 and matched[False] == 0  # two pages shared, or none
    assert answers[True] == answers[False]
    assert answers[True] == [_reference(generator, p, params) for p in prompts]


async def _generate_all(engine, prompts: list[str], params: GenerationParams) -> list:
    return list(
        await asyncio.gather(
            *(engine.generate(p, params, add_special_tokens=True) for p in prompts)
        )
    )


def test_kv_cache_size_can_be_set_but_holds_a_context_window(caplog):
    assert kv_cache_blocks(EngineSettings(kv_cache_tokens=4096), 1024) == 4096 // 32
    assert kv_cache_blocks(EngineSettings(kv_cache_tokens=100), 1024) == 1024 // 32
    assert "below the model's context window" in caplog.text


def test_exclusive_pauses_the_generation_loop(generator: TextGenerator):
    engine = ContinuousBatchingEngine(generator, EngineSettings(max_batch_size=2))
    try:
        inside = threading.Event()
        with engine.exclusive():
            inside.set()
        assert inside.is_set()
        result = asyncio.run(
            engine.generate(
                "Hi", GenerationParams(max_tokens=3, temperature=0), add_special_tokens=True
            )
        )
        assert result.completions[0].completion_tokens <= 3
    finally:
        engine.close()


def test_a_dead_generation_loop_fails_requests_and_health(generator: TextGenerator):
    engine = ContinuousBatchingEngine(generator, EngineSettings(max_batch_size=2))
    params = GenerationParams(max_tokens=100, temperature=0, ignore_eos=True)

    async def run():
        # Stands in for a fatal error inside transformers' loop: the loop thread is gone.
        await asyncio.to_thread(engine._manager.stop, block=True, timeout=10)
        return await asyncio.wait_for(
            engine.generate("Hi", params, add_special_tokens=True), timeout=30
        )

    try:
        with pytest.raises(EngineError):
            asyncio.run(run())
        assert not engine.healthy
    finally:
        engine.close()


# -- lone requests: they run in the manager, and others join them mid-generation ------


@pytest.fixture(scope="module", params=["sampling", "greedy-only"])
def continuous(request: pytest.FixtureRequest, generator: TextGenerator):
    settings = EngineSettings(max_batch_size=4, greedy_only=request.param == "greedy-only")
    built = ContinuousBatchingEngine(generator, settings)
    yield built
    built.close()


@contextmanager
def _on_forward(generator: TextGenerator, hook: Callable[[int], None]) -> Iterator[None]:
    """Call ``hook(n)`` before the n-th forward pass of the model, in any thread."""
    calls = 0

    def pre_hook(module: Any, args: Any) -> None:
        nonlocal calls
        calls += 1
        hook(calls)

    handle = generator.model.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


def _assert_idle(engine: ContinuousBatchingEngine) -> None:
    assert engine.in_flight == 0
    assert engine._sinks == {}


def _collect(engine, prompt: str, params: GenerationParams):
    async def run() -> list:
        return [d async for d in engine.stream(prompt, params, add_special_tokens=True)]

    return run()


def test_a_lone_request_matches_generate(continuous, generator: TextGenerator):
    params = GenerationParams(max_tokens=40, temperature=0)  # "Hi" ends with eos, 19 tokens
    # ignore_eos, and eos would come at the 48th token: past it, generate suppresses eos
    # (min_new_tokens) where the manager emits it without stopping.
    forced = GenerationParams(max_tokens=45, temperature=0, ignore_eos=True)

    async def run():
        result = await continuous.generate("Hi", params, add_special_tokens=True)
        return result, await _collect(continuous, PROMPTS[2], forced)

    result, deltas = asyncio.run(run())

    assert result == _reference(generator, "Hi", params)
    assert result.completions[0].finish_reason == "stop"
    expected = _reference(generator, PROMPTS[2], forced).completions[0]
    assert "".join(d.text for d in deltas) == expected.text
    assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == ("length", 45)
    _assert_idle(continuous)


def test_a_request_arriving_mid_generation_joins_the_running_one(
    continuous, generator: TextGenerator
):
    first = GenerationParams(max_tokens=40, temperature=0, ignore_eos=True)
    second = GenerationParams(max_tokens=12, temperature=0)
    reached, arrived = threading.Event(), threading.Event()

    def hold_fifth_step(call: int) -> None:  # the second request arrives mid-generation
        if call == 5:
            reached.set()
            arrived.wait(timeout=10)

    async def run():
        streaming = asyncio.create_task(_collect(continuous, PROMPTS[2], first))
        assert await asyncio.to_thread(reached.wait, 10)
        completing = asyncio.create_task(
            continuous.generate(PROMPTS[0], second, add_special_tokens=True)
        )
        while continuous.in_flight < 2:
            await asyncio.sleep(0.001)
        arrived.set()
        return await asyncio.wait_for(asyncio.gather(streaming, completing), timeout=60)

    with _on_forward(generator, hold_fifth_step):
        deltas, result = asyncio.run(run())

    expected = _reference(generator, PROMPTS[2], first).completions[0]
    assert "".join(d.text for d in deltas) == expected.text
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]
    assert deltas[-1].completion_tokens == 40
    assert result == _reference(generator, PROMPTS[0], second)
    _assert_idle(continuous)


def test_leaving_a_lone_stream_early_stops_its_generation(continuous, generator: TextGenerator):
    params = GenerationParams(max_tokens=100, temperature=0, ignore_eos=True)
    steps: list[int] = []

    def slow_step(call: int) -> None:  # so that leaving early is early
        steps.append(call)
        time.sleep(0.01)

    async def leave_after_first_delta():
        async with aclosing(continuous.stream("Hello", params, add_special_tokens=True)) as s:
            async for _ in s:
                break

    with _on_forward(generator, slow_step):
        asyncio.run(leave_after_first_delta())
        deadline = time.monotonic() + 5
        while continuous._manager.batch_processor.has_pending_requests():
            assert time.monotonic() < deadline, "the abandoned sequence kept running"
            time.sleep(0.01)
        assert len(steps) < 50
        _assert_idle(continuous)
        after = asyncio.run(
            _collect(continuous, "Hello", GenerationParams(max_tokens=3, temperature=0))
        )

    assert after[-1].finish_reason is not None
    _assert_idle(continuous)
