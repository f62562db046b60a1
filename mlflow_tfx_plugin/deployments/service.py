"""The model behind a deployment, and the OpenAI operations the server's routes call.

:class:`ServedModel` is the loaded model: requests are validated by the same pydantic
models and adapters as ``mlflow.pyfunc`` (so the same input gets the same 400 everywhere);
only the model calls differ: they go through the batching engines in :mod:`.engine`
instead of running one at a time. Chat templates run in a worker thread, as tokenizing
does: a prompt of megabytes must not stall the event loop.

:class:`OpenAIServing` is what each POST route calls: it takes the request body and
returns a response model or an async stream of chunks, within the deployment's timeout,
and counts tokens for the metrics. Failures are raised; the server answers them.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import AbstractContextManager, aclosing, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from pydantic import BaseModel

from mlflow_tfx_plugin.deployments.batching import MicroBatcher
from mlflow_tfx_plugin.deployments.engine import (
    EngineSettings,
    GenerationEngine,
    create_generation_engine,
)
from mlflow_tfx_plugin.deployments.engine.threads import PassingThreadExecutor
from mlflow_tfx_plugin.deployments.payloads import (
    CHAT_ROUTE,
    COMPLETIONS_ROUTE,
    EMBEDDINGS_ROUTE,
    INVOCATIONS_ROUTE,
    InvocationsResponse,
    check_requests,
    openai_route,
    pyfunc_input,
)
from mlflow_tfx_plugin.errors import (
    InvalidInputError,
    RequestTimeoutError,
    UnknownModelError,
    UnsupportedTaskError,
)
from mlflow_tfx_plugin.generation import TextGenerator
from mlflow_tfx_plugin.loading import load_adapter
from mlflow_tfx_plugin.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    Usage,
    parse_request,
)
from mlflow_tfx_plugin.pyfunc import to_python
from mlflow_tfx_plugin.tasks import TaskAdapter
from mlflow_tfx_plugin.tasks.chat import ChatAdapter
from mlflow_tfx_plugin.tasks.completions import CompletionChunker, CompletionsAdapter
from mlflow_tfx_plugin.tasks.embeddings import EmbeddingRunner, EmbeddingsAdapter
from mlflow_tfx_plugin.tasks.llm import LLMAdapter

if TYPE_CHECKING:
    from mlflow_tfx_plugin.deployments.config import BatchDecoding, DeploymentConfig
    from mlflow_tfx_plugin.deployments.metrics import ServerMetrics

_logger = logging.getLogger(__name__)

_POOLING_KEYS = ("pooling", "normalize", "max_length")

#: Stream chunks (``ChatCompletionChunk`` or ``CompletionResponse``), closed to cancel.
ChunkStream: TypeAlias = AsyncGenerator[BaseModel, None]
Answer: TypeAlias = BaseModel | ChunkStream
_T = TypeVar("_T")
_Response = TypeVar("_Response", ChatCompletionResponse, CompletionResponse, EmbeddingResponse)


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    """How to load and batch the model (from the deployment config)."""

    device: str | None = None
    torch_dtype: str | None = None
    batch_decoding: BatchDecoding = "auto"
    engine: EngineSettings = field(default_factory=EngineSettings)

    @classmethod
    def from_config(cls, config: DeploymentConfig) -> LoadOptions:
        """The options a deployment's ``-C`` settings ask for (the only place they are read)."""
        return cls(
            device=config.device,
            torch_dtype=config.torch_dtype,
            batch_decoding=config.batch_decoding,
            engine=EngineSettings.from_config(config),
        )


