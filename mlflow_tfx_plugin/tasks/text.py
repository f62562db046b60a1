"""Native text tasks that run through a transformers pipeline."""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.tasks.base import (
    GENERATION_PARAMS,
    TaskAdapter,
    _describe,
    as_records,
    as_text_list,
    column_schema,
    frame_records,
    plain,
    require_string,
    unwrap_record,
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
    generates_text = True

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> list[str]:
        texts = as_text_list(data)
        prompts = self.apply_prompt_template(texts)
        include_prompt = call_kwargs.pop("include_prompt", False)
        collapse_whitespace = call_kwargs.pop("collapse_whitespace", False)
        call_kwargs.setdefault("return_full_text", include_prompt)
        outputs = self.call_runner(prompts, call_kwargs)
        generated = [_first(output)["generated_text"] for output in outputs]
        if collapse_whitespace:
            generated = [" ".join(text.split()) for text in generated]
        return generated


class FillMaskAdapter(TaskAdapter):
    """``fill-mask``: the most likely token for each mask of each input."""

    task = "fill-mask"
    pipeline_task = "fill-mask"
    pipeline_class = "FillMaskPipeline"
    model_mappings = ("MODEL_FOR_MASKED_LM_MAPPING_NAMES",)
    auto_model_class = "AutoModelForMaskedLM"
    call_params: ClassVar[dict[str, str]] = {"top_k": "long"}
    supports_prompt_template = True

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> list[Any]:
        """The top token of each mask, shaped as stock ``mlflow.transformers`` shapes it.

        An input with one mask answers a string, one with several a list of strings (one
        per mask); a single input with several masks answers that flat list.
        """
        if isinstance(data, Mapping):  # stock validates fill-mask input as str or List[str]
            raise InvalidInputError(
                f"The input data is of an incorrect type. {type(data)} is invalid. Must be "
                f"either string or List[str]: got {_describe(data)}; send the text itself "
                "(with its mask token), or a list of texts.",
                param="inputs",
            )
        texts = as_text_list(data)
        prompts = self.apply_prompt_template(texts)
        self._require_mask(texts, prompts)
        outputs = self.call_runner(prompts, call_kwargs)
        # transformers unwraps the outer list when there is a single input.
        outputs = [outputs] if len(prompts) == 1 else outputs
        answers = [_top_tokens(output) for output in outputs]
        if len(answers) == 1 and isinstance(answers[0], list):
            return answers[0]
        return answers

    def _require_mask(self, texts: list[str], prompts: list[str]) -> None:
        """Name the mask token instead of letting transformers raise ``PipelineException``."""
        mask = getattr(getattr(self.runner, "tokenizer", None), "mask_token", None)
        if not mask:
            return
        for text, prompt in zip(texts, prompts, strict=True):
            if mask not in prompt:
                raise InvalidInputError(
                    f"Input {_describe(text)} has no mask token; include {mask!r} where the "
                    f"word to predict goes, e.g. 'Paris is the {mask} of France.'",
                    param="inputs",
                )


class TextClassificationAdapter(TaskAdapter):
    """``text-classification``: a DataFrame of ``label`` and ``score``, a row per input.

    An input is a text or a ``{"text", "text_pair"}`` sentence pair (cross-encoders, NLI).
    """

    task = "text-classification"
    pipeline_task = "text-classification"
    pipeline_class = "TextClassificationPipeline"
    model_mappings = ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",)
    auto_model_class = "AutoModelForSequenceClassification"
    call_params: ClassVar[dict[str, str]] = {"top_k": "long", "function_to_apply": "string"}

    @classmethod
    def output_schema(cls) -> Schema:
        return column_schema(("string", "label"), ("double", "score"))

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> pd.DataFrame:
        import pandas as pd

        inputs = _classification_inputs(data)
        outputs = self.call_runner(inputs, call_kwargs)
        rows = [
            row for output in outputs for row in (output if isinstance(output, list) else [output])
        ]
        return pd.DataFrame(rows, columns=["label", "score"])


class TokenClassificationAdapter(TaskAdapter):
    """``token-classification``: the entity labels found in each input, comma-joined."""

    task = "token-classification"
    pipeline_task = "token-classification"
    pipeline_class = "TokenClassificationPipeline"
    model_mappings = ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",)
    auto_model_class = "AutoModelForTokenClassification"
    call_params: ClassVar[dict[str, str]] = {"aggregation_strategy": "string"}

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> list[str]:
        texts = as_text_list(data)
        outputs = self.call_runner(texts, call_kwargs)
        return [_entity_labels(entities) for entities in outputs]


class ZeroShotClassificationAdapter(TaskAdapter):
    """``zero-shot-classification``: a DataFrame row per (sequence, label) with its score."""

    task = "zero-shot-classification"
    pipeline_task = "zero-shot-classification"
    pipeline_class = "ZeroShotClassificationPipeline"
    model_mappings = ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",)
    auto_model_class = "AutoModelForSequenceClassification"
    call_params: ClassVar[dict[str, str]] = {"multi_label": "boolean"}

    @classmethod
    def input_schema(cls) -> Schema:
        """Stock's string columns: ``candidate_labels`` is a list or a JSON string of one.

        An ``Array`` column would make MLflow's serving reject the JSON string form.
        """
        from mlflow.types.schema import ColSpec, Schema

        return Schema(
            [
                ColSpec("string", "sequences"),
                ColSpec("string", "candidate_labels"),
                ColSpec("string", "hypothesis_template", required=False),
            ]
        )

    @classmethod
    def signature_example(cls, example: Any) -> Any:
        """The example the signature is inferred from: list labels JSON-encoded, as stock does,
        so the inferred ``candidate_labels`` column is a string one too."""
        if isinstance(example, Mapping) and isinstance(example.get("candidate_labels"), list):
            return {**example, "candidate_labels": json.dumps(example["candidate_labels"])}
        return example

    @classmethod
    def output_schema(cls) -> Schema:
        return column_schema(("string", "sequence"), ("string", "labels"), ("double", "scores"))

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> pd.DataFrame:
        import pandas as pd

        rows: list[dict[str, Any]] = []
        for record in _zero_shot_requests(data):
            labels = _candidate_labels(record["candidate_labels"])
            kwargs = dict(call_kwargs)
            template = record.get("hypothesis_template")
            if not _missing(template) and template != "":
                kwargs["hypothesis_template"] = require_string(template, "hypothesis_template")
            sequences = as_text_list(record["sequences"], field="sequences")
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
    embeds_text = True

    @classmethod
    def output_schema(cls) -> Schema:
        from mlflow.types.schema import Schema, TensorSpec

        return Schema([TensorSpec(np.dtype("float64"), (-1, -1))])

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> np.ndarray | list[np.ndarray]:
        """One text gives a (tokens, hidden) array; several give a list of them."""
        texts = as_text_list(data)
        outputs = self.runner(self.apply_prompt_template(texts), **call_kwargs)
        arrays = [np.asarray(output[0], dtype=np.float64) for output in outputs]
        return arrays[0] if len(arrays) == 1 else arrays


class TableQuestionAnsweringAdapter(TaskAdapter):
    """``table-question-answering``: one answer per ``query`` over ``table``."""

    task = "table-question-answering"
    pipeline_task = "table-question-answering"
    pipeline_class = "TableQuestionAnsweringPipeline"
    model_mappings = ("MODEL_FOR_TABLE_QUESTION_ANSWERING_MAPPING_NAMES",)
    auto_model_class = "AutoModelForTableQuestionAnswering"

    @classmethod
    def input_schema(cls) -> Schema:
        return column_schema(("string", "query"), ("string", "table"))

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Any:
        """Undo what MLflow's schema enforcement does to ``{"query": q, "table": {...}}``.

        It builds ``pd.DataFrame(payload)``: a row per table column, the column names in the
        index and ``query`` repeated, so the records would lose the table's shape.
        """
        import pandas as pd

        if isinstance(frame.index, pd.RangeIndex) or set(frame.columns) != {"query", "table"}:
            return frame_records(frame)
        queries = list(dict.fromkeys(plain(frame["query"].tolist())))
        table = {str(column): plain(cells) for column, cells in frame["table"].items()}
        return {"query": queries[0] if len(queries) == 1 else queries, "table": table}

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> list[str]:
        """One answer per query; ``query`` may be a list of questions over the same table."""
        records = as_records(data, required=("query", "table"))
        answers: list[str] = []
        for record in records:
            table = _table(record["table"])
            queries = as_text_list(record["query"], field="query")
            results = self.runner(table=table, query=queries, **call_kwargs)
            # transformers answers a dict for a single query, a list for several.
            for result in results if isinstance(results, list) else [results]:
                answers.append(result["answer"].strip())
        return answers


def _first(output: Any) -> dict[str, Any]:
    return output[0] if isinstance(output, list) else output


def _top_tokens(output: list[Any]) -> str | list[str]:
    """The best token of one input's mask: a string, or a list when it has several masks."""
    if output and isinstance(output[0], list):
        return [candidates[0]["token_str"].strip() for candidates in output]
    return output[0]["token_str"].strip()


def _entity_labels(entities: list[dict[str, Any]]) -> str:
    """The entity labels comma-joined, as stock does: ``entity_group`` once aggregated."""
    if not entities:
        return ""
    key = "entity_group" if "entity_group" in entities[0] else "entity"
    return ",".join(entity[key] for entity in entities)


def _classification_inputs(data: Any) -> list[str | dict[str, str]]:
    """Texts, or ``{"text", "text_pair"}`` sentence pairs (one dict or a list of them)."""
    if isinstance(data, (str, Mapping)):
        return [_classification_item(data)]
    if isinstance(data, list) and data:
        return [_classification_item(item) for item in data]
    raise InvalidInputError(
        "Expected a string, a list of strings, or {'text': ..., 'text_pair': ...} dicts for "
        f"'inputs', got {_describe(data)}.",
        param="inputs",
    )


def _classification_item(item: Any) -> str | dict[str, str]:
    if isinstance(item, Mapping) and ("text_pair" in item or len(item) > 1):
        extra = sorted(str(key) for key in item if key not in ("text", "text_pair"))
        if extra:
            raise InvalidInputError(
                f"Text classification dicts take the keys 'text' and 'text_pair', got extra "
                f"key(s) {extra} in {_describe(item)}.",
                param=extra[0],
            )
        text = require_string(item.get("text"), "text")
        pair = item.get("text_pair")
        if _missing(pair):
            return text
        return {"text": text, "text_pair": require_string(pair, "text_pair")}
    value = unwrap_record(item)
    if isinstance(value, str):
        return value
    raise InvalidInputError(
        "Expected each item of 'inputs' to be a string or a {'text': ..., 'text_pair': ...} "
        f"dict, got {_describe(item)}.",
        param="inputs",
    )


def _zero_shot_requests(data: Any) -> list[dict[str, Any]]:
    """The zero-shot requests in pyfunc input: a dict, or records (a DataFrame's rows)."""
    records = as_records(data, required=("sequences", "candidate_labels"))
    if len(records) > 1 and all(_json_list(r["candidate_labels"]) is None for r in records):
        # MLflow's serving turns {"sequences": s, "candidate_labels": [a, b]} into one row per
        # label; rebuild the request as stock does, from each column's distinct values.
        return [_merge_rows(records)]
    return records


def _merge_rows(records: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key in records[0]:
        values: list[Any] = []
        for record in records:
            value = record.get(key)
            if not _missing(value) and value not in values:
                values.append(value)
        merged[key] = values[0] if len(values) == 1 else values or None
    return merged


def _candidate_labels(value: Any) -> str | list[str]:
    """A list of labels, a JSON string of one, or a comma-separated string (as stock)."""
    labels = _json_list(value) if isinstance(value, str) else value
    if labels is None:
        return value  # the pipeline splits it on commas, as stock relies on
    if isinstance(labels, list) and labels and all(isinstance(label, str) for label in labels):
        return labels
    raise InvalidInputError(
        "Field 'candidate_labels' must be a non-empty list of strings, or a JSON string of "
        f"one, got {_describe(value)}.",
        param="candidate_labels",
    )


def _json_list(value: Any) -> list[Any] | None:
    """The list a JSON string holds, else None."""
    if not isinstance(value, str):
        return value if isinstance(value, list) else None
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        return None
    return decoded if isinstance(decoded, list) else None


def _table(value: Any) -> dict[str, Any]:
    """A table as a dict of columns, from a dict, a JSON string, or MLflow's repr of a dict."""
    table = _decode_table(value) if isinstance(value, str) else value
    if isinstance(table, Mapping) and all(isinstance(cells, list) for cells in table.values()):
        # TAPAS reads every cell as text (numbers too); a number would crash its tokenizer.
        return {str(name): [str(cell) for cell in cells] for name, cells in table.items()}
    if isinstance(table, list) and not any(isinstance(cell, (Mapping, list)) for cell in table):
        raise InvalidInputError(
            f"Field 'table' arrived as one column's cells ({_describe(value)}): MLflow's schema "
            "enforcement splits a dict table into a row per column. Send the table as a JSON "
            "string instead: {'query': ..., 'table': json.dumps(table)}.",
            param="table",
        )
    raise InvalidInputError(
        "Field 'table' must be a dict of columns (name -> list of cells) or a JSON string of "
        f"one, got {_describe(value)}.",
        param="table",
    )


def _decode_table(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    # `mlflow models serve` casts a JSON object sent for a string column to its Python repr.
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as err:
        raise InvalidInputError(
            f"Field 'table' must be a JSON object of columns, got {_describe(text)}.",
            param="table",
        ) from err


def _missing(value: Any) -> bool:
    """None, or the NaN pandas puts in a missing cell."""
    return value is None or (isinstance(value, float) and math.isnan(value))


__all__ = [
    "FeatureExtractionAdapter",
    "FillMaskAdapter",
    "TableQuestionAnsweringAdapter",
    "TextClassificationAdapter",
    "TextGenerationAdapter",
    "TokenClassificationAdapter",
    "ZeroShotClassificationAdapter",
]
