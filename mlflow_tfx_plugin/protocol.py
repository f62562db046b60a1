"""OpenAI wire models: chat completions, completions and embeddings.

Requests validate here, once (a bad field raises :class:`InvalidInputError` naming it);
each request builds the internal :class:`GenerationParams`, so the adapters and the
server never read raw dicts. Responses and stream chunks are pydantic models dumped to
the JSON OpenAI clients expect.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.structured.logprobs import MAX_TOP_LOGPROBS
from mlflow_tfx_plugin.structured.spec import ConstraintSpec
from mlflow_tfx_plugin.structured.tools import ToolPlan, resolve_tool_choice, tool_names

_logger = logging.getLogger(__name__)

#: Used when neither the request nor ``model_config`` nor the checkpoint sets a limit.
DEFAULT_MAX_TOKENS = 256
MAX_STOP_SEQUENCES = 4
#: A ``temperature`` or ``top_p`` below this decodes greedily, as vLLM's ``_SAMPLING_EPS``
#: does: greedy is the limit of both, and the samplers divide logits by the temperature in
#: float32, where 1/1e-300 is inf and every probability becomes NaN.
SAMPLING_EPS = 1e-5
_INT64 = 2**63


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    """What one generate call needs, resolved from request, model_config and defaults."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    #: ``response_format``: the grammar the output is decoded under (None: free text).
    constraint: ConstraintSpec | None = None
    #: ``logprobs``: record each token's logprob with this many alternatives (None: no).
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class OpenAIModel(BaseModel):
    """Base of request models. An OpenAI field that would change the answer but is not
    honoured here (:attr:`unsupported_fields`) is a 400 naming it; any other extra field
    (``metadata``, ``store``, a client's own extension) cannot change the answer and is
    logged as ignored."""

    model_config = ConfigDict(extra="allow")
    unsupported_fields: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _check_extra_fields(self) -> OpenAIModel:
        extra = sorted(self.model_extra or ())
        refused = [name for name in extra if name in self.unsupported_fields]
        if refused:
            raise InvalidInputError(
                "is not supported by this server and would change the answer; remove it "
                "from the request",
                param=refused[0],
            )
        if extra:
            _logger.info("Ignoring request fields that do not change the answer: %s", extra)
        return self


class FunctionCall(BaseModel):
    name: str
    #: JSON text, as OpenAI sends it; in an answer cut short by ``max_tokens``, a prefix of it
    arguments: str


