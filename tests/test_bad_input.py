"""Bad input gets a clear error that names the problem and the fix, and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pytest
import transformers

import mlflow_tfx_plugin as tfx
from mlflow_tfx_plugin.errors import (
    CheckpointError,
    InvalidInputError,
    TfxError,
    UnsafeWeightsError,
    UnsupportedTaskError,
)


def _copy(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def _no_config(src: Path, tmp: Path) -> Path:
    return _copy(src, tmp / "ckpt", drop=("config.json",))


def _no_weights(src: Path, tmp: Path) -> Path:
    return _copy(src, tmp / "ckpt", drop=("model.safetensors",))


def _missing_shard(src: Path, tmp: Path) -> Path:
    ckpt = _copy(src, tmp / "ckpt")
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    return ckpt


def _pickle_weights(src: Path, tmp: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    ckpt = _copy(src, tmp / "ckpt")
    torch.save(load_file(ckpt / "model.safetensors"), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    return ckpt


def _not_a_dir(src: Path, tmp: Path) -> Path:
    return tmp / "does-not-exist"


CHECKPOINT_CASES: list[tuple[str, Callable[[Path, Path], Path], dict[str, Any], type, str]] = [
    ("no config.json", _no_config, {}, CheckpointError, "has no config.json"),
    ("no weights", _no_weights, {}, CheckpointError, "no weight files"),
    ("missing shard", _missing_shard, {}, CheckpointError, "missing weight shards"),
    ("pickle weights", _pickle_weights, {}, UnsafeWeightsError, "convert_pickle_weights=True"),
    ("not a directory", _not_a_dir, {}, CheckpointError, "not a local directory"),
    (
        "task the model cannot do",
        lambda src, tmp: src,
        {"task": "fill-mask"},
        UnsupportedTaskError,
        "cannot perform task 'fill-mask'.*text-generation",
    ),
    (
        "unsupported task",
        lambda src, tmp: src,
        {"task": "object-detection"},
        UnsupportedTaskError,
        "Supported tasks:",
    ),
    (
        "bad dtype",
        lambda src, tmp: src,
        {"torch_dtype": "float17"},
        InvalidInputError,
        "not a torch dtype",
    ),
    (
        "prompt template without placeholder",
        lambda src, tmp: src,
        {"prompt_template": "Answer: {question}"},
        InvalidInputError,
        "placeholder",
    ),
]


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "match"),
    [case[1:] for case in CHECKPOINT_CASES],
    ids=[case[0] for case in CHECKPOINT_CASES],
)
def test_bad_checkpoint_input_fails_cleanly(
    tiny_gpt2_dir: Path, tmp_path: Path, make: Any, kwargs: dict[str, Any], error: type, match: str
):
    target = tmp_path / "saved"
    with pytest.raises(error, match=match) as excinfo:
        tfx.save_model(make(tiny_gpt2_dir, tmp_path), target, **kwargs)
    assert isinstance(excinfo.value, mlflow.exceptions.MlflowException)
    assert excinfo.value.get_http_status_code() == 400
    assert not target.exists(), "a failed save must leave no half-written model behind"


def test_pickle_weights_convert_when_asked(tiny_gpt2_dir: Path, tmp_path: Path):
    ckpt = _pickle_weights(tiny_gpt2_dir, tmp_path)
    tfx.save_model(ckpt, tmp_path / "saved", convert_pickle_weights=True)

    files = {p.name for p in (tmp_path / "saved" / "model").iterdir()}
    assert "model.safetensors" in files
    assert "pytorch_model.bin" not in files
    pipe = tfx.load_model(str(tmp_path / "saved"))
    reference = transformers.pipeline("text-generation", model=str(tiny_gpt2_dir))
    kwargs = {"max_new_tokens": 3, "do_sample": False}
    assert pipe("Hello", **kwargs) == reference("Hello", **kwargs)


def test_failure_after_writing_started_removes_directory(
    tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    pipe = transformers.pipeline("text-generation", model=str(tiny_gpt2_dir))
    target = tmp_path / "saved"

    def disk_full(path: Path, *args: Any) -> None:  # a full disk cannot be made here: simulated
        assert (path / "model" / "model.safetensors").is_file(), "the weights were written"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mlflow_tfx_plugin.saving._write_environment", disk_full)
    with pytest.raises(OSError, match="No space left"):
        tfx.save_model(pipe, target)
    assert not target.exists()


def test_conda_env_path_that_does_not_exist_is_named(tiny_gpt2_dir: Path, tmp_path: Path):
    with pytest.raises(InvalidInputError, match="conda_env") as info:
        tfx.save_model(tiny_gpt2_dir, tmp_path / "saved", conda_env=str(tmp_path / "env.yaml"))
    assert info.value.param == "conda_env"
    assert not (tmp_path / "saved").exists()


@pytest.fixture(scope="module")
def gpt2_model_path(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    target = tmp_path_factory.mktemp("pyfunc") / "model"
    tfx.save_model(tiny_gpt2_dir, target, model_config={"max_new_tokens": 2})
    return str(target)


@pytest.fixture(scope="module")
def gpt2_pyfunc(gpt2_model_path: str) -> Any:
    return mlflow.pyfunc.load_model(gpt2_model_path)


@pytest.fixture(scope="module")
def gpt2_predictor(gpt2_model_path: str) -> Any:
    """The flavor's own predictor, behind MLflow's schema enforcement (what the server uses)."""
    return tfx._load_pyfunc(gpt2_model_path)


PREDICT_CASES = [
    ("non-string input", [1, 2], InvalidInputError, "to be a string"),
    ("dict input for text task", {"a": 1, "b": 2}, InvalidInputError, "to be a string"),
    ("empty list", [], InvalidInputError, "non-empty list"),
]


@pytest.mark.parametrize(
    ("data", "error", "match"), [c[1:] for c in PREDICT_CASES], ids=[c[0] for c in PREDICT_CASES]
)
def test_bad_predict_input(
    gpt2_predictor: Any, gpt2_pyfunc: Any, data: Any, error: type, match: str
):
    with pytest.raises(error, match=match):
        gpt2_predictor.predict(data)
    with pytest.raises(mlflow.exceptions.MlflowException):
        gpt2_pyfunc.predict(data)


def test_unknown_param_is_an_error(gpt2_predictor: Any):
    # Through mlflow.pyfunc, MLflow itself drops params the signature does not declare
    # (with a warning) before the model sees them; the flavor's predictor refuses them.
    with pytest.raises(
        InvalidInputError, match=r"Unknown parameter\(s\) \['max_tokenz'\].*max_new_tokens"
    ):
        gpt2_predictor.predict("Hello", params={"max_tokenz": 3})


def test_declared_params_pass_through_pyfunc(gpt2_pyfunc: Any):
    short = gpt2_pyfunc.predict("Hello", params={"max_new_tokens": 1, "do_sample": False})
    longer = gpt2_pyfunc.predict("Hello", params={"max_new_tokens": 6, "do_sample": False})
    assert longer[0].startswith(short[0])
    assert len(longer[0]) > len(short[0])


def test_misspelled_return_type(tiny_gpt2_dir: Path, tmp_path: Path):
    tfx.save_model(tiny_gpt2_dir, tmp_path / "saved")
    with pytest.raises(InvalidInputError, match="return_type must be 'pipeline' or 'components'"):
        tfx.load_model(str(tmp_path / "saved"), return_type="pipline")


def test_unknown_component_key(tiny_gpt2_dir: Path, tmp_path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    with pytest.raises(InvalidInputError, match=r"Unknown component\(s\) \['tokeniser'\]"):
        tfx.save_model({"model": model, "tokeniser": None}, tmp_path / "saved")


def test_component_dict_without_tokenizer(tiny_gpt2_dir: Path, tmp_path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    with pytest.raises(InvalidInputError, match="needs a tokenizer"):
        tfx.save_model({"model": model}, tmp_path / "saved", task="text-generation")


def test_unsupported_object(tmp_path: Path):
    with pytest.raises(InvalidInputError, match="must be a transformers Pipeline"):
        tfx.save_model(42, tmp_path / "saved")


def test_all_errors_share_one_base():
    for error in (CheckpointError, InvalidInputError, UnsafeWeightsError, UnsupportedTaskError):
        assert issubclass(error, TfxError)
        assert issubclass(error, ValueError)


@pytest.mark.parametrize("tied", [True, False])
def test_pickle_weights_with_tied_tensors_convert(tiny_gpt2_dir: Path, tmp_path: Path, tied: bool):
    """torch.save of a tied model keeps wte and lm_head as one tensor, which safetensors
    refuses ("Some tensors share memory"): stored once, as save_pretrained does."""
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    ckpt = _copy(tiny_gpt2_dir, tmp_path / "ckpt", drop=("model.safetensors",))
    torch.save(state, ckpt / "pytorch_model.bin")
    if not tied:  # a config that does not tie them: both names must be stored
        config = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))

    tfx.save_model(ckpt, tmp_path / "saved", convert_pickle_weights=True)

    pipe = tfx.load_model(str(tmp_path / "saved"))
    reference = transformers.pipeline("text-generation", model=str(tiny_gpt2_dir))
    kwargs = {"max_new_tokens": 3, "do_sample": False}
    assert pipe("Hello", **kwargs) == reference("Hello", **kwargs)
    from safetensors import safe_open

    with safe_open(tmp_path / "saved" / "model" / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in set(f.keys())) is not tied
