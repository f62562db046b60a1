"""``llm/v1/chat``: OpenAI chat completions over a text-generation model's chat template."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.generation import StreamDelta
from mlflow_tfx_plugin.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Delta,
    ResponseMessage,
    Usage,
)
from mlflow_tfx_plugin.tasks.llm import GenerativeAdapter, extend_schema

if TYPE_CHECKING:
    from mlflow.types.schema import Schema


class ChatAdapter(GenerativeAdapter):
    """Chat completions: one ``chat.completion`` object per request (never a list of them)."""

    task = "llm/v1/chat"
    request_model = ChatCompletionRequest

    @classmethod
    def input_schema(cls) -> Schema:
        from mlflow.types.llm import CHAT_MODEL_INPUT_SCHEMA

        return extend_schema(CHAT_MODEL_INPUT_SCHEMA)

    @classmethod
    def output_schema(cls) -> Schema:
        from mlflow.types.llm import CHAT_MODEL_OUTPUT_SCHEMA

        return CHAT_MODEL_OUTPUT_SCHEMA

    def respond(self, requests: list[ChatCompletionRequest]) -> list[dict[str, Any]]:
        groups: dict[Any, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.generation_params(self.model_config), []).append(index)
        responses: list[dict[str, Any]] = [{} for _ in requests]
        for params, indices in groups.items():  # one batched generate per parameter set
            prompts = [self.prompt(requests[i]) for i in indices]
            results = self.runner.generate(prompts, params, add_special_tokens=False)
            for index, result in zip(indices, results, strict=True):
                responses[index] = self.response(requests[index], result).model_dump()
        return responses

    def stream(self, request: ChatCompletionRequest) -> Iterator[ChatCompletionChunk]:
        params = request.generation_params(self.model_config)
        events = self.runner.stream(self.prompt(request), params, add_special_tokens=False)
        chunker = self.chunker(request)
        yield chunker.head
        for event in events:
            yield from chunker.chunks(event)

    def chunker(self, request: ChatCompletionRequest) -> ChatChunker:
        """Turns generation events into this request's stream chunks."""
        return ChatChunker(self.response_model_name(request), request.include_usage)

    def prompt(self, request: ChatCompletionRequest) -> str:
        """The chat template applied to the request's messages, ready for generation."""
        tokenizer = self.runner.tokenizer
        template = tokenizer.chat_template or self.model_config.get("chat_template")
        if not template:
            raise InvalidInputError(
                "The tokenizer has no chat template, so chat messages cannot be formatted. Set "
                "`tokenizer.chat_template` before logging, or log with "
                "model_config={'chat_template': '<jinja template>'}.",
                param="messages",
            )
        messages = [message.for_template() for message in request.messages]
        kwargs = {"tools": request.tools} if request.tools else {}
        return tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False, **kwargs
        )

    def response(self, request: ChatCompletionRequest, result: Any) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=i, message=ResponseMessage(content=c.text), finish_reason=c.finish_reason
            )
            for i, c in enumerate(result.completions)
        ]
        completion_tokens = sum(c.completion_tokens for c in result.completions)
        return ChatCompletionResponse(
            model=self.response_model_name(request),
            choices=choices,
            usage=Usage.of(result.prompt_tokens, completion_tokens),
        )


class ChatChunker:
    """Stream chunks of one chat completion: a role chunk, text deltas, the finish reason,
    then (when asked for) a usage chunk with no choices, as OpenAI sends them."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.head = ChatCompletionChunk(
            model=model,
            choices=[ChatChunkChoice(index=0, delta=Delta(role="assistant", content=""))],
        )

    def chunks(self, event: StreamDelta) -> list[ChatCompletionChunk]:
        chunks = []
        if event.text:
            choice = ChatChunkChoice(index=0, delta=Delta(content=event.text))
            chunks.append(self.head.model_copy(update={"choices": [choice]}))
        if event.finish_reason:
            choice = ChatChunkChoice(index=0, delta=Delta(), finish_reason=event.finish_reason)
            chunks.append(self.head.model_copy(update={"choices": [choice]}))
            if self.include_usage:
                usage = Usage.of(event.prompt_tokens, event.completion_tokens)
                chunks.append(self.head.model_copy(update={"choices": [], "usage": usage}))
        return chunks
