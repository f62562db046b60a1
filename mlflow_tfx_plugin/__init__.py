"""mlflow-tfx-plugin: track, register and serve Hugging Face Transformers models with MLflow.

Public API (``import mlflow_tfx_plugin as tfx``): :func:`save_model`, :func:`log_model`,
:func:`load_model`, :func:`persist_pretrained_model`, :func:`generate_signature_output`,
:func:`get_default_pip_requirements`, :func:`get_default_conda_env`, :func:`is_gpu_available`,
:func:`autolog` (the names of ``mlflow.transformers`` user code imports),
:func:`pipeline` (runners for tasks transformers 5 removed) and :data:`FLAVOR_NAME`.
``_load_pyfunc`` is the pyfunc loader MLflow calls.

The names are imported on first use (as ``huggingface_hub`` does), so that the deployment
server, which imports this package's serving modules only, never loads MLflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlflow_tfx_plugin._lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY_ATTRIBUTES = {
    "_load_pyfunc": "mlflow_tfx_plugin.flavor",
    "autolog": "mlflow_tfx_plugin.flavor",
    "generate_signature_output": "mlflow_tfx_plugin.flavor",
    "load_model": "mlflow_tfx_plugin.flavor",
    "log_model": "mlflow_tfx_plugin.flavor",
    "save_model": "mlflow_tfx_plugin.flavor",
    "FLAVOR_NAME": "mlflow_tfx_plugin.flavor_config",
    "persist_pretrained_model": "mlflow_tfx_plugin.persist",
    "get_default_conda_env": "mlflow_tfx_plugin.requirements",
    "get_default_pip_requirements": "mlflow_tfx_plugin.requirements",
    "is_gpu_available": "mlflow_tfx_plugin.loading",
    "pipeline": "mlflow_tfx_plugin.tasks",
}

__all__ = [
    "FLAVOR_NAME",
    "__version__",
    "_load_pyfunc",
    "autolog",
    "generate_signature_output",
    "get_default_conda_env",
    "get_default_pip_requirements",
    "is_gpu_available",
    "load_model",
    "log_model",
    "persist_pretrained_model",
    "pipeline",
    "save_model",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_ATTRIBUTES)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from mlflow_tfx_plugin.flavor import (
        _load_pyfunc,
        autolog,
        generate_signature_output,
        load_model,
        log_model,
        save_model,
    )
    from mlflow_tfx_plugin.flavor_config import FLAVOR_NAME
    from mlflow_tfx_plugin.loading import is_gpu_available
    from mlflow_tfx_plugin.persist import persist_pretrained_model
    from mlflow_tfx_plugin.requirements import get_default_conda_env, get_default_pip_requirements
    from mlflow_tfx_plugin.tasks import pipeline
