"""Tool calls out of generated text, whole or streamed, with one implementation for both.

Every parser is a :class:`CallStream`: it is fed text pieces and returns events (content
pieces, a call opening, pieces of its arguments). Parsing a whole text is feeding it in
one piece, so the joined events of a stream always equal the non-streamed parse.

- :class:`NamedCallStream`: a named tool's constrained output *is* its arguments.
- :class:`RequiredCallStream`: ``required``'s constrained JSON array, a call per element
  as soon as the element is complete.
- :class:`MarkerCallStream` with :class:`HermesFormat` (``<tool_call>{json}</tool_call>``)
  or :class:`Llama3JsonFormat` (``{"name": ..., "parameters": ...}``, ``;``-separated):
  ``auto`` for models with these common formats (``model_config["tool_call_parser"]``).
  Content streams until a call may begin; a call that does not parse is content (vLLM).
- :class:`TemplateCallStream`: a checkpoint's own ``tokenizer.response_template``
  (transformers' response parsing); it answers when the text is complete.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.structured.tools import ToolPlan

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContentPiece:
    text: str


@dataclass(frozen=True)
class CallOpened:
    """A call starts: its index in the answer and the tool's name."""

    index: int
    name: str


@dataclass(frozen=True)
class ArgumentsPiece:
    index: int
    text: str


Event = ContentPiece | CallOpened | ArgumentsPiece


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class ParsedMessage:
    """An answer's content (None when it is only calls) and its calls."""

    content: str | None
    calls: tuple[ParsedCall, ...] = ()


class CallStream(Protocol):
    def feed(self, piece: str) -> list[Event]: ...

    def finish(self) -> list[Event]: ...


def parse(stream: CallStream, text: str) -> ParsedMessage:
    """The whole ``text`` through a fresh ``stream``."""
    return assemble([*stream.feed(text), *stream.finish()])


def assemble(events: Sequence[Event]) -> ParsedMessage:
    content = "".join(e.text for e in events if isinstance(e, ContentPiece))
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, CallOpened):
            names[event.index] = event.name
            arguments[event.index] = []
        elif isinstance(event, ArgumentsPiece):
            arguments[event.index].append(event.text)
    calls = tuple(ParsedCall(names[i], "".join(arguments[i])) for i in sorted(names))
    return ParsedMessage(content if content or not calls else None, calls)


def _whole_call(index: int, name: str, arguments: Any) -> list[Event]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return [CallOpened(index, name), ArgumentsPiece(index, text)]


class NamedCallStream:
    """``tool_choice`` naming a tool: the text is that call's arguments, as it arrives."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._opened = False

    def feed(self, piece: str) -> list[Event]:
        events: list[Event] = [] if self._opened else [CallOpened(0, self.name)]
        self._opened = True
        return [*events, ArgumentsPiece(0, piece)] if piece else events

    def finish(self) -> list[Event]:
        return self.feed("")


class RequiredCallStream:
    """``tool_choice: "required"``: the JSON array of ``{"name", "parameters"}`` objects the
    grammar forces, one call per element once it is complete. Output cut short by
    ``max_tokens`` keeps its complete calls; with none, the text is content."""

    def __init__(self) -> None:
        self._text = ""
        self._position: int | None = None  # where the next element starts
        self._calls = 0
        self._decoder = json.JSONDecoder()

    def feed(self, piece: str) -> list[Event]:
        self._text += piece
        if self._position is None:
            start = self._text.find("[")
            if start < 0:
                return []
            self._position = start + 1
        events: list[Event] = []
        while (element := self._next_element()) is not None:
            events += _whole_call(self._calls, str(element["name"]), element["parameters"])
            self._calls += 1
        return events

    def _next_element(self) -> dict[str, Any] | None:
        assert self._position is not None
        text, position = self._text, self._position
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        try:
            element, end = self._decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return None
        if not isinstance(element, dict) or "name" not in element:
            return None
        self._position = end
        return element

    def finish(self) -> list[Event]:
        return [] if self._calls else [ContentPiece(self._text)]


class CallFormat(Protocol):
    """A model's own tool-call syntax, for :class:`MarkerCallStream`."""

    def call_start(self, text: str) -> int | None:
        """Where calls begin in ``text`` (None: not, or not yet)."""

    def undecided(self, text: str) -> int:
        """How many trailing characters of ``text`` could still begin a call."""

    def calls(self, text: str) -> list[tuple[str, Any]] | None:
        """``(name, arguments)`` of each call in ``text`` (from its start); None: malformed."""


