"""Extractive ``question-answering`` over ``AutoModelForQuestionAnswering``.

transformers 5 removed the pipeline; :class:`ExtractiveQARunner` finds the best
answer span in the context from the start/end logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.tasks.base import (
    Components,
    Runner,
    TaskAdapter,
    as_records,
    as_text_list,
    column_schema,
)

if TYPE_CHECKING:
    from mlflow.types.schema import Schema


@dataclass
class ExtractiveQARunner(Runner):
    """Called as transformers 4's question-answering pipeline was.

    ``runner(question=..., context=...)`` or ``runner({"question": ..., "context": ...})``
    gives ``{"answer", "score", "start", "end"}``; a list of such dicts, or lists of questions
    and contexts, give a list of them.
    """

    task: str = "question-answering"

    def __call__(
        self,
        *inputs: Any,
        question: Any = None,
        context: Any = None,
        max_answer_len: int = 30,
        top_k: int = 1,
    ) -> Any:
        """One answer dict per pair (a list of ``top_k`` of them when ``top_k`` > 1)."""
        pairs, single = _runner_pairs(inputs, question, context)
        answers = [
            best if top_k > 1 else best[0]
            for best in (
                self.answers(q, c, max_answer_len=max_answer_len, top_k=top_k) for q, c in pairs
            )
        ]
        return answers[0] if single else answers

    def answers(
        self, question: str, context: str, *, max_answer_len: int = 30, top_k: int = 1
    ) -> list[dict[str, Any]]:
        """The ``top_k`` best answer spans for one question over one context, best first."""
        import torch

        encoded = self.tokenizer(
            question,
            context,
            return_tensors="pt",
            truncation="only_second",
            return_offsets_mapping=True,
        )
        offsets = encoded.pop("offset_mapping")[0].tolist()
        context_mask = torch.tensor([sid == 1 for sid in encoded.sequence_ids(0)])
        with torch.inference_mode():
            output = self.model(**encoded.to(self.model.device))
        start_logits = output.start_logits[0].float().cpu().masked_fill(~context_mask, -1e9)
        end_logits = output.end_logits[0].float().cpu().masked_fill(~context_mask, -1e9)
        spans = []
        for start, end, score in _best_spans(start_logits, end_logits, max_answer_len, top_k):
            begin, finish = offsets[start][0], offsets[end][1]
            spans.append(
                {"answer": context[begin:finish], "score": score, "start": begin, "end": finish}
            )
        return spans


def _runner_pairs(
    inputs: tuple[Any, ...], question: Any, context: Any
) -> tuple[list[tuple[str, str]], bool]:
    """(question, context) pairs from the ways the pipeline was called, and whether it was one."""
    if len(inputs) > 1 or (inputs and (question is not None or context is not None)):
        raise InvalidInputError(
            "Pass one {'question', 'context'} dict (or a list of them), or question= and "
            "context= keywords.",
            param="inputs",
        )
    if inputs:
        records = as_records(inputs[0], required=("question", "context"))
        single = isinstance(inputs[0], Mapping)
    elif question is None or context is None:
        raise InvalidInputError(
            "Both question= and context= are needed.",
            param="question" if question is None else "context",
        )
    else:
        records = [{"question": question, "context": context}]
        single = isinstance(question, str) and isinstance(context, str)
    pairs = [pair for record in records for pair in _pairs(record)]
    return pairs, single and len(pairs) == 1


def _best_spans(
    start_logits: Any, end_logits: Any, max_answer_len: int, top_k: int
) -> list[tuple[int, int, float]]:
    """The ``top_k`` (start, end) pairs with the highest joint probability, end >= start."""
    import torch

    start_p = torch.softmax(start_logits, dim=-1)
    end_p = torch.softmax(end_logits, dim=-1)
    scores = torch.triu(start_p[:, None] * end_p[None, :])
    scores = torch.tril(scores, diagonal=max_answer_len - 1)
    best = torch.topk(scores.flatten(), k=min(top_k, scores.numel()))
    width = scores.shape[1]
    return [(int(i) // width, int(i) % width, float(v)) for v, i in zip(*best, strict=True)]


class QuestionAnsweringAdapter(TaskAdapter):
    """``question-answering``: ``{"question", "context"}`` (or a list of them; the values may be
    lists) -> one answer per pair, or its ``top_k`` best answers (flattened, as stock does)."""

    task = "question-answering"
    model_mappings = ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",)
    auto_model_class = "AutoModelForQuestionAnswering"
    runner_class = ExtractiveQARunner
    stock_pipeline_class = "QuestionAnsweringPipeline"
    call_params: ClassVar[dict[str, str]] = {"max_answer_len": "long", "top_k": "long"}

    @classmethod
    def input_schema(cls) -> Schema:
        return column_schema(("string", "question"), ("string", "context"))

    @classmethod
    def build_runner(cls, components: Components, **task_options: Any) -> ExtractiveQARunner:
        return ExtractiveQARunner(model=components["model"], tokenizer=components["tokenizer"])

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> list[str]:
        """One answer per (question, context) pair, stripped as stock strips it."""
        records = as_records(data, required=("question", "context"))
        return [
            answer["answer"].strip()
            for record in records
            for question, context in _pairs(record)
            for answer in self.runner.answers(question, context, **call_kwargs)
        ]


def _pairs(record: dict[str, Any]) -> list[tuple[str, str]]:
    """``question``/``context`` as strings or equal-length lists; one context may serve a list
    of questions (as transformers' question-answering pipeline allowed)."""
    questions = as_text_list(record["question"], field="question")
    contexts = as_text_list(record["context"], field="context")
    if len(contexts) == 1:
        contexts = contexts * len(questions)
    if len(questions) != len(contexts):
        raise InvalidInputError(
            f"Got {len(questions)} question(s) and {len(contexts)} contexts; send one question "
            "per context (equal-length lists), or several questions with a single context.",
            param="question",
        )
    return list(zip(questions, contexts, strict=True))
