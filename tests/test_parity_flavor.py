"""Drop-in parity with stock ``mlflow.transformers``: save/log/load arguments, MLmodel
contents, generation parameters and public names.

Where stock works on transformers 5 the same call goes through both flavors and the results
are compared; where it does not, the test asserts stock's documented contract.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import mlflow
import mlflow.transformers
import pytest
import torch
import transformers
import yaml
from huggingface_hub import ModelCard

import mlflow_tfx_plugin as tfx
from mlflow_tfx_plugin.errors import InvalidInputError

GREEDY = {"max_new_tokens": 3, "do_sample": False}
STOCK_REQUIREMENTS = ["transformers"]  # stock's defaults import torchvision (a stock defect)


@pytest.fixture(scope="module")
def gpt2_pipe(tiny_gpt2_dir: Path) -> transformers.Pipeline:
    return transformers.pipeline("text-generation", model=str(tiny_gpt2_dir))


def _mlmodel(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / "MLmodel").read_text())


# -- 11: generation parameters ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "param", "match"),
    [
        ({"num_beams": 0}, "num_beams", "greater than 0"),  # transformers divides by zero
        ({"top_k": -3}, "top_k", "at least 0"),  # transformers accepts it silently
        ({"max_new_tokens": -3}, "max_new_tokens", "greater than 0"),
        ({"top_p": 1.5}, "top_p", "at most 1"),
        ({"max_new_tokens": "lots"}, "max_new_tokens", "type long"),
        ({"do_sample": True, "temperature": 0.0}, "do_sample", "rejected the call parameters"),
    ],
)
def test_invalid_generation_parameter_is_an_invalid_input_error(
    gpt2_pipe: Any, tmp_path: Path, params: dict[str, Any], param: str | None, match: str
):
    tfx.save_model(gpt2_pipe, tmp_path / "m")
    model = tfx._load_pyfunc(str(tmp_path / "m"))

    with pytest.raises(InvalidInputError, match=match) as info:
        model.predict("Hello", {"max_new_tokens": 2, **params})
    assert info.value.param == param
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


def test_seq2seq_generation_parameters_are_checked_too(tiny_t5_dir: Path, tmp_path: Path):
    tfx.save_model(tiny_t5_dir, tmp_path / "m")
    model = tfx._load_pyfunc(str(tmp_path / "m"))

    with pytest.raises(InvalidInputError, match="greater than 0"):
        model.predict("hello", {"num_beams": 0})
    with pytest.raises(InvalidInputError, match="rejected the call parameters"):
        model.predict("hello", {"max_new_tokens": 2, "do_sample": True, "temperature": 0.0})


def test_model_config_key_generate_does_not_take_is_named(gpt2_pipe: Any, tmp_path: Path):
    """transformers' "model_kwargs are not used by the model" ValueError becomes ours."""
    tfx.save_model(gpt2_pipe, tmp_path / "m", model_config={"max_new_tokens": 2, "foo": 1})

    with pytest.raises(InvalidInputError, match=r"rejected the call parameters.*'foo'") as info:
        mlflow.pyfunc.load_model(str(tmp_path / "m")).predict("Hello")
    assert info.value.param == "foo"


def test_stock_model_config_keys_include_prompt_and_collapse_whitespace(
    gpt2_pipe: Any, tmp_path: Path
):
    """Stock's text-generation model_config keys work (they reached generate() before)."""
    config = {**GREEDY, "include_prompt": True, "collapse_whitespace": True}
    mlflow.transformers.save_model(
        gpt2_pipe, tmp_path / "stock", model_config=config, pip_requirements=STOCK_REQUIREMENTS
    )
    tfx.save_model(gpt2_pipe, tmp_path / "ours", model_config=config)

    stock = mlflow.pyfunc.load_model(str(tmp_path / "stock")).predict(["Hello world", "Paris"])
    ours = mlflow.pyfunc.load_model(str(tmp_path / "ours")).predict(["Hello world", "Paris"])
    assert ours == stock
    assert ours[0].startswith("Hello world")

    tfx.save_model(gpt2_pipe, tmp_path / "new-only", model_config={**GREEDY})
    new_text = mlflow.pyfunc.load_model(str(tmp_path / "new-only")).predict("Hello world")
    assert ours[0] == " ".join(("Hello world" + new_text[0]).split())


