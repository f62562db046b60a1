"""The continuous-batching engine, over transformers' continuous-batching manager.

Sequences join and leave the running batch at every decoding step. The KV cache is paged
and sized from ``max_batch_size`` and the context window (never from a share of RAM), and
without ``max_batch_size`` the running batch is sized from the cache. A lone request runs
in the manager too: alone there, a step costs what a ``generate`` step costs, as long as
the manager's loop is the only long-lived thread running torch (:mod:`.threads`).
Requests the manager cannot express go to the micro-batching engine (:mod:`.micro`).
Constrained requests (``response_format``, forced tool calls) and requests for
``logprobs`` run in the manager through a processor of ours (:mod:`.cb_hooks`); if that
hook cannot be installed or fails its start-up check, they go to micro-batching too.
Model work and tokenizing run off the event loop, so ``/health`` and ``/metrics`` answer
under load.

If transformers' loop dies, its requests fail and the engine restarts it (a bounded
number of times per window).
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
from typing import Any, cast

from mlflow_tfx_plugin.deployments.config import DEFAULT_BATCH_SIZE
from mlflow_tfx_plugin.deployments.engine.base import (
    EngineSettings,
    OutputSink,
    check_max_tokens,
    raise_if_failed,
)
from mlflow_tfx_plugin.deployments.engine.cb_hooks import (
    ControlRegistry,
    install_controls,
    self_check,
    uninstall_controls,
)
from mlflow_tfx_plugin.deployments.engine.cb_sampling import install_fast_sampling
from mlflow_tfx_plugin.deployments.engine.micro import MicroBatchingEngine
from mlflow_tfx_plugin.detokenize import IncrementalDetokenizer
from mlflow_tfx_plugin.errors import EngineError, InvalidInputError
from mlflow_tfx_plugin.generation import (
    Completion,
    FinishReason,
    PromptResult,
    StopStringStream,
    StreamDelta,
    TextGenerator,
    runnable_params,
)
from mlflow_tfx_plugin.protocol import GenerationParams
from mlflow_tfx_plugin.structured.controls import RowControls
from mlflow_tfx_plugin.structured.logprobs import TokenLogprob, kept_before_cut, resolve

_logger = logging.getLogger(__name__)

#: Default KV-cache tokens per ``max_batch_size`` slot (longer sequences share the pool).
KV_TOKENS_PER_SEQUENCE = 128
#: Most sequences a batch sized from its KV cache runs (each one adds to every step).
MAX_AUTO_BATCH_SIZE = 64
_PAGE_SIZE = 32  # small pages waste less of a small CPU cache than the default 256


class ContinuousBatchingEngine:
    """transformers' continuous batching: one background loop steps every live sequence.

    Every sequence runs in streaming mode inside the manager, so stop strings are matched
    on decoded text as tokens arrive, and a finished or abandoned sequence is cancelled at
    once, freeing its cache pages. Greedy decoding is per-request ``top_k=1`` in a
    sampling manager, so greedy and sampled requests share one batch (:mod:`.cb_sampling`
    gives greedy rows their argmax without sorting the vocabulary).

    Attributes:
        loop_restarts: restarts of the manager's loop after it died.
        fast_sampling: whether the manager runs :mod:`.cb_sampling`'s warpers and sampler.
    """

    def __init__(self, generator: TextGenerator, settings: EngineSettings) -> None:
        self.generator = generator
        self.settings = settings
        self.loop_restarts = 0
        self._restart_times: list[float] = []
        self._loop_failure_handled = False
        self._pausers = 0  # threads in or waiting for exclusive(): no restart meanwhile
        self._restart_lock = threading.Lock()  # guards the one above, and restarts
        self._manager, self._controls, self.fast_sampling = _start_manager(generator, settings)
        self._generate_lock = threading.Lock()  # one fallback generate at a time
        self._fallback = MicroBatchingEngine(
            generator, settings, exclusive=self._exclusive_generate
        )
        self._tokenize_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfx-tok")
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()  # guards the one above
        self._sinks: dict[str, OutputSink] = {}
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
        """Requests (sequences) being generated, in the manager or as a fallback."""
        return self._in_flight

    @property
    def controlled_requests(self) -> int:
        """Constrained or logprobs requests (sequences) that ran in the manager."""
        return self._controls.registered if self._controls is not None else 0

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
        """The pause, and one plain ``generate`` at a time (fallback requests)."""
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
        counted: AbstractContextManager[Any] = nullcontext()  # _manager_outputs counts its requests
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
        logprobs: list[TokenLogprob] = []
        async with aclosing(self._deltas(prompt, params, add_special_tokens)) as deltas:
            async for delta in deltas:
                pieces.append(delta.text)
                logprobs.extend(delta.logprobs)
                if delta.finish_reason:
                    completion = Completion(
                        "".join(pieces),
                        delta.finish_reason,
                        delta.completion_tokens,
                        tuple(logprobs) if params.logprobs is not None else None,
                    )
                    return delta.prompt_tokens, completion
        raise EngineError("Generation ended without a result.")  # pragma: no cover

    async def _deltas(
        self, prompt: str, params: GenerationParams, add_special_tokens: bool
    ) -> AsyncGenerator[StreamDelta, None]:
        """Text deltas of one sequence; stop strings are cut, partial ones held back.

        A sequence with logprobs sends each token's with the delta that completes its text.
        """
        input_ids, controls = await asyncio.get_running_loop().run_in_executor(
            self._tokenize_executor, self._prepare, prompt, params, add_special_tokens
        )
        max_new = self._max_new_tokens(params, len(input_ids))
        text_stream = StopStringStream(params.stop)
        deltas: _TextDeltas | _LogprobDeltas
        if controls is not None and controls.top_logprobs is not None:
            ends = set() if params.ignore_eos else self._eos_ids
            deltas = _LogprobDeltas(self.generator, controls, text_stream, ends)
        else:
            deltas = _TextDeltas(self.generator, text_stream)
        outputs = self._manager_outputs(input_ids, params, max_new, controls)
        async with aclosing(outputs):
            async for output in outputs:
                tokens = output.generated_tokens
                finished = output.is_finished()
                for delta in deltas.feed(tokens, final=finished):
                    yield delta
                if text_stream.stopped or finished:
                    if controls is not None and controls.error:
                        raise EngineError(f"Constrained decoding failed: {controls.error}")
                    stopped = (
                        text_stream.stopped
                        or (controls is not None and controls.done)
                        or (not params.ignore_eos and bool(tokens) and tokens[-1] in self._eos_ids)
                    )
                    reason: FinishReason = "stop" if stopped else "length"
                    yield StreamDelta("", reason, len(input_ids), len(tokens))
                    return

    def _prepare(
        self, prompt: str, params: GenerationParams, add_special_tokens: bool
    ) -> tuple[list[int], RowControls | None]:
        """The prompt's ids, and the sequence's controls if it has any (tokenize thread: a
        schema the grammar engine cannot enforce fails here, before generation)."""
        input_ids = self._encode(prompt, add_special_tokens)
        if not _is_controlled(params):
            return input_ids, None
        grammar = self.generator.grammar(params.constraint)
        controls = RowControls(
            matcher=self.generator.grammars.matcher(grammar) if grammar is not None else None,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            top_logprobs=params.logprobs,
        )
        return input_ids, controls

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        """Count a request in flight while the block runs."""
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    async def _manager_outputs(
        self,
        input_ids: list[int],
        params: GenerationParams,
        max_new: int,
        controls: RowControls | None = None,
    ) -> AsyncGenerator[Any, None]:
        """The manager's outputs for one request, counted in flight while they last; leaving
        early cancels it in the manager."""
        request_id = f"tfx-{uuid.uuid4().hex}"
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        finished = False
        with self._admitted():
            try:
                sink = (asyncio.get_running_loop(), outputs)
                self._submit(request_id, input_ids, params, max_new, sink, controls=controls)
                while not finished:
                    output = await outputs.get()
                    raise_if_failed(output)
                    finished = output.is_finished()
                    yield output
            finally:
                self._forget(request_id, cancel=not finished)

    def _submit(
        self,
        request_id: str,
        input_ids: list[int],
        params: GenerationParams,
        max_new: int,
        sink: OutputSink,
        *,
        controls: RowControls | None = None,
    ) -> None:
        """Add a request to the manager; its outputs go to ``sink``. A request with
        ``controls`` is decoded by the control processor (neutral warpers: it warps)."""
        with self._sinks_lock:
            self._sinks[request_id] = sink
        eos: int | list[int] = -1 if params.ignore_eos else sorted(self._eos_ids)
        sampling = self._sampling_kwargs(params)
        if controls is not None and self._controls is not None:
            self._controls.register(request_id, controls)
            if not self.settings.greedy_only:
                sampling = self._neutral_sampling
            if params.ignore_eos and controls.matcher is not None:
                eos = [self._end_token_id]  # a complete grammar ends the sequence anyway
        accepted = self._manager.add_request(
            input_ids,
            request_id=request_id,
            max_new_tokens=max_new,
            streaming=True,
            eos_token_id=eos,
            **sampling,
        )
        if accepted is None:
            raise EngineError("The generation loop is not accepting requests.")

    def _forget(self, request_id: str, *, cancel: bool) -> None:
        with self._sinks_lock:
            self._sinks.pop(request_id, None)
        if cancel:
            self._manager.cancel_request(request_id)
        if self._controls is not None:
            self._controls.forget(request_id)

    def _needs_fallback(self, params: GenerationParams) -> bool:
        """Per-request settings this manager cannot apply (controls: only without the hook)."""
        hooked = getattr(self, "_controls", None) is not None  # None too before __init__ sets it
        unsupported = (
            params.seed is not None
            or params.repetition_penalty is not None
            or (not hooked and _is_controlled(params))
        )
        return unsupported or (self.settings.greedy_only and not params.greedy)

    @property
    def _neutral_sampling(self) -> dict[str, Any]:
        return {"temperature": 1.0, "top_k": self._vocab_size, "top_p": 1.0}

    @property
    def _end_token_id(self) -> int:
        """What a sequence whose grammar is complete is given (as ``TextGenerator``)."""
        return _end_token_id(self.generator)

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
        self._tokenize_executor.shutdown(wait=False, cancel_futures=True)


def kv_cache_blocks(settings: EngineSettings, context_window: int) -> int:
    """Pages of the paged KV cache: ``kv_cache_tokens``, else ``KV_TOKENS_PER_SEQUENCE`` per
    batch slot (``DEFAULT_BATCH_SIZE`` slots when ``max_batch_size`` is not set), and never
    less than one context window (so any single request fits).

    Sequences take pages as they grow, so one long sequence may use many slots' worth.
    """
    tokens = settings.kv_cache_tokens or settings.batch_size * KV_TOKENS_PER_SEQUENCE
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


def running_batch_size(settings: EngineSettings, kv_cache_tokens: int) -> int:
    """Sequences decoded together: ``max_batch_size``, else as many as the KV cache holds
    at ``KV_TOKENS_PER_SEQUENCE`` each, from ``DEFAULT_BATCH_SIZE`` to ``MAX_AUTO_BATCH_SIZE``.

    A model with a long context window gets a large cache (one window at least), which
    then holds more short chats than a fixed 16; the scheduler still admits a sequence
    only when the cache has room for it.
    """
    if settings.max_batch_size is not None:
        return settings.max_batch_size
    fits = kv_cache_tokens // KV_TOKENS_PER_SEQUENCE
    return max(DEFAULT_BATCH_SIZE, min(MAX_AUTO_BATCH_SIZE, fits))


def _is_controlled(params: GenerationParams) -> bool:
    """Whether a request needs the control processor (a grammar, or logprobs)."""
    return params.constraint is not None or params.logprobs is not None


def _end_token_id(generator: TextGenerator) -> int:
    """The token that ends a sequence whose grammar is complete (``TextGenerator``'s rule)."""
    eos = generator.tokenizer.eos_token_id
    stops = generator.stop_token_ids
    return int(eos) if eos in stops or not stops else min(stops)


def _start_manager(
    generator: TextGenerator, settings: EngineSettings
) -> tuple[Any, ControlRegistry | None, bool]:
    """The started manager, the registry of its control hook (None: not installed), and
    whether it samples through :mod:`.cb_sampling`."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = generator.model
    vocab_size = int(model.config.get_text_config().vocab_size)
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
    num_blocks = kv_cache_blocks(settings, generator.context_window)
    batch_size = running_batch_size(settings, num_blocks * _PAGE_SIZE)
    cb_config = ContinuousBatchingConfig(
        page_size=_PAGE_SIZE,
        num_blocks=num_blocks,
        # Tokens per forward pass: longer prefills are split. The loop's buffers (attention
        # mask, indices) grow with it, and short chat prompts rarely need more.
        max_batch_tokens=max(256, batch_size * 32),
        max_requests_per_batch=batch_size,
        per_request_processors=not settings.greedy_only,
        allow_block_sharing=settings.prefix_caching,
        auto_switch_to_flash=False,
    )
    manager = model.init_continuous_batching(
        generation_config=generation_config, continuous_batching_config=cb_config
    )
    _logger.info(
        "Paged KV cache: %d tokens for up to %d sequences.",
        cb_config.num_blocks * _PAGE_SIZE,
        batch_size,
    )
    manager.warmup()
    fast_sampling = install_fast_sampling(manager)
    registry = install_controls(
        manager,
        eos_token_id=_end_token_id(generator),
        mask_width=lambda: generator.grammars.vocab_size,
    )
    manager.start()
    if registry is not None:
        check_sampling = (
            {} if settings.greedy_only else {"temperature": 1.0, "top_k": vocab_size, "top_p": 1.0}
        )
        probe = generator.encode("Hello", add_special_tokens=True)
        if not self_check(manager, registry, probe, check_sampling):
            manager.stop(block=True, timeout=10)
            uninstall_controls(manager, registry)
            registry = None
            manager.start()
    return manager, registry, fast_sampling


class _TextDeltas:
    """A sequence's text deltas from the manager's growing token lists, detokenized
    incrementally: one delta per output at most."""

    def __init__(self, generator: TextGenerator, text_stream: StopStringStream) -> None:
        self._texts = IncrementalDetokenizer(generator.tokenizer)
        self._text_stream = text_stream

    def feed(self, tokens: Sequence[int], *, final: bool) -> list[StreamDelta]:
        """The delta of the tokens not seen yet (all tokens so far in ``tokens``)."""
        texts, text_stream = self._texts, self._text_stream
        pieces = []
        for token in tokens[len(texts.ids) :]:
            pieces.append(text_stream.push(texts.push(token)))
            if text_stream.stopped:
                break
        if final and not text_stream.stopped:
            pieces.append(text_stream.push(texts.flush()))
        if final or text_stream.stopped:
            pieces.append(text_stream.finish())
        text = "".join(pieces)
        return [StreamDelta(text)] if text else []


class _LogprobDeltas:
    """A sequence's text deltas with its tokens' logprobs, from the manager's growing token
    lists (what ``TextGenerator`` streams from ``generate``): each token's logprob goes with
    the delta that completes its text; none for an end-of-sequence token, none past a stop
    string's cut."""

    def __init__(
        self,
        generator: TextGenerator,
        controls: RowControls,
        text_stream: StopStringStream,
        ends: set[int],
    ) -> None:
        self._vocab = generator.vocab_bytes
        self._records = controls.records
        self._texts = IncrementalDetokenizer(generator.tokenizer)
        self._text_stream = text_stream
        self._ends = ends
        self._pending: list[int] = []  # tokens whose logprobs are not sent yet

    def feed(self, tokens: Sequence[int], *, final: bool) -> list[StreamDelta]:
        """The deltas of the tokens not seen yet (all tokens so far in ``tokens``)."""
        texts, text_stream = self._texts, self._text_stream
        deltas = []
        for token in tokens[len(texts.ids) :]:
            index = len(texts.ids)
            if token not in self._ends and index < len(self._records):
                self._pending.append(index)
            piece = text_stream.push(texts.push(token))
            logprobs = self._release(lambda i: texts.spans[i][1] <= text_stream.sent)
            if piece or logprobs:
                deltas.append(StreamDelta(piece, logprobs=logprobs))
            if text_stream.stopped:
                break
        if final or text_stream.stopped:
            deltas.extend(self._finish())
        return deltas

    def _finish(self) -> list[StreamDelta]:
        text_stream = self._text_stream
        piece = "" if text_stream.stopped else text_stream.push(self._texts.flush())
        piece += text_stream.finish()
        cut = text_stream.sent if text_stream.stopped else None
        self._pending[:] = [i for i in self._pending if kept_before_cut(self._texts.spans[i], cut)]
        logprobs = self._release(lambda i: True)
        return [StreamDelta(piece, logprobs=logprobs)] if piece or logprobs else []

    def _release(self, ready: Callable[[int], bool]) -> tuple[TokenLogprob, ...]:
        pending = self._pending
        count = next((n for n, i in enumerate(pending) if not ready(i)), len(pending))
        sent, pending[:] = pending[:count], pending[count:]
        spans = self._texts.spans
        return tuple(resolve(self._records[i], spans[i], self._vocab) for i in sent)
