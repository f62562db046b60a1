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
