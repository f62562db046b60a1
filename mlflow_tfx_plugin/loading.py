"""Read a saved model back: its flavor config, then its components from disk.

Works on models written by this flavor and by stock ``mlflow.transformers``.
Weights load from safetensors (memory-mapped by ``from_pretrained``); remote code
runs only when the caller passes ``trust_remote_code=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME

from mlflow_tfx_plugin import components as comp
from mlflow_tfx_plugin.errors import InvalidInputError, ModelNotFoundError
from mlflow_tfx_plugin.flavor_config import (
    FLAVOR_NAME,
    STOCK_COMPONENTS_DIR,
    STOCK_FLAVOR_NAME,
    FlavorConfig,
)
from mlflow_tfx_plugin.hub import HubReference, load_error
from mlflow_tfx_plugin.tasks import get_adapter


def read_flavor_config(model_path: Path) -> FlavorConfig:
    """The flavor config of a saved model: ``tfx`` if present, else stock ``transformers``."""
    mlmodel_path = model_path / MLMODEL_FILE_NAME
    if not mlmodel_path.is_file():
        raise ModelNotFoundError(f"'{model_path}' is not an MLflow model: it has no MLmodel file.")
    return flavor_config_of(Model.load(str(mlmodel_path)), model_path)


def flavor_config_of(model: Model, model_path: Path | str = "the model") -> FlavorConfig:
    """The flavor config in an already-parsed MLmodel."""
    if FLAVOR_NAME in model.flavors:
        return FlavorConfig.from_dict(model.flavors[FLAVOR_NAME])
    if STOCK_FLAVOR_NAME in model.flavors:
        return FlavorConfig.from_stock_dict(model.flavors[STOCK_FLAVOR_NAME], model.metadata)
    raise InvalidInputError(
        f"The model at '{model_path}' has neither a '{FLAVOR_NAME}' nor a '{STOCK_FLAVOR_NAME}' "
        f"flavor (it has: {', '.join(model.flavors)}). Load it with its own flavor.",
        param="model_uri",
    )


def load_components(
    model_path: Path,
    config: FlavorConfig,
    *,
    device: Any = None,
    torch_dtype: Any = None,
    **from_pretrained_kwargs: Any,
) -> dict[str, Any]:
    """Load the model (with its PEFT adapter) and preprocessors of a saved model."""
    trust_remote_code = bool(from_pretrained_kwargs.pop("trust_remote_code", False))
    model = _load_model(
        _weights_location(model_path, config),
        config,
        device=device,
        torch_dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        **from_pretrained_kwargs,
    )
    if config.peft_adapter_dir:
        model = _attach_peft_adapter(model, model_path / config.peft_adapter_dir)
    return {comp.MODEL: model, **_load_preprocessors(model_path, config, trust_remote_code)}


def _weights_location(model_path: Path, config: FlavorConfig) -> str | Path:
    """The saved checkpoint, or for a reference-only model its repo id (pinned by _load_model)."""
    if not config.reference_only:
        return model_path / config.model_dir
    if not config.source_model_name or not config.source_model_revision:
        raise ModelNotFoundError(
            f"The model at '{model_path}' was logged without weights and without the commit "
            "they came from, so they cannot be fetched reproducibly. Log it again."
        )
    return config.source_model_name


def _load_model(
    model_dir: str | Path,
    config: FlavorConfig,
    *,
    device: Any,
    torch_dtype: Any,
    trust_remote_code: bool,
    **kwargs: Any,
) -> Any:
    adapter = get_adapter(config.adapter_task)
    class_name = "" if adapter.load_with_auto_class else config.model_class or ""
    model_class = comp.resolve_class(class_name, fallback=adapter.auto_model_class)
    dtype = torch_dtype or config.torch_dtype
    if dtype is not None:
        kwargs["dtype"] = as_torch_dtype(dtype)
    if device is not None and "device_map" not in kwargs:
        kwargs["device_map"] = device
    if config.reference_only:  # never a moving branch: the commit recorded at log time
        kwargs["revision"] = config.source_model_revision
    try:
        return model_class.from_pretrained(
            str(model_dir), trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
        )
    except OSError as err:
        if not config.reference_only:
            raise
        reference = HubReference(str(config.source_model_name), str(config.source_model_revision))
        raise load_error(reference, err) from err


def _load_preprocessors(
    model_path: Path, config: FlavorConfig, trust_remote_code: bool
) -> dict[str, Any]:
    loaded = {}
    for name, class_name in config.components.items():
        directory = _preprocessor_dir(model_path, config, name)
        loaded.update(
            comp.load_preprocessors(
                directory,
                {name: class_name},
                trust_remote_code=trust_remote_code,
                revision=None if isinstance(directory, Path) else config.source_model_revision,
            )
        )
    return comp.unpack_processor(loaded)


def _preprocessor_dir(model_path: Path, config: FlavorConfig, name: str) -> str | Path:
    if not config.is_stock_layout:
        return model_path / config.model_dir
    directory = model_path / STOCK_COMPONENTS_DIR / name
    # Stock reference-only models may keep no component files: fetch them at the commit.
    return directory if directory.is_dir() else str(config.source_model_name)


def _attach_peft_adapter(model: Any, adapter_dir: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir))


def as_torch_dtype(dtype: Any) -> Any:
    """A ``torch.dtype`` from a dtype or its name (``"bfloat16"``, ``"torch.float16"``)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise InvalidInputError(
            f"torch_dtype {dtype!r} is not a torch dtype; use e.g. 'bfloat16' or torch.float16.",
            param="torch_dtype",
        )
    return value
