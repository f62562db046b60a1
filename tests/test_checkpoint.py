"""Checkpoint-path logging: no weights loaded, files copied or hard-linked, manifest exact."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import mlflow
import pytest
import transformers

import mlflow_tfx_plugin as tfx
from mlflow_tfx_plugin.checkpoint import copy_checkpoint, inspect_checkpoint


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_inspect_reads_config_without_weights(tiny_llama_dir: Path):
    info = inspect_checkpoint(tiny_llama_dir)
    assert info.architecture == "LlamaForCausalLM"
    assert info.model_type == "llama"
    assert info.weight_files == ("model.safetensors",)
    assert info.has_tokenizer


@pytest.mark.parametrize("hardlink", [True, False])
def test_copy_builds_exact_manifest(tiny_llama_dir: Path, tmp_path: Path, hardlink: bool):
    manifest = copy_checkpoint(
        inspect_checkpoint(tiny_llama_dir), tmp_path / "out", hardlink=hardlink
    )

    [entry] = manifest
    copied = tmp_path / "out" / entry.path
    assert entry.sha256 == _sha256(tiny_llama_dir / entry.path)
    assert entry.size == copied.stat().st_size
    same_inode = os.stat(copied).st_ino == os.stat(tiny_llama_dir / entry.path).st_ino
    assert same_inode is hardlink
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"config.json", "tokenizer.json"}


def test_log_checkpoint_never_loads_weights(tiny_llama_dir: Path, tracking_uri: str, mocker):
    # A unit seam: from_pretrained must not run while logging a checkpoint path.
    spy = mocker.patch.object(
        transformers.PreTrainedModel, "from_pretrained", side_effect=AssertionError
    )

    with mlflow.start_run():
        info = tfx.log_model(str(tiny_llama_dir), name="model")

    spy.assert_not_called()
    conf = info.flavors["tfx"]
    assert conf["task"] == "text-generation"
    assert conf["model_class"] == "LlamaForCausalLM"
    assert conf["pipeline_class"] == "TextGenerationPipeline"
    assert conf["reference_only"] is False
    assert conf["source_model_name"] == str(tiny_llama_dir)
    assert conf["weights"] == [
        {
            "path": "model.safetensors",
            "size": (tiny_llama_dir / "model.safetensors").stat().st_size,
            "sha256": _sha256(tiny_llama_dir / "model.safetensors"),
        }
    ]


def test_saved_model_dir_is_a_plain_hf_checkpoint(tiny_llama_dir: Path, tmp_path: Path):
    tfx.save_model(tiny_llama_dir, tmp_path / "saved")
    model_dir = tmp_path / "saved" / "model"

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template
    assert (model_dir / "generation_config.json").is_file()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any(p.suffix == ".bin" for p in model_dir.iterdir())


def test_save_model_does_not_hardlink_into_a_permanent_dir(tiny_llama_dir: Path, tmp_path: Path):
    tfx.save_model(tiny_llama_dir, tmp_path / "saved")
    saved = tmp_path / "saved" / "model" / "model.safetensors"
    assert os.stat(saved).st_ino != os.stat(tiny_llama_dir / "model.safetensors").st_ino


def test_load_forwards_dtype_and_components(tiny_llama_dir: Path, tmp_path: Path):
    import torch

    tfx.save_model(tiny_llama_dir, tmp_path / "saved", torch_dtype=torch.bfloat16)
    components = tfx.load_model(str(tmp_path / "saved"), return_type="components")
    assert components["model"].dtype == torch.bfloat16
    assert components["task"] == "text-generation"
    assert "tokenizer" in components

    overridden = tfx.load_model(str(tmp_path / "saved"), torch_dtype="float32", device="cpu")
    assert overridden.model.dtype == torch.float32


def test_model_card_and_license_from_checkpoint(tiny_gpt2_dir: Path, tmp_path: Path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_gpt2_dir, ckpt)
    (ckpt / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Tiny GPT-2\nA test model.\n")
    tfx.save_model(ckpt, tmp_path / "saved")

    assert "# Tiny GPT-2" in (tmp_path / "saved" / "model_card.md").read_text()
    assert "apache-2.0" in (tmp_path / "saved" / "LICENSE.txt").read_text()
