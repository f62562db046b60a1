"""The ``tfx`` MLflow deployment target (entry point ``mlflow.deployments: tfx``).

MLflow's plugin loader requires ``run_local``, ``target_help`` and exactly one
``BaseDeploymentClient`` subclass in this module's namespace; keep it that way.

The three names are imported on first use: the deployment server process imports
``mlflow_tfx_plugin.deployments.listener``, which must not import MLflow through the
client. MLflow's loader finds them all the same (it lists them with ``dir()``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlflow_tfx_plugin._lazy import lazy_attributes

_LAZY_ATTRIBUTES = {
    "TfxDeploymentClient": "mlflow_tfx_plugin.deployments.client",
    "run_local": "mlflow_tfx_plugin.deployments.client",
    "target_help": "mlflow_tfx_plugin.deployments.usage",
}

__all__ = ["TfxDeploymentClient", "run_local", "target_help"]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_ATTRIBUTES)

if TYPE_CHECKING:
    from mlflow_tfx_plugin.deployments.client import TfxDeploymentClient, run_local
    from mlflow_tfx_plugin.deployments.usage import target_help
