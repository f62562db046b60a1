"""Task lookup and inference, and the transformers data the flavor reads without importing it."""

from __future__ import annotations

import pytest

from mlflow_tfx_plugin.errors import UnsupportedTaskError
from mlflow_tfx_plugin.tasks import ADAPTERS, get_adapter, infer_task
from mlflow_tfx_plugin.tasks.architectures import _tables_from_source

INFERRED = [
    ("GPT2LMHeadModel", "gpt2", "text-generation"),
    ("LlamaForCausalLM", "llama", "text-generation"),
    ("T5ForConditionalGeneration", "t5", "text2text-generation"),
    ("WhisperForConditionalGeneration", "whisper", "automatic-speech-recognition"),
    ("BertForSequenceClassification", "bert", "text-classification"),
    ("BertForTokenClassification", "bert", "token-classification"),
    ("BertForMaskedLM", "bert", "fill-mask"),
    ("BertForQuestionAnswering", "bert", "question-answering"),
    ("TapasForQuestionAnswering", "tapas", "table-question-answering"),
    ("ViTForImageClassification", "vit", "image-classification"),
    ("BertModel", "bert", "feature-extraction"),
]


@pytest.mark.parametrize(("architecture", "model_type", "task"), INFERRED)
def test_infer_task(architecture: str, model_type: str, task: str):
    assert infer_task(architecture, model_type) == task


def test_unknown_architecture_asks_for_task():
    with pytest.raises(UnsupportedTaskError, match="Pass `task=` explicitly"):
        infer_task("MadeUpForNothing", "madeup")


def test_aliases_and_unknown_tasks():
    assert get_adapter("sentiment-analysis").task == "text-classification"
    assert get_adapter("ner").task == "token-classification"
    with pytest.raises(UnsupportedTaskError, match=r"Supported tasks: .*text-generation"):
        get_adapter("text-to-everything")


def test_mapping_tables_read_from_source_match_the_imported_module():
    from transformers.models.auto import modeling_auto

    tables = _tables_from_source()
    assert "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES" in tables
    for name, table in tables.items():
        assert table == dict(getattr(modeling_auto, name)), name


#: What MLmodel records as the class that runs each task without a transformers pipeline:
#: the flavor's runner, or for llm/v1 tasks the native pipeline stock mlflow.transformers
#: records for the same model (``instance_type`` of ``save_model(pipe, task="llm/v1/chat")``).
RECORDED_WITHOUT_PIPELINE = {
    "llm/v1/chat": "TextGenerationPipeline",
    "llm/v1/completions": "TextGenerationPipeline",
    "llm/v1/embeddings": "FeatureExtractionPipeline",
    "question-answering": "ExtractiveQARunner",
    "summarization": "Seq2SeqRunner",
    "text2text-generation": "Seq2SeqRunner",
    "translation": "Seq2SeqRunner",
}


@pytest.mark.parametrize("task", sorted(ADAPTERS))
def test_recorded_pipeline_class_is_the_real_one(task: str):
    from transformers.pipelines import SUPPORTED_TASKS

    adapter = ADAPTERS[task]
    if adapter.pipeline_task is None:
        assert adapter.pipeline_class_name() == RECORDED_WITHOUT_PIPELINE[task]
    else:
        assert task not in RECORDED_WITHOUT_PIPELINE
        assert SUPPORTED_TASKS[adapter.pipeline_task]["impl"].endswith(
            "." + adapter.pipeline_class_name()
        )


@pytest.mark.parametrize("task", ["llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"])
def test_llm_tasks_record_their_native_pipeline_class(task: str):
    from transformers.pipelines import SUPPORTED_TASKS

    adapter = ADAPTERS[task]
    native = SUPPORTED_TASKS[adapter.native_task]["impl"]
    assert native.endswith("." + adapter.pipeline_class_name())
