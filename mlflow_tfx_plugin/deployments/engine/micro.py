"""The micro-batching engine: requests collected for a few milliseconds share one ``generate``.

It serves models transformers' continuous-batching manager cannot run, and requests the
manager cannot express (``seed``, ``repetition_penalty``; ``response_format`` and
``logprobs`` too where :mod:`.cb_hooks` is not installed). A batch runs one left-padded
``generate`` per group of equal parameters, and a failing group fails only its requests.
Grammars and logprobs settings do not split a group: each row has its own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, cast

from mlflow_tfx_plugin.deployments.batching import MicroBatcher
from mlflow_tfx_plugin.deployments.engine.base import (
    EngineSettings,
    check_max_tokens,
    request_error,
)
from mlflow_tfx_plugin.deployments.engine.threads import PassingThreadExecutor
from mlflow_tfx_plugin.errors import EngineError, InvalidInputError
from mlflow_tfx_plugin.generation import PromptResult, StreamDelta, TextGenerator, runnable_params
from mlflow_tfx_plugin.protocol import GenerationParams

_logger = logging.getLogger(__name__)


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
        self._executor = PassingThreadExecutor(max_workers=1, thread_name_prefix="tfx-generate")
        self._stream_executor = ThreadPoolExecutor(thread_name_prefix="tfx-stream")
        self._batcher: MicroBatcher[_GenerationItem, PromptResult] = MicroBatcher(
            self._generate_batch,
            max_batch_size=settings.batch_size,
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
        if params.constraint is not None:  # a bad schema fails here, not its whole batch
            await asyncio.to_thread(self.generator.grammar, params.constraint)
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
                loop.call_soon_threadsafe(deltas.put_nowait, request_error(err))
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
        """One ``generate`` per group of equal parameters (per-row controls aside); a
        failing group fails alone."""
        groups: dict[tuple[GenerationParams, bool], list[int]] = {}
        for index, item in enumerate(items):
            shared = replace(item.params, constraint=None, logprobs=None)
            groups.setdefault((shared, item.add_special_tokens), []).append(index)
        results: list[PromptResult | Exception] = [EngineError("No result.")] * len(items)
        for (params, add_special), indices in groups.items():
            prompts = [items[i].prompt for i in indices]
            constraints = [items[i].params.constraint for i in indices]
            logprobs = [items[i].params.logprobs for i in indices]
            try:
                with self.exclusive():
                    generated: Sequence[PromptResult | Exception] = self.generator.generate(
                        prompts,
                        params,
                        add_special_tokens=add_special,
                        constraints=constraints,
                        logprobs=logprobs,
                    )
            except Exception as err:
                if not isinstance(err, InvalidInputError):
                    _logger.exception("Generation failed for %d request(s).", len(indices))
                generated = [cast(Exception, request_error(err))] * len(indices)
            for index, result in zip(indices, generated, strict=True):
                results[index] = result
        return results

    def close(self) -> None:
        self._batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._stream_executor.shutdown(wait=False, cancel_futures=True)
