"""Shared base of the OpenAI-compatible ``llm/v1/*`` adapters.

Pyfunc input is one request dict (or records of several, as pandas rows arrive); the
output is one response object for one request, a list of them for several. ``model_config``
supplies defaults (``temperature``, ``max_tokens``, ``stop``, ...) that each request's
own fields override. The adapters are pure: request in, response (or chunks) out, so the
deployment server reuses them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.generation import TextGenerator
from mlflow_tfx_plugin.protocol import parse_request
from mlflow_tfx_plugin.tasks.base import Components, TaskAdapter
from mlflow_tfx_plugin.tasks.text import TextGenerationAdapter

if TYPE_CHECKING:
    from mlflow.types.schema import Schema


class LLMAdapter(TaskAdapter):
    """An ``llm/v1`` task over a native one (``native_task``)."""

    native_task: ClassVar[str]
    request_model: ClassVar[type[BaseModel]]

    @classmethod
    def default_signature(cls, model_config: Mapping[str, Any] | None = None) -> Any:
        from mlflow.models.signature import ModelSignature

        return ModelSignature(inputs=cls.input_schema(), outputs=cls.output_schema())

    def predict(self, data: Any, params: Mapping[str, Any] | None = None) -> Any:
        requests = self.parse_requests(data, params)
        responses = self.respond(requests)
        # One request answers with one object (MLflow may hand a dict over as a one-row
        # frame); several rows answer with a list.
        return responses[0] if len(responses) == 1 else responses

    def predict_stream(
        self, data: Any, params: Mapping[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield OpenAI stream chunks (dicts) for one request."""
        requests = self.parse_requests(data, params)
        if len(requests) != 1:
            raise InvalidInputError(f"Streaming takes one request, got {len(requests)}.")
        for chunk in self.stream(requests[0]):
            yield chunk.model_dump(exclude_none=True)

    def parse_requests(self, data: Any, params: Mapping[str, Any] | None) -> list[Any]:
        """Validate each request; ``params`` fill fields a request leaves unset."""
        records = [data] if isinstance(data, Mapping) else data
        if not isinstance(records, list) or not records:
            raise InvalidInputError(
                f"Expected an OpenAI request object (or a list of them), got {type(data).__name__}."
            )
        for index, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise InvalidInputError(
                    f"Request {index} must be an OpenAI request object, got "
                    f"{type(record).__name__}.",
                    param=str(index),
                )
        overrides = {k: v for k, v in (params or {}).items() if v is not None}
        return [
            parse_request(self.request_model, {**overrides, **_present(record)})
            for record in records
        ]

    def response_model_name(self, request: Any) -> str:
        """The ``model`` field of responses: what the request named, else the model's name."""
        return request.model or self.model_name

    def respond(self, requests: list[Any]) -> list[dict[str, Any]]:
        """Answer validated requests; subclasses batch them."""
        raise NotImplementedError

    def stream(self, request: Any) -> Iterator[BaseModel]:
        raise InvalidInputError(f"Task '{self.task}' does not stream.", param="stream")

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> Any:  # pragma: no cover - unused
        raise NotImplementedError


def _present(record: Any) -> Any:
    """Drop the missing values pandas fills in (None/NaN) for fields a row does not set."""
    if not isinstance(record, Mapping):
        return record
    return {
        k: v
        for k, v in record.items()
        if v is not None and not (isinstance(v, float) and math.isnan(v))
    }


class GenerativeAdapter(LLMAdapter):
    """Chat and completions: a causal LM driven by :class:`TextGenerator`."""

    native_task = TextGenerationAdapter.task
    #: What stock ``mlflow.transformers`` records for the same model: the native pipeline's
    #: class, which loads it (the flavor runs it with :class:`TextGenerator`).
    pipeline_class = TextGenerationAdapter.pipeline_class
    model_mappings = TextGenerationAdapter.model_mappings
    auto_model_class = TextGenerationAdapter.auto_model_class
    streamable = True
    generates_text = True

    @classmethod
    def build_runner(cls, components: Components, **task_options: Any) -> TextGenerator:
        return TextGenerator(components["model"], components["tokenizer"])


def extend_schema(schema: Schema, *extra: Any) -> Schema:
    """MLflow's public llm schema plus the fields this flavor also accepts.

    Without ``extra``, the generation fields chat and completions accept beyond MLflow's
    public schemas (MLflow's schema enforcement drops undeclared fields before the model
    sees them), ``logprobs`` as each API has it: chat's (a schema with ``messages``) is a
    flag with ``top_logprobs``, the legacy completions' a count.
    """
    from mlflow.types.schema import AnyType, ColSpec, Object, Property, Schema

    generation_fields = (
        ColSpec("long", "seed", required=False),
        # a JSON schema of any shape: a typed Object would reject most schemas
        ColSpec(AnyType(), "response_format", required=False),
        ColSpec("double", "repetition_penalty", required=False),
        ColSpec(
            Object([Property("include_usage", "boolean", required=False)]),
            "stream_options",
            required=False,
        ),
    )
    logprobs: tuple[ColSpec, ...]
    if any(spec.name == "messages" for spec in schema.inputs):
        logprobs = (
            ColSpec("boolean", "logprobs", required=False),
            ColSpec("long", "top_logprobs", required=False),
        )
    else:
        logprobs = (ColSpec("long", "logprobs", required=False),)
    return Schema([*schema.inputs, *(extra or (*generation_fields, *logprobs))])
