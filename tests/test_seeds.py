"""The saving/loading examples of the MLflow transformers docs (``shared/seeds``), on tiny models.

Each test names the seed section it mirrors. ``gpt2``/``flan-alpaca`` become local tiny
models; ``mlflow.transformers`` becomes ``mlflow_tfx_plugin``. Reference-only logging
(``save_pretrained=False``) and llm/v1 tasks are covered by their own suites.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
import transformers

import mlflow_tfx_plugin as tfx

GREEDY = {"max_new_tokens": 4, "do_sample": False}


def test_tasks_inferred_task_from_pipeline(tiny_gpt2_dir: Path, tracking_uri: str):
    """Seed 000, 'Native Transformers Task Types': the task is inferred from the pipeline."""
    pipeline = transformers.pipeline("text-generation", model=str(tiny_gpt2_dir))
    with mlflow.start_run():
        model_info = tfx.log_model(transformers_model=pipeline, name="model")
    assert model_info.flavors["tfx"]["task"] == "text-generation"


def test_large_models_normal_pipeline_logging(tiny_llama_dir: Path, tracking_uri: str):
    """Seed 002, 'Normal pipeline-based logging'."""
    pipeline = transformers.pipeline(task="text-generation", model=str(tiny_llama_dir))
    with mlflow.start_run():
        info = tfx.log_model(transformers_model=pipeline, name="model")
    assert tfx.load_model(info.model_uri)("Hi", **GREEDY) == pipeline("Hi", **GREEDY)


def test_large_models_memory_efficient_checkpoint_logging(tiny_llama_dir: Path, tracking_uri: str):
    """Seed 002, 'Memory-Efficient Model Logging': a checkpoint path plus task."""
    with mlflow.start_run():
        info = tfx.log_model(
            transformers_model=str(tiny_llama_dir), task="text-generation", name="model"
        )
    reference = transformers.pipeline("text-generation", model=str(tiny_llama_dir))
    assert tfx.load_model(info.model_uri)("Hi", **GREEDY) == reference("Hi", **GREEDY)


def test_large_models_wrong_task_fails_at_log_time_not_load_time(
    tiny_llama_dir: Path, tracking_uri: str
):
    """Seed 002 warns an incompatible task fails only at load time; ours fails at log time."""
    with (
        mlflow.start_run(),
        pytest.raises(mlflow.exceptions.MlflowException, match="cannot perform"),
    ):
        tfx.log_model(
            transformers_model=str(tiny_llama_dir), task="text-classification", name="model"
        )


def test_large_models_pipeline_dtype_is_kept(tiny_llama_dir: Path, tracking_uri: str):
    """Seed 002: a pipeline built with a half-precision dtype loads back in that dtype."""
    pipeline = transformers.pipeline(
        "text-generation", model=str(tiny_llama_dir), dtype=torch.float16
    )
    with mlflow.start_run():
        info = tfx.log_model(transformers_model=pipeline, name="model")
    assert info.flavors["tfx"]["torch_dtype"] == "float16"
    assert tfx.load_model(info.model_uri).model.dtype == torch.float16


def test_guide_components_logging(tiny_gpt2_dir: Path, tracking_uri: str):
    """Seed 003, 'Pipelines vs. Component Logging': a dict of components plus task."""
    components = {
        "model": transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir),
        "tokenizer": transformers.AutoTokenizer.from_pretrained(tiny_gpt2_dir),
    }
    with mlflow.start_run():
        info = tfx.log_model(transformers_model=components, task="text-generation", name="model")
    loaded = tfx.load_model(info.model_uri, return_type="components")
    assert type(loaded["model"]).__name__ == "GPT2LMHeadModel"
    assert loaded["tokenizer"].chat_template == components["tokenizer"].chat_template


def test_guide_model_config_and_params(tiny_gpt2_dir: Path, tracking_uri: str):
    """Seed 003, 'Using model_config and Model Signature Params for Inference'."""
    with mlflow.start_run():
        info = tfx.log_model(
            str(tiny_gpt2_dir), name="model", model_config={"max_new_tokens": 2, "do_sample": False}
        )
    model = mlflow.pyfunc.load_model(info.model_uri)
    pipe = transformers.pipeline("text-generation", model=str(tiny_gpt2_dir))

    default = model.predict("Hello")
    overridden = model.predict("Hello", params={"max_new_tokens": 5})
    assert default == [
        pipe("Hello", max_new_tokens=2, do_sample=False, return_full_text=False)[0][
            "generated_text"
        ]
    ]
    assert overridden == [
        pipe("Hello", max_new_tokens=5, do_sample=False, return_full_text=False)[0][
            "generated_text"
        ]
    ]
    params = {spec.name: spec.default for spec in info.signature.params.params}
    assert params["max_new_tokens"] == 2


def test_guide_prompt_template(tiny_gpt2_dir: Path, tracking_uri: str):
    """Seed 003, 'Saving Prompt Templates with Transformer Pipelines'."""
    template = "Answer the question: {prompt}\nAnswer:"
    pipe = transformers.pipeline("text-generation", model=str(tiny_gpt2_dir))
    with mlflow.start_run():
        info = tfx.log_model(pipe, name="model", prompt_template=template, model_config=GREEDY)

    prediction = mlflow.pyfunc.load_model(info.model_uri).predict("Where is Paris?")
    expected = pipe(template.format(prompt="Where is Paris?"), return_full_text=False, **GREEDY)
    assert prediction == [expected[0]["generated_text"]]
    assert mlflow.models.get_model_info(info.model_uri).metadata["prompt_template"] == template


def test_guide_dtype_override_at_load(tiny_gpt2_dir: Path, tracking_uri: str):
    """Seed 003, 'Scale Inference with Overriding Pytorch dtype'."""
    with mlflow.start_run():
        info = tfx.log_model(str(tiny_gpt2_dir), name="model", torch_dtype=torch.bfloat16)
    assert tfx.load_model(info.model_uri).model.dtype == torch.bfloat16
    assert tfx.load_model(info.model_uri, torch_dtype=torch.float32).model.dtype == torch.float32


def test_tutorial_text2text_generation(tiny_t5_dir: Path, tracking_uri: str):
    """Seed 004, the text2text-generation tutorial (transformers 5 has no such pipeline)."""
    task = "text2text-generation"
    generation_pipeline = tfx.pipeline(task=task, model=str(tiny_t5_dir))
    input_example = ["prompt 1", "prompt 2", "prompt 3"]
    parameters = {"max_length": 8, "do_sample": True, "temperature": 0.4}
    signature = mlflow.models.infer_signature(
        input_example,
        tfx.generate_signature_output(generation_pipeline, input_example),
        parameters,
    )
    with mlflow.start_run():
        model_info = tfx.log_model(
            transformers_model=generation_pipeline,
            name="text_generator",
            input_example=input_example,
            signature=signature,
        )

    sentence_generator = mlflow.pyfunc.load_model(model_info.model_uri)
    predictions = sentence_generator.predict(
        data=["Can you help me decide?", "Please tell me a joke about hiking."],
        params={"temperature": 0.7},
    )
    assert len(predictions) == 2
    assert all(isinstance(text, str) for text in predictions)
    assert str(sentence_generator.metadata.get_params_schema().params[0].name) == "max_length"


def test_guide_registered_model_name(tiny_gpt2_dir: Path, tracking_uri: str):
    """log_model(registered_model_name=...) creates a registered model version."""
    with mlflow.start_run():
        info = tfx.log_model(str(tiny_gpt2_dir), name="model", registered_model_name="tiny-gpt2")
    version = mlflow.MlflowClient().get_model_version(
        "tiny-gpt2", str(info.registered_model_version)
    )
    assert version.source == f"models:/{info.model_id}"
    assert tfx.load_model("models:/tiny-gpt2/1")("Hi", **GREEDY)