class ServedModel:
    """One loaded model and the OpenAI routes it can answer.

    Args:
        name: the deployment name, which is also the OpenAI ``model`` id.
        adapter: the flavor's task adapter over the loaded model.
        options: batching settings.
        on_batch: called with the size of every model batch (metrics).
    """

    def __init__(
        self, name: str, adapter: TaskAdapter, options: LoadOptions, on_batch: Any = None
    ) -> None:
        self.name = name
        self.task = adapter.task
        self.adapter = adapter
        adapter.model_name = name  # responses name the deployment, as GET /v1/models does
        settings = replace(options.engine, on_batch=on_batch) if on_batch else options.engine
        self._executor = PassingThreadExecutor(max_workers=1, thread_name_prefix="tfx-model")
        self.chat: ChatAdapter | None = None
        self.completions: CompletionsAdapter | None = None
        self.embeddings: EmbeddingsAdapter | None = None
        self.engine: GenerationEngine | None = None
        self._embedder: MicroBatcher[list[str], Any] | None = None
        if adapter.generates_text:
            greedy_only = options.batch_decoding == "greedy" or (
                options.batch_decoding == "auto" and adapter.model_config.get("temperature") == 0
            )
            settings = replace(settings, greedy_only=greedy_only)
            self._serve_generation(settings)
        elif adapter.embeds_text:
            self._serve_embeddings(settings)

    @property
    def routes(self) -> list[str]:
        """The OpenAI routes this model answers (``/invocations`` always works)."""
        served = [
            (CHAT_ROUTE, self.chat),
            (COMPLETIONS_ROUTE, self.completions),
            (EMBEDDINGS_ROUTE, self.embeddings),
        ]
        return [route for route, adapter in served if adapter is not None]

    @property
    def healthy(self) -> bool:
        """False once the generation loop has died: the server must be restarted."""
        return self.engine.healthy if self.engine is not None else True

    @property
    def queue_depth(self) -> int:
        depth = self.engine.queue_depth if self.engine else 0
        return depth + (self._embedder.queue_depth if self._embedder else 0)

    def _serve_generation(self, settings: EngineSettings) -> None:
        runner = self.adapter.runner
        generator = (
            runner
            if isinstance(runner, TextGenerator)
            else TextGenerator(runner.model, runner.tokenizer)  # a text-generation pipeline
        )
        common: dict[str, Any] = {
            "model_config": self.adapter.model_config,
            "prompt_template": self.adapter.prompt_template,
            "model_name": self.name,
        }
        template = generator.tokenizer.chat_template or self.adapter.model_config.get(
            "chat_template"
        )
        if template:
            self.chat = ChatAdapter(generator, **common)
        self.completions = CompletionsAdapter(generator, **common)
        self.engine = create_generation_engine(generator, settings)
        # A causal LM also embeds: mean-pooled, normalized last hidden states.
        base = getattr(generator.model, "base_model", generator.model)
        # Its own tokenizer: each call of a fast tokenizer first sets the padding and
        # truncation state it shares with every other caller, and the generation threads
        # tokenize concurrently (a padded embedding batch came out unpadded under load).
        tokenizer = copy.deepcopy(generator.tokenizer)
        embedder = EmbeddingRunner(base, tokenizer, pooling="mean", normalize=True)
        self._serve_embeddings(settings, embedder)

    def _serve_embeddings(self, settings: EngineSettings, runner: Any = None) -> None:
        runner = runner or self.adapter.runner
        if not isinstance(runner, EmbeddingRunner):  # a feature-extraction pipeline
            options = {key: value for key, value in vars(runner).items() if key in _POOLING_KEYS}
            runner = EmbeddingRunner(runner.model, runner.tokenizer, **options)
        self.embeddings = EmbeddingsAdapter(
            runner, model_config=self.adapter.model_config, model_name=self.name
        )
        self._embedder = MicroBatcher(
            self._encode_batch,
            max_batch_size=settings.batch_size,
            executor=self._executor,
            on_batch=settings.on_batch,
        )

    # -- chat / completions -------------------------------------------------------------

    def parse_chat(self, body: Mapping[str, Any]) -> ChatCompletionRequest:
        self._require(self.chat, CHAT_ROUTE)
        return parse_request(ChatCompletionRequest, body)

    def parse_completion(self, body: Mapping[str, Any]) -> CompletionRequest:
        self._require(self.completions, COMPLETIONS_ROUTE)
        return parse_request(CompletionRequest, body)

    def parse_embedding(self, body: Mapping[str, Any]) -> EmbeddingRequest:
        self._require(self.embeddings, EMBEDDINGS_ROUTE)
        return parse_request(EmbeddingRequest, body)

    async def chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        assert self.chat is not None and self.engine is not None
        params = request.generation_params(self.chat.model_config)
        prompt = await asyncio.to_thread(self.chat.prompt, request)
        result = await self.engine.generate(prompt, params, add_special_tokens=False)
        return self.chat.response(request, result, prompt)

    async def chat_stream(
        self, request: ChatCompletionRequest
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        assert self.chat is not None and self.engine is not None
        params = request.generation_params(self.chat.model_config)
        prompt = await asyncio.to_thread(self.chat.prompt, request)
        # the server counts tokens
        chunker = self.chat.chunker(request, prompt, model=self.name, include_usage=True)
        events = self.engine.stream(prompt, params, add_special_tokens=False)
        async with aclosing(events):  # closing the stream cancels the generation
            first = await anext(events)  # errors surface before the stream starts
            yield chunker.head
            for chunk in chunker.chunks(first):
                yield chunk
            async for event in events:
                for chunk in chunker.chunks(event):
                    yield chunk

    async def completion(self, request: CompletionRequest) -> CompletionResponse:
        assert self.completions is not None and self.engine is not None
        params = request.generation_params(self.completions.model_config)
        prompts = self.completions.apply_prompt_template(request.prompts)
        results = await asyncio.gather(
            *(self.engine.generate(prompt, params, add_special_tokens=True) for prompt in prompts)
        )
        return self.completions.response(request, list(results))

    async def completion_stream(
        self, request: CompletionRequest
    ) -> AsyncGenerator[CompletionResponse, None]:
        assert self.completions is not None and self.engine is not None
        [prompt] = self.completions.stream_prompt(request)
        params = request.generation_params(self.completions.model_config)
        chunker = CompletionChunker(self.name, include_usage=True)  # the server counts tokens
        events = self.engine.stream(prompt, params, add_special_tokens=True)
        async with aclosing(events):
            async for event in events:
                for chunk in chunker.chunks(event):
                    yield chunk

    # -- embeddings ---------------------------------------------------------------------

    async def embedding(self, request: EmbeddingRequest) -> EmbeddingResponse:
        assert self.embeddings is not None and self._embedder is not None
        vectors, token_counts = await self._embedder.submit(request.inputs)
        return self.embeddings.respond_encoded([request], vectors, token_counts)[0]

    def _encode_batch(self, batches: list[list[str]]) -> list[tuple[Any, list[int]]]:
        assert self.embeddings is not None
        texts = [text for texts in batches for text in texts]
        with self._exclusive():
            vectors, counts = self.embeddings.runner.encode(texts)  # one forward pass
        results, offset = [], 0
        for texts in batches:
            end = offset + len(texts)
            results.append((vectors[offset:end], counts[offset:end]))
            offset = end
        return results

    # -- other tasks --------------------------------------------------------------------

    async def predict(self, data: Any, params: Mapping[str, Any] | None = None) -> Any:
        """Any task, the way ``mlflow models serve`` runs it (one call at a time), with the
        payload's ``params``."""
        if params is not None and not isinstance(params, Mapping):
            raise InvalidInputError(
                f"'params' must be an object of call parameters, got {type(params).__name__}.",
                param="params",
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._predict, to_python(data), params)

    def _predict(self, data: Any, params: Mapping[str, Any] | None) -> Any:
        with self._exclusive():
            return self.adapter.predict(data, params)

    def _exclusive(self) -> AbstractContextManager[Any]:
        """Model calls outside the generation engine must not overlap its steps."""
        return self.engine.exclusive() if self.engine is not None else nullcontext()

    def _require(self, adapter: Any, route: str) -> None:
        if adapter is None:
            served = ", ".join(self.routes) or f"only {INVOCATIONS_ROUTE}"
            raise UnsupportedTaskError(
                f"This deployment serves a '{self.task}' model, which does not answer "
                f"{route}. It serves: {served}.",
            )

    async def warm_up(self) -> None:
        """Run every served route once, so the first user request is not the slow one."""
        if self.chat is not None:
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            await self.chat_completion(self.parse_chat(body))
        elif self.completions is not None:
            await self.completion(self.parse_completion({"prompt": "Hi", "max_tokens": 2}))
        if self.embeddings is not None:
            await self.embedding(self.parse_embedding({"input": "Hi"}))

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self._embedder is not None:
            self._embedder.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


def load_served_model(
    name: str, model_dir: Path, options: LoadOptions, on_batch: Any = None
) -> ServedModel:
    """Load a saved ``tfx`` or stock ``transformers`` model for serving."""
    adapter = load_adapter(model_dir, device=options.device, torch_dtype=options.torch_dtype)
    served = ServedModel(name, adapter, options, on_batch)
    if not served.routes:
        _logger.info("Task '%s' is served through /invocations only.", served.task)
    return served


def require_model_name(served: ServedModel, requested: str | None) -> None:
    """OpenAI clients name the model; an unknown name is a 404, as OpenAI answers it."""
    if requested is not None and requested not in (served.name, "default"):
        raise UnknownModelError(
            f"The model '{requested}' does not exist here. This deployment serves "
            f"'{served.name}' (see GET /v1/models)."
        )


class OpenAIServing:
    """The OpenAI operations of a deployment server: one method per POST route.

    Each takes the request body and returns a response model, or, for ``stream: true``, a
    :data:`ChunkStream` whose first chunk has already arrived, so a request that fails
    before it still gets its HTTP status. Every model call must finish within ``timeout``
    (each chunk of a stream, too). Failures are raised, for the server to answer.

    Args:
        model: the loaded model.
        timeout: the deployment's request timeout, in seconds.
        metrics: the server's metrics, where tokens and time to first token are counted.
    """

    def __init__(self, model: ServedModel, *, timeout: float, metrics: ServerMetrics) -> None:
        self.model = model
        self.timeout = timeout
        self.metrics = metrics

    async def chat(self, body: dict[str, Any]) -> ChatCompletionResponse | ChunkStream:
        require_model_name(self.model, body.get("model"))
        request = self.model.parse_chat(body)
        if request.stream:
            chunks = self.model.chat_stream(request)
            return await self._stream(CHAT_ROUTE, chunks, request.include_usage)
        return self._counted(await self._within_deadline(self.model.chat_completion(request)))

    async def completions(self, body: dict[str, Any]) -> CompletionResponse | ChunkStream:
        require_model_name(self.model, body.get("model"))
        request = self.model.parse_completion(body)
        if request.stream:
            chunks = self.model.completion_stream(request)
            return await self._stream(COMPLETIONS_ROUTE, chunks, request.include_usage)
        return self._counted(await self._within_deadline(self.model.completion(request)))

    async def embeddings(self, body: dict[str, Any]) -> EmbeddingResponse:
        require_model_name(self.model, body.get("model"))
        request = self.model.parse_embedding(body)
        return self._counted(await self._within_deadline(self.model.embedding(request)))

    async def invocations(self, body: dict[str, Any]) -> Answer:
        """``mlflow models serve`` payloads: OpenAI bodies pass through, others are pyfunc input."""
        route = openai_route(body)
        require_model_name(self.model, body.get("model"))
        if route is not None and route in self.model.routes:
            return await self._operation(route)(body)
        data = pyfunc_input(body)
        if isinstance(self.model.adapter, LLMAdapter):
            check_requests(body, data)
        predictions = await self._within_deadline(self.model.predict(data, body.get("params")))
        for prediction in predictions if isinstance(predictions, list) else [predictions]:
            if isinstance(prediction, dict):
                self._count_tokens(prediction.get("usage"))
        return InvocationsResponse.of(predictions, unwrapped=route is not None)

    def _operation(self, route: str) -> Callable[[dict[str, Any]], Awaitable[Answer]]:
        operations = {
            CHAT_ROUTE: self.chat,
            COMPLETIONS_ROUTE: self.completions,
            EMBEDDINGS_ROUTE: self.embeddings,
        }
        return operations[route]

    async def _stream(self, route: str, chunks: ChunkStream, include_usage: bool) -> ChunkStream:
        """``chunks`` once the first one is here.

        The last chunk always carries usage (for the metrics); it is sent only when the
        client asked for it with ``stream_options.include_usage``.
        """
        started = time.perf_counter()
        try:
            first = await self._within_deadline(anext(chunks))
        except RequestTimeoutError:
            await chunks.aclose()
            raise
        self.metrics.time_to_first_token.labels(route).observe(time.perf_counter() - started)
        return self._rest_of(first, chunks, include_usage)

    async def _rest_of(
        self, first: BaseModel, chunks: ChunkStream, include_usage: bool
    ) -> ChunkStream:
        try:
            yield first
            while True:
                try:
                    chunk = await self._within_deadline(anext(chunks))
                except StopAsyncIteration:
                    break
                usage = getattr(chunk, "usage", None)
                if usage is not None:
                    self._count_tokens(usage)
                    if not include_usage:
                        continue
                yield chunk
        finally:
            await chunks.aclose()  # a client that went away cancels its generation here

    async def _within_deadline(self, work: Awaitable[_T]) -> _T:
        try:
            return await asyncio.wait_for(work, self.timeout)
        except TimeoutError:
            raise RequestTimeoutError(
                f"The request took longer than the deployment's timeout of {self.timeout:g} s."
            ) from None

    def _counted(self, response: _Response) -> _Response:
        self._count_tokens(response.usage)
        return response

    def _count_tokens(self, usage: Usage | Mapping[str, Any] | None) -> None:
        if isinstance(usage, Usage):
            usage = usage.model_dump()
        if usage:
            self.metrics.prompt_tokens.inc(usage.get("prompt_tokens", 0))
            self.metrics.completion_tokens.inc(usage.get("completion_tokens", 0))
