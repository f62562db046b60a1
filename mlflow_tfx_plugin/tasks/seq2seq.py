"""Sequence-to-sequence generation: ``text2text-generation``, ``summarization``, ``translation``.

transformers 5 removed these pipelines; :class:`Seq2SeqRunner` replaces them with a
small callable over ``AutoModelForSeq2SeqLM`` that keeps their call shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

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

    def __call__(self, texts: list[str], **generate_kwargs: Any) -> list[dict[str, str]]:
        import torch

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
    """``text2text-generation``: a string, a list of strings, or dicts joined as ``key: value``."""

    task = "text2text-generation"
    model_mappings = ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",)
    auto_model_class = "AutoModelForSeq2SeqLM"
    call_params: ClassVar[dict[str, str]] = dict(GENERATION_PARAMS)
    supports_prompt_template = True
    probe_params: ClassVar[dict[str, Any]] = {"max_new_tokens": 8}
    default_input_example = "answer: What is the capital of France?"
    output_key: ClassVar[str] = "generated_text"
    runner_class = Seq2SeqRunner

    @classmethod
    def build_runner(cls, components: Components, **task_options: Any) -> Seq2SeqRunner:
        return Seq2SeqRunner(
            model=components["model"],
            tokenizer=components["tokenizer"],
            task=cls.task,
            output_key=cls.output_key,
        )

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> list[str]:
        texts, _ = as_text_list(_join_dict_input(data))
        outputs = self.runner(self.apply_prompt_template(texts), **call_kwargs)
        return [output[self.output_key] for output in outputs]


class SummarizationAdapter(Text2TextGenerationAdapter):
    task = "summarization"
    default_input_example = "MLflow is an open source platform for the machine learning lifecycle."
    output_key = "summary_text"


class TranslationAdapter(Text2TextGenerationAdapter):
    task = "translation"
    default_input_example = "The house is wonderful."
    output_key = "translation_text"


def _join_dict_input(data: Any) -> Any:
    """Stock MLflow joins dict input for text2text as ``"key: value key: value"``."""
    if isinstance(data, Mapping) and len(data) > 1:
        return " ".join(f"{key}: {value}" for key, value in data.items())
    if isinstance(data, list):
        return [_join_dict_input(item) for item in data]
    return data
