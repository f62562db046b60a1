"""Task adapters, found by task name.

Each module owns one task family. :data:`ADAPTERS` maps a task name to its adapter;
:func:`infer_task` picks the native task of a model from its architecture.
"""

from __future__ import annotations

import os
from typing import Any

from mlflow_tfx_plugin.errors import UnsupportedTaskError
from mlflow_tfx_plugin.tasks.architectures import mapping_names
from mlflow_tfx_plugin.tasks.audio import AudioClassificationAdapter, SpeechRecognitionAdapter
from mlflow_tfx_plugin.tasks.base import TaskAdapter
from mlflow_tfx_plugin.tasks.chat import ChatAdapter
from mlflow_tfx_plugin.tasks.completions import CompletionsAdapter
from mlflow_tfx_plugin.tasks.embeddings import EmbeddingsAdapter
from mlflow_tfx_plugin.tasks.llm import LLMAdapter
from mlflow_tfx_plugin.tasks.question_answering import QuestionAnsweringAdapter
from mlflow_tfx_plugin.tasks.seq2seq import (
    SummarizationAdapter,
    Text2TextGenerationAdapter,
    TranslationAdapter,
)
from mlflow_tfx_plugin.tasks.text import (
    FeatureExtractionAdapter,
    FillMaskAdapter,
    TableQuestionAnsweringAdapter,
    TextClassificationAdapter,
    TextGenerationAdapter,
    TokenClassificationAdapter,
    ZeroShotClassificationAdapter,
)
from mlflow_tfx_plugin.tasks.vision import ImageClassificationAdapter

ADAPTERS: dict[str, type[TaskAdapter]] = {
    adapter.task: adapter
    for adapter in (
        TextGenerationAdapter,
        Text2TextGenerationAdapter,
        SummarizationAdapter,
        TranslationAdapter,
        QuestionAnsweringAdapter,
        FillMaskAdapter,
        TextClassificationAdapter,
        TokenClassificationAdapter,
        ZeroShotClassificationAdapter,
        FeatureExtractionAdapter,
        TableQuestionAnsweringAdapter,
        SpeechRecognitionAdapter,
        AudioClassificationAdapter,
        ImageClassificationAdapter,
        ChatAdapter,
        CompletionsAdapter,
        EmbeddingsAdapter,
    )
}

#: Aliases transformers accepts for task names.
TASK_ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}

#: Order matters: the first family whose models include the architecture wins
#: (Whisper is also a seq2seq model; a sequence classifier is not zero-shot by default).
_INFERENCE_ORDER = (
    SpeechRecognitionAdapter,
    AudioClassificationAdapter,
    ImageClassificationAdapter,
    TableQuestionAnsweringAdapter,
    QuestionAnsweringAdapter,
    Text2TextGenerationAdapter,
    TextGenerationAdapter,
    TextClassificationAdapter,
    TokenClassificationAdapter,
    FillMaskAdapter,
    FeatureExtractionAdapter,
)


def get_adapter(task: str) -> type[TaskAdapter]:
    """The adapter class for a task name (aliases accepted).

    Raises:
        UnsupportedTaskError: the task is not supported, with the list of supported ones.
    """
    adapter = ADAPTERS.get(TASK_ALIASES.get(task, task))
    if adapter is None:
        message = (
            f"Task '{task}' is not supported by the tfx flavor. Supported tasks: "
            f"{', '.join(sorted(ADAPTERS))}."
        )
        if str(task).startswith("llm/v1/"):  # stock's wording first: callers match on it
            llm_tasks = sorted(name for name in ADAPTERS if name.startswith("llm/v1/"))
            message = (
                f"The task provided is invalid. '{task}' is not a supported LLM inference task. "
                f"Must be one of {llm_tasks}. {message}"
            )
        raise UnsupportedTaskError(message, param="task")
    return adapter


def pipeline(task: str, model: Any, tokenizer: Any = None, **components: Any) -> Any:
    """Build the object that runs ``task``: a transformers pipeline for native tasks, the
    flavor's own runner for tasks transformers 5 removed (``text2text-generation``,
    ``summarization``, ``translation``, ``question-answering``).

    Args:
        task: the task name.
        model: a loaded model, or a local checkpoint path.
        tokenizer: its tokenizer (loaded from ``model`` when it is a path and this is None).
        components: other preprocessors (``feature_extractor``, ``image_processor``, ...).

    Example:
        >>> pipe = tfx.pipeline("text2text-generation", model="./flan-t5")  # doctest: +SKIP
        >>> pipe(["Translate: hello"], max_new_tokens=10)  # doctest: +SKIP
    """
    adapter = get_adapter(task)
    if adapter.pipeline_task is not None:
        return adapter.build_runner({"model": model, "tokenizer": tokenizer, **components})
    if isinstance(model, (str, os.PathLike)):
        import transformers

        tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(str(model))
        model = getattr(transformers, adapter.auto_model_class).from_pretrained(str(model))
    return adapter.build_runner({"model": model, "tokenizer": tokenizer, **components})


def model_can_do(
    adapter: type[TaskAdapter], architecture: str | None, model_type: str | None
) -> bool:
    """Whether a model (by architecture class name and model_type) can run the task."""
    for mapping_name in adapter.model_mappings:
        mapping = mapping_names(mapping_name)
        if mapping_name == "MODEL_MAPPING_NAMES":
            if model_type in mapping:
                return True
            continue
        if architecture in _flatten(mapping.values()):
            return True
    return False


def infer_task(architecture: str | None, model_type: str | None) -> str:
    """The native task for a model architecture, e.g. ``LlamaForCausalLM`` -> text-generation.

    Raises:
        UnsupportedTaskError: no supported task fits; the message asks for ``task=``.
    """
    for adapter in _INFERENCE_ORDER:
        if adapter is not FeatureExtractionAdapter and model_can_do(
            adapter, architecture, model_type
        ):
            return adapter.task
    if (
        architecture
        and architecture.endswith("Model")
        and model_can_do(FeatureExtractionAdapter, architecture, model_type)
    ):
        return FeatureExtractionAdapter.task
    raise UnsupportedTaskError(
        f"Cannot infer a task for architecture '{architecture}' (model_type '{model_type}'). "
        f"Pass `task=` explicitly; supported tasks: {', '.join(sorted(ADAPTERS))}.",
        param="task",
    )


def _flatten(values: object) -> set[str]:
    names: set[str] = set()
    for value in values:  # type: ignore[attr-defined]
        names.update(value if isinstance(value, tuple) else (value,))
    return names


__all__ = [
    "ADAPTERS",
    "LLMAdapter",
    "TaskAdapter",
    "get_adapter",
    "infer_task",
    "model_can_do",
    "pipeline",
]
