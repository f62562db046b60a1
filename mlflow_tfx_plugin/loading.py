"""Read a saved model back: its flavor config, then its components from disk.

Works on models written by this flavor and by stock ``mlflow.transformers``.
Weights load from safetensors (memory-mapped by ``from_pretrained``); remote code
runs only when the caller passes ``trust_remote_code=True``.

Nothing here imports MLflow: the deployment server loads models through this module
and reads the MLmodel file with PyYAML (see :mod:`mlflow_tfx_plugin.errors`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from mlflow_tfx_plugin import components as comp
from mlflow_tfx_plugin.checkpoint import checked_base_model_path
from mlflow_tfx_plugin.errors import InvalidInputError, ModelNotFoundError
from mlflow_tfx_plugin.flavor_config import (
    FLAVOR_NAME,
    OLD_STOCK_MODEL_DIR,
    PROMPT_TEMPLATE_KEY,
    STOCK_COMPONENTS_DIR,
    STOCK_FLAVOR_NAME,
    FlavorConfig,
)
from mlflow_tfx_plugin.hub import HubReference, load_error
from mlflow_tfx_plugin.tasks import TaskAdapter, get_adapter

MLMODEL_FILE_NAME = "MLmodel"
_PYFUNC_FLAVOR = "python_function"  # mlflow.pyfunc.FLAVOR_NAME
_PYFUNC_MODEL_CONFIG = "config"  # mlflow.pyfunc.MODEL_CONFIG


class HasFlavors(Protocol):
    """An MLmodel: :class:`mlflow.models.Model` or :class:`MLmodelFile`."""

    @property
    def flavors(self) -> dict[str, Any]: ...

    @property
    def metadata(self) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class MLmodelFile:
    """The parts of a saved model's MLmodel file that loading it needs."""

    flavors: dict[str, Any]
    metadata: dict[str, Any] | None
    #: Names of the params in the model's signature.
    signature_params: tuple[str, ...]

    @classmethod
    def read(cls, model_path: Path) -> MLmodelFile:
        path = model_path / MLMODEL_FILE_NAME
        if not path.is_file():
            raise ModelNotFoundError(
                f"'{model_path}' is not an MLflow model: it has no MLmodel file."
            )
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        params = json.loads((content.get("signature") or {}).get("params") or "[]")
        return cls(
            flavors=content.get("flavors") or {},
            metadata=content.get("metadata"),
            signature_params=tuple(spec["name"] for spec in params),
        )

    @property
    def saved_model_config(self) -> dict[str, Any]:
        """The ``model_config`` saved with the model (the pyfunc flavor keeps it)."""
        return self.flavors.get(_PYFUNC_FLAVOR, {}).get(_PYFUNC_MODEL_CONFIG) or {}


def read_flavor_config(model_path: Path) -> FlavorConfig:
    """The flavor config of a saved model: ``tfx`` if present, else stock ``transformers``."""
    return flavor_config_of(MLmodelFile.read(model_path), model_path)


def load_adapter(
    path: str | Path,
    model_config: Mapping[str, Any] | None = None,
    *,
    device: Any = None,
    torch_dtype: Any = None,
) -> TaskAdapter:
    """The task adapter over a saved model's loaded components (pyfunc and the server)."""
    local_path = Path(path)
    mlmodel = MLmodelFile.read(local_path)
    config = flavor_config_of(mlmodel, local_path)
    components = load_components(local_path, config, device=device, torch_dtype=torch_dtype)
    adapter_cls = get_adapter(config.adapter_task)
    # mlflow.pyfunc passes the saved model_config merged with overrides; a direct call
    # (the deployment server) gets the saved one as the base.
    return adapter_cls(
        adapter_cls.build_runner(components, **config.task_options),
        model_config={**mlmodel.saved_model_config, **(model_config or {})},
        prompt_template=(mlmodel.metadata or {}).get(PROMPT_TEMPLATE_KEY),
        signature_params=mlmodel.signature_params,
        model_name=Path(config.source_model_name or "model").name,
    )


