"""The contract every task adapter follows, and the input helpers they share.

An adapter knows one task: which models can do it, how to build the object that runs
it from loaded components, how to parse pyfunc input, which call parameters it
accepts, and how to shape the output. It knows nothing about storage.
"""

from __future__ import annotations

import base64
import binascii
import json
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mlflow_tfx_plugin.errors import InvalidInputError

if TYPE_CHECKING:  # imported where signatures are built: log time, never in the server
    import pandas as pd
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, Schema

#: Parameters of ``generate`` accepted at predict time by generation tasks, with the
#: MLflow param type used in signatures.
GENERATION_PARAMS: dict[str, str] = {
    "max_new_tokens": "long",
    "max_length": "long",
    "min_new_tokens": "long",
    "do_sample": "boolean",
    "temperature": "double",
    "top_k": "long",
    "top_p": "double",
    "num_beams": "long",
    "repetition_penalty": "double",
    "no_repeat_ngram_size": "long",
}

#: The smallest value each numeric call parameter may take, and whether it is excluded.
#: transformers accepts some out-of-range values and then fails deep inside ``generate``
#: (``num_beams=0`` divides by zero), so they are checked before the call.
_PARAM_MINIMUM: dict[str, tuple[float, bool]] = {
    "max_new_tokens": (0, True),
    "max_length": (0, True),
    "min_new_tokens": (0, False),
    "temperature": (0, False),
    "top_k": (0, False),
    "top_p": (0, False),
    "num_beams": (0, True),
    "repetition_penalty": (0, True),
    "no_repeat_ngram_size": (0, False),
}
_PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "long": (numbers.Integral,),
    "double": (numbers.Real,),
    "boolean": (bool,),
    "string": (str,),
}

Components = dict[str, Any]


@dataclass
class Runner:
    """Base of the flavor's own pipeline-like runners, for tasks transformers 5 removed.

    Like a transformers pipeline it exposes ``task``, ``model`` and ``tokenizer``, so it
    can be passed to ``log_model`` and is what ``load_model`` returns for these tasks.
    """

    model: Any
    tokenizer: Any
    task: str