# -- 12: text-generation input types ---------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [["Hello", {"text": "Hi"}], {"text": ["Hello", "Hi"]}, {"a": "Hello", "b": "Hi"}],
    ids=["str-dict mix", "dict with a list", "dict with two keys"],
)
def test_text_generation_rejects_what_stock_rejects(gpt2_pipe: Any, tmp_path: Path, data: Any):
    tfx.save_model(gpt2_pipe, tmp_path / "m", model_config=GREEDY)
    adapter = tfx._load_pyfunc(str(tmp_path / "m"))  # no schema enforcement: the server's path
    mlflow.transformers.save_model(gpt2_pipe, tmp_path / "s", pip_requirements=STOCK_REQUIREMENTS)
    stock = mlflow.transformers._load_pyfunc(str(tmp_path / "s"))

    with pytest.raises(mlflow.exceptions.MlflowException):
        stock.predict(data)
    with pytest.raises(InvalidInputError, match="inputs"):
        adapter.predict(data)


def test_text_generation_accepts_records_as_stock_does(gpt2_pipe: Any, tmp_path: Path):
    tfx.save_model(gpt2_pipe, tmp_path / "m", model_config=GREEDY)
    model = mlflow.pyfunc.load_model(str(tmp_path / "m"))

    assert model.predict([{"text": "Hello"}, {"text": "Hi"}]) == model.predict(["Hello", "Hi"])
    assert model.predict({"text": "Hello"}) == model.predict("Hello")


# -- 13: metadata task -----------------------------------------------------------------------


@pytest.mark.parametrize("task", [None, "text-generation", "llm/v1/completions"])
def test_metadata_task_that_conflicts_with_task_raises(
    gpt2_pipe: Any, tracking_uri: str, task: str | None
):
    with pytest.raises(mlflow.exceptions.MlflowException) as stock_error:
        mlflow.transformers.log_model(
            gpt2_pipe,
            name="stock",
            task=task,
            metadata={"task": "llm/v1/chat"},
            pip_requirements=STOCK_REQUIREMENTS,
        )
    assert "doesn't match" in stock_error.value.message

    with pytest.raises(InvalidInputError, match=r"metadata\['task'\] is 'llm/v1/chat'") as info:
        tfx.log_model(gpt2_pipe, name="ours", task=task, metadata={"task": "llm/v1/chat"})
    assert info.value.param == "metadata"


def test_metadata_task_that_matches_is_kept(gpt2_pipe: Any, tracking_uri: str):
    info = tfx.log_model(
        gpt2_pipe, name="m", task="llm/v1/chat", metadata={"task": "llm/v1/chat", "owner": "me"}
    )
    assert info.metadata == {"task": "llm/v1/chat", "owner": "me"}


# -- 15, 20: input examples ------------------------------------------------------------------


def test_input_example_with_params_as_stock_takes_it(gpt2_pipe: Any, tracking_uri: str):
    example = ("Hello", {"max_new_tokens": 2, "do_sample": False})
    stock = mlflow.transformers.log_model(
        gpt2_pipe, name="stock", input_example=example, pip_requirements=STOCK_REQUIREMENTS
    )
    ours = tfx.log_model(gpt2_pipe, name="ours", input_example=example)

    for info in (stock, ours):
        params = {spec.name: spec.default for spec in info.signature.params}
        assert params["max_new_tokens"] == 2
        assert params["do_sample"] is False
    assert ours.signature.inputs == stock.signature.inputs
    assert ours.signature.outputs == stock.signature.outputs
    saved = mlflow.models.Model.load(ours.model_uri).load_input_example_params(
        mlflow.artifacts.download_artifacts(ours.model_uri)
    )
    assert saved == example[1]
    # the example's params are the signature's defaults, so a plain call makes 2 tokens
    output = mlflow.pyfunc.load_model(ours.model_uri).predict("Hello")
    assert output == mlflow.pyfunc.load_model(ours.model_uri).predict("Hello", params=example[1])


def test_input_example_that_does_not_run_warns_and_keeps_the_default_signature(
    gpt2_pipe: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.WARNING, logger="mlflow_tfx_plugin.saving"):
        tfx.save_model(gpt2_pipe, tmp_path / "ours", input_example={"prompt": 3})
    mlflow.transformers.save_model(
        gpt2_pipe, tmp_path / "stock", input_example={"prompt": 3}, pip_requirements=["x"]
    )

    assert "did not run through the 'text-generation' model" in caplog.text
    ours = mlflow.models.Model.load(str(tmp_path / "ours")).signature
    stock = mlflow.models.Model.load(str(tmp_path / "stock")).signature
    assert ours.inputs == stock.inputs
    assert ours.outputs == stock.outputs
    assert (tmp_path / "ours" / "input_example.json").is_file()


