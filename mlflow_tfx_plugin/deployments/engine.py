"""Batching over one loaded model, for the deployment server.

Two engines share one async interface (:class:`GenerationEngine`):

- :class:`ContinuousBatchingEngine` drives transformers' continuous-batching manager:
  sequences join and leave the running batch at every decoding step, and the KV cache is
  paged and sized from ``max_batch_size`` (never from a share of RAM). A request that
  arrives to an idle engine runs alone through plain ``generate`` instead, and hands off
  to the manager as soon as another request arrives.
- :class:`MicroBatchingEngine` collects requests for a few milliseconds (up to
  ``max_batch_size``), runs one left-padded ``generate`` and splits the results. It serves
  models the continuous-batching manager cannot run, and requests it cannot express
  (``seed``, ``repetition_penalty``).

Embeddings go through the same :class:`MicroBatcher`. Model work, and tokenizing, always
run off the event loop, so ``/health`` and ``/metrics`` answer under load.

No request can fail another: sampling parameters are checked (or made greedy) before a
request joins a batch (:func:`runnable_params`), a micro-batch fails per group of equal
parameters, and if transformers' loop dies anyway, its requests fail and the engine
restarts it (a bounded number of times per window).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, aclosing, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

from mlflow_tfx_plugin.errors import EngineError, InvalidInputError, TfxError
from mlflow_tfx_plugin.generation import (
    Completion,
    FinishReason,
    PromptResult,
    StreamDelta,
    TextGenerator,
    cancel_criterion,
    cut_at_stop,
    partial_stop_length,
    runnable_params,
)
from mlflow_tfx_plugin.protocol import GenerationParams

_logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

#: Default KV-cache tokens per ``max_batch_size`` slot (longer sequences share the pool).
KV_TOKENS_PER_SEQUENCE = 128
_PAGE_SIZE = 32  # small pages waste less of a small CPU cache than the default 256
_BATCH_WINDOW_S = 0.005


class BatchObserver(Protocol):
    def __call__(self, size: int) -> None: ...


@dataclass
class EngineSettings:
    """What the engines take from the deployment config."""

    max_batch_size: int = 16
    max_tokens_limit: int | None = None
    kv_cache_tokens: int | None = None
    on_batch: BatchObserver = field(default=lambda size: None)
    #: A greedy-only continuous-batching loop: no per-request sampling warpers (each sorts
    #: the vocabulary every step), so greedy requests decode faster; sampled requests go
    #: through micro-batching, pausing the loop while they run.
    greedy_only: bool = False
    #: Restarts of a continuous-batching loop that died, at most this many per window; past
    #: them the engine reports unhealthy until the window allows another.
    max_loop_restarts: int = 3
    loop_restart_window_s: float = 60.0


class GenerationEngine(Protocol):
    """Async text generation with OpenAI semantics over one causal LM."""

    generator: TextGenerator

    async def generate(
        self, prompt: str, params: GenerationParams, *, add_special_tokens: bool
    ) -> PromptResult: ...

    def stream(
        self, prompt: str, params: GenerationParams, *, add_special_tokens: bool
    ) -> AsyncGenerator[StreamDelta, None]: ...

    def close(self) -> None: ...

    def exclusive(self) -> AbstractContextManager[Any]:
        """Hold while running the model outside the engine (embeddings, pyfunc predict)."""
        ...

    @property
    def healthy(self) -> bool: ...

    @property
    def queue_depth(self) -> int: ...


class MicroBatcher(Generic[ItemT, ResultT]):
    """Collects items submitted concurrently and runs them in batches on one worker thread.

    Args:
        run_batch: turns a list of items into a list of results (same order). It runs on
            the worker thread; a result that is an exception fails its item only, an
            exception raised fails every item of that batch.
        max_batch_size: most items per batch.
        window_s: how long to wait for more items once the first one arrives.
    """

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], Sequence[ResultT | Exception]],
        *,
        max_batch_size: int,
        executor: ThreadPoolExecutor,
        window_s: float = _BATCH_WINDOW_S,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._executor = executor
        self._window_s = window_s
        self._on_batch = on_batch or (lambda size: None)
        self._pending: asyncio.Queue[tuple[ItemT, asyncio.Future[ResultT]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queue_depth(self) -> int:
        return self._pending.qsize() if self._pending else 0

    async def submit(self, item: ItemT) -> ResultT:
        """Queue ``item`` and wait for its result."""
        loop = asyncio.get_running_loop()
        if self._pending is None or self._loop is not loop:  # first use, or a new event loop
            self._loop = loop
            self._pending = asyncio.Queue()
            self._worker = asyncio.create_task(self._work())
        future: asyncio.Future[ResultT] = loop.create_future()
        await self._pending.put((item, future))
        return await future

    async def _work(self) -> None:
        assert self._pending is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._pending.get()]
            deadline = loop.time() + self._window_s
            while len(batch) < self._max_batch_size:
                try:
                    timeout = max(deadline - loop.time(), 0)
                    batch.append(await asyncio.wait_for(self._pending.get(), timeout))
                except TimeoutError:
                    break
            live = [(item, future) for item, future in batch if not future.done()]
            if live:
                await self._run(loop, live)

    async def _run(
        self, loop: asyncio.AbstractEventLoop, batch: list[tuple[ItemT, asyncio.Future[ResultT]]]
    ) -> None:
        self._on_batch(len(batch))
        try:
            results = await loop.run_in_executor(
                self._executor, self._run_batch, [item for item, _ in batch]
            )
        except Exception as err:  # every caller of this batch gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()


@dataclass(frozen=True)
class _GenerationItem:
    prompt: str
    params: GenerationParams
    add_special_tokens: bool


class MicroBatchingEngine:
    """Dynamic micro-batching over :class:`TextGenerator` (one ``generate`` per batch).

    Args:
        exclusive: entered around every model call (the continuous-batching engine passes
            its pause, when it hands requests over to this one).
    """

    def __init__(
        self,
        generator: TextGenerator,
        settings: EngineSettings,
        exclusive: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        self.generator = generator
        self.settings = settings
        self.exclusive = exclusive
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfx-generate")
        self._stream_executor = ThreadPoolExecutor(thread_name_prefix="tfx-stream")
        self._batcher: MicroBatcher[_GenerationItem, PromptResult] = MicroBatcher(
            self._generate_batch,
            max_batch_size=settings.max_batch_size,
            executor=self._executor,
            on_batch=settings.on_batch,
        )

    @property
    def queue_depth(self) -> int:
        return self._batcher.queue_depth

    @property
    def healthy(self) -> bool:
        return True  # each batch runs on its own; a failure fails only its requests

    async def generate(
        self, prompt: str, params: GenerationParams, *, add_special_tokens: bool
    ) -> PromptResult:
        params = runnable_params(params)
        check_max_tokens(params, self.settings)
        return await self._batcher.submit(_GenerationItem(prompt, params, add_special_tokens))

    async def stream(
        self, prompt: str, params: GenerationParams, *, add_special_tokens: bool
    ) -> AsyncGenerator[StreamDelta, None]:
        params = runnable_params(params)
        check_max_tokens(params, self.settings)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[StreamDelta | BaseException | None] = asyncio.Queue()
        cancel = threading.Event()

        def produce() -> None:
            try:
                self.settings.on_batch(1)
                with self.exclusive():
                    events = self.generator.stream(
                        prompt, params, add_special_tokens=add_special_tokens, cancel=cancel
                    )
                    for event in events:
                        loop.call_soon_threadsafe(deltas.put_nowait, event)
            except BaseException as err:  # handed to the consumer, raised there
                loop.call_soon_threadsafe(deltas.put_nowait, _request_error(err))
            loop.call_soon_threadsafe(deltas.put_nowait, None)

        producer = loop.run_in_executor(self._stream_executor, produce)
        try:
            while (event := await deltas.get()) is not None:
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            cancel.set()
            await asyncio.shield(producer)

    def _generate_batch(self, items: list[_GenerationItem]) -> list[PromptResult | Exception]:
        """One ``generate`` per group of equal parameters; a failing group fails alone."""
        groups: dict[tuple[GenerationParams, bool], list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault((item.params, item.add_special_tokens), []).append(index)
        results: list[PromptResult | Exception] = [EngineError("No result.")] * len(items)
        for (params, add_special), indices in groups.items():
            prompts = [items[i].prompt for i in indices]
            try:
                with self.exclusive():
                    generated: Sequence[PromptResult | Exception] = self.generator.generate(
                        prompts, params, add_special_tokens=add_special
                    )
            except Exception as err:
                if not isinstance(err, InvalidInputError):
                    _logger.exception("Generation failed for %d request(s).", len(indices))
                generated = [cast(Exception, _request_error(err))] * len(indices)
            for index, result in zip(indices, generated, strict=True):
                results[index] = result
        return results

    def close(self) -> None:
        self._batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._stream_executor.shutdown(wait=False, cancel_futures=True)


class ContinuousBatchingEngine:
    """transformers' continuous batching: one background loop steps every live sequence.

    Every sequence runs in streaming mode inside the manager, so stop strings are matched
    on decoded text as tokens arrive, and a finished or abandoned sequence is cancelled at
    once, freeing its cache pages. Greedy decoding is per-request ``top_k=1`` in a
    sampling manager, so greedy and sampled requests share one batch.

    A request alone in the engine runs *solo*: plain ``generate`` (a ``DynamicCache``, as
    :class:`TextGenerator` runs it), with the manager paused. One sequence gains nothing
    from batching, and the paged path's many small per-layer ops make each step slower:
    on SmolLM2-135M (CPU) a decode step takes 76 ms in the manager and 69 ms in
    ``generate``, so a lone request took 15% longer than ``generate``. When another request
    arrives, the solo run stops after its current step and continues in the manager (its
    prompt and tokens so far as a new request), joining the newcomer's first step; the
    consumer sees one stream.

    Attributes:
        solo_requests: requests that started solo.
        handoffs: solo requests that were continued in the manager.
    """

    def __init__(self, generator: TextGenerator, settings: EngineSettings) -> None:
        self.generator = generator
        self.settings = settings
        self.solo_requests = 0
        self.handoffs = 0
        self.loop_restarts = 0
        self._restart_times: list[float] = []
        self._loop_failure_handled = False
        self._pausers = 0  # threads in or waiting for exclusive(): no restart meanwhile
        self._restart_lock = threading.Lock()  # guards the one above, and restarts
        self._manager = _start_manager(generator, settings)
        self._generate_lock = threading.Lock()  # one plain generate at a time: solo or fallback
        self._fallback = MicroBatchingEngine(
            generator, settings, exclusive=self._exclusive_generate
        )
        self._solo_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfx-solo")
        self._tokenize_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfx-tok")
        self._in_flight = 0
        self._solo: _SoloRun | None = None
        self._in_flight_lock = threading.Lock()  # guards the two above
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._sinks_lock = threading.Lock()
        self._stopping = threading.Event()
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="tfx-cb-dispatch", daemon=True
        )
        self._dispatcher.start()

    @property
    def queue_depth(self) -> int:
        return self._manager.input_queue.qsize() + self._fallback.queue_depth

    @property
    def in_flight(self) -> int:
        """Requests (sequences) being generated, solo, in the manager or as a fallback."""
        return self._in_flight

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Pause the generation loop at a step boundary (its sequences and cache are kept).

        The manager's forward passes change state the model shares, so any other
        forward pass on the same model must not overlap them.
        """
        with self._restart_lock:
            self._pausers += 1
        try:
            with cast(AbstractContextManager[Any], self._manager.pause()):
                yield
        finally:
            with self._restart_lock:
                self._pausers -= 1

    @contextmanager
    def _exclusive_generate(self) -> Iterator[None]:
        """The pause, and one plain ``generate`` at a time (solo and fallback requests)."""
        with self.exclusive(), self._generate_lock:
            yield

    async def generate(
        self, prompt: str, params: GenerationParams, *, add_special_tokens: bool
    ) -> PromptResult:
        params = runnable_params(params)
        if self._needs_fallback(params):
            with self._admitted():
                return await self._fallback.generate(
                    prompt, params, add_special_tokens=add_special_tokens
                )
        runs = 1 if params.greedy else params.n  # greedy choices are identical
        choices = await asyncio.gather(
            *(self._complete(prompt, params, add_special_tokens) for _ in range(runs))
        )
        prompt_tokens = choices[0][0]
        completions = [completion for _, completion in choices]
        if params.greedy:
            completions = completions * params.n
        return PromptResult(prompt_tokens=prompt_tokens, completions=completions)

    async def stream(
        self, prompt: str, params: GenerationParams, *, add_special_tokens: bool
    ) -> AsyncGenerator[StreamDelta, None]:
        params = runnable_params(params)
        if params.n != 1:
            raise InvalidInputError("Streaming supports n=1 only.", param="n")
        counted: AbstractContextManager[Any] = nullcontext()  # _outputs counts its requests
        if self._needs_fallback(params):
            deltas = self._fallback.stream(prompt, params, add_special_tokens=add_special_tokens)
            counted = self._admitted()
        else:
            deltas = self._deltas(prompt, params, add_special_tokens)
        with counted:
            async with aclosing(deltas):  # closing early cancels the generation at once
                async for delta in deltas:
                    yield delta

    async def _complete(
        self, prompt: str, params: GenerationParams, add_special_tokens: bool
    ) -> tuple[int, Completion]:
        pieces: list[str] = []
        async with aclosing(self._deltas(prompt, params, add_special_tokens)) as deltas:
            async for delta in deltas:
                pieces.append(delta.text)
                if delta.finish_reason:
                    completion = Completion(
                        "".join(pieces), delta.finish_reason, delta.completion_tokens
                    )
                    return delta.prompt_tokens, completion
        raise EngineError("Generation ended without a result.")  # pragma: no cover

    async def _deltas(
        self, prompt: str, params: GenerationParams, add_special_tokens: bool
    ) -> AsyncGenerator[StreamDelta, None]:
        """Text deltas of one sequence; stop strings are cut, partial ones held back."""
        input_ids = await asyncio.get_running_loop().run_in_executor(
            self._tokenize_executor, self._encode, prompt, add_special_tokens
        )
        max_new = self._max_new_tokens(params, len(input_ids))
        tokenizer = self.generator.tokenizer
        emitted, tokens = 0, []
        outputs = self._outputs(input_ids, params, max_new)
        async with aclosing(outputs):
            async for output in outputs:
                tokens = output.generated_tokens
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                text, hit_stop = cut_at_stop(text, params.stop)
                finished = hit_stop or output.is_finished()
                safe = len(text) if finished else _stable_length(text, params.stop)
                if safe > emitted:
                    yield StreamDelta(text[emitted:safe])
                    emitted = safe
                if finished:
                    stopped = hit_stop or (
                        not params.ignore_eos and bool(tokens) and tokens[-1] in self._eos_ids
                    )
                    reason: FinishReason = "stop" if stopped else "length"
                    yield StreamDelta("", reason, len(input_ids), len(tokens))
                    return

    async def _outputs(
        self, input_ids: list[int], params: GenerationParams, max_new: int
    ) -> AsyncGenerator[Any, None]:
        """Outputs for one sequence: solo if the engine is idle, else from the manager."""
        # Sampled n > 1 runs its sequences side by side: the manager is the place for them.
        candidate = (
            _SoloRun(input_ids, params, max_new, self._stop_ids(params), asyncio.get_running_loop())
            if params.greedy or params.n == 1
            else None
        )
        with self._admitted(candidate) as solo:
            if solo is not None:
                outputs = self._solo_outputs(solo)
            else:
                outputs = self._manager_outputs(input_ids, params, max_new)
            async with aclosing(outputs):
                async for output in outputs:
                    yield output

    @contextmanager
    def _admitted(self, candidate: _SoloRun | None = None) -> Iterator[_SoloRun | None]:
        """Count a request in flight; yields ``candidate`` if it may run solo (engine idle).

        Any request arriving while a solo run is in progress asks it to hand off.
        """
        with self._in_flight_lock:
            if self._solo is not None:
                self._solo.stop.set()
            solo = candidate if self._in_flight == 0 else None
            if solo is not None:
                self._solo = solo
            self._in_flight += 1
        try:
            yield solo
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1
                if solo is not None:
                    self._solo = None

    async def _manager_outputs(
        self, input_ids: list[int], params: GenerationParams, max_new: int
    ) -> AsyncGenerator[Any, None]:
        """The manager's outputs for one request; leaving early cancels it in the manager."""
        request_id = f"tfx-{uuid.uuid4().hex}"
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        finished = False
        try:
            sink = (asyncio.get_running_loop(), outputs)
            self._submit(request_id, input_ids, params, max_new, sink)
            while not finished:
                output = await outputs.get()
                _raise_if_failed(output)
                finished = output.is_finished()
                yield output
        finally:
            self._forget(request_id, cancel=not finished)

    async def _solo_outputs(self, run: _SoloRun) -> AsyncGenerator[Any, None]:
        """A solo run's outputs: its own tokens, then, after a handoff, the manager's."""
        self.solo_requests += 1
        await asyncio.sleep(0)  # requests arriving in the same burst are admitted first
        run.loop.run_in_executor(self._solo_executor, self._run_solo, run)
        finished = False
        try:
            while not finished:
                output = await run.outputs.get()
                _raise_if_failed(output)
                if not isinstance(output, _SoloOutput):  # from the continuation in the manager
                    output = _SoloOutput(run.tokens + output.generated_tokens, output.is_finished())
                finished = output.is_finished()
                yield output
        finally:
            with run.lock:
                run.closed = True
                run.stop.set()
            if run.continuation_id is not None:
                self._forget(run.continuation_id, cancel=not finished)
            # No await here: the server closes this generator from a cancelled task, where
            # an await would be cancelled too. The worker's generate stops after its
            # current step, and the single solo thread runs the next request after it.

    def _run_solo(self, run: _SoloRun) -> None:
        """Worker thread: generate with the manager paused, then hand off if not complete."""
        try:
            # Asked to hand off before starting (a burst of requests): no generate, no pause.
            with nullcontext() if run.stop.is_set() else self._exclusive_generate():
                if not run.stop.is_set():
                    self._generate_solo(run)
                with run.lock:
                    if not (run.closed or run.complete):
                        self._hand_off(run)  # while paused: it joins the manager's next step
        except Exception as err:  # fails this request only
            _logger.exception("Solo generation failed.")
            run.send(EngineError(f"Generation failed: {err}"))

    def _generate_solo(self, run: _SoloRun) -> None:
        import torch
        from transformers import StoppingCriteriaList

        self.settings.on_batch(1)
        model = self.generator.model
        input_ids = torch.tensor([run.input_ids], device=model.device)
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                streamer=_token_streamer(run.add_token),
                stopping_criteria=StoppingCriteriaList([cancel_criterion(run.stop)]),
                **self._generate_kwargs(run.params, run.max_new),
            )

    def _hand_off(self, run: _SoloRun) -> None:
        """Continue a solo run in the manager: its prompt and tokens so far are the prompt."""
        run.continuation_id = f"tfx-{uuid.uuid4().hex}"
        self._submit(
            run.continuation_id,
            run.input_ids + run.tokens,
            run.params,
            run.max_new - len(run.tokens),
            (run.loop, run.outputs),
        )
        self.handoffs += 1

    def _submit(
        self,
        request_id: str,
        input_ids: list[int],
        params: GenerationParams,
        max_new: int,
        sink: tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]],
    ) -> None:
        """Add a request to the manager; its outputs go to ``sink``."""
        with self._sinks_lock:
            self._sinks[request_id] = sink
        accepted = self._manager.add_request(
            input_ids,
            request_id=request_id,
            max_new_tokens=max_new,
            streaming=True,
            eos_token_id=-1 if params.ignore_eos else sorted(self._eos_ids),
            **self._sampling_kwargs(params),
        )
        if accepted is None:
            raise EngineError("The generation loop is not accepting requests.")

    def _forget(self, request_id: str, *, cancel: bool) -> None:
        with self._sinks_lock:
            self._sinks.pop(request_id, None)
        if cancel:
            self._manager.cancel_request(request_id)

    def _needs_fallback(self, params: GenerationParams) -> bool:
        """Per-request settings this manager cannot apply."""
        unsupported = params.seed is not None or params.repetition_penalty is not None
        return unsupported or (self.settings.greedy_only and not params.greedy)

    def _generate_kwargs(self, params: GenerationParams, max_new: int) -> dict[str, Any]:
        """``generate`` arguments for a solo run. No stop strings: ``_deltas`` cuts at them,
        and a ``generate`` that ended at one would look like a run to hand off."""
        eos = {"eos_token_id": sorted(self._eos_ids) or None}
        return {**self.generator.decoding_kwargs(params, max_new), **eos}

    def _sampling_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        if self.settings.greedy_only:
            return {}
        if params.greedy:
            return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        return {
            "temperature": float(params.temperature),
            "top_k": min(int(params.top_k or self._vocab_size), self._vocab_size),
            "top_p": float(params.top_p),
        }

    @property
    def healthy(self) -> bool:
        """Whether the generation loop is running (between a fatal error and its restart,
        or once restarts are used up for the window, it is not)."""
        return bool(self._manager.is_running())

    def _dispatch(self) -> None:
        """Route outputs from the manager's queue to the waiting requests (own thread)."""
        while not self._stopping.is_set():
            output = self._manager.get_result(timeout=0.1)
            if output is None:
                if not self.healthy and not self._stopping.is_set():
                    self._recover()
                    self._stopping.wait(0.05)  # get_result does not wait once the loop is gone
                continue
            step = [output]
            while (more := self._manager.get_result(timeout=0)) is not None:
                step.append(more)
            self.settings.on_batch(len({out.request_id for out in step}))
            for out in step:
                with self._sinks_lock:
                    sink = self._sinks.get(out.request_id)
                if sink is not None:
                    loop, queue = sink
                    loop.call_soon_threadsafe(queue.put_nowait, out)

    def _recover(self) -> None:
        """The loop is gone: fail the requests that waited on it, and restart it if it died
        of an error (not a stop) and the restart budget allows."""
        fatal = getattr(self._manager.background_thread_status, "fatal_error", None)
        if not self._loop_failure_handled:
            self._loop_failure_handled = True
            _logger.error("The generation loop stopped: %s", fatal or "stopped")
        # Every tick while it is down: a request is never left waiting on a loop that is gone.
        self._fail_waiting(EngineError(f"The generation loop stopped: {fatal or 'stopped'}."))
        if fatal is None:
            return  # stopped on purpose
        now = time.monotonic()
        window = self.settings.loop_restart_window_s
        self._restart_times = [t for t in self._restart_times if now - t < window]
        if len(self._restart_times) >= self.settings.max_loop_restarts:
            return  # unhealthy until the oldest restart leaves the window
        with self._restart_lock:
            # A thread still waiting for a pause of the dead loop is about to fail; starting
            # now would clear its pause request from under it.
            if self._pausers or self._stopping.is_set():
                return
            self._manager.start()
        self._restart_times.append(now)
        self.loop_restarts += 1
        self._loop_failure_handled = False
        _logger.warning(
            "Restarted the generation loop (%d of at most %d restarts per %g s).",
            len(self._restart_times),
            self.settings.max_loop_restarts,
            window,
        )

    def _fail_waiting(self, error: EngineError) -> None:
        with self._sinks_lock:
            sinks = list(self._sinks.values())
        for loop, queue in sinks:
            loop.call_soon_threadsafe(queue.put_nowait, error)

    def _encode(self, prompt: str, add_special_tokens: bool) -> list[int]:
        return self.generator.encode(prompt, add_special_tokens=add_special_tokens)

    def _max_new_tokens(self, params: GenerationParams, prompt_tokens: int) -> int:
        check_max_tokens(params, self.settings)
        return self.generator.max_new_tokens(params, prompt_tokens)

    @property
    def _eos_ids(self) -> set[int]:
        return self.generator.stop_token_ids

    def _stop_ids(self, params: GenerationParams) -> set[int]:
        """The tokens that end this request."""
        return set() if params.ignore_eos else self._eos_ids

    @property
    def _vocab_size(self) -> int:
        return int(self.generator.model.config.get_text_config().vocab_size)

    def close(self) -> None:
        self._stopping.set()
        with self._restart_lock:  # no restart after this
            pass
        self._manager.stop(block=True, timeout=10)
        self._dispatcher.join(timeout=5)
        self._fallback.close()
        self._solo_executor.shutdown(wait=False, cancel_futures=True)
        self._tokenize_executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _SoloOutput:
    """A solo run's tokens so far, shaped like the manager's outputs (what ``_deltas`` reads)."""

    generated_tokens: list[int]
    finished: bool = False
    error: str | None = None

    def is_finished(self) -> bool:
        return self.finished