class TaskAdapter(ABC):
    """Runs one task over a loaded model: input parsing, the call, output shaping.

    Subclasses set the class attributes and implement :meth:`build_runner` (when the
    task has no transformers pipeline) and :meth:`run`.
    """

    task: ClassVar[str]
    #: transformers pipeline task name, or None when the adapter runs the model itself.
    pipeline_task: ClassVar[str | None] = None
    #: Class name of that pipeline (recorded in MLmodel without importing the pipelines).
    pipeline_class: ClassVar[str | None] = None
    #: The pipeline class stock ``mlflow.transformers`` names for the task where transformers
    #: 5 removed it and the flavor runs a runner of its own (MLmodel's ``instance_type``).
    stock_pipeline_class: ClassVar[str | None] = None
    #: ``transformers.models.auto.modeling_auto`` mappings whose models can do the task.
    model_mappings: ClassVar[tuple[str, ...]] = ()
    #: The Auto class used to load the model for this task.
    auto_model_class: ClassVar[str] = "AutoModel"
    #: Load with ``auto_model_class`` even when the checkpoint names a more specific class
    #: (embeddings need the bare encoder of a ``...ForMaskedLM`` checkpoint).
    load_with_auto_class: ClassVar[bool] = False
    #: Call parameters accepted at predict time, with their MLflow param type.
    call_params: ClassVar[dict[str, str]] = {}
    #: Call parameters taken without a declared type (a value of several types, such as
    #: ``return_timestamps``: True, "word" or "char"), so not in the default signature.
    untyped_params: ClassVar[tuple[str, ...]] = ()
    #: Whether the model needs a tokenizer (or a processor holding one).
    needs_tokenizer: ClassVar[bool] = True
    #: Libraries the task needs beyond transformers and torch, added to the default pip
    #: requirements (audio decoding, images).
    pip_packages: ClassVar[tuple[str, ...]] = ()
    supports_prompt_template: ClassVar[bool] = False
    #: Params used when running an input example at log time only to infer the output
    #: type: generation is capped so logging a large model stays cheap.
    probe_params: ClassVar[dict[str, Any]] = {}
    #: The flavor's own runner class, for tasks without a transformers pipeline.
    runner_class: ClassVar[type[Runner]] = Runner
    #: pyfunc ``predict_stream`` yields chunks (MLmodel's ``streamable``).
    streamable: ClassVar[bool] = False
    #: The model generates text, so a deployment serves it on the OpenAI chat, completions
    #: and embeddings routes.
    generates_text: ClassVar[bool] = False
    #: The model embeds text, so a deployment serves it on the OpenAI embeddings route.
    embeds_text: ClassVar[bool] = False

    def __init__(
        self,
        runner: Any,
        *,
        model_config: Mapping[str, Any] | None = None,
        prompt_template: str | None = None,
        signature_params: Iterable[str] = (),
        model_name: str = "model",
    ) -> None:
        self.runner = runner
        self.model_name = model_name
        self.model_config = dict(model_config or {})
        self.prompt_template = prompt_template
        self.allowed_params = {
            *self.call_params,
            *self.untyped_params,
            *self.model_config,
            *signature_params,
        }

    @classmethod
    def build_runner(cls, components: Components, **task_options: Any) -> Any:
        """Build the callable that runs the task (a transformers pipeline by default).

        ``task_options`` are settings recorded at save time (e.g. embedding pooling).
        """
        import transformers

        build: Any = transformers.pipeline  # its overloads want a literal task name
        return build(cls.pipeline_task, **components)

    @classmethod
    def pipeline_class_name(cls) -> str:
        """The class that runs the task: the transformers pipeline class, or the runner's."""
        return cls.pipeline_class or cls.runner_class.__name__

    @classmethod
    def has_needed_components(cls, components: Mapping[str, Any]) -> bool:
        """Whether ``components`` hold what the task needs besides the model: a tokenizer
        (or a processor holding one), when :attr:`needs_tokenizer`."""
        return not cls.needs_tokenizer or "tokenizer" in components or "processor" in components

    @classmethod
    def read_task_options(cls, checkpoint_dir: Path | None) -> dict[str, Any]:
        """Settings read from the checkpoint at save time and passed to :meth:`build_runner`
        at load time (none by default)."""
        return {}

    @classmethod
    def default_signature(
        cls, model_config: Mapping[str, Any] | None = None
    ) -> ModelSignature | None:
        """The signature used when no input example is given."""
        from mlflow.models.signature import ModelSignature

        params: Any = cls.params_schema(model_config)  # ModelSignature accepts None
        return ModelSignature(inputs=cls.input_schema(), outputs=cls.output_schema(), params=params)

    @classmethod
    def signature_example(cls, example: Any) -> Any:
        """The input example as it is saved and its signature inferred (as given by default).

        Stock ``mlflow.transformers`` re-encodes some examples first (zero-shot labels as a
        JSON string), so that the signature admits its documented REST payloads.
        """
        return example

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Any:
        """pyfunc input that MLflow's schema enforcement turned into a DataFrame, as plain
        Python: one record per row by default."""
        return frame_records(frame)

    @classmethod
    def input_schema(cls) -> Schema:
        """The signature's inputs (a string by default)."""
        return string_schema()

    @classmethod
    def output_schema(cls) -> Schema:
        """The signature's outputs (a string by default)."""
        return string_schema()

    @classmethod
    def params_schema(cls, model_config: Mapping[str, Any] | None = None) -> ParamSchema | None:
        """Predict-time params: the task's call parameters plus the model_config keys."""
        from mlflow.types.schema import ParamSchema, ParamSpec

        specs = {name: ParamSpec(name, dtype, None) for name, dtype in cls.call_params.items()}
        for name, value in (model_config or {}).items():
            dtype, shape = _param_dtype(name, value)
            specs[name] = ParamSpec(name, dtype, value, shape)
        return ParamSchema(list(specs.values())) if specs else None

    def predict(self, data: Any, params: Mapping[str, Any] | None = None) -> Any:
        """Answer one pyfunc call: parse ``data``, run the model, shape the output."""
        call_kwargs = self.resolve_params(params)
        return self.run(data, call_kwargs)

    def resolve_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Merge ``model_config`` defaults with per-call ``params``; unknown keys raise."""
        given = {k: v for k, v in (params or {}).items() if v is not None}
        unknown = sorted(set(given) - self.allowed_params)
        if unknown:
            raise InvalidInputError(
                f"Unknown parameter(s) {unknown} for task '{self.task}'. Valid parameters: "
                f"{sorted(self.allowed_params)}. Add others to `model_config` when logging the "
                "model.",
                param=unknown[0],
            )
        resolved = {**self.model_config, **given}
        for name, value in resolved.items():
            self._check_param(name, value)
        return resolved

    def _check_param(self, name: str, value: Any) -> None:
        """A declared call parameter has its MLflow type and a value the model can take."""
        dtype = self.call_params.get(name)
        types = _PARAM_TYPES.get(dtype or "")
        # bool is an int in Python, but a number param given True is a mistake worth naming.
        if types and (
            not isinstance(value, types) or (dtype != "boolean" and isinstance(value, bool))
        ):
            raise InvalidInputError(
                f"Parameter '{name}' must be of type {dtype}, got {_describe(value)}.", param=name
            )
        minimum, exclusive = _PARAM_MINIMUM.get(name, (None, False))
        if minimum is None or not isinstance(value, (int, float)):
            return
        if value <= minimum if exclusive else value < minimum:
            bound = f"greater than {minimum}" if exclusive else f"at least {minimum}"
            raise InvalidInputError(
                f"Parameter '{name}' must be {bound}, got {value!r}.", param=name
            )
        if name == "top_p" and value > 1:
            raise InvalidInputError(
                f"Parameter 'top_p' must be at most 1, got {value!r}.", param="top_p"
            )

    def apply_prompt_template(self, texts: list[str]) -> list[str]:
        if not self.prompt_template:
            return texts
        return [self.prompt_template.format(prompt=text) for text in texts]

    @abstractmethod
    def run(self, data: Any, call_kwargs: dict[str, Any]) -> Any:
        """Run the task on pyfunc input with the resolved call parameters."""

    def call_runner(self, inputs: Any, call_kwargs: Mapping[str, Any]) -> Any:
        """Call the pipeline or runner with the resolved call parameters.

        transformers reports parameters a model cannot use (a ``model_config`` key that is no
        generation argument, a value ``generate`` refuses) with a ``ValueError``; that is the
        caller's mistake, so it becomes an :class:`InvalidInputError` naming the parameters.
        """
        try:
            return self.runner(inputs, **call_kwargs)
        except ValueError as err:
            if isinstance(err, InvalidInputError) or not call_kwargs:
                raise
            pipeline_class = self.stock_pipeline_class or type(self.runner).__name__
            raise InvalidInputError(  # stock's wording first: callers match on it
                "The params provided to the `predict` method are not valid for pipeline "
                f"{pipeline_class}. The '{self.task}' model rejected the call parameters "
                f"{ {k: call_kwargs[k] for k in sorted(call_kwargs)} }: {err} Pass only "
                "parameters the model's generate() accepts, with valid values.",
                param=next((name for name in sorted(call_kwargs) if name in str(err)), None),
            ) from err


def frame_records(frame: pd.DataFrame) -> list[dict[Any, Any]]:
    """The rows of a DataFrame as records of plain Python values."""
    return [{key: plain(value) for key, value in row.items()} for row in frame.to_dict("records")]


def plain(value: Any) -> Any:
    """A value with NumPy scalars and arrays of strings or objects made plain Python."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "OUS":
        if value.ndim == 0:  # a scalar payload such as REST `{"inputs": "..."}`
            return plain(value.item())
        return [plain(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def string_schema() -> Schema:
    """One unnamed string column."""
    from mlflow.types.schema import ColSpec, Schema

    return Schema([ColSpec("string")])


def column_schema(*columns: tuple[str, str]) -> Schema:
    """Named columns, each given as ``(type, name)``."""
    from mlflow.types.schema import ColSpec, Schema

    return Schema([ColSpec(dtype, name) for dtype, name in columns])


def _param_dtype(name: str, value: Any) -> tuple[str, tuple[int, ...] | None]:
    """The MLflow param type of a ``model_config`` value, and its shape (``(-1,)`` for a list,
    such as the ASR pipeline's ``stride_length_s=[5, 3]``)."""
    if isinstance(value, list) and value:
        types = {_scalar_dtype(name, item) for item in value}
        if len(types) == 1:
            return types.pop(), (-1,)
    elif not isinstance(value, list):
        return _scalar_dtype(name, value), None
    raise InvalidInputError(
        f"model_config['{name}'] = {value!r}: a list value must be non-empty and of one type.",
        param=name,
    )


def _scalar_dtype(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    raise InvalidInputError(
        f"model_config['{name}'] = {value!r} has type {type(value).__name__}; model_config "
        "values must be str, int, float, bool or a list of one of them, so they can be "
        "overridden at predict time.",
        param=name,
    )


def as_text_list(data: Any, *, field: str = "inputs") -> list[str]:
    """Normalize text input to a list of strings.

    Accepts a string, a list of strings, or records (dicts) with exactly one string
    field, as pandas input arrives after the pyfunc boundary.
    """
    if isinstance(data, str):
        return [data]
    if isinstance(data, Mapping):
        return [_single_text(data, field)]
    if isinstance(data, list) and data:
        if len({isinstance(item, str) for item in data}) > 1:
            raise InvalidInputError(  # stock's wording first: callers match on it
                "If supplying a list, all values must be of string type. "
                f"'{field}' mixes strings and other values ({_describe(data)}); send a list of "
                "strings, or a list of records with one string field each.",
                param=field,
            )
        return [_single_text(item, field) for item in data]
    raise InvalidInputError(
        f"Expected a string or a non-empty list of strings for '{field}', got {_describe(data)}.",
        param=field,
    )


def _single_text(item: Any, field: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping) and len(item) == 1:
        value = next(iter(item.values()))
        if isinstance(value, str):
            return value
    stock_phrase = (  # stock's wording first: callers match on it
        ""
        if isinstance(item, Mapping)
        else "Invalid data submission. Ensure all elements in the list are strings or "
        "dictionaries. "
    )
    raise InvalidInputError(
        f"{stock_phrase}Expected each item of '{field}' to be a string, got {_describe(item)}.",
        param=field,
    )


def unwrap_record(item: Any) -> Any:
    """The value of a one-field record (how a single pandas column arrives), else the item."""
    if isinstance(item, Mapping) and len(item) == 1:
        return next(iter(item.values()))
    return item


def as_records(data: Any, *, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Normalize dict-style input (a dict or a list of dicts) and check required keys."""
    records = [dict(data)] if isinstance(data, Mapping) else data
    if not isinstance(records, list) or not records:
        raise InvalidInputError(
            f"Expected a dict (or a list of dicts) with keys {list(required)}, "
            f"got {_describe(data)}.",
            param=required[0],
        )
    for record in records:
        if not isinstance(record, Mapping):
            raise InvalidInputError(
                f"Expected a dict with keys {list(required)}, got {_describe(record)}.",
                param=required[0],
            )
        missing = [key for key in required if record.get(key) is None]
        if missing:
            raise InvalidInputError(
                f"Input is missing required field(s) {missing}; expected keys {list(required)}.",
                param=missing[0],
            )
    return records


def require_string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(
            f"Field '{field}' must be a string, got {_describe(value)}.", param=field
        )
    return value


def maybe_json(value: Any, field: str) -> Any:
    """Decode a JSON-encoded string field (how nested values travel through pandas)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise InvalidInputError(
            f"Field '{field}' must be a JSON object or list, or a string holding one: {err}.",
            param=field,
        ) from err


#: Stock ``mlflow.transformers``' words for a string that is neither a file nor a URI, which
#: callers match on; our messages for a string that is neither a file nor base64 start so.
STOCK_INVALID_STRING_INPUT = (
    "An invalid string input was provided. String inputs to audio or image files must be "
    "either a file location or a uri."
)


def decode_base64(data: str | bytes) -> bytes | None:
    """The bytes that base64 ``data`` encodes, or None when it is not base64.

    Accepts what stock MLflow and transformers accept (``base64.decodebytes``): line breaks
    (``base64.encodebytes`` output) and a ``data:<mime>;base64,`` prefix.
    """
    try:
        raw = data.encode("ascii") if isinstance(data, str) else bytes(data)
    except UnicodeEncodeError:
        return None
    if raw.startswith(b"data:") and b";base64," in raw[:100]:
        raw = raw.split(b",", 1)[1]
    compact = b"".join(raw.split())
    if not compact or len(compact) % 4:
        return None
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _describe(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{type(value).__name__} {text}"