# -- 16: model cards -------------------------------------------------------------------------

CARD = "---\nlicense: mit\nlanguage: en\ntags:\n- tiny\n---\n# Tiny\nA test model.\n"


def test_model_card_argument_writes_card_text_and_data_as_stock(gpt2_pipe: Any, tmp_path: Path):
    card = ModelCard(CARD)
    mlflow.transformers.save_model(
        gpt2_pipe, tmp_path / "stock", model_card=card, pip_requirements=STOCK_REQUIREMENTS
    )
    tfx.save_model(gpt2_pipe, tmp_path / "ours", model_card=card)

    for name in ("model_card.md", "model_card_data.yaml"):
        assert (tmp_path / "ours" / name).read_text() == (tmp_path / "stock" / name).read_text()
    assert yaml.safe_load((tmp_path / "ours" / "model_card_data.yaml").read_text()) == {
        "license": "mit",
        "language": "en",
        "tags": ["tiny"],
    }
    assert "mit" in (tmp_path / "ours" / "LICENSE.txt").read_text()


def test_checkpoint_readme_becomes_card_text_and_data(tiny_gpt2_dir: Path, tmp_path: Path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_gpt2_dir, checkpoint)
    (checkpoint / "README.md").write_text(CARD)

    tfx.save_model(checkpoint, tmp_path / "ours")

    assert (tmp_path / "ours" / "model_card.md").read_text() == ModelCard(CARD).text
    data = yaml.safe_load((tmp_path / "ours" / "model_card_data.yaml").read_text())
    assert data["license"] == "mit"


def test_model_card_of_the_wrong_type_is_named(gpt2_pipe: Any, tmp_path: Path):
    with pytest.raises(InvalidInputError, match=r"huggingface_hub\.ModelCard") as info:
        tfx.save_model(gpt2_pipe, tmp_path / "m", model_card="# a card")
    assert info.value.param == "model_card"
    assert not (tmp_path / "m").exists()


# -- 17: model_size_bytes --------------------------------------------------------------------


def test_model_size_bytes_is_recorded_like_stock(gpt2_pipe: Any, tiny_gpt2_dir: Path, tmp_path):
    mlflow.transformers.save_model(gpt2_pipe, tmp_path / "stock", pip_requirements=["x"])
    tfx.save_model(gpt2_pipe, tmp_path / "ours")
    tfx.save_model(tiny_gpt2_dir, tmp_path / "checkpoint")

    stock_size = _mlmodel(tmp_path / "stock")["model_size_bytes"]
    for name in ("ours", "checkpoint"):
        size = _mlmodel(tmp_path / name)["model_size_bytes"]
        files = sum(f.stat().st_size for f in (tmp_path / name).rglob("*") if f.name != "MLmodel")
        weights = (tmp_path / name / "model" / "model.safetensors").stat().st_size
        assert weights < size <= files, "counts every file saved before MLmodel"
        assert abs(size - stock_size) < 0.5 * stock_size  # same weights, other small files


# -- 18: devices -----------------------------------------------------------------------------


def test_device_minus_one_is_the_cpu_and_components_carry_the_device(
    gpt2_pipe: Any, tmp_path: Path
):
    tfx.save_model(gpt2_pipe, tmp_path / "m")
    stock = mlflow.transformers.load_model(str(tmp_path / "m"), return_type="components", device=-1)

    pipe = tfx.load_model(str(tmp_path / "m"), device=-1)
    components = tfx.load_model(str(tmp_path / "m"), return_type="components", device=-1)

    assert pipe.device == torch.device("cpu")
    assert set(components) == set(stock) == {"model", "tokenizer", "task", "device"}
    assert components["device"] == stock["device"] == -1
    assert components["model"].device == torch.device("cpu")
    with pytest.raises(InvalidInputError, match=r"-1 .*for the CPU") as info:
        tfx.load_model(str(tmp_path / "m"), device=-2)
    assert info.value.param == "device"


# -- 19: the stock layout of MLflow < 2.4.1 --------------------------------------------------


