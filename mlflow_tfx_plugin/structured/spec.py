"""What a request constrains its output to, independent of any tokenizer or grammar engine."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

ConstraintKind = Literal["json_schema", "json_object"]


@dataclass(frozen=True)
class ConstraintSpec:
    """A constraint on generated text; hashable, so equal requests share a compiled grammar.

    Attributes:
        kind: ``json_schema`` (the text validates against ``source``) or ``json_object``
            (the text is one JSON object).
        source: the schema as compact JSON (keys keep their order: the output's properties
            come in the schema's order).
        param: the request field that set it, named by errors about it.
    """

    kind: ConstraintKind
    source: str
    param: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any], *, param: str) -> ConstraintSpec:
        return cls("json_schema", _compact(schema), param)

    @classmethod
    def json_object(cls, *, param: str) -> ConstraintSpec:
        return cls("json_object", _compact({"type": "object"}), param)

    @property
    def schema(self) -> dict[str, Any]:
        return dict(json.loads(self.source))


def _compact(schema: dict[str, Any]) -> str:
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