class ToolCall(BaseModel):
    """A tool call in an answer."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class HistoryFunctionCall(FunctionCall):
    """A function call in the history: its arguments must be a JSON object, which chat
    templates receive as a dict."""

    @field_validator("arguments")
    @classmethod
    def _json_arguments(cls, value: str) -> str:
        try:
            arguments = json.loads(value or "{}")
        except json.JSONDecodeError as err:
            raise ValueError(f"must be JSON text ({err})") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"must be a JSON object, got {value!r}")
        return value


class HistoryToolCall(ToolCall):
    """A tool call of an assistant message in the history."""

    function: HistoryFunctionCall


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    """One entry of ``tools``: only functions (OpenAI's custom tools are not supported)."""

    type: Literal["function"]
    function: FunctionDefinition

    @field_validator("type", mode="before")
    @classmethod
    def _only_functions(cls, value: Any) -> Any:
        if value != "function":
            raise ValueError(f"must be 'function' (the only tool type supported), got {value!r}")
        return value


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[HistoryToolCall] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _only_text_parts(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind != "text":
                    raise ValueError(f"only text content parts are supported, got type {kind!r}")
        elif value is not None and not isinstance(value, str):
            raise ValueError(
                f"must be a string or a list of text parts, got {type(value).__name__}"
            )
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: plain-string content."""
        message = self.model_dump(exclude_none=True, exclude={"content"})
        return {**message, "content": self.text()}


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the output must validate against."""

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, one JSON object, or JSON for a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema_for_json_schema(cls, value: Any, info: Any) -> Any:
        if value is None and info.data.get("type") == "json_schema":
            raise ValueError("is required when 'type' is 'json_schema' (with 'name' and 'schema')")
        return value

    def constraint(self) -> ConstraintSpec | None:
        if self.type == "json_object":
            return ConstraintSpec.json_object(param="response_format")
        if self.type == "json_schema" and self.json_schema is not None:
            param = "response_format.json_schema.schema"
            return ConstraintSpec.json_schema(self.json_schema.schema_, param=param)
        return None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(OpenAIModel):
    """Sampling fields shared by chat and completions requests."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-_INT64, le=_INT64 - 1)  # torch seeds are 64-bit
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # logits are divided or multiplied by it in float32: 1e-300 makes them inf
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)
    user: str | None = None
    response_format: ResponseFormat | None = None  # a vLLM extension for completions

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(stop == "" for stop in stops):
            raise ValueError("stop sequences must not be empty strings")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_openai_penalties(cls, value: float | None) -> float | None:
        if value:
            raise ValueError(
                "is not supported (transformers has no additive penalty); use "
                "'repetition_penalty' (e.g. 1.1) instead"
            )
        return value

    def generation_params(self, defaults: Mapping[str, Any] | None = None) -> GenerationParams:
        """Request values over ``model_config`` defaults over OpenAI's defaults."""
        defaults = defaults or {}
        stop = self.stop if self.stop is not None else defaults.get("stop")
        temperature = _first(self.temperature, defaults.get("temperature"), 1.0)
        top_p = _first(self.top_p, defaults.get("top_p"), 1.0)
        if _below_eps(temperature) or _below_eps(top_p):
            # Greedy is the limit of both; the kernels divide logits by the temperature, and
            # 1/1e-300 is inf in float32, which makes every probability NaN.
            temperature, top_p = 0.0, 1.0
        return GenerationParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or defaults.get("max_tokens"),
            temperature=temperature,
            top_p=top_p,
            top_k=_first(self.top_k, defaults.get("top_k")),
            n=self.n,
            stop=tuple([stop] if isinstance(stop, str) else stop or ()),
            seed=_first(self.seed, defaults.get("seed")),
            repetition_penalty=_first(self.repetition_penalty, defaults.get("repetition_penalty")),
            ignore_eos=self.ignore_eos,
            constraint=self.response_format.constraint() if self.response_format else None,
            logprobs=self.logprob_alternatives,
        )

    @property
    def logprob_alternatives(self) -> int | None:
        """How many alternatives each token's logprob comes with (None: no logprobs)."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


ToolChoice = Literal["none", "auto", "required"]
_TOOL_CHOICES = ("none", "auto", "required")


class ChatCompletionRequest(_GenerationRequest):
    unsupported_fields = frozenset(
        {
            "audio",
            "function_call",
            "functions",
            "logit_bias",
            "modalities",
            "prediction",
            "reasoning_effort",
            "verbosity",
            "web_search_options",
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    #: ``"none" | "auto" | "required"`` or ``{"type": "function", "function": {"name": ...}}``
    tool_choice: ToolChoice | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value: int | None, info: Any) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs 'logprobs' set to true")
        return value

    @property
    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _check_tool_choice(cls, value: Any) -> Any:
        if value is None or value in _TOOL_CHOICES:
            return value
        if isinstance(value, Mapping) and value.get("type") == "function":
            function = value.get("function")
            name = function.get("name") if isinstance(function, Mapping) else None
            if isinstance(name, str):
                return {"type": "function", "function": {"name": name}}
        raise ValueError(
            "must be 'none', 'auto', 'required' or "
            f"{{'type': 'function', 'function': {{'name': <a tool's name>}}}}, got {value!r}"
        )

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:  # vLLM accepts "none" alone
            raise InvalidInputError("is set, but the request has no 'tools'", param="tool_choice")
        if isinstance(choice, Mapping):
            name, known = choice["function"]["name"], tool_names(self.tool_dicts)
            if name not in known:
                raise InvalidInputError(
                    f"names the tool {name!r}, which is not in 'tools' ({', '.join(known)})",
                    param="tool_choice",
                )
        if self.response_format is not None and self.response_format.type != "text":
            plan = self.tool_plan()
            if plan is not None and plan.constraint() is not None:
                raise InvalidInputError(
                    f"cannot be combined with tool_choice {plan.mode!r}, which already "
                    "constrains the output to tool calls",
                    param="response_format",
                )
        return self

    @property
    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools as OpenAI sends them (what chat templates take)."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools or ()]

    def tool_plan(self) -> ToolPlan | None:
        """How this request may call its tools (None: it has none)."""
        return resolve_tool_choice(
            self.tool_dicts, self.tool_choice, parallel=self.parallel_tool_calls
        )

    def generation_params(self, defaults: Mapping[str, Any] | None = None) -> GenerationParams:
        """As for any request; ``tool_choice`` ``required`` or named constrains the output."""
        params = super().generation_params(defaults)
        plan = self.tool_plan()
        constraint = plan.constraint() if plan is not None else None
        return replace(params, constraint=constraint) if constraint else params


class CompletionRequest(_GenerationRequest):
    unsupported_fields = frozenset({"best_of", "logit_bias"})

    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    #: the legacy API's logprobs: how many alternatives each token comes with
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("must not be an empty list")
        if value == "" or (isinstance(value, list) and "" in value):
            raise ValueError("must not be or contain an empty string: there is nothing to continue")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("is not supported: the prompt is never returned")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("(insertion) is not supported by causal language models")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class EmbeddingRequest(OpenAIModel):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("must not be an empty list")
        if value == "" or (isinstance(value, list) and "" in value):
            raise ValueError("must not contain empty strings")
        return value

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("is not supported: embeddings keep the model's own dimension")
        return value

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int = 0) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    """One chosen token's logprob, with the most likely alternatives."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """``choices[].logprobs`` of a chat completion or chunk: one entry per token."""

    content: list[ChatTokenLogprob] | None = None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """``choices[].logprobs`` of a text completion (OpenAI's legacy shape)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is only tool calls
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: the first names it (``id``, ``type``, the tool's
    name, empty ``arguments``); later ones carry pieces of its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    """A ``text_completion``; stream chunks use the same shape with partial text."""

    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, for every failure the server answers."""

    error: ErrorDetail

    @classmethod
    def of(
        cls, message: str, *, kind: str, param: str | None = None, code: str | int | None = None
    ) -> ErrorResponse:
        return cls(error=ErrorDetail(message=message, type=kind, param=param, code=code))


RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_request(model: type[RequestT], data: Any) -> RequestT:
    """Validate a request dict; the first problem becomes an :class:`InvalidInputError`."""
    if not isinstance(data, Mapping):
        raise InvalidInputError(
            f"Expected a JSON object for a {model.__name__}, got {type(data).__name__}.",
            param=None,
        )
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise _translate(err) from None


def _translate(err: ValidationError) -> InvalidInputError:
    error = err.errors()[0]
    # pydantic names validator functions in locations ("function-after[...]")
    location = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-"))
    message = error["msg"].removeprefix("Value error, ")
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, InvalidInputError) and cause.param:  # a cross-field rule
        location = cause.param
    if error["type"] == "missing":
        message = "is required"
    if not location:
        return InvalidInputError(f"Invalid request: {message}.")
    return InvalidInputError(f"Invalid request: '{location}' {message}.", param=location)


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _below_eps(value: Any) -> bool:
    return isinstance(value, int | float) and value < SAMPLING_EPS