def test_loads_stock_model_in_the_old_pipeline_layout(gpt2_pipe: Any, tmp_path: Path):
    """Before MLflow 2.4.1 stock saved the model in ``pipeline/`` and wrote no model_binary."""
    old = tmp_path / "old"
    mlflow.transformers.save_model(gpt2_pipe, old, pip_requirements=STOCK_REQUIREMENTS)
    (old / "model").rename(old / "pipeline")
    mlmodel = _mlmodel(old)
    del mlmodel["flavors"]["transformers"]["model_binary"]
    (old / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    expected = gpt2_pipe("Hello", **GREEDY)

    assert mlflow.transformers.load_model(str(old))("Hello", **GREEDY) == expected
    assert tfx.load_model(str(old))("Hello", **GREEDY) == expected
    assert set(tfx.load_model(str(old), return_type="components")) == {"model", "tokenizer", "task"}


# -- 14: PEFT adapters over a local base checkpoint ------------------------------------------

peft = pytest.importorskip("peft")


@pytest.fixture
def lora_components(tiny_gpt2_dir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False)
    return {
        "model": peft.get_peft_model(base, config),
        "tokenizer": transformers.AutoTokenizer.from_pretrained(tiny_gpt2_dir),
    }


def _generate(pipe: Any) -> str:
    return pipe("Hello world", return_full_text=False, **GREEDY)[0]["generated_text"]


def test_peft_base_model_path_saves_the_adapter_only(
    lora_components: dict[str, Any], tiny_gpt2_dir: Path, tmp_path: Path
):
    expected = _generate(transformers.pipeline("text-generation", **lora_components))
    base = tmp_path / "base"
    shutil.copytree(tiny_gpt2_dir, base)

    tfx.save_model(lora_components, tmp_path / "ours", base_model_path=base)
    mlflow.transformers.save_model(
        lora_components,
        tmp_path / "stock",
        task="text-generation",  # stock cannot infer it offline
        base_model_path=base,
        pip_requirements=["x"],
    )

    saved = tmp_path / "ours"
    assert not list(saved.rglob("*.safetensors")) or all(
        "peft" in str(p.relative_to(saved)) for p in saved.rglob("*.safetensors")
    ), "no base weights are saved"
    assert _mlmodel(saved)["flavors"]["tfx"]["local_base_model_path"] == str(base)
    assert _mlmodel(saved)["flavors"]["tfx"]["reference_only"] is False
    for path in (saved, tmp_path / "stock"):  # each flavor loads both models
        assert _generate(tfx.load_model(str(path))) == expected
        assert _generate(mlflow.transformers.load_model(str(path))) == expected
    assert mlflow.pyfunc.load_model(str(saved)).predict("Hello world", params=GREEDY) == [expected]


def test_peft_base_model_path_can_move_at_load_time(
    lora_components: dict[str, Any], tiny_gpt2_dir: Path, tmp_path: Path
):
    expected = _generate(transformers.pipeline("text-generation", **lora_components))
    shutil.copytree(tiny_gpt2_dir, tmp_path / "base")
    tfx.save_model(lora_components, tmp_path / "m", base_model_path=tmp_path / "base")
    (tmp_path / "base").rename(tmp_path / "moved")

    with pytest.raises(InvalidInputError, match="does not exist") as info:
        tfx.load_model(str(tmp_path / "m"))
    assert info.value.param == "base_model_path"
    moved = tfx.load_model(str(tmp_path / "m"), base_model_path=tmp_path / "moved")
    assert _generate(moved) == expected


@pytest.mark.parametrize(
    ("model", "base", "match"),
    [
        ("plain", "base", "only supported for PEFT models"),
        ("lora", "missing", "does not exist"),
        ("lora", "no-config", "has no config.json"),
    ],
)
def test_peft_base_model_path_errors(
    lora_components: dict[str, Any],
    tiny_gpt2_dir: Path,
    tmp_path: Path,
    model: str,
    base: str,
    match: str,
):
    (tmp_path / "no-config").mkdir()
    shutil.copytree(tiny_gpt2_dir, tmp_path / "base")
    components = (
        lora_components
        if model == "lora"
        else {"model": lora_components["model"].get_base_model(), "tokenizer": None}
    )
    components = {k: v for k, v in components.items() if v is not None}
    components.setdefault("tokenizer", lora_components["tokenizer"])

    with pytest.raises(InvalidInputError, match=match) as info:
        tfx.save_model(components, tmp_path / "m", base_model_path=tmp_path / base)
    assert info.value.param == "base_model_path"
    assert not (tmp_path / "m").exists()


def test_base_model_path_on_a_model_with_its_own_weights_is_refused(
    gpt2_pipe: Any, tiny_gpt2_dir: Path, tmp_path: Path
):
    tfx.save_model(gpt2_pipe, tmp_path / "m")
    with pytest.raises(InvalidInputError, match="applies only to PEFT models"):
        tfx.load_model(str(tmp_path / "m"), base_model_path=tiny_gpt2_dir)


# -- 21: public names ------------------------------------------------------------------------

#: Every public function ``mlflow.transformers`` defines (it has no ``__all__``).
STOCK_PUBLIC_API = sorted(
    name
    for name, value in vars(mlflow.transformers).items()
    if not name.startswith("_")
    and callable(value)
    and getattr(value, "__module__", None) == "mlflow.transformers"
)


def test_every_public_stock_function_exists_here():
    assert STOCK_PUBLIC_API == [
        "autolog",
        "generate_signature_output",
        "get_default_conda_env",
        "get_default_pip_requirements",
        "is_gpu_available",
        "load_model",
        "log_model",
        "persist_pretrained_model",
        "save_model",
    ], "stock's public API changed: cover the new names"
    for name in STOCK_PUBLIC_API:
        assert callable(getattr(tfx, name)), name
        assert name in tfx.__all__


def test_get_default_conda_env_and_is_gpu_available(gpt2_pipe: Any):
    env = tfx.get_default_conda_env(gpt2_pipe)
    pip = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict))

    assert set(tfx.get_default_pip_requirements(gpt2_pipe)) <= set(pip)
    assert any(req.startswith("mlflow") for req in pip)
    assert not any("torchvision" in req for req in pip)
    assert tfx.is_gpu_available() is mlflow.transformers.is_gpu_available() is False