class HermesFormat:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, repeated (Hermes, Qwen).

    As vLLM's ``hermes`` parser: content is the text before the first tag; a last tag left
    open still counts when its JSON is complete.
    """

    OPEN = "<tool_call>"
    _CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)

    def call_start(self, text: str) -> int | None:
        index = text.find(self.OPEN)
        return index if index >= 0 else None

    def undecided(self, text: str) -> int:
        return _partial_suffix(text, self.OPEN)

    def calls(self, text: str) -> list[tuple[str, Any]] | None:
        found = []
        for match in self._CALL.finditer(text):
            call = _json_call(match.group(1) if match.group(1) is not None else match.group(2))
            if call is None:
                return None
            found.append(call)
        return found or None


class Llama3JsonFormat:
    """Llama 3.x JSON tool calls: the answer *starts* with ``{"name": ..., "parameters":
    {...}}`` (optionally after ``<|python_tag|>``); several calls are ``;``-separated."""

    PYTHON_TAG = "<|python_tag|>"

    def call_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith(("{", self.PYTHON_TAG)):
            return len(text) - len(stripped)
        return None

    def undecided(self, text: str) -> int:
        stripped = text.lstrip()
        return len(text) if self.PYTHON_TAG.startswith(stripped) else 0

    def calls(self, text: str) -> list[tuple[str, Any]] | None:
        text = text.strip().removeprefix(self.PYTHON_TAG)
        decoder, position, found = json.JSONDecoder(), 0, []
        while True:
            while position < len(text) and text[position].isspace():
                position += 1
            try:
                value, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError:
                return None
            call = _call_of(value)
            if call is None:
                return None
            found.append(call)
            rest = text[position:].lstrip()
            if not rest:
                return found
            if not rest.startswith(";"):
                return None
            position = len(text) - len(rest) + 1


def _json_call(body: str) -> tuple[str, Any] | None:
    try:
        return _call_of(json.loads(body.strip()))
    except json.JSONDecodeError:
        return None


def _call_of(value: Any) -> tuple[str, Any] | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return (value["name"], arguments) if isinstance(arguments, dict) else None


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


@dataclass
class MarkerCallStream:
    """``auto`` with a known format: content streams until a call may begin; then the rest
    is held, and parsed when the text is complete. Content that is only whitespace before
    calls is dropped (the answer's content is None)."""

    format: CallFormat
    _text: str = ""
    _emitted: int = 0
    _start: int | None = field(default=None)

    def feed(self, piece: str) -> list[Event]:
        self._text += piece
        if self._start is None:
            self._start = self.format.call_start(self._text)
        safe = (
            self._start
            if self._start is not None
            else len(self._text) - self.format.undecided(self._text)
        )
        if safe <= self._emitted or not self._text[:safe].strip():
            return []
        piece, self._emitted = self._text[self._emitted : safe], safe
        return [ContentPiece(piece)]

    def finish(self) -> list[Event]:
        calls = None
        if self._start is not None:
            calls = self.format.calls(self._text[self._start :])
            if calls is None:
                _logger.info("The model's tool call did not parse; answering it as content.")
        if not calls:
            rest = self._text[self._emitted :]
            return [ContentPiece(rest)] if rest else []
        assert self._start is not None
        head = self._text[self._emitted : self._start] if self._text[: self._start].strip() else ""
        events: list[Event] = [ContentPiece(head)] if head else []
        for index, (name, arguments) in enumerate(calls):
            events += _whole_call(index, name, arguments)
        return events


class TemplateCallStream:
    """A checkpoint's ``response_template`` (transformers' ``parse_response``); the answer
    comes when the text is complete (a stream holds it back until then)."""

    def __init__(self, tokenizer: Any, *, prefix: str, tools: Sequence[Mapping[str, Any]]) -> None:
        self._tokenizer = tokenizer
        self._prefix = prefix
        self._tools = list(tools)
        self._text = ""

    def feed(self, piece: str) -> list[Event]:
        self._text += piece
        return []

    def finish(self) -> list[Event]:
        try:
            message = self._tokenizer.parse_response(
                self._text, prefix=self._prefix, tools=self._tools
            )
        except Exception as err:  # any template failure leaves the text as content
            _logger.info("The response template did not parse the answer (%s).", err)
            return [ContentPiece(self._text)] if self._text else []
        found = [call.get("function") or call for call in message.get("tool_calls") or []]
        calls = [_call_of({**call, "arguments": call.get("arguments") or {}}) for call in found]
        if None in calls:  # a call that does not parse leaves the text as content (vLLM)
            return [ContentPiece(self._text)] if self._text else []
        events: list[Event] = []
        if message.get("content"):
            events.append(ContentPiece(str(message["content"])))
        for index, (name, arguments) in enumerate(call for call in calls if call is not None):
            events += _whole_call(index, name, arguments)
        return events


FORMATS: dict[str, type[HermesFormat] | type[Llama3JsonFormat]] = {
    "hermes": HermesFormat,
    "llama3_json": Llama3JsonFormat,
}
PARSER_CONFIG_KEY = "tool_call_parser"


def call_stream(
    plan: ToolPlan | None, *, tokenizer: Any, configured: str | None, prefix: str = ""
) -> CallStream | None:
    """The parser for one answer (None: its text is plain content).

    ``auto`` uses the checkpoint's ``response_template``, else ``configured`` (a
    ``tool_call_parser`` name), else none: the model's calls stay in the content.

    Raises:
        InvalidInputError: ``configured`` names no known format.
    """
    if plan is None or plan.mode == "none":
        return None
    if plan.mode == "named":
        return NamedCallStream(str(plan.name))
    if plan.mode == "required":
        return RequiredCallStream()
    if getattr(tokenizer, "response_template", None) is not None:
        return TemplateCallStream(tokenizer, prefix=prefix, tools=plan.tools)
    if configured is None:
        return None
    if configured not in FORMATS:
        raise InvalidInputError(
            f"model_config['{PARSER_CONFIG_KEY}'] is {configured!r}; the known tool-call "
            f"formats are {sorted(FORMATS)}. Fix the model's model_config.",
            param="tools",
        )
    return MarkerCallStream(FORMATS[configured]())


class SingleCall:
    """``parallel_tool_calls: false`` over any stream: events of calls past the first are
    dropped (``auto`` cannot prevent the model from writing them)."""

    def __init__(self, inner: CallStream) -> None:
        self._inner = inner

    def feed(self, piece: str) -> list[Event]:
        return self._first_call(self._inner.feed(piece))

    def finish(self) -> list[Event]:
        return self._first_call(self._inner.finish())

    @staticmethod
    def _first_call(events: list[Event]) -> list[Event]:
        return [e for e in events if isinstance(e, ContentPiece) or e.index == 0]
