"""Sequence-to-sequence generation: ``text2text-generation``, ``summarization``, ``translation``.

transformers 5 removed these pipelines; :class:`Seq2SeqRunner` replaces them with a
small callable over ``AutoModelForSeq2SeqLM`` that keeps their call shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.tasks.base import (
    GENERATION_PARAMS,
    Components,
    Runner,
    TaskAdapter,
    as_text_list,
)


@dataclass
class Seq2SeqRunner(Runner):
    """A pipeline-like callable: ``runner(texts, **generate_kwargs)`` -> list of dicts."""

    output_key: str = "generated_text"

    def __call__(self, texts: str | list[str], **generate_kwargs: Any) -> list[dict[str, str]]:
        """One dict per text; a single string gives a list of one, as the removed pipelines
        did."""
        import torch

        texts = [texts] if isinstance(texts, str) else list(texts)
        prefix = self._task_prefix()
        batch = self.tokenizer(
            [prefix + text for text in texts], return_tensors="pt", padding=True, truncation=True
        ).to(self.model.device)
        with torch.inference_mode():
            output_ids = self.model.generate(**batch, **generate_kwargs)
        texts_out = self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)
        return [{self.output_key: text.strip()} for text in texts_out]

    def _task_prefix(self) -> str:
        specific = getattr(self.model.config, "task_specific_params", None) or {}
        for name, params in specific.items():
            if name.startswith(self.task.split("_")[0]) and params.get("prefix"):
                return str(params["prefix"])
        return ""


class Text2TextGenerationAdapter(TaskAdapter):
    """``text2text-generation``: a string, a list of strings, or dicts of strings joined as
    ``"key: value key: value"`` (stock MLflow's ``_parse_text2text_input``)."""

    task = "text2text-generation"
    model_mappings = ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",)
    auto_model_class = "AutoModelForSeq2SeqLM"
    call_params: ClassVar[dict[str, str]] = dict(GENERATION_PARAMS)
    supports_prompt_template = True
    probe_params: ClassVar[dict[str, Any]] = {"max_new_tokens": 8}
    output_key: ClassVar[str] = "generated_text"
    runner_class = Seq2SeqRunner
    stock_pipeline_class = "Text2TextGenerationPipeline"

    @classmethod
    def build_runner(cls, components: Components, **task_options: Any) -> Seq2SeqRunner:
        return Seq2SeqRunner(
            model=components["model"],
            tokenizer=components["tokenizer"],
            task=cls.task,
            output_key=cls.output_key,
        )

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> list[str]:
        prompts = self.apply_prompt_template(self.parse_texts(data))
        outputs = self.call_runner(prompts, call_kwargs)
        return [output[self.output_key] for output in outputs]

    def parse_texts(self, data: Any) -> list[str]:
        """The prompts in ``data``: dict records become ``"key: value"`` strings."""
        if isinstance(data, Mapping):
            return _record_texts(data)
        if isinstance(data, list) and data and all(isinstance(item, Mapping) for item in data):
            # Value types first, as stock checks them; then our stricter same-keys check.
            texts = [text for record in data for text in _record_texts(record)]
            _check_same_keys(data)
            return texts
        return as_text_list(data)


class SummarizationAdapter(Text2TextGenerationAdapter):
    """``summarization``: a string or a list of strings; a record gives its first field
    (stock MLflow's summarization/translation parsing)."""

    task = "summarization"
    stock_pipeline_class = "SummarizationPipeline"
    output_key = "summary_text"

    def parse_texts(self, data: Any) -> list[str]:
        if isinstance(data, list) and data and all(isinstance(item, Mapping) for item in data):
            return [_first_text(record) for record in data]
        if isinstance(data, Mapping):
            raise InvalidInputError(
                f"The input data is of an incorrect type. {type(data)} is invalid. Must be either "
                f"string or List[str]: '{self.task}' takes a string or a list of strings, got "
                f"the dict {_truncate(data)}; send the text itself, or a list of one-field "
                "records.",
                param="inputs",
            )
        return as_text_list(data)


class TranslationAdapter(SummarizationAdapter):
    task = "translation"
    stock_pipeline_class = "TranslationPipeline"
    supports_prompt_template = False  # as stock: its templating covers summarization only
    output_key = "translation_text"


# Stock mlflow.transformers' wording, which callers (and MLflow's tests) match on.
_STOCK_TEXT2TEXT_TYPE = (
    "An invalid type has been supplied. Please supply a Dict[str, str], str, List[str], or a "
    "List[Dict[str, str]] for a Text2Text Pipeline."
)


def _record_texts(record: Mapping[Any, Any]) -> list[str]:
    """Stock's text2text rule: a record of strings is one ``"key: value ..."`` prompt; a row
    pandas made from plain strings (key ``0``) or an ``inputs`` record gives its values."""
    for key, value in record.items():
        if not isinstance(value, str):
            raise InvalidInputError(
                f"{_STOCK_TEXT2TEXT_TYPE} Field '{key}' of a text2text input must be a string, "
                f"got {type(value).__name__} {_truncate(value)}. Send a dict of strings, a "
                "string, a list of strings or a list of dicts of strings; to send several "
                "prompts, send a list of dicts.",
                param=str(key),
            )
    if not record:
        raise InvalidInputError("Got an empty dict; send a dict of strings.", param="inputs")
    if 0 in record or "inputs" in record or not all(isinstance(key, str) for key in record):
        return list(record.values())
    return [" ".join(f"{key}: {value}" for key, value in record.items())]


def _check_same_keys(records: list[Mapping[Any, Any]]) -> None:
    expected = list(records[0])
    for index, record in enumerate(records[1:], start=1):
        missing = [key for key in expected if key not in record]
        extra = [key for key in record if key not in expected]
        if missing or extra:
            field = (missing or extra)[0]
            raise InvalidInputError(
                f"Record {index} has keys {list(record)} but record 0 has {expected}: field "
                f"'{field}' is missing from one of them. Give every record the same fields.",
                param=str(field),
            )


def _first_text(record: Mapping[Any, Any]) -> str:
    value = next(iter(record.values()), None)
    if not isinstance(value, str):
        raise InvalidInputError(
            f"Expected each record to hold a string, got {_truncate(record)}.", param="inputs"
        )
    return value


def _truncate(value: Any, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