def flavor_config_of(model: HasFlavors, model_path: Path | str = "the model") -> FlavorConfig:
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
    base_model_path: str | os.PathLike[str] | None = None,
    **from_pretrained_kwargs: Any,
) -> dict[str, Any]:
    """Load the model (with its PEFT adapter) and preprocessors of a saved model.

    ``base_model_path`` moves the local base checkpoint of a PEFT adapter saved with
    ``base_model_path=`` (e.g. another mount point than at save time).
    """
    trust_remote_code = bool(from_pretrained_kwargs.pop("trust_remote_code", False))
    model = _load_model(
        _weights_location(model_path, config, base_model_path),
        config,
        device=device,
        torch_dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        **from_pretrained_kwargs,
    )
    if config.peft_adapter_dir:
        model = _attach_peft_adapter(model, model_path / config.peft_adapter_dir)
    return {comp.MODEL: model, **_load_preprocessors(model_path, config, trust_remote_code)}


def _weights_location(
    model_path: Path, config: FlavorConfig, base_model_path: str | os.PathLike[str] | None = None
) -> str | Path:
    """The saved checkpoint, the local base checkpoint of a PEFT adapter, or for a
    reference-only model its repo id (pinned by _load_model)."""
    if base_model_path is not None and not config.local_base_model_path:
        raise InvalidInputError(
            "base_model_path applies only to PEFT models saved with base_model_path=; the model "
            f"at '{model_path}' carries its own weights. Drop the argument.",
            param="base_model_path",
        )
    if config.local_base_model_path:
        return checked_base_model_path(base_model_path or config.local_base_model_path)
    if not config.reference_only:
        return saved_model_dir(model_path, config)
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
        kwargs["device_map"] = as_device_map(device)
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
        return saved_model_dir(model_path, config)
    directory = model_path / STOCK_COMPONENTS_DIR / name
    # Stock reference-only models may keep no component files: fetch them at the commit.
    return directory if directory.is_dir() else str(config.source_model_name)


def saved_model_dir(model_path: Path, config: FlavorConfig) -> Path:
    """Where the checkpoint is: ``model_dir``, or ``pipeline/`` where MLflow before 2.4.1
    wrote it (a model whose ``model/`` was renamed so: MLflow's own tests make them)."""
    directory = model_path / config.model_dir
    old = model_path / OLD_STOCK_MODEL_DIR
    return old if not directory.is_dir() and old.is_dir() else directory


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


def as_device_map(device: Any) -> Any:
    """A ``from_pretrained`` device map from a device as pipelines take it.

    transformers pipelines use ``-1`` for the CPU and ``0, 1, ...`` for GPUs; ``device_map``
    takes the GPU numbers and device names but not ``-1``.
    """
    if isinstance(device, str) and device.lstrip("-").isdigit():
        device = int(device)
    if isinstance(device, int) and not isinstance(device, bool):
        if device < -1:
            raise InvalidInputError(
                f"device={device} is not a device: use -1 (or 'cpu') for the CPU, or a GPU "
                "number (0, 1, ...).",
                param="device",
            )
        return "cpu" if device == -1 else device
    return device


#: Environment variable stock ``mlflow.transformers`` reads for the default device.
DEFAULT_DEVICE_ENV = "MLFLOW_DEFAULT_PREDICTION_DEVICE"


def is_gpu_available() -> bool:
    """Whether torch sees a CUDA GPU (as ``mlflow.transformers.is_gpu_available``)."""
    import torch

    return bool(torch.cuda.is_available())


def default_device(device: Any) -> Any:
    """The device to load onto when the caller gave none, as stock chooses it:
    ``$MLFLOW_DEFAULT_PREDICTION_DEVICE``, else GPU 0 when there is one, else the CPU."""
    if device is not None:
        return device
    if value := os.environ.get(DEFAULT_DEVICE_ENV):
        return value
    return 0 if is_gpu_available() else None