@dataclass
class _SoloRun:
    """One request generating alone through plain ``generate``."""

    input_ids: list[int]
    params: GenerationParams
    max_new: int
    stop_ids: set[int]
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    #: Ends ``generate`` after its current step: a request arrived, or the consumer left.
    stop: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards the two below
    closed: bool = False  # the consumer is gone
    continuation_id: str | None = None

    @property
    def complete(self) -> bool:
        """Whether it needs no more tokens (max tokens, or an end-of-sequence token)."""
        tokens = self.tokens
        return len(tokens) >= self.max_new or (bool(tokens) and tokens[-1] in self.stop_ids)

    def add_token(self, token: int) -> None:
        """Called by ``generate``'s streamer (worker thread)."""
        self.tokens.append(token)
        self.send(_SoloOutput(list(self.tokens), self.complete))

    def send(self, item: Any) -> None:
        if not self.closed:  # nobody reads once the consumer is gone (its loop may be too)
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


def _token_streamer(on_token: Callable[[int], None]) -> Any:
    """A ``generate`` streamer that hands each new token to ``on_token``, skipping the prompt."""
    from transformers.generation.streamers import BaseStreamer

    class TokenStreamer(BaseStreamer):
        prompt_seen = False

        def put(self, value: Any) -> None:
            if self.prompt_seen:
                on_token(int(value.item()))
            self.prompt_seen = True

        def end(self) -> None:
            pass

    return TokenStreamer()


