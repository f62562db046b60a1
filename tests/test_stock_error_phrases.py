"""Our errors start with the phrase stock ``mlflow.transformers`` raises for the same mistake.

MLflow's own test suite (and users' code) matches on stock's wording with
``pytest.raises(match=...)``; our explanation follows the phrase. Each phrase below is quoted
from stock's source (mlflow/transformers/__init__.py), or, where stock cannot run on
transformers 5 (text2text), from its last wording that MLflow's tests match.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import transformers
from mlflow.exceptions import MlflowException

import mlflow_tfx_plugin as tfx


@pytest.fixture(scope="module")
def gpt2_pipe(tiny_gpt2_dir: Path) -> Any:
    return transformers.pipeline("text-generation", model=str(tiny_gpt2_dir))


def _raises(phrase: str) -> Any:
    return pytest.raises(MlflowException, match=re.escape(phrase))


def test_invalid_component_dict(gpt2_pipe: Any, tmp_path: Path):
    with _raises("Invalid dictionary submitted for 'transformers_model'. The key(s) ['bogus']"):
        tfx.save_model({"model": gpt2_pipe.model, "bogus": 1}, tmp_path / "m")


def test_not_a_pipeline(gpt2_pipe: Any, tmp_path: Path):
    phrase = "The pipeline type submitted is not a valid transformers Pipeline."
    with _raises(phrase):
        tfx.generate_signature_output(gpt2_pipe.model, "hi")
    with _raises(phrase):
        tfx.save_model(42, tmp_path / "m")


@pytest.mark.parametrize(
    "data",
    [
        {"answer": "a", "context": ["not", "a", "string"]},
        [{"answer": ["42"], "context": "life"}, {"unmatched": "keys", "cause": "failure"}],
    ],
)
def test_text2text_invalid_type(tiny_t5_dir: Path, data: Any):
    pipe = tfx.pipeline("text2text-generation", model=str(tiny_t5_dir))
    with _raises("An invalid type has been supplied. Please supply"):
        tfx.generate_signature_output(pipe, data)


def test_fill_mask_dict(tiny_bert_mlm_dir: Path):
    pipe = transformers.pipeline("fill-mask", model=str(tiny_bert_mlm_dir))
    with _raises("The input data is of an incorrect type. <class 'dict'> is invalid."):
        tfx.generate_signature_output(pipe, {"text": "Paris is the [MASK] of France."})


def test_unknown_llm_task(gpt2_pipe: Any, tmp_path: Path):
    with pytest.raises(MlflowException, match=r"The task provided is invalid.*Must be.*chat"):
        tfx.save_model(gpt2_pipe, tmp_path / "m", task="llm/v1/invalid")


def test_llm_task_the_model_cannot_do(tiny_bert_mlm_dir: Path, tmp_path: Path):
    pipe = transformers.pipeline("fill-mask", model=str(tiny_bert_mlm_dir))
    with pytest.raises(MlflowException, match=r"The task provided is invalid.*cannot perform"):
        tfx.save_model(pipe, tmp_path / "m", task="llm/v1/chat")


def test_metadata_task_mismatch(gpt2_pipe: Any, tmp_path: Path):
    with _raises("LLM v1 task type 'llm/v1/chat' is specified in metadata, but"):
        tfx.save_model(gpt2_pipe, tmp_path / "m", metadata={"task": "llm/v1/chat"})


@pytest.mark.parametrize("template", ["{multiple} {placeholders}", "No placeholders", "{}"])
def test_bad_prompt_template(gpt2_pipe: Any, tmp_path: Path, template: str):
    phrase = "Argument `prompt_template` must be a string with a single format arg, 'prompt'."
    with _raises(phrase):
        tfx.save_model(gpt2_pipe, tmp_path / "m", prompt_template=template)


def test_non_string_prompt_template(gpt2_pipe: Any, tmp_path: Path):
    # Was an AttributeError ('int' object has no attribute 'format').
    with _raises("Argument `prompt_template` must be a string, received <class 'int'>"):
        tfx.save_model(gpt2_pipe, tmp_path / "m", prompt_template=1001)


@pytest.mark.parametrize(
    "task", ["text-classification", "translation", "audio-classification", "object-detection"]
)
def test_prompt_template_for_a_task_without_templates(
    tiny_gpt2_dir: Path, tmp_path: Path, task: str
):
    # As stock's test does: the pipeline's task is overwritten, so the model cannot do it;
    # the template is refused first (stock checks it right after building the pipeline).
    pipe = transformers.pipeline("text-generation", model=str(tiny_gpt2_dir))
    pipe.task = task
    with _raises(f"Prompt templating is not supported for the `{task}` task type."):
        tfx.save_model(pipe, tmp_path / "m", prompt_template="Q: {prompt}")


@pytest.mark.parametrize(
    ("model_dir", "task", "pipeline_class"),
    [
        ("tiny_gpt2_dir", "text-generation", "TextGenerationPipeline"),
        # transformers 5 has no text2text pipeline: stock's name for it, not our runner's
        ("tiny_t5_dir", "text2text-generation", "Text2TextGenerationPipeline"),
    ],
)
def test_params_the_pipeline_rejects(
    request: pytest.FixtureRequest, model_dir: str, task: str, pipeline_class: str
):
    pipe = tfx.pipeline(task, model=str(request.getfixturevalue(model_dir)))
    phrase = (
        f"The params provided to the `predict` method are not valid for pipeline {pipeline_class}."
    )
    with _raises(phrase):
        tfx.generate_signature_output(pipe, "Hello", params={"max_new_tokens": 2, "foo": 1})


def test_list_mixing_strings_and_other_values(tiny_bert_mlm_dir: Path):
    pipe = transformers.pipeline("fill-mask", model=str(tiny_bert_mlm_dir))
    with _raises("If supplying a list, all values must be of string type."):
        tfx.generate_signature_output(pipe, ["Paris is the [MASK] of France.", 42])


@pytest.mark.parametrize("data", [[1, 2], [{"text": "Hello"}, 3]])
def test_list_of_neither_strings_nor_dicts(gpt2_pipe: Any, data: list[Any]):
    phrase = "Invalid data submission. Ensure all elements in the list are strings or dictionaries."
    with _raises(phrase):
        tfx.generate_signature_output(gpt2_pipe, data)


@pytest.fixture(scope="module")
def asr_pipe(tiny_whisper_dir: Path) -> Any:
    return transformers.pipeline("automatic-speech-recognition", model=str(tiny_whisper_dir))


def test_audio_string_neither_file_nor_base64(asr_pipe: Any):
    phrase = (
        "An invalid string input was provided. String inputs to audio or image files must be "
        "either a file location or a uri."
    )
    with _raises(phrase):
        tfx.generate_signature_output(asr_pipe, "no/such/file.wav")


@pytest.mark.parametrize("data", [b"\x00\x01 not audio", "bm90IGF1ZGlv"])  # raw; base64
def test_audio_that_does_not_decode(asr_pipe: Any, data: Any):
    phrase = (
        "Failed to process the input audio data. Either the audio file is corrupted or a uri "
        "was passed in without overriding the default model signature."
    )
    with _raises(phrase):
        tfx.generate_signature_output(asr_pipe, data)


def test_image_string_neither_file_nor_base64(tiny_vit_dir: Path):
    pipe = transformers.pipeline("image-classification", model=str(tiny_vit_dir))
    with _raises("An invalid string input was provided. String inputs to audio or image files"):
        tfx.generate_signature_output(pipe, "no/such/image.png")
