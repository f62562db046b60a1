"""PEFT: base weights keep the base model's own keys; the adapter is saved apart and reattached."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
import transformers
from safetensors import safe_open

import mlflow_tfx_plugin as tfx

peft = pytest.importorskip("peft")


@pytest.fixture
def lora_pipeline(tiny_gpt2_dir: Path) -> transformers.Pipeline:
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    return transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)


def test_peft_roundtrip(
    lora_pipeline: transformers.Pipeline, tiny_gpt2_dir: Path, tracking_uri: str
):
    kwargs = {"max_new_tokens": 4, "do_sample": False, "return_full_text": False}
    expected = lora_pipeline("Hello world", **kwargs)[0]["generated_text"]

    with mlflow.start_run():
        info = tfx.log_model(lora_pipeline, name="model")

    conf = info.flavors["tfx"]
    assert conf["peft_adapter_dir"] == "peft"
    assert conf["model_class"] == "GPT2LMHeadModel"
    requirements = Path(mlflow.pyfunc.get_model_dependencies(info.model_uri)).read_text()
    assert "peft==" in requirements
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    with safe_open(local / "model" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    with safe_open(tiny_gpt2_dir / "model.safetensors", "pt") as f:
        assert keys == set(f.keys()), "base weights must keep the base model's own keys"
    assert not any("lora" in key for key in keys)
    assert (local / "peft" / "adapter_config.json").is_file()

    loaded = tfx.load_model(info.model_uri)
    assert isinstance(loaded.model, peft.PeftModel)
    assert loaded("Hello world", **kwargs)[0]["generated_text"] == expected
    assert mlflow.pyfunc.load_model(info.model_uri).predict(
        "Hello world", params={"max_new_tokens": 4, "do_sample": False}
    ) == [expected]
