"""Lone requests: one runs alone through plain ``generate`` until another request arrives.

One sequence gains nothing from batching, and the paged path's many small per-layer ops
make each step slower: on SmolLM2-135M (CPU, transformers 5.24, ``benchmarks/
engine_step.py``) a decode step of one sequence takes 61-69 ms in the manager and 59-66
ms in ``generate`` (66-127 ms in the manager before :mod:`.cb_sampling`), and a lone
request was served 5-9% slower through the manager than solo. When another request
arrives, the solo run stops after its current step and hands off: it continues in the
manager (its prompt and tokens so far as a new request), joining the newcomer's first
step, and its consumer sees one stream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlflow_tfx_plugin.deployments.engine.base import EngineSettings, OutputSink, raise_if_failed
from mlflow_tfx_plugin.errors import EngineError
from mlflow_tfx_plugin.generation import TextGenerator, cancel_criterion
from mlflow_tfx_plugin.protocol import GenerationParams

_logger = logging.getLogger(__name__)


class SubmitToManager(Protocol):
    """Adds a request to the continuous-batching manager; its outputs go to ``sink``."""

    def __call__(
        self,
        request_id: str,
        input_ids: list[int],
        params: GenerationParams,
        max_new: int,
        sink: OutputSink,
    ) -> None: ...


class ForgetInManager(Protocol):
    """Stops routing a manager request's outputs, and cancels it there if asked."""

    def __call__(self, request_id: str, *, cancel: bool) -> None: ...


@dataclass
class SoloOutput:
    """A solo run's tokens so far, shaped like the manager's outputs (what the engine reads)."""

    generated_tokens: list[int]
    finished: bool = False

    def is_finished(self) -> bool:
        return self.finished


@dataclass
class SoloRun:
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
        self.send(SoloOutput(list(self.tokens), self.complete))

    def send(self, item: Any) -> None:
        if not self.closed:  # nobody reads once the consumer is gone (its loop may be too)
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


class SoloRunner:
    """Runs solo requests, one at a time, on its own thread, and hands them off.

    Args:
        generator: the model and tokenizer the engine serves.
        settings: the engine's settings (``on_batch`` sees each solo run as a batch of one).
        exclusive: entered around each ``generate``: the manager's pause, and one plain
            ``generate`` at a time.
        submit: continues a run in the manager.
        forget: drops a continuation in the manager (cancelling it if unfinished).

    Attributes:
        requests: requests that started solo.
        handoffs: solo requests that were continued in the manager.
    """

    def __init__(
        self,
        generator: TextGenerator,
        settings: EngineSettings,
        *,
        exclusive: Callable[[], AbstractContextManager[Any]],
        submit: SubmitToManager,
        forget: ForgetInManager,
    ) -> None:
        self.generator = generator
        self.settings = settings
        self.requests = 0
        self.handoffs = 0
        self._exclusive = exclusive
        self._submit = submit
        self._forget = forget
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfx-solo")

    async def outputs(self, run: SoloRun) -> AsyncGenerator[Any, None]:
        """A solo run's outputs: its own tokens, then, after a handoff, the manager's."""
        self.requests += 1
        await asyncio.sleep(0)  # requests arriving in the same burst are admitted first
        run.loop.run_in_executor(self._executor, self._run, run)
        finished = False
        try:
            while not finished:
                output = await run.outputs.get()
                if not isinstance(output, SoloOutput):  # an error, or the continuation's output
                    raise_if_failed(output)
                    output = SoloOutput(run.tokens + output.generated_tokens, output.is_finished())
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

    def _run(self, run: SoloRun) -> None:
        """Worker thread: generate with the manager paused, then hand off if not complete."""
        try:
            # Asked to hand off before starting (a burst of requests): no generate, no pause.
            with nullcontext() if run.stop.is_set() else self._exclusive():
                if not run.stop.is_set():
                    self._generate(run)
                with run.lock:
                    if not (run.closed or run.complete):
                        self._hand_off(run)  # while paused: it joins the manager's next step
        except Exception as err:  # fails this request only
            _logger.exception("Solo generation failed.")
            run.send(EngineError(f"Generation failed: {err}"))

    def _generate(self, run: SoloRun) -> None:
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

    def _hand_off(self, run: SoloRun) -> None:
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

    def _generate_kwargs(self, params: GenerationParams, max_new: int) -> dict[str, Any]:
        """``generate`` arguments for a solo run. No stop strings: the engine cuts at them,
        and a ``generate`` that ended at one would look like a run to hand off."""
        eos = {"eos_token_id": sorted(self.generator.stop_token_ids) or None}
        return {**self.generator.decoding_kwargs(params, max_new), **eos}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


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