def test_autolog_turns_on_mlflow_transformers_autologging():
    from mlflow.utils.autologging_utils import autologging_is_disabled

    try:
        tfx.autolog(disable=False, silent=True)
        assert not autologging_is_disabled("transformers")
        tfx.autolog(disable=True)
        assert autologging_is_disabled("transformers")
    finally:
        mlflow.transformers.autolog(disable=True)
    assert json.dumps(STOCK_PUBLIC_API)


# -- found by MLflow's own transformers tests ------------------------------------------------


def test_question_answering_top_k_answers_per_question(tiny_bert_qa_dir: Path, tmp_path: Path):
    """Stock: top_k=2 over three questions gives six answers."""
    tfx.save_model(tiny_bert_qa_dir, tmp_path / "m")
    model = mlflow.pyfunc.load_model(str(tmp_path / "m"))
    data = {"question": ["Who?", "What?", "Where?"], "context": "Run owns the house in Paris."}

    answers = model.predict(data, params={"top_k": 2})
    best = model.predict(data)
    assert len(answers) == 6 and answers[::2] == best


def test_default_requirements_of_a_peft_model_list_peft(lora_components: dict[str, Any]):
    assert any(r.startswith("peft==") for r in tfx.get_default_pip_requirements(lora_components))
    model = lora_components["model"]
    assert any(r.startswith("peft==") for r in tfx.get_default_pip_requirements(model))


def test_a_license_note_is_written_when_the_model_has_no_license(gpt2_pipe: Any, tmp_path: Path):
    mlflow.transformers.save_model(gpt2_pipe, tmp_path / "stock", pip_requirements=["x"])
    tfx.save_model(gpt2_pipe, tmp_path / "ours")

    assert (tmp_path / "stock" / "LICENSE.txt").is_file()
    assert "license" in (tmp_path / "ours" / "LICENSE.txt").read_text().lower()


def test_the_stock_section_reads_as_stock_writes_it(tiny_bert_qa_dir: Path, tmp_path: Path):
    tfx.save_model(tiny_bert_qa_dir, tmp_path / "m", torch_dtype=torch.float16)
    section = _mlmodel(tmp_path / "m")["flavors"]["transformers"]

    assert section["instance_type"] == "QuestionAnsweringPipeline"
    assert section["framework"] == "pt"
    assert section["torch_dtype"] == "torch.float16"
    assert tfx.load_model(str(tmp_path / "m")).model.dtype == torch.float16


def test_a_model_whose_checkpoint_dir_was_renamed_pipeline_loads(gpt2_pipe: Any, tmp_path: Path):
    """MLflow's own test renames model/ to pipeline/ and drops model_binary (MLflow < 2.4.1)."""
    tfx.save_model(gpt2_pipe, tmp_path / "m", model_config=GREEDY)
    (tmp_path / "m" / "model").rename(tmp_path / "m" / "pipeline")
    mlmodel = _mlmodel(tmp_path / "m")
    mlmodel["flavors"]["transformers"].pop("model_binary")
    (tmp_path / "m" / "MLmodel").write_text(yaml.safe_dump(mlmodel))

    assert mlflow.pyfunc.load_model(str(tmp_path / "m")).predict("Hello")