def _request_error(err: BaseException) -> BaseException:
    """What a request's caller gets for a failure: input errors as they are, the rest as an
    :class:`EngineError` (the server answers both, even in the middle of a stream)."""
    if isinstance(err, TfxError) or not isinstance(err, Exception):
        return err  # TfxError: the plugin's own (input errors, EngineError); or a cancellation
    return EngineError(f"Generation failed: {err}")


def _raise_if_failed(output: Any) -> None:
    if isinstance(output, EngineError):
        raise output
    if output.error:
        raise EngineError(f"Generation failed: {output.error}")


def create_generation_engine(
    generator: TextGenerator, settings: EngineSettings, *, continuous: bool = True
) -> GenerationEngine:
    """Continuous batching when the model supports it, else dynamic micro-batching."""
    if continuous:
        try:
            return ContinuousBatchingEngine(generator, settings)
        except Exception as err:  # an architecture or attention the manager cannot run
            _logger.warning(
                "Continuous batching is not available for this model (%s); using dynamic "
                "micro-batching instead.",
                err,
            )
    return MicroBatchingEngine(generator, settings)


def check_max_tokens(params: GenerationParams, settings: EngineSettings) -> None:
    """Reject requests above the deployment's ``max_tokens_limit``."""
    limit = settings.max_tokens_limit
    if limit is not None and params.max_tokens is not None and params.max_tokens > limit:
        raise InvalidInputError(
            f"max_tokens={params.max_tokens} is above this deployment's limit of {limit}.",
            param="max_tokens",
        )


