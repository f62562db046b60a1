"""Native text tasks that run through a transformers pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mlflow_tfx_plugin.tasks.base import (
    GENERATION_PARAMS,
    TaskAdapter,
    as_records,
    as_text_list,
    call_runner,
    column_schema,
    maybe_json,
    require_string,
)

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.types.schema import Schema


class TextGenerationAdapter(TaskAdapter):
    """``text-generation``: returns only the generated text, never the prompt."""

    task = "text-generation"
    pipeline_task = "text-generation"
    pipeline_class = "TextGenerationPipeline"
    model_mappings = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",)
    auto_model_class = "AutoModelForCausalLM"
    call_params: ClassVar[dict[str, str]] = {
        **GENERATION_PARAMS,
        "return_full_text": "boolean",
        # stock mlflow.transformers' model_config keys: prompt in the output, whitespace runs
        "include_prompt": "boolean",
        "collapse_whitespace": "boolean",
    }
    supports_prompt_template = True
    probe_params: ClassVar[dict[str, Any]] = {"max_new_tokens": 8}
    default_input_example = "Hello, my name is"

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> list[str]:
        texts, _ = as_text_list(data)
        prompts = self.apply_prompt_template(texts)
        include_prompt = call_kwargs.pop("include_prompt", False)
        collapse_whitespace = call_kwargs.pop("collapse_whitespace", False)
        call_kwargs.setdefault("return_full_text", include_prompt)
        outputs = call_runner(self.runner, prompts, call_kwargs, task=self.task)
        generated = [_first(output)["generated_text"] for output in outputs]
        if collapse_whitespace:
            generated = [" ".join(text.split()) for text in generated]
        return generated


class FillMaskAdapter(TaskAdapter):
    """``fill-mask``: the most likely token for the mask of each input."""

    task = "fill-mask"
    pipeline_task = "fill-mask"
    pipeline_class = "FillMaskPipeline"
    model_mappings = ("MODEL_FOR_MASKED_LM_MAPPING_NAMES",)
    auto_model_class = "AutoModelForMaskedLM"
    call_params: ClassVar[dict[str, str]] = {"top_k": "long"}
    supports_prompt_template = True
    default_input_example = "The capital of France is [MASK]."

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> list[str]:
        texts, _ = as_text_list(data)
        outputs = self.runner(self.apply_prompt_template(texts), **call_kwargs)
        # One input gives a flat list of candidates; several give a list per input.
        outputs = [outputs] if len(texts) == 1 else outputs
        return [_first(output)["token_str"] for output in outputs]


class TextClassificationAdapter(TaskAdapter):
    """``text-classification``: a DataFrame of ``label`` and ``score``, a row per input."""

    task = "text-classification"
    pipeline_task = "text-classification"
    pipeline_class = "TextClassificationPipeline"
    model_mappings = ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",)
    auto_model_class = "AutoModelForSequenceClassification"
    call_params: ClassVar[dict[str, str]] = {"top_k": "long", "function_to_apply": "string"}
    default_input_example = "MLflow makes tracking models easy."

    @classmethod
    def output_schema(cls) -> Schema:
        return column_schema(("string", "label"), ("double", "score"))

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> pd.DataFrame:
        import pandas as pd

        texts, _ = as_text_list(data)
        outputs = self.runner(texts, **call_kwargs)
        rows = [
            row for output in outputs for row in (output if isinstance(output, list) else [output])
        ]
        return pd.DataFrame(rows, columns=["label", "score"])


class TokenClassificationAdapter(TaskAdapter):
    """``token-classification``: the recognized entities of each input, comma-joined."""

    task = "token-classification"
    pipeline_task = "token-classification"
    pipeline_class = "TokenClassificationPipeline"
    model_mappings = ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",)
    auto_model_class = "AutoModelForTokenClassification"
    call_params: ClassVar[dict[str, str]] = {"aggregation_strategy": "string"}
    default_input_example = "Alice lives in Paris."

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> list[str]:
        texts, _ = as_text_list(data)
        outputs = self.runner(texts, **call_kwargs)
        return [",".join(_entity_words(entities)) for entities in outputs]


class ZeroShotClassificationAdapter(TaskAdapter):
    """``zero-shot-classification``: a DataFrame row per (sequence, label) with its score."""

    task = "zero-shot-classification"
    pipeline_task = "zero-shot-classification"
    pipeline_class = "ZeroShotClassificationPipeline"
    model_mappings = ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",)
    auto_model_class = "AutoModelForSequenceClassification"
    call_params: ClassVar[dict[str, str]] = {"multi_label": "boolean"}
    default_input_example: ClassVar[Any] = {
        "sequences": "My phone battery dies in an hour.",
        "candidate_labels": ["hardware", "software"],
        "hypothesis_template": "This example is about {}.",
    }

    @classmethod
    def input_schema(cls) -> Schema:
        from mlflow.types.schema import Array, ColSpec, Schema

        return Schema(
            [
                ColSpec("string", "sequences"),
                ColSpec(Array("string"), "candidate_labels"),
                ColSpec("string", "hypothesis_template", required=False),
            ]
        )

    @classmethod
    def output_schema(cls) -> Schema:
        return column_schema(("string", "sequence"), ("string", "labels"), ("double", "scores"))

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> pd.DataFrame:
        import pandas as pd

        records, _ = as_records(data, required=("sequences", "candidate_labels"))
        rows: list[dict[str, Any]] = []
        for record in records:
            labels = maybe_json(record["candidate_labels"], "candidate_labels")
            labels = [labels] if isinstance(labels, str) else list(labels)
            kwargs = dict(call_kwargs)
            if template := record.get("hypothesis_template"):
                kwargs["hypothesis_template"] = require_string(template, "hypothesis_template")
            sequences, _ = as_text_list(record["sequences"], field="sequences")
            results = self.runner(sequences, candidate_labels=labels, **kwargs)
            for result in results if isinstance(results, list) else [results]:
                rows.extend(
                    {"sequence": result["sequence"], "labels": label, "scores": score}
                    for label, score in zip(result["labels"], result["scores"], strict=True)
                )
        return pd.DataFrame(rows, columns=["sequence", "labels", "scores"])


class FeatureExtractionAdapter(TaskAdapter):
    """``feature-extraction``: per-token hidden states, one array per input."""

    task = "feature-extraction"
    pipeline_task = "feature-extraction"
    pipeline_class = "FeatureExtractionPipeline"
    model_mappings = ("MODEL_MAPPING_NAMES",)
    auto_model_class = "AutoModel"
    supports_prompt_template = True
    default_input_example = "MLflow tracks models."

    @classmethod
    def output_schema(cls) -> Schema:
        from mlflow.types.schema import Schema, TensorSpec

        return Schema([TensorSpec(np.dtype("float64"), (-1, -1))])

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> np.ndarray | list[np.ndarray]:
        """One text gives a (tokens, hidden) array; several give a list of them."""
        texts, _ = as_text_list(data)
        outputs = self.runner(self.apply_prompt_template(texts), **call_kwargs)
        arrays = [np.asarray(output[0], dtype=np.float64) for output in outputs]
        return arrays[0] if len(arrays) == 1 else arrays


class TableQuestionAnsweringAdapter(TaskAdapter):
    """``table-question-answering``: the answer to ``query`` over ``table``."""

    task = "table-question-answering"
    pipeline_task = "table-question-answering"
    pipeline_class = "TableQuestionAnsweringPipeline"
    model_mappings = ("MODEL_FOR_TABLE_QUESTION_ANSWERING_MAPPING_NAMES",)
    auto_model_class = "AutoModelForTableQuestionAnswering"
    default_input_example: ClassVar[Any] = {
        "query": "Which city is in France?",
        "table": '{"city": ["Paris", "Rome"], "country": ["France", "Italy"]}',
    }

    @classmethod
    def input_schema(cls) -> Schema:
        return column_schema(("string", "query"), ("string", "table"))

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> list[str]:
        records, _ = as_records(data, required=("query", "table"))
        answers = []
        for record in records:
            table = maybe_json(record["table"], "table")
            query = require_string(record["query"], "query")
            answers.append(self.runner(table=table, query=query, **call_kwargs)["answer"])
        return answers


def _first(output: Any) -> dict[str, Any]:
    return output[0] if isinstance(output, list) else output


def _entity_words(entities: list[dict[str, Any]]) -> list[str]:
    return [entity["word"] for entity in entities]


__all__ = [
    "FeatureExtractionAdapter",
    "FillMaskAdapter",
    "TableQuestionAnsweringAdapter",
    "TextClassificationAdapter",
    "TextGenerationAdapter",
    "TokenClassificationAdapter",
    "ZeroShotClassificationAdapter",
]
