"""``llm/v1/chat``: OpenAI chat completions over a text-generation model's chat template.

Tool calling: the tools go to the chat template; ``tool_choice`` ``required`` or a named tool
constrains decoding (:mod:`mlflow_tfx_plugin.structured.tools`); ``auto`` parses the model's
own format (:mod:`mlflow_tfx_plugin.structured.parsers`): the checkpoint's
``response_template``, else ``model_config["tool_call_parser"]`` (``hermes`` or
``llama3_json``), else none, and the model's calls stay in ``content``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.generation import FinishReason, StreamDelta
from mlflow_tfx_plugin.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    Delta,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ResponseMessage,
    ToolCall,
    Usage,
)
from mlflow_tfx_plugin.structured.logprobs import TokenLogprob, chat_logprobs
from mlflow_tfx_plugin.structured.parsers import (
    PARSER_CONFIG_KEY,
    ArgumentsPiece,
    CallOpened,
    CallStream,
    ContentPiece,
    Event,
    SingleCall,
    call_stream,
    parse,
)
from mlflow_tfx_plugin.structured.tools import history_for_template, new_call_id
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
        from mlflow.types.schema import AnyType, ColSpec, Schema

        schema = extend_schema(CHAT_MODEL_INPUT_SCHEMA)
        # MLflow's typed ``tools`` rejects most parameter schemas (e.g. one with "maximum")
        inputs = [spec for spec in schema.inputs if spec.name != "tools"]
        tool_fields = [
            ColSpec(AnyType(), "tools", required=False),
            ColSpec(AnyType(), "tool_choice", required=False),
            ColSpec("boolean", "parallel_tool_calls", required=False),
        ]
        return Schema([*inputs, *tool_fields])

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
            for index, prompt, result in zip(indices, prompts, results, strict=True):
                responses[index] = self.response(requests[index], result, prompt).model_dump()
        return responses

    def stream(self, request: ChatCompletionRequest) -> Iterator[ChatCompletionChunk]:
        params = request.generation_params(self.model_config)
        prompt = self.prompt(request)
        events = self.runner.stream(prompt, params, add_special_tokens=False)
        chunker = self.chunker(request, prompt)
        yield chunker.head
        for event in events:
            yield from chunker.chunks(event)

    def chunker(
        self,
        request: ChatCompletionRequest,
        prompt: str = "",
        *,
        model: str | None = None,
        include_usage: bool | None = None,
    ) -> ChatChunker:
        """Turns generation events into this request's stream chunks (tool-call deltas
        included)."""
        return ChatChunker(
            model or self.response_model_name(request),
            request.include_usage if include_usage is None else include_usage,
            calls=self.call_stream(request, prompt),
        )

    def call_stream(self, request: ChatCompletionRequest, prompt: str = "") -> CallStream | None:
        """The tool-call parser of one answer (None: the text is plain content)."""
        plan = request.tool_plan()
        stream = call_stream(
            plan,
            tokenizer=self.runner.tokenizer,
            configured=self.model_config.get(PARSER_CONFIG_KEY),
            prefix=prompt,
        )
        if stream is not None and plan is not None and not plan.parallel:
            return SingleCall(stream)
        return stream

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
        messages = history_for_template([message.for_template() for message in request.messages])
        kwargs = {"tools": request.tool_dicts} if request.tools else {}
        from jinja2.exceptions import TemplateError

        try:
            return tokenizer.apply_chat_template(
                messages,
                chat_template=template,
                add_generation_prompt=True,
                tokenize=False,
                **kwargs,
            )
        except TemplateError as err:  # raise_exception(...) in the template: roles, tools, ...
            raise InvalidInputError(
                f"The model's chat template rejected the messages: {err}", param="messages"
            ) from err

    def response(
        self, request: ChatCompletionRequest, result: Any, prompt: str = ""
    ) -> ChatCompletionResponse:
        """The answer to ``request``; ``prompt`` is what it generated from (response
        templates parse tool calls in its context)."""
        choices = []
        for index, completion in enumerate(result.completions):
            calls = self.call_stream(request, prompt)
            message = ResponseMessage(content=completion.text)
            if calls is not None:
                message = answer_message(parse(calls, completion.text))
            finish = finish_reason(completion.finish_reason, bool(message.tool_calls))
            logprobs = choice_logprobs(completion.logprobs)
            choice = ChatChoice(
                index=index, message=message, finish_reason=finish, logprobs=logprobs
            )
            choices.append(choice)
        completion_tokens = sum(c.completion_tokens for c in result.completions)
        return ChatCompletionResponse(
            model=self.response_model_name(request),
            choices=choices,
            usage=Usage.of(result.prompt_tokens, completion_tokens),
        )


def answer_message(parsed: Any) -> ResponseMessage:
    """The assistant message of a parsed answer: its content, and its calls with new ids."""
    calls = [
        ToolCall(id=new_call_id(), function=FunctionCall(name=call.name, arguments=call.arguments))
        for call in parsed.calls
    ]
    return ResponseMessage(content=parsed.content, tool_calls=calls or None)


def choice_logprobs(logprobs: tuple[TokenLogprob, ...] | None) -> ChoiceLogprobs | None:
    """``choices[].logprobs`` for a completion's (or a stream delta's) tokens."""
    return None if logprobs is None else ChoiceLogprobs.model_validate(chat_logprobs(logprobs))


def finish_reason(generated: FinishReason, has_calls: bool) -> Any:
    """``tool_calls`` for an answer with calls that ended by itself (``length`` stays)."""
    return "tool_calls" if has_calls and generated == "stop" else generated


class ChatChunker:
    """Stream chunks of one chat completion: a role chunk, text deltas, the finish reason,
    then (when asked for) a usage chunk with no choices, as OpenAI sends them.

    With ``calls``, the text goes through that tool-call parser: content deltas, then per
    call a delta naming it (index, id, type, name, empty arguments) and deltas of its
    arguments; joined, they equal the non-streamed answer's calls.
    """

    def __init__(self, model: str, include_usage: bool, *, calls: CallStream | None = None) -> None:
        self.include_usage = include_usage
        self.calls = calls
        self._call_ids: dict[int, str] = {}
        self.head = ChatCompletionChunk(
            model=model,
            choices=[ChatChunkChoice(index=0, delta=Delta(role="assistant", content=""))],
        )

    def chunks(self, event: StreamDelta) -> list[ChatCompletionChunk]:
        chunks = [self._chunk(delta) for delta in self._deltas(event)]
        if event.logprobs:  # on the first chunk of the text they belong to
            first = chunks[0] if chunks else self._chunk(Delta())
            choice = first.choices[0].model_copy(
                update={"logprobs": choice_logprobs(event.logprobs)}
            )
            chunks[:1] = [first.model_copy(update={"choices": [choice]})]
        if event.finish_reason:
            finish = finish_reason(event.finish_reason, bool(self._call_ids))
            choice = ChatChunkChoice(index=0, delta=Delta(), finish_reason=finish)
            chunks.append(self.head.model_copy(update={"choices": [choice]}))
            if self.include_usage:
                usage = Usage.of(event.prompt_tokens, event.completion_tokens)
                chunks.append(self.head.model_copy(update={"choices": [], "usage": usage}))
        return chunks

    def _chunk(self, delta: Delta) -> ChatCompletionChunk:
        return self.head.model_copy(update={"choices": [ChatChunkChoice(index=0, delta=delta)]})

    def _deltas(self, event: StreamDelta) -> list[Delta]:
        if self.calls is None:
            return [Delta(content=event.text)] if event.text else []
        events = self.calls.feed(event.text)
        if event.finish_reason:
            events += self.calls.finish()
        return [self._delta(e) for e in events]

    def _delta(self, event: Event) -> Delta:
        if isinstance(event, ContentPiece):
            return Delta(content=event.text)
        if isinstance(event, CallOpened):
            self._call_ids[event.index] = call_id = new_call_id()
            function = DeltaFunctionCall(name=event.name, arguments="")
            call = DeltaToolCall(index=event.index, id=call_id, type="function", function=function)
            return Delta(tool_calls=[call])
        assert isinstance(event, ArgumentsPiece)
        function = DeltaFunctionCall(arguments=event.text)
        return Delta(tool_calls=[DeltaToolCall(index=event.index, function=function)])
