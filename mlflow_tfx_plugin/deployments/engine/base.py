"""What every generation engine shares: its protocol, its settings, and request limits.

:class:`EngineSettings` is built from the deployment config in one place,
:meth:`EngineSettings.from_config`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mlflow_tfx_plugin.deployments.batching import BatchObserver
from mlflow_tfx_plugin.deployments.config import DEFAULT_BATCH_SIZE
from mlflow_tfx_plugin.errors import EngineError, InvalidInputError, TfxError
from mlflow_tfx_plugin.generation import PromptResult, StreamDelta, TextGenerator
from mlflow_tfx_plugin.protocol import GenerationParams

if TYPE_CHECKING:
    from mlflow_tfx_plugin.deployments.config import DeploymentConfig

OutputSink = tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]
"""Where the outputs of one sequence in the manager go: a queue, fed on its event loop."""


def _ignore_batch(size: int) -> None:
    pass


@dataclass(frozen=True)
class EngineSettings:
    """What the engines take from the deployment config."""

    #: None: the continuous-batching engine sizes its batch from the KV cache
    #: (:func:`~.continuous.running_batch_size`); the others use :data:`DEFAULT_BATCH_SIZE`.
    max_batch_size: int | None = None
    max_tokens_limit: int | None = None
    kv_cache_tokens: int | None = None
    #: Share the KV pages of a common prompt prefix between sequences (the manager's
    #: block sharing).
    prefix_caching: bool = True
    on_batch: BatchObserver = field(default=_ignore_batch)
    #: A greedy-only continuous-batching loop: no per-request sampling warpers (each sorts
    #: the vocabulary every step), so greedy requests decode faster; sampled requests go
    #: through micro-batching, pausing the loop while they run.
    greedy_only: bool = False
    #: Restarts of a continuous-batching loop that died, at most this many per window; past
    #: them the engine reports unhealthy until the window allows another.
    max_loop_restarts: int = 3
    loop_restart_window_s: float = 60.0

    @property
    def batch_size(self) -> int:
        """Items per micro-batch (generation fallback and embeddings)."""
        return self.max_batch_size or DEFAULT_BATCH_SIZE

    @classmethod
    def from_config(cls, config: DeploymentConfig) -> EngineSettings:
        """The engine's share of a deployment's ``-C`` settings (``greedy_only`` depends on
        the model too: the served model sets it from ``batch_decoding``)."""
        return cls(
            max_batch_size=config.max_batch_size,
            max_tokens_limit=config.max_tokens_limit,
            kv_cache_tokens=config.kv_cache_tokens,
            prefix_caching=config.prefix_caching,
        )


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


def check_max_tokens(params: GenerationParams, settings: EngineSettings) -> None:
    """Reject requests above the deployment's ``max_tokens_limit``."""
    limit = settings.max_tokens_limit
    if limit is not None and params.max_tokens is not None and params.max_tokens > limit:
        raise InvalidInputError(
            f"max_tokens={params.max_tokens} is above this deployment's limit of {limit}.",
            param="max_tokens",
        )


def request_error(err: BaseException) -> BaseException:
    """What a request's caller gets for a failure: input errors as they are, the rest as an
    :class:`EngineError` (the server answers both, even in the middle of a stream)."""
    if isinstance(err, TfxError) or not isinstance(err, Exception):
        return err  # TfxError: the plugin's own (input errors, EngineError); or a cancellation
    return EngineError(f"Generation failed: {err}")


def raise_if_failed(output: Any) -> None:
    """Raise for an output of transformers' manager that failed, or an error sent instead."""
    if isinstance(output, EngineError):
        raise output
    if output.error:
        raise EngineError(f"Generation failed: {output.error}")