def kv_cache_blocks(settings: EngineSettings, context_window: int) -> int:
    """Pages of the paged KV cache: ``kv_cache_tokens``, else ``KV_TOKENS_PER_SEQUENCE`` per
    batch slot, and never less than one context window (so any single request fits).

    Sequences take pages as they grow, so one long sequence may use many slots' worth.
    """
    tokens = settings.kv_cache_tokens or settings.max_batch_size * KV_TOKENS_PER_SEQUENCE
    if tokens < context_window:
        if settings.kv_cache_tokens:
            _logger.warning(
                "kv_cache_tokens=%d is below the model's context window; using %d so that "
                "any single request fits.",
                tokens,
                context_window,
            )
        tokens = context_window
    return math.ceil(tokens / _PAGE_SIZE)


def _start_manager(generator: TextGenerator, settings: EngineSettings) -> Any:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = generator.model
    common = {
        "max_new_tokens": generator.default_max_tokens,
        "eos_token_id": sorted(generator.stop_token_ids) or -1,
        "pad_token_id": generator.tokenizer.pad_token_id,
    }
    sampling: dict[str, Any]
    if settings.greedy_only:
        sampling = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    else:
        sampling = {
            "do_sample": True,  # per-request top_k=1 makes a request greedy
            "temperature": 0.7,  # non-neutral defaults make transformers create the
            "top_k": 50,  # per-request warpers; every request then sets all three
            "top_p": 0.95,
        }
    generation_config = GenerationConfig(**sampling, **common)
    cb_config = ContinuousBatchingConfig(
        page_size=_PAGE_SIZE,
        num_blocks=kv_cache_blocks(settings, generator.context_window),
        # Tokens per forward pass: longer prefills are split. The loop's buffers (attention
        # mask, indices) grow with it, and short chat prompts rarely need more.
        max_batch_tokens=max(256, settings.max_batch_size * 32),
        max_requests_per_batch=settings.max_batch_size,
        per_request_processors=not settings.greedy_only,
        auto_switch_to_flash=False,
    )
    manager = model.init_continuous_batching(
        generation_config=generation_config, continuous_batching_config=cb_config
    )
    _logger.info(
        "Paged KV cache: %d tokens for up to %d sequences.",
        cb_config.num_blocks * _PAGE_SIZE,
        settings.max_batch_size,
    )
    manager.warmup()
    manager.start()
    return manager


def _stable_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be sent: no half-decoded character, no possible stop prefix."""
    end = len(text.rstrip("\ufffd"))
    return min(end, len(text) - partial_stop_length(text, stops))
