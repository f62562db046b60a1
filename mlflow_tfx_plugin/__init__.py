"""mlflow-tfx-plugin: track, register and serve Hugging Face Transformers models with MLflow.

Public API (``import mlflow_tfx_plugin as tfx``): :func:`save_model`, :func:`log_model`,
:func:`load_model`, :func:`persist_pretrained_model`, :func:`generate_signature_output`,
:func:`get_default_pip_requirements`,
:func:`pipeline` (runners for tasks transformers 5 removed) and :data:`FLAVOR_NAME`.
``_load_pyfunc`` is the pyfunc loader MLflow calls.
"""

from mlflow_tfx_plugin.flavor import (
    _load_pyfunc,
    generate_signature_output,
    load_model,
    log_model,
    save_model,
)
from mlflow_tfx_plugin.flavor_config import FLAVOR_NAME
from mlflow_tfx_plugin.persist import persist_pretrained_model
from mlflow_tfx_plugin.requirements import get_default_pip_requirements
from mlflow_tfx_plugin.tasks import pipeline

__version__ = "0.1.0"

__all__ = [
    "FLAVOR_NAME",
    "__version__",
    "_load_pyfunc",
    "generate_signature_output",
    "get_default_pip_requirements",
    "load_model",
    "log_model",
    "persist_pretrained_model",
    "pipeline",
    "save_model",
]
