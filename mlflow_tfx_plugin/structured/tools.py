"""Tool calling: what a request's ``tool_choice`` allows, and the grammars that force calls.

``required`` and a named tool are enforced by constrained decoding, independent of the
model's own tool-call format, as vLLM does: ``required`` decodes a JSON array of
``{"name": <a tool>, "parameters": <its arguments>}`` objects, a named tool decodes that
tool's arguments alone. ``auto`` leaves the model free and parses what it writes
(:mod:`.parsers`); ``none`` never parses calls. The tools are still rendered into the prompt
by the chat template in every mode.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mlflow_tfx_plugin.structured.spec import ConstraintSpec

ToolMode = Literal["none", "auto", "required", "named"]
#: A tool without ``parameters`` takes any JSON object, as OpenAI documents.
ANY_ARGUMENTS: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolPlan:
    """How one request may call its tools.

    Attributes:
        mode: ``none``, ``auto`` (the model decides), ``required`` (at least one call) or
            ``named`` (exactly one call, of ``name``).
        tools: the request's tools, as OpenAI sends them (``{"type": "function", ...}``).
        name: the tool a ``named`` plan calls.
        parallel: several calls may come in one answer (``parallel_tool_calls``).
    """

    mode: ToolMode
    tools: tuple[Mapping[str, Any], ...]
    name: str | None = None
    parallel: bool = True

    def constraint(self) -> ConstraintSpec | None:
        """The grammar that forces valid calls (``required`` and ``named`` only)."""
        if self.mode == "required":
            return ConstraintSpec.json_schema(
                required_schema(self.tools, parallel=self.parallel), param="tools"
            )
        if self.mode == "named":
            index = tool_names(self.tools).index(str(self.name))
            return ConstraintSpec.json_schema(
                named_schema(self.tools[index]), param=f"tools.{index}.function.parameters"
            )
        return None


def resolve_tool_choice(
    tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any, *, parallel: bool
) -> ToolPlan | None:
    """The plan for a request's (already validated) ``tools`` and ``tool_choice``.

    Without tools there is no plan; with tools, ``tool_choice`` defaults to ``auto``.
    """
    if not tools:
        return None
    tools = tuple(tools)
    if isinstance(tool_choice, Mapping):
        return ToolPlan("named", tools, name=tool_choice["function"]["name"], parallel=False)
    mode: ToolMode = tool_choice or "auto"
    return ToolPlan(mode, tools, parallel=parallel)


def tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(tool["function"]["name"]) for tool in tools]


def parameters_of(tool: Mapping[str, Any]) -> dict[str, Any]:
    """A tool's arguments schema (any object when it declares none)."""
    return dict(tool["function"].get("parameters") or ANY_ARGUMENTS)


def required_schema(tools: Sequence[Mapping[str, Any]], *, parallel: bool) -> dict[str, Any]:
    """vLLM's schema for ``tool_choice: "required"``: a non-empty array of calls, each the
    name of one tool with arguments valid for it (at most one call without ``parallel``)."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": name},
                "parameters": parameters_of(tool),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for name, tool in zip(tool_names(tools), tools, strict=True)
    ]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def named_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The schema of a named tool's call: its arguments."""
    return parameters_of(tool)


def new_call_id() -> str:
    """An OpenAI-style tool call id: ``call_`` and 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


def history_for_template(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: an assistant's tool-call ``arguments`` as
    objects (OpenAI sends JSON strings), and string ``content`` (templates fail on None)."""
    converted = []
    for message in messages:
        message = {**message, "content": message.get("content") or ""}
        if message.get("tool_calls"):
            message["tool_calls"] = [_call_for_template(call) for call in message["tool_calls"]]
        converted.append(message)
    return converted


def _call_for_template(call: Mapping[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        function["arguments"] = json.loads(arguments) if arguments.strip() else {}
    return {**call, "type": call.get("type") or "function", "function": function}
