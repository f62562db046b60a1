"""``llm/v1/completions``: OpenAI text completions over a text-generation model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.generation import StreamDelta
from mlflow_tfx_plugin.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from mlflow_tfx_plugin.structured.logprobs import TokenLogprob, completion_logprobs
from mlflow_tfx_plugin.tasks.llm import GenerativeAdapter, extend_schema

if TYPE_CHECKING:
    from mlflow.types.schema import Schema


class CompletionsAdapter(GenerativeAdapter):
    """Text completions; ``prompt`` may be a string or a list (choices ``n`` per prompt)."""

    task = "llm/v1/completions"
    request_model = CompletionRequest
    supports_prompt_template = True

    @classmethod
    def input_schema(cls) -> Schema:
        from mlflow.types.llm import COMPLETIONS_MODEL_INPUT_SCHEMA
        from mlflow.types.schema import ColSpec, Schema

        # echo and suffix are declared so that they reach the request model, which rejects
        # them: left out, MLflow's schema enforcement would drop them without a word.
        unsupported = (
            ColSpec("boolean", "echo", required=False),
            ColSpec("string", "suffix", required=False),
        )
        return Schema([*extend_schema(COMPLETIONS_MODEL_INPUT_SCHEMA).inputs, *unsupported])

    @classmethod
    def output_schema(cls) -> Schema:
        from mlflow.types.llm import COMPLETIONS_MODEL_OUTPUT_SCHEMA

        return COMPLETIONS_MODEL_OUTPUT_SCHEMA

    def respond(self, requests: list[CompletionRequest]) -> list[dict[str, Any]]:
        responses = []
        for request in requests:
            params = request.generation_params(self.model_config)
            results = self.runner.generate(self.apply_prompt_template(request.prompts), params)
            responses.append(self.response(request, results).model_dump())
        return responses

    def stream(self, request: CompletionRequest) -> Iterator[CompletionResponse]:
        [prompt] = self.stream_prompt(request)
        chunker = self.chunker(request)
        for event in self.runner.stream(prompt, request.generation_params(self.model_config)):
            yield from chunker.chunks(event)

    def stream_prompt(self, request: CompletionRequest) -> list[str]:
        """The one templated prompt of a streamed request."""
        if len(request.prompts) != 1:
            raise InvalidInputError("Streaming takes a single prompt.", param="prompt")
        return self.apply_prompt_template(request.prompts)

    def chunker(self, request: CompletionRequest) -> CompletionChunker:
        """Turns generation events into this request's stream chunks."""
        return CompletionChunker(self.response_model_name(request), request.include_usage)

    def response(self, request: CompletionRequest, results: list[Any]) -> CompletionResponse:
        """One response over the results of all the request's prompts (``n`` choices each)."""
        n = request.n
        choices = [
            CompletionChoice(
                index=p * n + i,
                text=c.text,
                finish_reason=c.finish_reason,
                logprobs=legacy_logprobs(c.logprobs),
            )
            for p, result in enumerate(results)
            for i, c in enumerate(result.completions)
        ]
        usage = Usage.of(
            sum(r.prompt_tokens for r in results),
            sum(c.completion_tokens for r in results for c in r.completions),
        )
        return CompletionResponse(
            model=self.response_model_name(request), choices=choices, usage=usage
        )


class CompletionChunker:
    """Stream chunks of one text completion: text pieces, the finish reason, then usage."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.head = CompletionResponse(model=model, choices=[])

    def chunks(self, event: StreamDelta) -> list[CompletionResponse]:
        chunks = []
        if event.text or event.finish_reason or event.logprobs:
            choice = CompletionChoice(
                index=0,
                text=event.text,
                finish_reason=event.finish_reason,
                logprobs=legacy_logprobs(event.logprobs) if event.logprobs else None,
            )
            chunks.append(self.head.model_copy(update={"choices": [choice]}))
        if event.finish_reason and self.include_usage:
            usage = Usage.of(event.prompt_tokens, event.completion_tokens)
            chunks.append(self.head.model_copy(update={"choices": [], "usage": usage}))
        return chunks


def legacy_logprobs(logprobs: tuple[TokenLogprob, ...] | None) -> CompletionLogprobs | None:
    """``choices[].logprobs`` (the legacy shape) for a completion's or a chunk's tokens."""
    if logprobs is None:
        return None
    return CompletionLogprobs.model_validate(completion_logprobs(logprobs))
